"""The FLUX.1 family on its tiny model: the tiny model's wiring, the dynamic timestep shift, the rollout
sampler against the stock ``FluxPipeline`` (packed latents, guidance embedding) and SDEdit against its
img2img pipeline, the learner's guidance
input and its DPO step, DDPO on the Flow-GRPO SDE sampler with only ``rollout.eta`` set, the config rules,
and the LoRA rlfh writes loading with the stock ``load_lora_weights``."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from families import detect_family, family_of, load_pipeline
from families.flux import Flux
from rlfh.config.schema import ConfigError, ModelConfig, load_config
from rollouts.sampler import Sampler, seeded_generators
from rollouts.types import SamplerSettings
from tests.conftest import REPO
from tests.families.lora_check import assert_lora_loads_in_stock_pipeline
from tests.families.test_sd3 import FLOW_DDPO
from tests.rollouts.test_sampler import assert_images_match

PROMPTS, SEEDS = ["a photo of a person", "a man waving his hand", "a photo of a person"], [3, 1, 4]


def config(*overrides):
    return load_config(REPO / "configs" / "tiny.yaml", ["logging.wandb=false", *overrides])


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    return load_pipeline(ModelConfig(path=tiny_flux_dir))


class StockFlux:
    """The stock ``FluxPipeline`` of a folder as the checks call a pipeline: at the T5 length rlfh encodes
    with (the pipeline's default is 512 whatever the tokenizer's), latents unpacked to (B, C, h, w)."""

    def __init__(self, path):
        from diffusers import FluxPipeline

        self.pipe = FluxPipeline.from_pretrained(path)
        self.pipe.set_progress_bar_config(disable=True)

    def load_lora_weights(self, path):
        self.pipe.load_lora_weights(path)

    def __call__(self, **kwargs):
        out = self.pipe(**kwargs, max_sequence_length=Flux().sequence_length(self.pipe))
        if kwargs.get("output_type") == "latent":
            out.images = self.pipe._unpack_latents(out.images, kwargs["height"], kwargs["width"], 8)
        return out


def test_the_tiny_model_is_a_stock_flux_pipeline(pipe, tiny_flux_dir):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    index = json.loads((Path(tiny_flux_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and isinstance(pipe, FluxPipeline)
    assert detect_family(tiny_flux_dir).name == "flux" and detect_family("rlfh:tiny-flux").name == "flux"
    assert family_of(pipe).name == "flux" and isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert type(pipe.tokenizer_2).__name__ == "T5Tokenizer" and pipe.tokenizer_2.model_max_length == 32
    assert pipe.transformer.config.guidance_embeds  # as FLUX.1-dev: guidance-distilled
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.vae.config.shift_factor == 0.1159
    assert pipe.vae.config.scaling_factor == 0.3611 and not pipe.vae.config.use_quant_conv


def test_the_sampler_timesteps_are_shifted_by_the_images_token_count():
    """FluxPipeline's sigmas: s = linspace(1, 1/n, n) moved to exp(mu) / (exp(mu) + 1/s - 1), mu linear in the
    token count from 0.5 at 256 tokens to 1.15 at 4096. 1024 px: 64 x 64 = 4096 tokens, mu = 1.15; 64 px: 16
    tokens, mu = 0.5 - 240 * 0.65 / 3840 = 0.459375."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    for px, mu in ((1024, 1.15), (64, 0.459375)):
        Flux().set_timesteps(scheduler, 4, px, px, "cpu")
        s = np.linspace(1.0, 0.25, 4)
        expected = math.exp(mu) / (math.exp(mu) + 1 / s - 1)
        np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(scheduler.timesteps.numpy(), 1000 * expected, rtol=0, atol=1e-3)


def test_sampler_equals_stock_diffusers_pipeline(pipe, tiny_flux_dir):
    """Guidance 3.5 (the guidance embedding; the negative prompt unused, as FluxPipeline without true CFG):
    the same latents within 5e-5 and the same images within one uint8 level in at most 0.1% of the values."""
    ours = Sampler(pipe, "tiny-flux").sample(PROMPTS, SEEDS, SamplerSettings(4, 3.5, "blurry", 64, 64))
    stock = StockFlux(tiny_flux_dir)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=3.5, height=64, width=64)
    ref_lat = stock(**kwargs, generator=seeded_generators(SEEDS), output_type="latent").images
    ref_img = stock(**kwargs, generator=seeded_generators(SEEDS), output_type="np").images
    assert ours.latents.shape == (3, 4, 8, 8) and ours.images.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(ours.latents, ref_lat.numpy(), atol=5e-5, rtol=0)
    assert_images_match(ours.images, ref_img)
    # the rows the rollouts send the learner: the T5 tokens and CLIP's pooled output
    assert {tuple(a.shape for a in rows) for rows in ours.conditioning.values()} == {((32, 32), (32,))}
    # the guidance embedding is an input: another scale, other samples
    other = Sampler(pipe, "tiny-flux").sample(PROMPTS, SEEDS, SamplerSettings(4, 1.0, "", 64, 64))
    assert np.abs(other.latents - ours.latents).max() > 1e-3


def test_config_rules_of_the_flux_family():
    """ddpo needs only rollout.eta > 0; the UNets' DDIM scheduler, the eps-only methods, HcP, CFG-free
    training and reward backpropagation through the last step alone are refused naming the key and the reason."""
    assert config("model.path=rlfh:tiny-flux", *FLOW_DDPO, "rollout.guidance_scale=3.5").rollout.scheduler == "default"
    refused = {
        "rollout.scheduler=ddim": "rollout.scheduler=ddim does not apply to the flux model family",
        "model.hcp.enabled=true": "model.hcp.enabled=true does not apply to the flux model family: HcP",
        "learner.dpo.guidance.coef=1.0": "learner.dpo.guidance.coef=1.0 does not apply to the flux model family",
        "learner.guidance_free.scale=3": "learner.guidance_free.scale=3.0 does not apply to the flux model family: "
        "CFG-free training distils",
        # reward backpropagation works on FLUX (tests/families/test_sd3_learning.py), but not through the last
        # sampling step alone (draft_k's default K = 1), whose sigma carries no gradient
        "learner.loss=draft": "learner.draft.variant=draft_k trains the last sampling step alone on the flux family",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            config("model.path=rlfh:tiny-flux", *FLOW_DDPO, override)
    with pytest.raises(ConfigError, match="learner.loss=ddpo needs the stochastic .SDE. sampler.*rollout.eta > 0"):
        config("model.path=rlfh:tiny-flux", "learner.loss=ddpo", "rollout.num_inference_steps=4")


def test_dpo_trains_on_the_velocity_error_at_the_rollouts_guidance(tiny_flux_dir):
    """The learner's conditioning carries rollout.guidance_scale as the guidance input, its target is the
    velocity eps - x0, and a DPO step moves the LoRA."""
    from rlfh.learner.engine import LearnerEngine

    cfg = config(f"model.path={tiny_flux_dir}", "learner.loss=dpo", "rollout.guidance_scale=3.5")
    lrn = LearnerEngine(cfg)
    _, added = lrn.condition(["a", "b"], 64, 64)
    assert torch.equal(added["guidance"], torch.full((2,), 3.5))
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([250.0, 900.0])
    assert torch.equal(lrn.noised(x0, t, eps)[2], eps - x0)
    from tests.families.lora_check import assert_a_dpo_step_moves_the_lora

    assert_a_dpo_step_moves_the_lora(cfg, lrn)


def test_ddpo_on_flux_the_learner_recomputes_the_sde_samplers_logprobs(tiny_flux_dir):
    """The Flow-GRPO SDE sampler with only rollout.eta=1.0 set, at guidance 3.5 (negative rows built by the
    learner and dropped by the family), in a 64 x 128 bucket of a 64 x 64 config (its own shift): before any
    update the learner's recomputed per-step log-probs equal the recorded ones on the bucket's timesteps, and
    a clipped-ratio step trains."""
    from dataclasses import replace

    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import ddpo_window, learner_batch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.rlfh.test_ddpo import settings_of

    cfg = config(f"model.path={tiny_flux_dir}", *FLOW_DDPO, "rollout.guidance_scale=3.5")
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model), scheduler=cfg.rollout.scheduler)
    s.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    st, prompts = replace(settings_of(cfg), width=128), ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 1))
    assert b.trajectory["log_probs"].shape == (4, 4) and b.latents.shape == (4, 4, 8, 16)
    shifted_for_64 = lrn.stochastic.timesteps.numpy().copy()
    samples = ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 128), b.trajectory, st)
    batch, _ = learner_batch(cfg.learner, samples)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    assert m["ddpo/recorded_logprob_max_diff"] < 1e-5 and np.isfinite(m["loss/ddpo"])
    np.testing.assert_array_equal(b.trajectory["timesteps"], lrn.stochastic.timesteps.numpy())
    # 32 tokens shift more than 16, by more than the 1e-3 the learner finds a recorded timestep within
    assert np.abs(b.trajectory["timesteps"][1:] - shifted_for_64[1:]).min() > 0.1
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())


def test_the_lora_rlfh_writes_loads_in_the_stock_pipeline(tiny_flux_dir, tmp_path):
    """A LoRA of diffusers' FLUX targets written by the family loads with ``load_lora_weights`` at its alpha:
    the stock pipeline's latents then equal our sampler's with the same LoRA merged, and differ from the
    base's. The targets reach both kinds of block."""
    state = assert_lora_loads_in_stock_pipeline(Flux(), tiny_flux_dir, StockFlux(tiny_flux_dir), tmp_path, 0.2)
    assert any(k.startswith("single_transformer_blocks.0.attn.to_q.") for k in state)
    assert any(".ff_context.net.2." in k for k in state) and any(".to_add_out." in k for k in state)


def test_make_tiny_model_writes_a_flux_pipeline(tmp_path):
    from rlfh.cli.main import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "flux", "--pretrain-steps", "0"]) == 0
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_refine_equals_stock_img2img(pipe):
    """SDEdit on FLUX's shifted schedule (Sampler.refine: HG-DPO's SDRecon, region pairs) against diffusers'
    FluxImg2ImgPipeline fed the latents: the same refined latents within 5e-5."""
    from diffusers import FluxImg2ImgPipeline

    prompts, seeds = PROMPTS[:2], SEEDS[:2]
    settings = SamplerSettings(4, 3.5, "", 64, 64)
    sampler = Sampler(pipe, "tiny-flux")
    x0 = sampler.sample(prompts, [7, 8], settings).latents
    ours = sampler.refine(x0, prompts, seeds, settings, strength=0.5)
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    ref = img2img(
        prompt=prompts,
        image=torch.from_numpy(x0),  # a latent-channel `image` is taken as latents as they are
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=3.5,
        height=64,
        width=64,
        max_sequence_length=Flux().sequence_length(pipe),
        generator=seeded_generators(seeds),
        output_type="latent",
    ).images
    np.testing.assert_allclose(ours.latents, img2img._unpack_latents(ref, 64, 64, 8).numpy(), atol=5e-5, rtol=0)
    assert not np.allclose(ours.latents, x0, atol=1e-3)
