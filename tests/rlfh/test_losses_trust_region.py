"""Tests for rlfh/losses/trust_region.py (Flow-DPPO's KL mask, GRPO-Guard's ratio normalization)."""

import math

import pytest
import torch

from families.ddim import ddim_step_with_logprob
from rlfh.losses.trust_region import dppo_loss, gaussian_mean_kl, guard_log_ratio, guard_loss, log_ratio_drift


def test_gaussian_kl_worked_numbers():
    # mean gap 1 everywhere, sigma 0.5: 1 / (2 * 0.25) = 2
    kl = gaussian_mean_kl(torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2), torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(kl, torch.full((3,), 2.0))


def test_dppo_worked_numbers():
    # rho = 1.5, 1.5, 0.5, 0.5; A = 1, 1, -1, 1; KL = 1, 0, 1, 1; delta = 0.5
    # 0: KL > delta, A > 0, rho > 1 -> masked; 1: inside the region -> -1.5;
    # 2: KL > delta, A < 0, rho < 1 -> masked; 3: KL > delta but corrective (A > 0, rho < 1) -> -0.5
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_(True)
    out = dppo_loss(logp, torch.zeros(4), torch.tensor([1.0, 1.0, -1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5)
    torch.testing.assert_close(out.loss, torch.tensor(-0.5))
    assert float(out.limited_frac) == 0.5
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -1.5, 0.0, -0.5]) / 4)  # d(-A rho)/dlogp = -A rho


def test_dppo_mask_is_asymmetric_and_inclusive_at_the_threshold():
    """The references' rule: drop when kl_score >= delta and the ratio moves with A. Every term here is
    outside (KL = delta = 0.25 or above), so a symmetric mask on KL alone would drop all four."""
    # rho = 2, 0.5, 2, 0.5; A = 1, 1, -1, -1: terms 0 (A > 0, rho > 1) and 3 (A < 0, rho < 1) move with A
    logp = torch.log(torch.tensor([2.0, 0.5, 2.0, 0.5], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    out = dppo_loss(
        logp, torch.zeros(4, dtype=torch.float64), adv, torch.tensor([0.25, 0.25, 3.0, 0.25], dtype=torch.float64), 0.25
    )
    # kept: -1 * 0.5 and -(-1) * 2 -> (-0.5 + 2) / 4
    torch.testing.assert_close(out.loss, torch.tensor(0.375, dtype=torch.float64))
    assert float(out.limited_frac) == 0.5
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 2.0, 0.0], dtype=torch.float64) / 4)


def test_guard_clips_large_moves_and_clipped_terms_carry_no_gradient():
    """sigma = 0.5, eps = 0.2; log rho~ = 0.5 (log rho + KL):
    0: A = 1,  log rho = 0.9,  KL = 0.1 -> rho~ = e^0.5 = 1.6487 > 1.2: clipped at -1.2, no gradient
    1: A = -1, log rho = -1.1, KL = 0.1 -> rho~ = e^-0.5 = 0.6065 < 0.8: clipped at 0.8, no gradient
    2: A = 1,  log rho = 0.1,  KL = 0.1 -> rho~ = e^0.1 = 1.1052 inside: -1.1052
    3: A = 1,  log rho = -1.1, KL = 0.1 -> rho~ = 0.6065 out of the band on the pessimistic side: -0.6065,
       unclipped (PPO's max keeps it), its gradient kept; clipfrac counts it (|rho~ - 1| > eps)"""
    logp = torch.tensor([0.9, -1.1, 0.1, -1.1], dtype=torch.float64, requires_grad=True)
    kl = torch.full((4,), 0.1, dtype=torch.float64, requires_grad=True)  # carries the gradient, as in the learner
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    sigma = torch.full((4,), 0.5, dtype=torch.float64)
    out = guard_loss(logp, torch.zeros(4, dtype=torch.float64), adv, kl, sigma, 0.2)
    e = math.exp
    torch.testing.assert_close(out.loss, torch.tensor((-1.2 + 0.8 - e(0.1) - e(-0.5)) / 4, dtype=torch.float64))
    assert float(out.limited_frac) == 0.75 > 0
    out.loss.backward()
    # d(-A rho~)/d logp = d(-A rho~)/d KL = -A rho~ sigma, / 4 for the mean; 0 where clipped
    expected = torch.tensor([0.0, 0.0, -e(0.1) * 0.5, -e(-0.5) * 0.5], dtype=torch.float64) / 4
    torch.testing.assert_close(logp.grad, expected)
    torch.testing.assert_close(kl.grad, expected)
    # the per-step weight lambda multiplies every term and its gradient, the clipping unchanged
    logp.grad = None
    w = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    out_w = guard_loss(
        logp, torch.zeros(4, dtype=torch.float64), adv, kl.detach(), torch.full((4,), 0.5, dtype=torch.float64), 0.2, w
    )
    torch.testing.assert_close(
        out_w.loss, torch.tensor((-2 * 1.2 + 3 * 0.8 - 4 * e(0.1) - 5 * e(-0.5)) / 4, dtype=torch.float64)
    )
    assert float(out_w.limited_frac) == 0.75
    out_w.loss.backward()
    torch.testing.assert_close(logp.grad, w * expected)
    with pytest.raises(ValueError, match="step_weight"):
        guard_loss(logp, torch.zeros(4), adv, torch.zeros(4), torch.ones(4), 0.2, -1.0)


def test_guard_normalized_log_ratio_is_the_drift_free_step_gap():
    """sigma (log rho + KL) = mean(Delta z) exactly, with x = mu_old + sigma z the recorded step."""
    g = torch.Generator().manual_seed(0)
    alphas = torch.tensor([0.95, 0.8, 0.5], dtype=torch.float64)
    x = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    e_old, e_new = torch.randn(2, 4, 4, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    kw = dict(alphas_cumprod=alphas, final_alpha_cumprod=1.0, step_ratio=1, eta=1.0)
    old = ddim_step_with_logprob(e_old, 2, x, noise=z, **kw)
    new = ddim_step_with_logprob(e_new, 2, x, prev_sample=old.prev_sample, **kw)
    kl = gaussian_mean_kl(new.mean, old.mean, new.std_dev)
    normalized = guard_log_ratio(new.log_prob, old.log_prob, kl, new.std_dev)
    torch.testing.assert_close(normalized, ((new.mean - old.mean) * z).flatten(1).mean(1))
    # and the raw log-ratio carries the -KL drift plus a 1/sigma-scaled spread
    raw = new.log_prob - old.log_prob
    torch.testing.assert_close(raw, normalized / new.std_dev - kl)


def test_guard_at_the_old_policy_is_reinforce_scaled_by_sigma():
    logp = torch.randn(3, 2, requires_grad=True)
    std = torch.tensor([0.5, 0.1])  # (T,) per step: passed per (sample, step)
    adv = torch.tensor([1.0, -2.0, 0.5])
    out = guard_loss(logp, logp.detach(), adv, torch.zeros(3, 2), std.expand(3, 2), clip_range=0.2)
    torch.testing.assert_close(out.loss, -adv.mean())
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * std / 6)


def test_drift_per_timestep_and_bad_inputs():
    logp, old = torch.tensor([[0.0, -1.0], [0.0, -3.0]]), torch.zeros(2, 2)
    torch.testing.assert_close(log_ratio_drift(logp, old), torch.tensor([0.0, -2.0]))
    with pytest.raises(ValueError, match="threshold"):
        dppo_loss(logp, old, torch.ones(2), torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="kl shape"):
        dppo_loss(logp, old, torch.ones(2), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="std"):
        gaussian_mean_kl(torch.ones(2, 1), torch.ones(2, 1), torch.tensor([0.0, 1.0]))
    assert math.isfinite(float(guard_log_ratio(logp, old, torch.zeros(2, 2), torch.ones(2)).sum()))
