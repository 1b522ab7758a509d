import numpy as np
import pytest
import torch

from rlfh.config.schema import ModelConfig
from families import load_pipeline
from rollouts.sampler import Sampler, seeded_generators
from rollouts.types import SamplerSettings


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(ModelConfig(path=tiny_model_dir))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_equals_stock_diffusers_pipeline(pipe, guidance):
    prompts, seeds = ["a photo of a person", "a man waving his hand", "a photo of a person"], [3, 1, 4]
    settings = SamplerSettings(6, guidance, "blurry", 64, 64)
    ours = Sampler(pipe, "tiny").sample(prompts, seeds, settings)
    kwargs = dict(prompt=prompts, negative_prompt=["blurry"] * 3, num_inference_steps=6, guidance_scale=guidance,
                  height=64, width=64)
    ref_lat = pipe(**kwargs, generator=seeded_generators(seeds), output_type="latent").images
    ref_img = pipe(**kwargs, generator=seeded_generators(seeds), output_type="np").images
    assert ours.latents.shape == (3, 4, 8, 8) and ours.images.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(ours.latents, ref_lat.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ours.images, (ref_img * 255).round().astype(np.uint8))


def test_seeds_are_per_sample(pipe):
    s = Sampler(pipe)
    settings = SamplerSettings(4, 1.0, "", 64, 64)
    a = s.sample(["p", "q"], [7, 8], settings)
    b = s.sample(["q", "p", "p"], [8, 9, 7], settings)
    # a sample depends on its own (prompt, seed) only, not on its batch neighbours
    np.testing.assert_allclose(a.latents[0], b.latents[2], atol=1e-5)
    np.testing.assert_allclose(a.latents[1], b.latents[0], atol=1e-5)
    assert not np.allclose(b.latents[1], b.latents[2])


def test_lora_weights_change_samples_and_version(pipe, tiny_model_dir):
    s = Sampler(load_pipeline(ModelConfig(path=tiny_model_dir)))
    s.add_lora(4, 4, ["to_q", "to_k", "to_v", "to_out.0"])  # merged into the weights (the default)
    settings = SamplerSettings(4, 1.0, "", 64, 64)
    base = s.sample(["p"], [0], settings)
    sd = {}
    for name, m in s.lora.modules.items():  # peft's shapes: A (r, in), B (out, r)
        sd[f"{name}.lora_A.weight"] = torch.full((4, m.weight.shape[1]), 0.05)
        sd[f"{name}.lora_B.weight"] = torch.full((m.weight.shape[0], 4), 0.05)
    s.load_lora(sd, policy_version=3)
    moved = s.sample(["p"], [0], settings)
    assert moved.policy_version == 3 and base.policy_version == 0
    assert np.abs(moved.latents - base.latents).max() > 1e-3


def test_prompt_seed_count_mismatch(pipe):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        Sampler(pipe).sample(["a", "b"], [1], SamplerSettings(2, 1.0, "", 64, 64))
