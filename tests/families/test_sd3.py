"""The SD3 family on its tiny model: the tiny model's wiring, the rollout sampler against the stock
``StableDiffusion3Pipeline``, the learner's velocity target and its DPO step, DDPO on the Flow-GRPO SDE
sampler with only ``rollout.eta`` set, the config rules, and the LoRA rlfh writes loading with the
stock ``load_lora_weights``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from families import family_of, load_pipeline
from families.sd3 import SD3
from rlfh.config.schema import ConfigError, ModelConfig, load_config
from rollouts.sampler import Sampler, seeded_generators
from rollouts.types import SamplerSettings
from tests.conftest import REPO
from tests.families.lora_check import assert_lora_loads_in_stock_pipeline
from tests.rollouts.test_sampler import assert_images_match

FLOW_DDPO = [
    "learner.loss=ddpo",
    "rollout.eta=1.0",
    "rollout.num_inference_steps=4",
    "learner.train_batch_size=4",
    "learner.micro_batch_size_per_gpu=4",
]


def config(*overrides):
    return load_config(REPO / "configs" / "tiny.yaml", ["logging.wandb=false", *overrides])


@pytest.fixture(scope="module")
def pipe(tiny_sd3_dir):
    return load_pipeline(ModelConfig(path=tiny_sd3_dir))


def stock_pipeline(path):
    """The stock pipeline as diffusers documents loading SD3 without T5."""
    from diffusers import StableDiffusion3Pipeline

    stock = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    return stock


def test_the_tiny_model_is_a_stock_sd3_pipeline(pipe, tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    index = json.loads((Path(tiny_sd3_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and isinstance(pipe, StableDiffusion3Pipeline)
    assert family_of(pipe).name == "sd3" and isinstance(pipe.transformer, SD3Transformer2DModel)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None  # T5 absent, as diffusers allows
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    assert pipe.vae.config.shift_factor == 0.0609 and pipe.vae.config.scaling_factor == 1.5305


def test_sampler_equals_stock_diffusers_pipeline(pipe, tiny_sd3_dir):
    """Guided, with a negative prompt: the same latents within 5e-5 (the guided combination is rounded in
    each side's own order) and the same images within one uint8 level in at most 0.1% of the values."""
    prompts, seeds = ["a photo of a person", "a man waving his hand", "a photo of a person"], [3, 1, 4]
    ours = Sampler(pipe, "tiny-sd3").sample(prompts, seeds, SamplerSettings(4, 4.0, "blurry", 64, 64))
    stock = stock_pipeline(tiny_sd3_dir)
    kwargs = dict(
        prompt=prompts, negative_prompt=["blurry"] * 3, num_inference_steps=4, guidance_scale=4.0, height=64, width=64
    )
    ref_lat = stock(**kwargs, generator=seeded_generators(seeds), output_type="latent").images
    ref_img = stock(**kwargs, generator=seeded_generators(seeds), output_type="np").images
    assert ours.latents.shape == (3, 4, 8, 8) and ours.images.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(ours.latents, ref_lat.numpy(), atol=5e-5, rtol=0)
    assert_images_match(ours.images, ref_img)
    # the rows the rollouts send the learner: CLIP + (absent) T5 tokens, and the pooled projections
    assert {tuple(a.shape for a in rows) for rows in ours.conditioning.values()} == {((77 + 256, 64), (64,))}


def test_config_rules_of_the_flow_family():
    """ddpo needs only rollout.eta > 0; the UNets' DDIM scheduler and the eps-only methods are refused
    naming the key and the reason."""
    cfg = config("model.path=rlfh:tiny-sd3", *FLOW_DDPO)
    assert cfg.rollout.scheduler == "default"
    with pytest.raises(ConfigError, match="rollout.scheduler=ddim does not apply to the sd3 model family"):
        config("model.path=rlfh:tiny-sd3", *FLOW_DDPO, "rollout.scheduler=ddim")
    with pytest.raises(ConfigError, match="learner.loss=ddpo needs the stochastic .SDE. sampler.*rollout.eta > 0"):
        config("model.path=rlfh:tiny-sd3", "learner.loss=ddpo", "rollout.num_inference_steps=4")
    with pytest.raises(ConfigError, match="model.hcp.enabled=true does not apply to the sd3 model family: HcP"):
        config("model.path=rlfh:tiny-sd3", "model.hcp.enabled=true")
    with pytest.raises(ConfigError, match="learner.dpo.guidance.coef=1.0 does not apply to the sd3 model family"):
        config("model.path=rlfh:tiny-sd3", "learner.dpo.guidance.coef=1.0")


def test_dpo_trains_on_the_velocity_error(tiny_sd3_dir):
    """The learner's target is the velocity eps - x0 at x_t = (1 - sigma) x0 + sigma eps, the DPO loss reads
    it through the schedule (rlfh/losses/dpo.py is family-agnostic), and a step moves the LoRA."""
    from rlfh.learner.engine import LearnerEngine

    cfg = config(f"model.path={tiny_sd3_dir}", "learner.loss=dpo")
    lrn = LearnerEngine(cfg)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250.0, 900.0])
    x_t, _, target = lrn.noised(x0, t, eps)
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps, rtol=0, atol=1e-6)
    assert torch.equal(target, eps - x0)
    from tests.families.lora_check import assert_a_dpo_step_moves_the_lora

    assert_a_dpo_step_moves_the_lora(cfg, lrn)


def test_ddpo_on_sd3_the_learner_recomputes_the_sde_samplers_logprobs(tiny_sd3_dir):
    """The Flow-GRPO SDE sampler with only rollout.eta=1.0 set: before any update the learner's recomputed
    per-step log-probs equal the recorded ones, and a clipped-ratio step trains."""
    from rlfh.data.batches import ScoredSamples, TrajectoryBatch
    from rlfh.data.pairs import ddpo_window, learner_batch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.rlfh.test_ddpo import settings_of

    cfg = config(f"model.path={tiny_sd3_dir}", *FLOW_DDPO)
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model), scheduler=cfg.rollout.scheduler)
    s.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    st, prompts = settings_of(cfg), ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 1))
    assert b.trajectory["timesteps"].dtype == np.float32 and b.trajectory["log_probs"].shape == (4, 4)
    samples = ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st)
    batch, _ = learner_batch(cfg.learner, samples)
    assert isinstance(batch, TrajectoryBatch) and batch.latents.shape[1] == 5
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    assert m["ddpo/recorded_logprob_max_diff"] < 1e-5 and np.isfinite(m["loss/ddpo"])
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())


def test_the_lora_rlfh_writes_loads_in_the_stock_pipeline(tiny_sd3_dir, tmp_path):
    """A LoRA of diffusers' SD3 targets written by the family loads with ``load_lora_weights`` at its
    alpha: the stock pipeline's latents then equal our sampler's with the same LoRA merged, and differ
    from the base's."""
    state = assert_lora_loads_in_stock_pipeline(SD3(), tiny_sd3_dir, stock_pipeline(tiny_sd3_dir), tmp_path, 0.2)
    assert any(".add_q_proj." in k for k in state) and any(".to_add_out." in k for k in state)


def test_refine_equals_stock_img2img_and_inpainting_keeps_the_outside(pipe):
    """SDEdit on the flow schedule (Sampler.refine: HG-DPO's SDRecon, region pairs; x0 re-noised with the
    scheduler's ``scale_noise``) against diffusers' StableDiffusion3Img2ImgPipeline fed the latents, and
    masked SDEdit leaving the latents outside the mask as they were."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    prompts, seeds = ["a photo of a person", "a man waving his hand"], [3, 1]
    settings = SamplerSettings(4, 3.0, "blurry", 64, 64)
    sampler = Sampler(pipe, "tiny-sd3")
    x0 = sampler.sample(prompts, [7, 8], settings).latents
    ours = sampler.refine(x0, prompts, seeds, settings, strength=0.5)
    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
    ref = img2img(
        prompt=prompts,
        negative_prompt=["blurry"] * 2,
        image=torch.from_numpy(x0),  # a latent-channel `image` is taken as latents as they are
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=seeded_generators(seeds),
        output_type="latent",
    ).images
    np.testing.assert_allclose(ours.latents, ref.numpy(), atol=5e-5, rtol=0)
    assert not np.allclose(ours.latents, x0, atol=1e-3)
    masks = np.zeros((2, 1, 8, 8), np.float32)
    masks[:, :, 2:5, 3:7] = 1.0
    out = sampler.refine(x0, prompts, seeds, settings, strength=0.5, masks=masks)
    outside = np.broadcast_to(masks == 0, x0.shape)
    np.testing.assert_array_equal(outside * out.latents, outside * x0)
    assert np.abs(out.latents[~outside] - x0[~outside]).mean() > 1e-3
