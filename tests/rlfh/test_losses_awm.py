"""Tests for rlfh/losses/awm.py (Advantage Weighted Matching, arXiv 2509.25050)."""

import math

import pytest
import torch

from rlfh.losses.awm import awm_loss
from rlfh.losses.rwr import weighted_loss


def test_worked_numbers():
    # rho = exp(old_error - error) = 1.5 and 0.5; A = (1, -1), clip 0.2:
    # max(-1.5, -1.2) = -1.2, max(0.5, 0.8) = 0.8 -> L = -0.2; both ratios outside [0.8, 1.2]
    error = torch.tensor([0.5, 0.3], dtype=torch.float64)
    old = error + torch.tensor([math.log(1.5), math.log(0.5)], dtype=torch.float64)
    out = awm_loss(error, torch.tensor([1.0, -1.0], dtype=torch.float64), old, clip_range=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(-0.2, dtype=torch.float64))
    assert float(out.clipfrac) == 1.0 and float(out.ratio_mean) == pytest.approx(1.0)


def test_on_policy_gradient_is_the_advantage_weighted_denoising_loss():
    """At rho = 1 AWM's gradient is RWR's weighted_loss gradient with the advantages as weights."""
    adv = torch.tensor([1.5, -0.5, 0.0, -1.0])
    e1 = torch.rand(4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = awm_loss(e1, adv)  # on-policy: old = sg(error)
    torch.testing.assert_close(out.loss, -adv.mean())
    out.loss.backward()
    e2 = e1.detach().clone().requires_grad_(True)
    weighted_loss(e2, adv).backward()
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(e1.grad, adv / 4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        awm_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="clip_range"):
        awm_loss(torch.zeros(2), torch.zeros(2), clip_range=0.0)
    with pytest.raises(ValueError, match="finite"):
        awm_loss(torch.zeros(1), torch.tensor([math.inf]))


def test_per_region_objectives_match_the_loss():
    from rlfh.losses.objectives import advantage_objectives
    from rlfh.losses.region_mse import per_sample_mse

    g = torch.Generator().manual_seed(4)
    pred, old, eps = (torch.randn(4, 4, 4, 4, generator=g) for _ in range(3))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    objs, m = advantage_objectives("awm", pred, old, eps, adv, {}, ["global"], 5.0, clip_range=0.2)
    expected = awm_loss(per_sample_mse(pred, eps), adv, per_sample_mse(old, eps), 0.2)
    torch.testing.assert_close(objs["global"], expected.loss)
    assert m["awm/clipfrac"] == pytest.approx(float(expected.clipfrac))
    on_policy, _ = advantage_objectives("awm", pred, None, eps, adv, {}, ["global"], 5.0)
    torch.testing.assert_close(on_policy["global"], -adv.mean())
