"""The SDXL adapter and the shared conditioning: what diffusers' pipeline computes, each prompt
encoded once (tiny model)."""

import pytest
import torch

from families import PromptCache, family_of, load_pipeline
from families.sdxl import SDXL
from rlfh.config.schema import ModelConfig


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(ModelConfig(path=tiny_model_dir))


def test_time_ids_are_the_pipelines(pipe):
    ours = SDXL.time_ids(64, 96, torch.float32)
    theirs = pipe._get_add_time_ids(
        (64, 96),
        (0, 0),
        (64, 96),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(ours, theirs)


def test_guided_conditioning_equals_the_pipelines_and_encodes_each_prompt_once(pipe):
    prompts = ["a photo of a person", "two people talking", "a photo of a person"]
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=["blurry"] * 3,
    )
    calls = []

    class Counting(SDXL):
        def encode_prompts(self, pipe, prompts, device):
            calls.append(list(prompts))
            return super().encode_prompts(pipe, prompts, device)

    cache = PromptCache(Counting())
    enc, added = cache.conditioning(pipe, prompts, 64, 64, "cpu", negative_prompt="blurry")
    assert enc.shape == (6, 77, pos.shape[-1]) and added["time_ids"].shape == (6, 6)
    # the encoders' numbers depend on the batch they run in (~1e-6 on CPU): the same rows, not the same bits
    torch.testing.assert_close(enc, torch.cat([neg, pos]), rtol=0, atol=1e-5)
    torch.testing.assert_close(added["text_embeds"], torch.cat([neg_pooled, pooled]), rtol=0, atol=1e-5)
    assert torch.equal(added["time_ids"], SDXL.time_ids(64, 64, enc.dtype).repeat(6, 1))
    cache.conditioning(pipe, prompts[::-1], 64, 64, "cpu", negative_prompt="blurry")
    assert calls == [["a photo of a person", "two people talking"], ["blurry"]]
    cache.clear()
    cache.rows(pipe, ["two people talking"], "cpu")
    assert calls[2:] == [["two people talking"]]


def test_predict_is_the_unets_call(pipe):
    family = family_of(pipe)
    cond = PromptCache(family).conditioning(pipe, ["a photo of a person"] * 2, 64, 64, "cpu")
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added).sample
        assert torch.equal(family.predict(pipe.unet, x, t, cond), want)
