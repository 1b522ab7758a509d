"""Tests for rlfh/losses/dpo_variants.py (hinge and IPO Diffusion-DPO, trl's loss types on the Diffusion-DPO margin)."""

import pytest
import torch
import torch.nn.functional as F

from rlfh.losses.dpo import dpo_logits
from rlfh.losses.dpo_variants import dpo_hinge_loss, dpo_ipo_loss, dpo_variant_loss
from rlfh.losses.region_mse import per_sample_mse

# Worked pair values: model_diff = (0.10 - 0.30, 0.20 - 0.10) = (-0.2, 0.1); ref_diff = (0.0, 0.0)
MSE_TW = torch.tensor([0.10, 0.20])
MSE_TL = torch.tensor([0.30, 0.10])
MSE_RW = torch.tensor([0.20, 0.15])
MSE_RL = torch.tensor([0.20, 0.15])


def test_logits_worked_numbers():
    # logits = -0.5 * (model_diff - ref_diff) = (0.1, -0.05)
    torch.testing.assert_close(dpo_logits(MSE_TW, MSE_TL, MSE_RW, MSE_RL), torch.tensor([0.1, -0.05]))


def test_hinge_worked_numbers():
    # beta = 5: beta * logits = (0.5, -0.25) -> relu(1 - .) = (0.5, 1.25) -> mean 0.875
    torch.testing.assert_close(dpo_hinge_loss(MSE_TW, MSE_TL, MSE_RW, MSE_RL, beta=5.0), torch.tensor(0.875))
    # beta = 20: (2.0, -1.0) -> (0, 2) -> 1.0
    torch.testing.assert_close(dpo_hinge_loss(MSE_TW, MSE_TL, MSE_RW, MSE_RL, beta=20.0), torch.tensor(1.0))


def test_ipo_worked_numbers():
    # beta = 5: target 1 / (2 * 5) = 0.1 -> ((0.1 - 0.1)^2 + (-0.05 - 0.1)^2) / 2 = 0.0225 / 2 = 0.01125
    torch.testing.assert_close(dpo_ipo_loss(MSE_TW, MSE_TL, MSE_RW, MSE_RL, beta=5.0), torch.tensor(0.01125))


def test_against_formula_from_predictions():
    # Same t and eps for winner and loser; MSEs from eps predictions (Diffusion-DPO, arXiv 2311.12908).
    gen = torch.Generator().manual_seed(0)
    b, beta = 4, 5000.0
    eps = torch.randn(b, 4, 8, 8, generator=gen)
    preds = [eps + 0.1 * torch.randn(b, 4, 8, 8, generator=gen) for _ in range(4)]
    mse = [per_sample_mse(p, eps) for p in preds]  # theta_w, theta_l, ref_w, ref_l
    model_diff, ref_diff = mse[0] - mse[1], mse[2] - mse[3]
    inside = -0.5 * beta * (model_diff - ref_diff)
    torch.testing.assert_close(dpo_hinge_loss(*mse, beta=beta), F.relu(1 - inside).mean())
    ipo = ((inside / beta - 1 / (2 * beta)) ** 2).mean()  # ~1e-8 here: compare relatively
    torch.testing.assert_close(dpo_ipo_loss(*mse, beta=beta), ipo, rtol=1e-5, atol=0)
    torch.testing.assert_close(dpo_variant_loss("hinge", *mse, beta=beta), dpo_hinge_loss(*mse, beta=beta))
    torch.testing.assert_close(dpo_variant_loss("ipo", *mse, beta=beta), dpo_ipo_loss(*mse, beta=beta))


def test_gradient_direction():
    # Lowering the winner's policy MSE must lower both losses (while the hinge is active).
    mse_tw = MSE_TW.clone().requires_grad_(True)
    dpo_hinge_loss(mse_tw, MSE_TL, MSE_RW, MSE_RL, beta=5.0).backward()
    assert bool((mse_tw.grad > 0).all())
    mse_tw.grad = None
    dpo_ipo_loss(mse_tw, MSE_TL, MSE_RW, MSE_RL, beta=5.0).backward()
    assert mse_tw.grad[1] > 0  # pair 1 is below its target margin


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        dpo_logits(MSE_TW, MSE_TL[:1], MSE_RW, MSE_RL)
    with pytest.raises(ValueError, match="beta"):
        dpo_hinge_loss(MSE_TW, MSE_TL, MSE_RW, MSE_RL, beta=0.0)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_variant_loss("sigmoid", MSE_TW, MSE_TL, MSE_RW, MSE_RL, beta=1.0)
