"""The HcP layer on the tiny model: the UNet's output unchanged, M_h as its formula, training lowers the
alignment loss, checkpoint / resume / export, and the rollout sampler still loads the LoRA."""

import numpy as np
import pytest
import torch

from rlfh.data.batches import PairBatch
from rlfh.data.pose_prior import pose_heatmap
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from tests.conftest import REPO

PROMPTS = ["a photo of a person", "a man waving his hand"]
HCP = [
    "model.hcp.enabled=true",
    "model.hcp.scale_weights={2: 1.0}",
    "model.hcp.timesteps=[0, 999]",
    "data.hcp_priors.sigma=0.08",
]
# test landmarks (x, y, visibility) on a 64x64 image: a standing figure in the left half. Drawn by
# hand as the loss's input; no detector claims to have found them.
FIGURE = np.array(
    [[[16, 8, 1], [16, 20, 1], [8, 24, 1], [24, 24, 1], [16, 36, 1], [12, 52, 1], [20, 52, 1]]], np.float32
)


def make(tiny_model_dir, *overrides, seed=0):
    from rlfh.config.schema import load_config

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"seed={seed}",
            "learner.train_batch_size=2",
            "learner.micro_batch_size_per_gpu=2",
            "learner.lr=1e-3",
            *overrides,
        ],
    )
    return LearnerEngine(cfg)


def prior(n):
    return np.repeat(pose_heatmap(FIGURE, (64, 64), 0.08)[None], n, axis=0)  # (n, 1, 8, 8)


def posed_pairs(n=4, seed=0):
    lat = np.random.default_rng(seed).standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    return PairBatch(lat[0], lat[1], [PROMPTS[i % 2] for i in range(n)], priors_w=prior(n), priors_l=prior(n))


def alignment(lrn, seed=123):
    """L_hca of the current weights on fixed inputs (every item posed, t in the window)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 300, 600, 900])
    enc, added = lrn.condition([PROMPTS[i % 2] for i in range(4)], 64, 64)
    with torch.enable_grad():
        lrn.denoiser(x, t, encoder_hidden_states=enc, added_cond_kwargs=added)
    metrics = {}
    lrn.hcp.term(t, [PROMPTS[i % 2] for i in range(4)], torch.from_numpy(prior(4)), metrics)
    return metrics["loss/hcp"]  # without the coefficient


@pytest.mark.parametrize("mode", ["residual", "observe"])
def test_hcp_layer_leaves_the_unet_output_unchanged_and_records_m_h(tiny_model_dir, mode):
    """A fresh layer is exact in either mode: residual's projection starts at zero, observe adds nothing."""
    plain, hcp = make(tiny_model_dir), make(tiny_model_dir, *HCP, f"model.hcp.mode={mode}")
    assert hcp.hcp.processors and all(".attn2" in n for n in hcp.hcp.processors)
    assert any(".processor.phi." in n for n in hcp.trainable_names)  # trained with the LoRA
    assert any(".processor.proj." in n for n in hcp.trainable_names) == (mode == "residual")
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    enc, added = plain.condition(PROMPTS, 64, 64)
    want = plain.policy(x, t, enc, added)
    got = hcp.policy(x, t, enc, added)
    assert torch.equal(got, want)  # the same prediction, bit for bit
    maps = hcp.hcp.take_maps()
    assert len(maps) == len(hcp.hcp.processors)
    for f, m in maps:  # factor 2 of the 8x8 latent: 4x4 positions, softmax over the 77 tokens
        assert f == 2 and m.shape == (2, 16, 77) and m.requires_grad
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 16))
    hcp.reference(x, t, enc, added)  # no gradients: nothing recorded
    assert hcp.hcp.take_maps() == []


def test_m_h_is_softmax_of_q_against_phi_of_the_text(tiny_model_dir):
    lrn = make(tiny_model_dir, *HCP)
    name, proc = next(iter(lrn.hcp.processors.items()))
    attn = lrn.denoiser.get_submodule(name)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    c = torch.randn(2, 77, lrn.denoiser.config.cross_attention_dim, generator=g)
    got = proc.human_attention(attn, z, c)
    q, k = attn.to_q(z), proc.phi(c)
    heads, d = attn.heads, q.shape[-1] // attn.heads
    want = torch.stack(
        [
            torch.softmax(q[..., i * d : (i + 1) * d] @ k[..., i * d : (i + 1) * d].transpose(1, 2) / d**0.5, -1)
            for i in range(heads)
        ]
    ).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the human tokens: "man" (3 BPE pieces here) in the second prompt; all words in the first has none
    mask = lrn.hcp.token_mask(["a man waving his hand", "a red car"])
    assert 0 < int(mask[0].sum()) < int(lrn.hcp.token_mask(["a zzz waving his zzz"])[0].sum())
    assert not mask[0, 0] and not mask[1, 0]  # never BOS
    assert int(mask[1].sum()) == len(lrn.pipe.tokenizer("a red car").input_ids) - 2


def test_hcp_steps_only_inside_the_timestep_window(tiny_model_dir):
    lrn = make(tiny_model_dir, *HCP[:2], "model.hcp.timesteps=[500, 999]")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    enc, added = lrn.condition(PROMPTS, 64, 64)
    lrn.policy(x, torch.tensor([100, 200]), enc, added)
    m = {}
    assert lrn.hcp.term(torch.tensor([100, 200]), PROMPTS, torch.from_numpy(prior(2)), m) is None
    assert m["hcp/kept_fraction"] == 0.0 and m["hcp/posed_fraction"] == 1.0
    lrn.policy(x, torch.tensor([100, 800]), enc, added)
    assert lrn.hcp.term(torch.tensor([100, 800]), PROMPTS, torch.from_numpy(prior(2)), m) is not None
    assert m["hcp/kept_fraction"] == 0.5


@pytest.mark.slow
def test_training_with_hcp_lowers_the_alignment_loss(tiny_model_dir):
    """The term's gradient moves M_h toward the prior: after the same DPO training, L_hca is lower with
    the HcP term (coef 10) than without it (coef 0), by a margin, for two seeds."""
    for seed in (0, 1):
        after = {}
        for coef in (0.0, 10.0):
            lrn = make(tiny_model_dir, *HCP, f"model.hcp.coef={coef}", "learner.lr=1e-2", seed=seed)
            before = alignment(lrn)
            metrics = train(lrn, posed_pairs(seed=seed), epochs=10)
            after[coef] = alignment(lrn)
            if coef:
                assert metrics["loss/hcp"] > 0 and metrics["hcp/kept_fraction"] == 1.0
        print(f"seed {seed}: L_hca {before:.4f} before, after training {after}")
        assert after[10.0] < 0.7 * before, (seed, before, after)
        assert after[10.0] < 0.7 * after[0.0], (seed, before, after)


def test_hcp_weights_checkpoint_resume_and_the_sampler_loads_the_lora(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from families import load_pipeline
    from rlfh.learner.hcp import HCP_FILE
    from rollouts.sampler import Sampler

    observe = [*HCP, "model.hcp.mode=observe", "model.hcp.coef=10"]  # the output-neutral form
    lrn = make(tiny_model_dir, *observe)
    train(lrn, posed_pairs(), epochs=2)
    ckpt = lrn.save_checkpoint(tmp_path / "ckpt")
    saved = load_file(str(ckpt / HCP_FILE))
    assert saved and all(torch.equal(v, lrn.hcp.state_dict()[k]) for k, v in saved.items())
    # resume: a fresh engine gets the trained phi back from the engine state
    again = make(tiny_model_dir, *observe)
    assert not all(torch.equal(v, again.hcp.state_dict()[k]) for k, v in saved.items())
    again.load_checkpoint(ckpt)
    assert all(torch.equal(v, again.hcp.state_dict()[k]) for k, v in saved.items())
    again.hcp.load_state_dict(saved)  # the exported file loads as well
    with pytest.raises(RuntimeError, match="do not match"):
        again.hcp.load_state_dict({k: v for k, v in list(saved.items())[1:]})
    # the rollout sampler (no HcP layer) loads the LoRA the learner syncs, and predicts what the learner does
    sampler = Sampler(load_pipeline(lrn.cfg.model, "cpu"))
    sampler.add_lora(lrn.cfg.model.lora.rank, lrn.cfg.model.lora.alpha, lrn.cfg.model.lora.target_modules)
    sampler.load_lora(lrn.lora_state_dict(), 1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    want = lrn.denoiser_output(x, 500, PROMPTS[1])
    base = Sampler(load_pipeline(lrn.cfg.model, "cpu")).denoiser_output(x, 500, PROMPTS[1])
    got = sampler.denoiser_output(x, 500, PROMPTS[1])
    assert (want - base).abs().max() > 1e-4  # the LoRA moved
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and diffusers loads the exported LoRA file with no HcP key in it
    pipe = load_pipeline(lrn.cfg.model, "cpu")
    pipe.load_lora_weights(ckpt)
    assert not any("processor" in k for k in pipe.unet.state_dict())


def test_hcp_config_rules(tiny_cfg):
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_cfg(
            "model.hcp.enabled=true",
            "model.hcp.scale_weights={3: 1.0}",
            "model.hcp.timesteps=[900, 100]",
            "data.hcp_priors.sigma=0",
            "data.hcp_priors.prior=real",
            "model.lora.enabled=false",
        )
    text = str(e.value)
    for needle in (
        "model.hcp.scale_weights: key 3",
        "model.hcp.timesteps=[900, 100]",
        "data.hcp_priors.sigma=0",
        "data.hcp_priors.prior=real",
        "needs model.lora.enabled",
    ):
        assert needle in text
    assert tiny_cfg("model.hcp.enabled=true").model.hcp.scale_weights == {"2": 0.5, "4": 1.0}
    # the paper's residual layer changes the UNet's output: online rollout actors (LoRA only) cannot sample it
    from rlfh.recipes.online import train as train_online

    assert tiny_cfg("model.hcp.enabled=true").model.hcp.mode == "residual"
    with pytest.raises(ConfigError, match="model.hcp.mode=residual changes the UNet's output"):
        train_online(tiny_cfg("model.hcp.enabled=true"))


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
def test_hcp_under_mpd_regions_and_gradient_checkpointing(tiny_model_dir):
    """Per-region gradients (MPD solves over them; phi has none there) and recomputed checkpointed blocks
    (which run the processor again in backward) leave the HcP term working."""
    lrn = make(
        tiny_model_dir, *HCP, "learner.regions.names=[global, face]", "learner.engine.gradient_checkpointing=true"
    )
    batch = posed_pairs()
    face = np.zeros((4, 1, 8, 8), np.float32)
    face[:, :, :4, :4] = 1.0
    batch.masks_w["face"], batch.masks_l["face"] = face, face
    phi = {k: v.clone() for k, v in lrn.hcp.state_dict().items()}
    metrics = train(lrn, batch, epochs=2)
    assert metrics["loss/hcp"] > 0 and "mpd/weight/face" in metrics
    assert any(not torch.equal(v, lrn.hcp.state_dict()[k]) for k, v in phi.items())


@pytest.mark.slow
def test_hcp_on_weighted_samples(tiny_model_dir):
    """train_samples (RWR here) adds the term too, each row with its own prior: unposed rows add nothing."""
    from rlfh.data.batches import SampleBatch

    lrn = make(tiny_model_dir, *HCP, "learner.loss=rwr")
    lat = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    posed = prior(4)
    posed[1::2] = 0.0  # rows 1 and 3: no person found
    batch = SampleBatch(lat, [PROMPTS[i % 2] for i in range(4)], np.full(4, 0.25, np.float32), priors=posed)
    phi = {k: v.clone() for k, v in lrn.hcp.state_dict().items()}
    metrics = train(lrn, batch, epochs=1)
    assert metrics["loss/hcp"] > 0 and metrics["hcp/posed_fraction"] == 0.5
    assert any(not torch.equal(v, lrn.hcp.state_dict()[k]) for k, v in phi.items())
    # without priors in the batch the layer records but adds nothing, and phi keeps its weights (in the
    # output-neutral form: the residual form's layer is part of the UNet, which the RWR loss itself trains)
    lrn2 = make(tiny_model_dir, *HCP, "learner.loss=rwr", "model.hcp.mode=observe")
    phi2 = {k: v.clone() for k, v in lrn2.hcp.state_dict().items()}
    assert "loss/hcp" not in train(lrn2, SampleBatch(lat, batch.prompts, batch.weights), epochs=1)
    assert all(torch.equal(v, lrn2.hcp.state_dict()[k]) for k, v in phi2.items())
    assert lrn2.hcp.take_maps() == []


@pytest.mark.slow
def test_hcp_trains_on_every_bucket_at_its_size(tiny_model_dir):
    """rollout.resolutions with HcP: each bucket's batch carries priors at its latent size and the alignment term
    is taken on each (the layer's maps and pooled priors are per batch, of whatever size)."""
    from rlfh.data.batches import SampleBatch
    from rlfh.data.buckets import BucketBatches

    lrn = make(tiny_model_dir, *HCP, "learner.loss=rwr", "rollout.resolutions=[[64, 64], [64, 128]]")
    parts = []
    for h, w in ((64, 64), (64, 128)):
        lat = np.random.default_rng(w).standard_normal((2, 4, h // 8, w // 8)).astype(np.float32)
        posed = np.repeat(pose_heatmap(FIGURE, (h, w), 0.08)[None], 2, axis=0)  # (2, 1, h/8, w/8)
        parts.append(SampleBatch(lat, PROMPTS, np.full(2, 0.5, np.float32), priors=posed))
    seen = []
    term = lrn.hcp.term

    def spy(t, prompts, priors, metrics):
        seen.append(tuple(priors.shape[-2:]))
        return term(t, prompts, priors, metrics)

    lrn.hcp.term = spy
    metrics = train(lrn, BucketBatches(parts), epochs=1)
    assert set(seen) == {(8, 8), (8, 16)} and metrics["loss/hcp"] > 0 and metrics["learner/buckets"] == 2


def test_residual_layer_changes_generation_after_training(tiny_model_dir, tmp_path):
    """The paper's reading (model.hcp.mode=residual, default): a fresh layer on a pipeline samples exactly as the
    pipeline without it; after training, the checkpoint's LoRA with its layer (load_hcp_into, as rlfh eval
    loads it) generates other images than the same LoRA alone, and the learner's prediction is the pipeline's.
    The reference runs without the layer's residual (the base model has no layer)."""
    from families import load_pipeline
    from rlfh.learner.hcp import HcP, load_hcp_into
    from rlfh.run.checkpoints import load_lora_into, resolve_lora
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    lrn = make(tiny_model_dir, *HCP, "model.hcp.coef=10", "learner.lr=1e-2")
    hc, settings = lrn.cfg.model.hcp, SamplerSettings(4, 1.0, "", 64, 64)
    fresh = load_pipeline(lrn.cfg.model, "cpu")
    before = Sampler(fresh).sample(PROMPTS, [0, 1], settings).images
    HcP(fresh.unet, hc, fresh.tokenizer)  # a fresh layer: exact
    assert np.array_equal(Sampler(fresh).sample(PROMPTS, [0, 1], settings).images, before)

    train(lrn, posed_pairs(), epochs=3)
    assert any(float(p.detach().abs().max()) > 0 for n, p in lrn.denoiser.named_parameters() if ".processor.proj." in n)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300, 700])
    enc, added = lrn.condition(PROMPTS, 64, 64)
    with torch.no_grad():
        policy = lrn.policy(x, t, enc, added)
        lrn.hcp.set_active(False)
        without = lrn.policy(x, t, enc, added)
        lrn.hcp.set_active(True)
        ref_off = lrn.reference(x, t, enc, added)
        with lrn.weights.lora_off():
            lrn.hcp.set_active(False)
            base = lrn.policy(x, t, enc, added)
            lrn.hcp.set_active(True)
    assert float((policy - without).abs().max()) > 1e-4  # the trained layer feeds the output
    torch.testing.assert_close(ref_off, base)  # the reference: neither LoRA nor layer

    ckpt = lrn.save_checkpoint(tmp_path / "ckpt")
    pipe = load_pipeline(lrn.cfg.model, "cpu")
    load_lora_into(pipe, resolve_lora(ckpt))
    lora_only = Sampler(pipe).sample(PROMPTS, [0, 1], settings).images
    assert load_hcp_into(pipe, ckpt, hc) is not None
    with_layer = Sampler(pipe).sample(PROMPTS, [0, 1], settings).images
    changed = np.abs(lora_only.astype(np.int16) - with_layer).mean()
    print(f"mean |LoRA alone - LoRA + layer| = {changed:.3f} uint8 levels")
    assert changed > 0.5, changed  # mean uint8 levels the layer changes
