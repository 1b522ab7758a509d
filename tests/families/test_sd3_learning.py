"""Learning on the tiny SD3 model, one test per loss class, through the loops the UNet families' learning tests
use (no copies): Diffusion-DPO on the velocity error (tests/test_sd15_end_to_end.py: dpo_gain), DDPO/GRPO on
the Flow-GRPO SDE sampler with only ``rollout.eta=1.0`` (tests/rlfh/test_ddpo.py: ddpo_learning_gain), NFT
(tests/rlfh/test_online_rl.py: online_learning_gain) and DRaFT / ReFL through the flow sampler's Euler steps
(tests/rlfh/test_losses_draft.py: draft_learning_gain); one step of AWM, RWR, IPO and the DDPO trust regions;
and the Euler step's x_0 prediction and gradient that reward back-propagation takes on a flow model.

Each margin is about half the smallest gain over 3 seeds (``python -m tests.learning_sweep NAME --model
rlfh:tiny-sd3 --seeds 0 1 2``, 1 OpenMP thread, 2 shared and loaded cores); the test trains with seed 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfh.config.schema import load_config
from tests.conftest import REPO


def config(model_dir, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [f"model.path={model_dir}", "logging.wandb=false", *overrides])


# ---------------------------------------------------------------- the flow step reward back-propagation takes


def test_euler_step_x0_prediction_and_its_gradient():
    """On the straight path x_t = (1 - sigma) x0 + sigma eps the true velocity v = eps - x0 gives x0_hat = x_t -
    sigma v = x0 exactly and an Euler step landing on the path at sigma'; d x0_hat / d v = -sigma and
    d x_t' / d v = sigma' - sigma per element (what DRaFT's and ReFL's gradients go through)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from families.sd3 import SD3

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[1]
    sigma, sigma_next = float(scheduler.sigmas[1]), float(scheduler.sigmas[2])
    x_t = (1 - sigma) * x0 + sigma * eps
    v = (eps - x0).requires_grad_(True)
    x_next, x0_hat = SD3().step_and_x0(scheduler, v, t, x_t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_next, (1 - sigma_next) * x0 + sigma_next * eps, rtol=0, atol=1e-5)
    (gx0,) = torch.autograd.grad(x0_hat.sum(), v, retain_graph=True)
    (gnext,) = torch.autograd.grad(x_next.sum(), v)
    torch.testing.assert_close(gx0, torch.full_like(v, -sigma))
    torch.testing.assert_close(gnext, torch.full_like(v, sigma_next - sigma))


# DRaFT on the flow model: the gradient through the Euler steps before the last one (whose sigma ~ 0.003 carries
# none: ModelFamily.last_step_untrainable). 3 steps of sigma 1 -> 0.75 -> 0.003 -> 0 (shift 3).
FLOW_DRAFT = {
    "draft_k": ("learner.draft.k=2",),  # steps 1 and 2: the gradient through 0.75 -> 0.003
    "refl": ("learner.draft.refl_range=[0.34,0.66]",),  # j = 1: x0_hat = x_1 - 0.75 v_hat
}


# ---------------------------------------------------------------- one step of the other losses


def scored_batch(cfg, n: int = 8):
    """Random latents of two prompts scored by their channel-0 mean, in the loss's batch (samples or pairs)."""
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch

    lat = np.random.default_rng(0).standard_normal((n, 4, 8, 8)).astype(np.float32)
    prompts = ["a"] * (n // 2) + ["b"] * (n // 2)
    scores = lat[:, 0].mean(axis=(1, 2)).tolist()
    return learner_batch(cfg.learner, ScoredSamples(lat, prompts, prompts, scores, [{}] * n, (64, 64)))[0]


def sde_batch(cfg, lrn):
    """A round of the Flow-GRPO SDE sampler (rollout.eta=1.0) recorded for DDPO, 2 prompts x 2 samples."""
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import ddpo_window, learner_batch
    from tests.rlfh.learner_sampler import policy_sampler
    from tests.rlfh.test_ddpo import settings_of

    s, st, prompts = policy_sampler(cfg, lrn), settings_of(cfg), ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=ddpo_window(cfg, 0))
    samples = ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st)
    return learner_batch(cfg.learner, samples)[0]


SMALL = ["learner.train_batch_size=4", "learner.micro_batch_size_per_gpu=4"]
FLOW_DDPO = ["learner.loss=ddpo", "rollout.eta=1.0", "rollout.num_inference_steps=4", *SMALL]
ONE_STEP = {  # loss: (overrides, the batch builder, the loss metric)
    "awm": (["learner.loss=awm", *SMALL], "scored", "loss/awm"),
    "rwr": (["learner.loss=rwr", *SMALL], "scored", "loss/rwr"),
    # one pair per prompt: 2 pairs, one optimizer step of 2
    "dpo_ipo": (
        ["learner.loss=dpo_ipo", "learner.train_batch_size=2", "learner.micro_batch_size_per_gpu=2"],
        "scored",
        "loss/dpo_ipo",
    ),
    "ddpo_dppo": ([*FLOW_DDPO, "learner.ddpo.trust_region=dppo"], "sde", "loss/ddpo"),
    "ddpo_guard": ([*FLOW_DDPO, "learner.ddpo.trust_region=guard"], "sde", "loss/ddpo"),
}


@pytest.mark.parametrize("name", sorted(ONE_STEP))
def test_one_step_of_each_loss_trains_on_sd3(tiny_sd3_dir, name):
    """AWM and RWR on scored samples, IPO on pairs (the velocity errors), the DDPO trust regions on the SDE
    sampler's recorded steps: one optimizer step, a finite loss, and the LoRA moves."""
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train

    overrides, kind, metric = ONE_STEP[name]
    cfg = config(tiny_sd3_dir, *overrides)
    lrn = LearnerEngine(cfg)
    batch = sde_batch(cfg, lrn) if kind == "sde" else scored_batch(cfg)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    assert np.isfinite(m[metric]), m
    if kind == "sde":
        assert m["ddpo/recorded_logprob_max_diff"] < 1e-5  # the learner scores the sampler's SDE steps
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())


# ---------------------------------------------------------------- learning, one test per loss class
# Gains over seeds 0, 1, 2 (python -m tests.learning_sweep NAME --model rlfh:tiny-sd3 --seeds 0 1 2; 1 OpenMP
# thread, 2 shared loaded cores), each a rise of the reward at fixed seeds that training never samples:
#   dpo (6 rounds of tests/test_sd15_end_to_end.py's loop, channel-0 mean): 0.4759, 0.4773, 0.4296 -> margin 0.2.
#       Before the loser's own velocity target (rlfh/losses/objectives.py: target_l) the same loop lost
#       -0.2996, -0.2256, -0.2039: the loser's error was taken against the winner's eps - x0_w.
#   ddpo_flow (12 rounds, rollout.eta=1.0, the Flow-GRPO SDE step; channel-0 mean at eta = 0): 0.9968, 1.0805,
#       0.5801 -> margin 0.25.
#   nft (8 rounds, lr 1e-2, 2 epochs): 0.7565, 0.9426, 1.1061 -> margin 0.35.
#   flow_draft_draft_k (K = 2, 8 rounds, lr 1e-2, BrightFace at fixed seeds): 0.0067, 0.0059, 0.0051 -> 0.0025;
#   flow_draft_refl (j = 1 of 3, 8 rounds, lr 1e-2): 0.0095, 0.0065, 0.0059 -> 0.003. DRaFT through the last step
#       alone (K = 1, lr 5e-2, 5 rounds) measured -0.0111, -0.0005, 0.0056: no signal, as the last sigma predicts.
LEARNING = {"dpo": 0.2, "ddpo_flow": 0.25, "nft": 0.35, "flow_draft_draft_k": 0.0025, "flow_draft_refl": 0.003}
DRAFT_RUN = {"rounds": 8, "lr": "1e-2"}


def sd3_gain(name: str, model_dir: str, seed: int = 0) -> float:
    """The learning run ``name`` of tests/learning_sweep.py on a tiny flow model (the loops shared with the UNets)."""
    from tests.learning_sweep import runs

    extra = DRAFT_RUN if name.startswith("flow_draft") else {}
    return runs()[name](model_dir, seed, **extra)


@pytest.mark.slow  # 20 - 40 s on 2 loaded cores
@pytest.mark.parametrize("name", ["dpo", "nft"])
def test_dpo_and_nft_raise_the_reward_on_sd3(tiny_sd3_dir, name):
    assert sd3_gain(name, tiny_sd3_dir) >= LEARNING[name]


@pytest.mark.slow  # 35 s on 2 loaded cores (12 SDE rounds)
def test_ddpo_on_the_sde_sampler_raises_the_reward_on_sd3(tiny_sd3_dir):
    assert sd3_gain("ddpo_flow", tiny_sd3_dir) >= LEARNING["ddpo_flow"]


@pytest.mark.slow  # 15 - 25 s on 2 loaded cores
@pytest.mark.parametrize("name", ["flow_draft_draft_k", "flow_draft_refl"])
def test_reward_backprop_through_the_flow_sampler_raises_the_reward(tiny_sd3_dir, name):
    assert sd3_gain(name, tiny_sd3_dir) >= LEARNING[name]


# The same runs on the tiny FLUX (--model rlfh:tiny-flux, 1 OpenMP thread, quiet AMD EPYC): flow_draft_draft_k
# 0.0277, 0.0259, 0.0281 -> margin 0.013; flow_draft_refl 0.0272, 0.0246, 0.0267 -> margin 0.012.
FLUX_LEARNING = {"flow_draft_draft_k": 0.013, "flow_draft_refl": 0.012}


@pytest.mark.slow  # a few seconds each on a quiet machine; the tiny FLUX's first build is the fixture's
@pytest.mark.parametrize("name", ["flow_draft_draft_k", "flow_draft_refl"])
def test_reward_backprop_through_the_flux_sampler_raises_the_reward(tiny_flux_dir, name):
    assert sd3_gain(name, tiny_flux_dir) >= FLUX_LEARNING[name]


def test_dpo_scores_the_loser_against_its_own_velocity_target():
    """A flow model's target eps - x0 differs between winner and loser (same eps, two x0): each error is taken
    against its own, and without ``target_l`` both are the winner's (the eps-prediction case)."""
    from rlfh.losses.objectives import pairwise_objectives

    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl, tw, tl = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(6))
    _, m = pairwise_objectives("dpo", 100.0, pw, pl, rw, rl, tw, {}, {}, ["global"], 5.0, target_l=tl)
    assert m["dpo/mse_theta_l"] == pytest.approx(float((pl - tl).pow(2).mean()), rel=1e-5)
    assert m["dpo/mse_ref_l"] == pytest.approx(float((rl - tl).pow(2).mean()), rel=1e-5)
    assert m["dpo/mse_theta_w"] == pytest.approx(float((pw - tw).pow(2).mean()), rel=1e-5)
    _, shared = pairwise_objectives("dpo", 100.0, pw, pl, rw, rl, tw, {}, {}, ["global"], 5.0)
    assert shared["dpo/mse_theta_l"] == pytest.approx(float((pl - tw).pow(2).mean()), rel=1e-5)


def test_draft_on_sd3_trains_through_the_euler_steps_and_refuses_the_last_step_alone(tiny_sd3_dir):
    """One DRaFT-K (K = 2) round on SD3: two steps with gradient, the decoded reward scored, the LoRA moved; a
    variant whose only step with gradient is the last (sigma ~ 0.003) is refused naming the reason."""
    from rlfh.config.schema import ConfigError
    from rlfh.data.batches import PromptBatch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train

    reward = ["rewards.0.target=tests.fixture_rewards:BrightFace", "rewards.0.name=bright_face"]
    small = ["rollout.height=32", "rollout.width=32", "rollout.num_inference_steps=3", "rollout.guidance_scale=1.0"]
    cfg = config(tiny_sd3_dir, "learner.loss=draft", *FLOW_DRAFT["draft_k"], *reward, *small)
    lrn = LearnerEngine(cfg)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, PromptBatch(["a", "b", "a", "b"]), epochs=1)
    assert m["draft/grad_steps"] == 2.0 and m["draft/first_grad_step"] == 1.0
    assert np.isfinite(m["loss/draft/global"]) and m["loss/draft/global"] == pytest.approx(
        -m["draft/reward/bright_face"]
    )
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
    for last_only in (["learner.draft.variant=draft_lv"], ["learner.draft.k=1"]):
        with pytest.raises(ConfigError, match="trains the last sampling step alone on the sd3 family: the flow"):
            config(tiny_sd3_dir, "learner.loss=draft", *last_only, *reward, *small)
