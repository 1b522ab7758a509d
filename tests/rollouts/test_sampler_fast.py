"""The sampler's speed-ups keep its outputs: the merged LoRA (against peft's unmerged adapter and
against itself over many syncs), the prompt-embedding cache, and torch.compile (slow)."""

import copy

import numpy as np
import pytest
import torch

from families import PromptCache, family_of, load_pipeline
from rlfh.config.schema import ModelConfig
from rollouts.sampler import MergedLora, Sampler
from rollouts.types import RolloutBatch, SamplerSettings

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a photo of a person", "a man waving his hand", "a photo of a person", "two people talking"]

# Merged vs unmerged eps on the tiny model, fp32 CPU, a random rank-8 LoRA that moves eps by ~5e-3:
# measured max |diff| 7.2e-7 at |eps| <= 3.5, i.e. float32 rounding of the two summation orders.
MERGE_EPS_TOL = 5e-6


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(ModelConfig(path=tiny_model_dir))


def random_lora_state(lora: MergedLora, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A peft-format LoRA state (A (r, in), B (out, r)) whose delta moves eps by ~1e-3..1e-2."""
    sd = {}
    for name, m in lora.modules.items():
        out, inp = m.weight.shape
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / inp**0.5
        sd[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.02
    return sd


def test_merged_lora_matches_the_unmerged_peft_adapter(pipe):
    merged = Sampler(copy.deepcopy(pipe))
    merged.add_lora(8, 16, TARGETS)  # alpha != rank: the scale 2 must be applied
    unmerged = Sampler(copy.deepcopy(pipe))
    unmerged.add_lora(8, 16, TARGETS, merge=False)
    sd = random_lora_state(merged.lora, 8, torch.Generator().manual_seed(0))
    merged.load_lora(sd, 1)
    unmerged.load_lora(sd, 1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got, want = merged.denoiser_output(x, 500, PROMPTS[0]), unmerged.denoiser_output(x, 500, PROMPTS[0])
    base = Sampler(pipe).denoiser_output(x, 500, PROMPTS[0])
    assert (want - base).abs().max() > 100 * MERGE_EPS_TOL  # the LoRA matters far above the tolerance
    assert (got - want).abs().max() <= MERGE_EPS_TOL
    settings = SamplerSettings(6, 5.0, "blurry", 64, 64)
    a, b = merged.sample(PROMPTS, [0, 1, 2, 3], settings), unmerged.sample(PROMPTS, [0, 1, 2, 3], settings)
    # 6 steps amplify the eps rounding to ~1e-5 in the latents; a pixel near a rounding edge may flip
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
    # the same weights as peft's own merge of the same state
    for name, m in merged.lora.modules.items():
        peft_layer = unmerged.pipe.unet.get_submodule(name)
        delta = peft_layer.get_delta_weight(peft_layer.active_adapters[0])
        assert torch.equal(m.weight, peft_layer.base_layer.weight + delta)


def test_merge_does_not_drift_over_300_syncs(pipe):
    s = Sampler(copy.deepcopy(pipe))
    s.add_lora(8, 8, TARGETS)
    untargeted = {
        k: v.clone() for k, v in s.pipe.unet.state_dict().items() if k.rsplit(".", 1)[0] not in s.lora.modules
    }
    gen = torch.Generator().manual_seed(2)
    for version in range(1, 301):
        sd = random_lora_state(s.lora, 8, gen)
        s.load_lora(sd, version)
    fresh = Sampler(copy.deepcopy(pipe))
    fresh.add_lora(8, 8, TARGETS)
    fresh.load_lora(sd, 300)
    for name, m in s.lora.modules.items():
        assert torch.equal(m.weight, fresh.lora.modules[name].weight)  # bit-identical to one merge
        # and equal to base + delta computed in float64, within float32 rounding of the weights
        w64 = (
            pipe.unet.get_submodule(name).weight.double()
            + sd[f"{name}.lora_B.weight"].double() @ sd[f"{name}.lora_A.weight"].double()
        )
        assert (m.weight.double() - w64).abs().max() <= 1e-6 * max(1.0, w64.abs().max().item())
    own = s.pipe.unet.state_dict()
    assert all(torch.equal(own[k], v) for k, v in untargeted.items())  # nothing else touched
    assert s.policy_version == 300


def test_merged_lora_refuses_foreign_state_and_full_loads(pipe):
    s = Sampler(copy.deepcopy(pipe))
    s.add_lora(4, 4, TARGETS)
    sd = random_lora_state(s.lora, 4, torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="unexpected keys"):
        s.load_lora({**sd, "conv_in.lora_A.weight": torch.zeros(4, 4)}, 1)
    with pytest.raises(RuntimeError, match="missing keys"):
        s.load_lora(dict(list(sd.items())[1:]), 1)
    assert s.policy_version == 0
    with pytest.raises(RuntimeError, match="full weights"):
        s.load_full([{}], 1)
    with pytest.raises(ValueError, match="matches"):
        Sampler(copy.deepcopy(pipe)).add_lora(4, 4, ["no_such_layer"])


def test_prompt_cache_equals_uncached_and_encodes_each_prompt_once_per_version(pipe):
    settings = SamplerSettings(4, 5.0, "blurry", 64, 64)
    uncached = Sampler(pipe, cache_prompts=False).sample(PROMPTS, [5, 6, 7, 8], settings)
    s = Sampler(pipe)
    calls = []
    encode = pipe.encode_prompt

    def counting(prompt, **kw):
        calls.append(list(prompt))
        return encode(prompt=prompt, **kw)

    s.pipe = copy.copy(pipe)  # a shallow copy: same modules, its own encode_prompt
    s.pipe.encode_prompt = counting
    first = s.sample(PROMPTS, [5, 6, 7, 8], settings)
    again = s.sample(PROMPTS[::-1], [8, 7, 6, 5], settings)
    np.testing.assert_array_equal(first.latents, uncached.latents)
    np.testing.assert_array_equal(first.images, uncached.images)
    np.testing.assert_array_equal(again.latents, first.latents[::-1])
    # each distinct prompt once, the negative once; nothing for the second batch
    assert calls == [["a photo of a person", "a man waving his hand", "two people talking"], ["blurry"]]
    s.policy_version = 1  # a sync: the cache starts over
    s.sample(PROMPTS[:1], [5], settings)
    assert calls[2:] == [["a photo of a person"], ["blurry"]]

    # the batch carries the positive conditioning it was sampled with
    assert set(first.conditioning) == set(PROMPTS)
    enc, added = PromptCache(family_of(pipe), enabled=False).conditioning(pipe, PROMPTS, 64, 64, "cpu")
    for i, p in enumerate(PROMPTS):
        e, pooled = first.conditioning[p]
        assert (
            e.dtype == np.float32
            and e.shape == (77, enc.shape[-1])
            and pooled.shape == (added["text_embeds"].shape[-1],)
        )
        np.testing.assert_allclose(e, enc[i].numpy(), atol=1e-6)
        np.testing.assert_allclose(pooled, added["text_embeds"][i].numpy(), atol=1e-6)
    both = RolloutBatch.concat([first, s.sample(["a new prompt"], [1], settings)])
    assert set(both.conditioning) == set(PROMPTS) | {"a new prompt"}


@pytest.mark.slow
def test_compiled_sampler_matches_eager(pipe):
    """torch.compile of UNet + VAE decoder (inductor, CPU): same images within 1 uint8 level, latents
    within 1e-4; a LoRA loaded after compiling is used without recompiling."""
    settings = SamplerSettings(3, 5.0, "", 64, 64)
    prompts, seeds = PROMPTS[:2], [1, 2]
    eager = Sampler(copy.deepcopy(pipe))
    eager.add_lora(4, 4, TARGETS)
    compiled = Sampler(copy.deepcopy(pipe), compile=True)
    compiled.add_lora(4, 4, TARGETS)
    sd = random_lora_state(eager.lora, 4, torch.Generator().manual_seed(4))
    for version, state in [(0, None), (1, sd)]:
        if state is not None:
            eager.load_lora(state, version)
            compiled.load_lora(state, version)
        a, b = eager.sample(prompts, seeds, settings), compiled.sample(prompts, seeds, settings)
        np.testing.assert_allclose(b.latents, a.latents, atol=1e-4)
        assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
        if state is None:
            before = a.latents
    assert np.abs(b.latents - before).max() > 1e-3  # the LoRA load reached the compiled graph


def test_rollout_compile_is_refused_where_it_would_be_ignored():
    from rlfh.config.schema import ConfigError, load_config
    from tests.conftest import REPO

    assert load_config(REPO / "configs" / "tiny.yaml", ["rollout.compile=true"]).rollout.compile
    with pytest.raises(ConfigError, match="rollout.compile=false"):
        load_config(REPO / "configs" / "tiny.yaml", ["resources.colocate=true", "rollout.compile=true"])
