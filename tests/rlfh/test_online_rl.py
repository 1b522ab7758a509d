"""DiffusionNFT and AWM in the learner (learner.loss=nft / awm), the KL term (learner.reference.kl_coef) and the
EMA reference (learner.reference.model=ema), on the tiny model without Ray. Formulas: rlfh/losses/nft.py,
awm.py, kl.py; derivations: docs/online_rl.md."""

import numpy as np
import pytest
import torch

from families import load_pipeline
from rlfh.config.schema import ConfigError, load_config
from rlfh.data.batches import PairBatch, SampleBatch, ScoredSamples
from rlfh.data.pairs import learner_batch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from rollouts.sampler import Sampler
from rollouts.types import SamplerSettings
from tests.conftest import REPO
from tests.rlfh.learner_sampler import policy_sampler


def config(tiny_model_dir, *overrides):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.train_batch_size=4",
            "learner.micro_batch_size_per_gpu=4",
            *overrides,
        ],
    )


def samples(n=8, seed=0):
    lat = np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)
    prompts = ["a"] * (n // 2) + ["b"] * (n // 2)
    return lat, prompts, lat[:, 0].mean(axis=(1, 2)).tolist()


@pytest.mark.parametrize("loss", ["nft", "awm"])
def test_batch_signal_and_first_step_against_the_sampling_policy(tiny_model_dir, loss):
    cfg = config(tiny_model_dir, f"learner.loss={loss}")
    lat, prompts, scores = samples()
    batch, stats = learner_batch(cfg.learner, ScoredSamples(lat, prompts, prompts, scores, [{}] * 8, (64, 64)))
    assert isinstance(batch, SampleBatch) and len(batch) == 8 and stats["samples/kept"] == 8
    z = np.concatenate([(np.array(s) - np.mean(s)) / np.std(s) for s in (scores[:4], scores[4:])])  # per-prompt z
    np.testing.assert_allclose(batch.advantages, z, rtol=1e-5, atol=1e-6)
    assert batch.weights is None  # the signal of these losses is the advantage, not a loss weight
    from rlfh.learner.steps import advantage_signal

    signal = advantage_signal(cfg.learner, batch, list(range(8))).numpy()
    np.testing.assert_allclose(signal, 0.5 + 0.5 * z / 5 if loss == "nft" else z, rtol=1e-5, atol=1e-6)
    lrn = LearnerEngine(cfg)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=2)
    assert np.isfinite(m[f"loss/{loss}"]) and lrn.global_step == 4
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
    # the sampling policy is the round's start: predicting with it reproduces the pre-training UNet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    enc, added = lrn.condition(["a", "b"], 64, 64)
    t = torch.tensor([500, 500])
    assert lrn.old_weights is not None
    lrn2 = LearnerEngine(cfg)  # same seed: the same initial adapter
    torch.testing.assert_close(
        lrn.old_policy(x, t, enc, added), lrn2.denoiser(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
    )
    if loss == "awm":
        assert m["awm/ratio"] == pytest.approx(1.0, abs=0.05)  # the first steps start at ratio 1
    # nft's adaptive weighting: x0_hat - x0 = -k_t (eps_hat - eps), x0_hat from diffusers' own DDPM step
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_hat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(lrn.pipe.scheduler.config, clip_sample=False)
    for tt in (3, 500, 999):
        x_t, tv, target = lrn.noised(x0, torch.tensor([tt, tt]), torch.randn(2, 4, 8, 8))
        x0_hat = ddpm.step(eps_hat, tt, x_t.float()).pred_original_sample
        k = lrn.x0_scale(tv).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(x0_hat - x0, -k * (eps_hat - target), rtol=1e-4, atol=1e-4)


def test_kl_term_is_zero_at_the_reference_and_grows(tiny_model_dir):
    cfg = config(
        tiny_model_dir,
        "learner.loss=dpo",
        "learner.reference.kl_coef=10",
        "learner.train_batch_size=2",
        "learner.micro_batch_size_per_gpu=2",
    )
    lat = np.random.default_rng(1).standard_normal((2, 4, 4, 8, 8)).astype(np.float32)
    lrn = LearnerEngine(cfg)
    pairs = PairBatch(lat[0][:2], lat[1][:2], ["a", "b"])  # one optimizer step per round
    m1 = train(lrn, pairs, epochs=1)
    m2 = train(lrn, pairs, epochs=3)
    # LoRA starts with B = 0: the first prediction is the reference's exactly; after updates it is not
    assert m1["loss/kl"] == 0.0 and m2["loss/kl"] > 0.0


def test_ema_reference_is_refreshed_every_k_rounds(tiny_model_dir):
    cfg = config(
        tiny_model_dir,
        "learner.loss=rwr",
        "learner.reference.model=ema",
        "learner.ema.decay=0.5",
        "learner.reference.refresh_rounds=2",
        "learner.reference.kl_coef=1",
    )
    lat, prompts, scores = samples()
    lrn = LearnerEngine(cfg)
    batch, _ = learner_batch(cfg.learner, ScoredSamples(lat, prompts, prompts, scores, [{}] * 8, (64, 64)))
    seen = []
    for _ in range(3):
        train(lrn, batch, epochs=1)
        seen.append([w.clone() for w in lrn.reference_weights])
    # rounds 0 and 2 refresh (policy_version 0, 2), round 1 keeps round 0's reference
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert any(not torch.equal(a, b) for a, b in zip(seen[1], seen[2]))
    x = torch.randn(1, 4, 8, 8)
    enc, added = lrn.condition(["a"], 64, 64)
    t = torch.tensor([300])
    torch.testing.assert_close(
        lrn.reference(x, t, enc, added), lrn.predict_with(lrn.reference_weights, x, t, enc, added)
    )


def test_config_rules(tiny_model_dir):
    with pytest.raises(ConfigError, match="learner.reference.model=ema needs learner.ema.decay"):
        config(tiny_model_dir, "learner.reference.model=ema")
    with pytest.raises(ConfigError, match="max_staleness=0"):
        config(tiny_model_dir, "learner.loss=nft", "rollout.max_staleness=1")
    config(
        tiny_model_dir,
        "learner.loss=ddpo",
        "rollout.scheduler=ddim",
        "rollout.eta=1.0",
        "learner.reference.kl_coef=0.1",
    )
    with pytest.raises(ConfigError, match="learner.nft.beta"):
        config(tiny_model_dir, "learner.loss=nft", "learner.nft.beta=0")


def fixed_seed_reward(s, st):
    """Mean of latent channel 0 of samples at fixed seeds: the policy's own change only."""
    return float(s.sample(["a", "b"] * 4, list(range(1000, 1008)), st).latents[:, 0].mean())


# The tiny learning test: a few online rounds (sample guidance-free, score, train, sync) raise a reward of
# the final latents (the mean of channel 0) at fixed seeds, as tests/rlfh/test_ddpo.py does for DDPO.
# Margins come from the spread over seeds (python -m tests.learning_sweep nft|awm --seeds 0 1 2: the seed
# moves the LoRA initialisation, the learner's noise and the sampling seeds, as another CPU's rounding
# would move the trajectory), each at most half the smallest gain measured. Over 8 rounds, 1 OpenMP
# thread: nft (lr 1e-2, 2 epochs, nft.beta 0.1, eps_mse) gains 0.0243, 0.1487, 0.0136 -> margin 0.006;
# awm (lr 5e-3, 2 epochs) 0.0149, 0.0147, 0.0065, and seed 0 with 2 threads 0.0149 -> margin 0.003.
# AWM at lr 2e-2 and 4 epochs (this test's earlier setting) gained 0.294, -0.251, -0.120, 0.072 over
# seeds 0-3, and at lr 1e-2 / 2 epochs 0.015, -0.302: a random walk whose seed 0 happened to be high.
# nft moves less per round by design: per sample its minimizer is eps_old + (2r - 1)(eps - eps_old) / beta
# (a bounded step from the sampling policy, r = 0.5 + 0.5 A / c).
LEARNING = {"nft": ("1e-2", 2, 0.006), "awm": ("5e-3", 2, 0.003)}  # lr, epochs per round, margin


def online_learning_gain(
    tiny_model_dir, loss: str, seed: int = 0, rounds: int = 8, lr: str | None = None, epochs: int | None = None
) -> float:
    """The rise of ``fixed_seed_reward`` over ``rounds`` online rounds of ``loss``; ``seed`` moves the LoRA
    initialisation, the learner's noise and every round's sampling seeds (the evaluation seeds stay fixed)."""
    lr, epochs = lr or LEARNING[loss][0], epochs or LEARNING[loss][1]
    cfg = config(
        tiny_model_dir, f"learner.loss={loss}", "rollout.num_inference_steps=4", f"learner.lr={lr}", f"seed={seed}"
    )
    lrn = LearnerEngine(cfg)
    s = policy_sampler(cfg, lrn)
    rc = cfg.rollout
    st = SamplerSettings(rc.num_inference_steps, 1.0, "", rc.height, rc.width)
    before = fixed_seed_reward(s, st)
    prompts = ["a"] * 4 + ["b"] * 4
    for rnd in range(rounds):
        b = s.sample(prompts, [10_000 * seed + rnd * 8 + i for i in range(8)], st)
        rewards = b.latents[:, 0].mean(axis=(1, 2)).tolist()
        batch, _ = learner_batch(cfg.learner, ScoredSamples(b.latents, prompts, prompts, rewards, [{}] * 8, (64, 64)))
        train(lrn, batch, epochs=epochs)
        s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    after = fixed_seed_reward(s, st)
    print(f"{loss}, seed {seed}: channel-0 mean at fixed seeds {before:.4f} -> {after:.4f}")
    return after - before


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nft", "awm"])
def test_online_rounds_raise_reward(tiny_model_dir, loss):
    assert online_learning_gain(tiny_model_dir, loss) >= LEARNING[loss][2]


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
@pytest.mark.parametrize("region", ["dppo", "guard"])
def test_ddpo_trust_regions_start_at_the_sampler_and_train(tiny_model_dir, region):
    """learner.ddpo.trust_region=dppo/guard in train_trajectories: the sampling policy's step means are
    recomputed from the round's starting weights, so the first micro-step sees KL 0 and ratio 1; the
    masked / clipped fraction, the KL and the per-step log-ratio drift are in the metrics. At the default
    delta and clip range (1e-5, 1e-4) three epochs at lr 1e-2 leave the trust region: some terms are
    masked / clipped. guard weights each step by 1 / |d mu / d eps_hat|, the DDIM step's own Jacobian."""
    from families.ddim import scheduler_step_with_logprob
    from rlfh.data.pairs import ddpo_window
    from rlfh.learner.ddpo_steps import mean_jacobian

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.loss=ddpo",
            "rollout.scheduler=ddim",
            "rollout.eta=1.0",
            "rollout.num_inference_steps=4",
            "rollout.guidance_scale=3.0",
            "learner.train_batch_size=4",
            "learner.micro_batch_size_per_gpu=4",
            "learner.lr=1e-2",
            f"learner.ddpo.trust_region={region}",
        ],
    )
    lrn = LearnerEngine(cfg)
    s = policy_sampler(cfg, lrn, scheduler="ddim")
    rc = cfg.rollout
    st = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, "", rc.height, rc.width, rc.eta, rc.scheduler)
    prompts = ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 1))
    batch, _ = learner_batch(
        cfg.learner,
        ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st),
    )
    m1 = train(lrn, batch, epochs=1)  # one optimizer step of 4 timesteps: the first sees the sampler itself
    assert m1["ddpo/recorded_logprob_max_diff"] < 1e-5
    assert {f"ddpo/log_ratio_drift/step{j}" for j in range(4)} <= set(m1)
    m2 = train(lrn, batch, epochs=3)  # the old weights are this round's start: the policy has moved since
    limited = "ddpo/maskedfrac" if region == "dppo" else "ddpo/clipfrac"
    assert m2["ddpo/kl"] > 0 and np.isfinite(m2["loss/ddpo"]) and 0 < m2[limited] <= 1
    x, e = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for t in batch.timesteps:  # mu(eps + 1) - mu(eps) = k_t, the mean being affine in eps_hat
        mu0, mu1 = (
            scheduler_step_with_logprob(lrn.stochastic, e + d, int(t), x, eta=1.0, prev_sample=x).mean
            for d in (0.0, 1.0)
        )
        torch.testing.assert_close(
            (mu1 - mu0).float(), mean_jacobian(lrn, int(t), 1.0).cpu().expand(2, 4, 8, 8), rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
def test_ddpo_kl_term_is_zero_at_the_reference_and_grows(tiny_model_dir):
    """learner.reference.kl_coef with ddpo: kl_coef * KL(pi_theta(. | x_j) || pi_ref(. | x_j)) of the DDIM-eta steps
    from
    the guided predictions on each trained step's input; 0 while the LoRA is the base model's (B = 0), > 0
    once trained, and equal to the KL of the two Gaussians computed here: their means from diffusers' DDIM
    step (zero noise) with the policy's and the base UNet's guided eps, the shared sigma^2 from the schedule."""
    from families import Conditioning
    from rlfh.data.pairs import ddpo_window
    from rlfh.learner.ddpo_steps import reference_eps, transition_weight
    from rlfh.learner.loop import kl_term

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.loss=ddpo",
            "rollout.scheduler=ddim",
            "rollout.eta=1.0",
            "rollout.num_inference_steps=4",
            "rollout.guidance_scale=3.0",
            "learner.train_batch_size=4",
            "learner.micro_batch_size_per_gpu=4",
            "learner.lr=1e-2",
            "learner.reference.kl_coef=10",
        ],
    )
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    rc = cfg.rollout
    st = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, "", rc.height, rc.width, rc.eta, rc.scheduler)
    prompts = ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 1))
    batch, _ = learner_batch(
        cfg.learner,
        ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st),
    )
    m1 = train(lrn, batch, epochs=1)  # the first micro-step is at the reference: its KL is exactly 0
    m2 = train(lrn, batch, epochs=2)
    assert m1["loss/kl"] == 0.0 and m2["loss/kl"] > 0.0 and np.isfinite(m2["loss/ddpo"])
    # the term itself, on one recorded input: policy eps vs the base UNet's, both guided
    enc, added = lrn.condition(["p", "q"], 64, 64, "")
    x = torch.from_numpy(batch.latents[:2, 1]).to(lrn.dtype)
    t = int(batch.timesteps[1])
    with torch.no_grad():
        eps = lrn.family.guided_prediction(lrn.denoiser, lrn.stochastic, x, t, Conditioning(enc, added), 3.0)
        with lrn.adapters_off():
            base = lrn.family.guided_prediction(lrn.denoiser, lrn.stochastic, x, t, Conditioning(enc, added), 3.0)
    m = {}
    term = kl_term(lrn, eps, reference_eps(lrn, x, t, enc, added, st), m, transition_weight(lrn, t, st.eta, 2))
    ac = lrn.stochastic.alphas_cumprod.double()
    a, a_prev = ac[t], ac[t - 1000 // 4]  # 4 steps of 1000: t = 501 -> 251
    sigma2 = (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # eta = 1
    zero = torch.zeros_like(x, dtype=torch.float32)
    mu = lrn.stochastic.step(eps.float(), t, x.float(), eta=1.0, variance_noise=zero).prev_sample.double()
    mu_ref = lrn.stochastic.step(base.float(), t, x.float(), eta=1.0, variance_noise=zero).prev_sample.double()
    gaussian_kl = ((mu - mu_ref) ** 2).flatten(1).mean(1) / (2 * sigma2)  # per latent element, as the log-probs
    torch.testing.assert_close(term.double(), 10 * gaussian_kl.mean(), rtol=1e-4, atol=0)
    assert float(term) > 0 and m["loss/kl"] == pytest.approx(float(term))


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
@pytest.mark.parametrize("loss", ["nft", "awm"])
def test_checkpoint_resume_is_exact_with_ema_reference_and_sampler(tiny_model_dir, tmp_path, loss):
    """Saved and loaded mid-run (learner.reference.model=ema refreshed every 3 rounds, the EMA as the sampling
    policy, the KL term on), the learner continues exactly as the uninterrupted one: the kept EMA reference
    of the last refresh, the EMA and the old policy it gives come back bit for bit."""
    cfg = config(
        tiny_model_dir,
        f"learner.loss={loss}",
        "learner.reference.model=ema",
        "learner.ema.decay=0.5",
        "learner.reference.refresh_rounds=3",
        "learner.ema.sampling_policy=ema",
        "learner.reference.kl_coef=1",
    )
    batches = []
    for rnd in range(4):
        lat, prompts, scores = samples(seed=rnd)
        batches.append(learner_batch(cfg.learner, ScoredSamples(lat, prompts, prompts, scores, [{}] * 8, (64, 64)))[0])
    ref = LearnerEngine(cfg)
    ref_metrics = [train(ref, b, epochs=1) for b in batches]
    lrn = LearnerEngine(cfg)
    for b in batches[:2]:
        train(lrn, b, epochs=1)
    lrn.save_checkpoint(tmp_path / "ckpt")
    resumed = LearnerEngine(cfg)
    resumed.load_checkpoint(tmp_path / "ckpt")
    got = [train(resumed, b, epochs=1) for b in batches[2:]]
    for k, (a, b) in enumerate(zip(ref_metrics[2:], got)):  # round 2 keeps round 0's reference, round 3 refreshes
        for key in (f"loss/{loss}", "loss/kl", f"{loss}/old_eps_mse"):
            assert a[key] == b[key], (k + 2, key, a[key], b[key])
    for x, y in zip(
        ref.trainable_parameters() + ref.ema.shadow_params + ref.reference_weights,
        resumed.trainable_parameters() + resumed.ema.shadow_params + resumed.reference_weights,
    ):
        assert torch.equal(x, y)
