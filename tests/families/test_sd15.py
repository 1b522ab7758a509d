"""The SD1.5 family on its tiny model: the tiny model's wiring, the rollout sampler against the stock
``StableDiffusionPipeline``, the pipeline's own prompt conditioning, the training target following the
scheduler's ``prediction_type``, and the LoRA rlfh writes loading with the stock ``load_lora_weights``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from families import PromptCache, family_of, load_pipeline
from families.sd15 import SD15
from rlfh.config.schema import ModelConfig, load_config
from rollouts.sampler import Sampler, seeded_generators
from rollouts.types import SamplerSettings
from tests.conftest import REPO
from tests.families.lora_check import assert_lora_loads_in_stock_pipeline
from tests.rollouts.test_sampler import assert_sampler_equals_stock_pipeline


@pytest.fixture(scope="module")
def region_images(tmp_path_factory):
    from tests.rlfh.test_region_pairs_tiny import write_face_images

    return write_face_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir):
    return load_pipeline(ModelConfig(path=tiny_sd15_dir))


def test_the_tiny_model_is_a_stock_sd15_pipeline(pipe, tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    index = json.loads((Path(tiny_sd15_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and isinstance(pipe, StableDiffusionPipeline)
    assert family_of(pipe).name == "sd15" and pipe.safety_checker is None
    unet = pipe.unet
    assert unet.config.addition_embed_type is None and unet.config.cross_attention_dim == 32
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.vae.config.scaling_factor == 0.18215


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_equals_stock_diffusers_pipeline(pipe, guidance):
    """The SDXL sampler's check (tests/rollouts/test_sampler.py) against the stock StableDiffusionPipeline."""
    ours = assert_sampler_equals_stock_pipeline(pipe, "tiny-sd15", guidance)
    # the rows the rollouts send the learner: the token embeddings only (no pooled embedding on SD1.5)
    assert {p: tuple(a.shape for a in rows) for p, rows in ours.conditioning.items()} == {
        p: ((77, 32),) for p in ours.prompts
    }


def test_guided_conditioning_is_the_pipelines(pipe):
    prompts = ["a photo of a person", "two people talking", "a photo of a person"]
    pos, neg = pipe.encode_prompt(
        prompts, "cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=["blurry"] * 3
    )
    enc, added = PromptCache(SD15()).conditioning(pipe, prompts, 64, 64, "cpu", negative_prompt="blurry")
    assert added == {}
    # the encoder's numbers depend on the batch it runs in (~1e-6 on CPU): the same rows, not the same bits
    torch.testing.assert_close(enc, torch.cat([neg, pos]), rtol=0, atol=1e-5)


def test_training_target_follows_the_schedulers_prediction_type(tiny_sd15_dir, tmp_path):
    """The learner's target is eps for the tiny model and v = sqrt(abar) eps - sqrt(1 - abar) x0 for the
    same model whose scheduler config says v_prediction (SD2.x-768's), equal to diffusers' ``get_velocity``;
    the DDIM sampler of the rollouts reads the same prediction type."""
    from diffusers import DDPMScheduler

    from rlfh.learner.engine import LearnerEngine

    vdir = tmp_path / "tiny-sd15-v"
    shutil.copytree(tiny_sd15_dir, vdir)
    sched = vdir / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 500, 990])
    targets = {}
    for path in (tiny_sd15_dir, vdir):
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={path}"])
        lrn = LearnerEngine(cfg)
        kind = lrn.pipe.scheduler.config.prediction_type
        targets[kind] = lrn.noised(x0, t, eps)[2]
        assert lrn.family.stochastic_scheduler(lrn.pipe.scheduler.config).config.prediction_type == kind
    assert sorted(targets) == ["epsilon", "v_prediction"]
    assert torch.equal(targets["epsilon"], eps)
    velocity = DDPMScheduler.from_config(json.loads(sched.read_text())).get_velocity(x0, eps, t)
    assert torch.equal(targets["v_prediction"], velocity) and not torch.allclose(velocity, eps, atol=0.1)


def test_the_lora_rlfh_writes_loads_in_the_stock_pipeline(tiny_sd15_dir, tmp_path):
    """A LoRA of the default targets written by the family loads with ``load_lora_weights`` at its alpha:
    the stock pipeline's latents then equal our sampler's with the same LoRA merged, and differ from the
    base's."""
    stock = load_pipeline(ModelConfig(path=tiny_sd15_dir))
    assert_lora_loads_in_stock_pipeline(SD15(), tiny_sd15_dir, stock, tmp_path, lora_b_std=0.05)


def test_make_tiny_model_writes_the_family_asked_for(tmp_path, capsys, monkeypatch):
    import families
    from rlfh.cli.main import main

    monkeypatch.setattr(families, "NOT_YET", {"QwenImagePipeline": "qwen_image"})
    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "sd15", "--pretrain-steps", "0"]) == 0
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert main(["make-tiny-model", str(tmp_path / "f"), "--family", "qwen_image"]) == 2
    assert "model family 'qwen_image' is not implemented yet" in capsys.readouterr().err


def test_the_hcp_layer_hooks_sd15s_cross_attention_and_trains(tiny_sd15_dir):
    """HcP (trained on SD1.5 in its paper) on the tiny SD1.5: its factor-2 cross-attention is the mid
    block's (the tiny UNet attends at factor 1 and in the mid block, as SD1.5 attends at 1, 2 and 4 and
    in the mid block); a step trains phi with the LoRA and leaves a finite alignment loss."""
    from rlfh.learner.steps import train
    from tests.rlfh.test_hcp import HCP, alignment, make, posed_pairs

    lrn = make(tiny_sd15_dir, *HCP, "model.hcp.coef=10")
    assert sorted(lrn.hcp.processors) == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    phi = {k: v.clone() for k, v in lrn.hcp.state_dict().items()}
    before = alignment(lrn)
    train(lrn, posed_pairs(), epochs=1)
    assert any(not torch.equal(v, phi[k]) for k, v in lrn.hcp.state_dict().items())
    assert np.isfinite(before) and np.isfinite(alignment(lrn))


def test_ddpo_on_sd15_the_learner_recomputes_the_samplers_logprobs(tiny_sd15_dir):
    """DDPO's stochastic DDIM sampler on SD1.5 (built from its PNDM config) with guidance: before any
    update the learner's recomputed per-step log-probs equal the recorded ones, and a step trains."""
    from rlfh.data.batches import ScoredSamples, TrajectoryBatch
    from rlfh.data.pairs import ddpo_window, learner_batch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.rlfh.test_ddpo import DDPO, settings_of

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_sd15_dir}", *DDPO])
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    s.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    st, prompts = settings_of(cfg), ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 1))
    samples = ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st)
    batch, _ = learner_batch(cfg.learner, samples)
    assert isinstance(batch, TrajectoryBatch) and batch.latents.shape[1] == 5
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    assert m["ddpo/recorded_logprob_max_diff"] < 1e-5 and np.isfinite(m["loss/ddpo"])
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())


@pytest.mark.parametrize("loss", ["nft", "awm"])
def test_nft_and_awm_on_sd15(tiny_sd15_dir, loss):
    """The SDXL checks of tests/rlfh/test_online_rl.py, run on SD1.5: the batch's advantages, a training
    step, the sampling policy as the round's start, and NFT's x0 scale against diffusers' DDPM step."""
    from tests.rlfh.test_online_rl import test_batch_signal_and_first_step_against_the_sampling_policy as check

    check(tiny_sd15_dir, loss)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_refine_equals_stock_img2img_and_inpainting_keeps_the_outside(pipe, guidance):
    """SDEdit (Sampler.refine: HG-DPO's SDRecon, region pairs) on SD1.5 against diffusers' own
    StableDiffusionImg2ImgPipeline, at the SDXL test's tolerance (tests/rollouts/test_refine.py), and
    its inpainting check."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from tests.rollouts.test_refine import test_inpainting_changes_only_inside_the_mask as inpainting_check

    prompts, seeds = ["a photo of a person", "a man waving his hand"], [3, 1]
    settings = SamplerSettings(10, guidance, "blurry", 64, 64)
    sampler = Sampler(pipe, "tiny-sd15")
    x0 = sampler.sample(prompts, [7, 8], settings).latents
    ours = sampler.refine(x0, prompts, seeds, settings, strength=0.4)
    ref = StableDiffusionImg2ImgPipeline.from_pipe(pipe)(
        prompt=prompts,
        negative_prompt=["blurry"] * 2,
        image=torch.from_numpy(x0),  # 4 channels: taken as latents as they are
        strength=0.4,
        num_inference_steps=10,
        guidance_scale=guidance,
        generator=seeded_generators(seeds),
        output_type="latent",
    ).images
    np.testing.assert_allclose(ours.latents, ref.numpy(), atol=1e-5)
    assert not np.allclose(ours.latents, x0, atol=1e-3)
    if guidance == 1.0:
        inpainting_check(pipe)


def test_eval_compares_an_sd15_model_with_an_sdxl_baseline(tiny_sd15_dir, tiny_model_dir, tmp_path):
    """`rlfh eval` takes any family, also two in one comparison: model.family names the config's model
    only, the baseline's family is read from its folder."""
    from rlfh.eval.evaluate import ModelSpec, evaluate

    overrides = [f"model.path={tiny_sd15_dir}", "model.family=sd15", "rollout.num_inference_steps=2"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    summary = evaluate(
        cfg, ModelSpec(tiny_sd15_dir), ["a photo of a person"], [0], tmp_path, ModelSpec(tiny_model_dir), progress=False
    )
    jpeg = summary["rewards"]["jpeg_compressibility"]
    assert jpeg["model"]["n_valid"] == 1 and jpeg["baseline"]["n_valid"] == 1
    assert jpeg["model"]["mean"] != jpeg["baseline"]["mean"]


@pytest.mark.parametrize("inpainter", ["policy", "pipeline"])
def test_make_region_pairs_on_sd15(region_images, tiny_sd15_dir, tmp_path, capsys, inpainter):
    """`rlfh make-region-pairs` on SD1.5 (FaceScore's region pairs), inpainting by the policy (SDEdit,
    ``Sampler.refine``) or by the inpainting pipeline diffusers' ``AutoPipelineForInpainting`` makes of the
    SD1.5 folder (``StableDiffusionInpaintPipeline``, fed the latents with the 4-channel UNet): the tests'
    SDXL checks, each copy bit-identical to its original outside the face mask and changed inside."""
    from rlfh.cli.main import main
    from rlfh.recipes.region_pairs import DiffusersInpainter
    from tests.rlfh.test_region_pairs_tiny import assert_inpainted_only_in_the_mask, overrides, records_by_role

    extra = [f"data.region_pairs.pipeline={tiny_sd15_dir}"] if inpainter == "pipeline" else []
    run = tmp_path / "pairs"
    assert (
        main(["make-region-pairs", "configs/tiny.yaml", str(region_images), *overrides(tiny_sd15_dir, run, *extra)])
        == 0
    )
    assert "6 of 6 images had the region" in capsys.readouterr().out
    pairs, decode_latent = records_by_role(run / "rollouts")
    assert len(pairs) == 6
    assert_inpainted_only_in_the_mask(pairs, decode_latent, 0.4)  # the strength table's, as on SDXL
    if inpainter == "pipeline":
        assert type(DiffusersInpainter(tiny_sd15_dir, "cpu").pipe).__name__ == "StableDiffusionInpaintPipeline"
        assert {inp["model_id"] for _, inp in pairs} == {tiny_sd15_dir}


@pytest.mark.slow  # ~65 s at load 9 on 2 cores: two rounds of 4 SDRecon winners and 4 fresh losers at 10 steps
def test_hgdpo_sdrecon_winners_on_sd15(tiny_sd15_dir, tmp_path):
    """HG-DPO's normal stage on SD1.5: the real images encoded by SD1.5's VAE (its latent scale), SDRecon
    re-noising them along SD1.5's own schedule and denoising with its policy (SDEdit, equal to
    StableDiffusionImg2ImgPipeline: test_refine_equals_stock_img2img_and_inpainting_keeps_the_outside).
    The SDXL check of tests/rlfh/test_hgdpo_sdrecon.py: the winners lie much nearer their real images than
    fresh samples for the same captions, and the same (seed, round) gives the same winners."""
    from tests.rlfh.test_hgdpo_sdrecon import real_winners_in_the_normal_stage
    from tests.rlfh.test_hgdpo_sdrecon import test_sdrecon_winners_are_the_real_images_partly_redenoised as check

    cfg, rw = real_winners_in_the_normal_stage(tiny_sd15_dir, tmp_path)
    assert rw.source.latents.shape[1:] == (4, 8, 8)
    check((cfg, rw))
