"""Tests for rlfh/losses/ddpo.py and rlfh/losses/advantages.py (DDPO, arXiv 2305.13301)."""

import pytest
import torch

from rlfh.losses.advantages import group_indices, per_prompt_advantages
from rlfh.losses.ddpo import ddpo_clipped_loss


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.randn(6, 3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.0])
    out = ddpo_clipped_loss(logp, logp.detach().clone(), adv)
    torch.testing.assert_close(out.loss, -adv.mean())
    out.loss.backward()
    torch.testing.assert_close(logp.grad, (-adv[:, None] / 18).expand(6, 3))  # REINFORCE gradient
    assert float(out.approx_kl) == 0.0 and float(out.clipfrac) == 0.0


def test_against_formula_worked_numbers():
    eps = 0.2
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # rho = 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    # terms: max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(2.2, 2.2) = 2.2; max(0.7, 0.8) = 0.8
    out = ddpo_clipped_loss(logp, old, adv, clip_range=eps)
    torch.testing.assert_close(out.loss, torch.tensor((-1.2 - 0.5 + 2.2 + 0.8) / 4))
    rho = torch.exp(logp - old)
    formula = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps)).mean()
    torch.testing.assert_close(out.loss, formula)
    torch.testing.assert_close(out.clipfrac, torch.tensor(0.75))


def test_default_clip_range_and_bad_inputs():
    logp = torch.tensor([0.01, -0.01])
    out = ddpo_clipped_loss(logp, torch.zeros(2), torch.tensor([1.0, 1.0]))  # eps = 1e-4 default
    torch.testing.assert_close(
        out.loss, torch.maximum(-torch.exp(logp), -torch.exp(logp).clamp(1 - 1e-4, 1 + 1e-4)).mean()
    )
    with pytest.raises(ValueError, match="old_log_prob"):
        ddpo_clipped_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="advantages"):
        ddpo_clipped_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="clip_range"):
        ddpo_clipped_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), clip_range=0.0)


def test_advantages_worked_numbers():
    # Prompt "a": rewards 1, 3 -> mean 2, std 1 -> (-1, 1); prompt "b": 0, 0, 6 -> mean 2, std sqrt(8).
    r = torch.tensor([1.0, 0.0, 3.0, 0.0, 6.0], dtype=torch.float64)
    adv = per_prompt_advantages(r, ["a", "b", "a", "b", "b"], eps=0.0 + 1e-12)
    s8 = 8**0.5
    torch.testing.assert_close(adv, torch.tensor([-1.0, -2 / s8, 1.0, -2 / s8, 4 / s8], dtype=torch.float64))


def test_advantages_clip_singletons_and_formula():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=gen)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    adv = per_prompt_advantages(r, ids)
    g = r.view(4, 3)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).flatten()
    torch.testing.assert_close(adv, expected.clamp(-5, 5))
    # Clipping at +-5: one outlier in a large group.
    r2 = torch.zeros(100)
    r2[0] = 1.0
    assert float(per_prompt_advantages(r2, [0] * 100)[0]) == 5.0
    # Singleton prompt: global stats (default) or 0.
    r3 = torch.tensor([1.0, 3.0, 10.0])
    ids3 = ["a", "a", "b"]
    glob = (10.0 - r3.mean()) / (r3.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(per_prompt_advantages(r3, ids3)[2], glob.clamp(-5, 5))
    assert float(per_prompt_advantages(r3, ids3, fallback="zero")[2]) == 0.0
    # Equal rewards -> 0.
    assert per_prompt_advantages(torch.ones(4), [0, 0, 1, 1]).abs().sum() == 0
    assert group_indices(["x", "y", "x"]).tolist() == [0, 1, 0]


def test_advantages_bad_inputs():
    with pytest.raises(ValueError, match="prompt ids"):
        per_prompt_advantages(torch.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="fallback"):
        per_prompt_advantages(torch.zeros(2), ["a", "b"], fallback="mean")
    with pytest.raises(ValueError, match="finite"):
        per_prompt_advantages(torch.tensor([0.0, float("nan")]), ["a", "a"])
