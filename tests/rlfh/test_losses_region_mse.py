"""Tests for rlfh/losses/region_mse.py: FairHuman's global and region errors (arXiv 2507.02714)."""

import pytest
import torch
import torch.nn.functional as F

from rlfh.losses.objectives import region_errors
from rlfh.losses.region_mse import per_sample_mse, per_sample_region_mse


def test_global_equals_mse_loss():
    gen = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    torch.testing.assert_close(per_sample_mse(pred, eps), ((pred - eps) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(per_sample_mse(pred, eps).mean(), F.mse_loss(pred, eps))
    # half precision is upcast, float64 kept
    assert per_sample_mse(pred.bfloat16(), eps.bfloat16()).dtype == torch.float32
    assert per_sample_mse(pred.double(), eps.double()).dtype == torch.float64


def test_region_worked_numbers():
    # B = 2, C = 2, 2x2 latent. Sample 0: mask covers one pixel where diff = 1 in both channels.
    pred = torch.zeros(2, 2, 2, 2)
    eps = torch.zeros(2, 2, 2, 2)
    pred[0, :, 0, 0] = 1.0  # diff 1 inside the mask
    pred[0, :, 1, 1] = 10.0  # outside the mask: ignored
    pred[1] = 2.0  # sample 1 has an empty mask
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 0.3  # any positive value counts (1[M > 0])
    # sample 0: (5 * 1)^2 over 2 of 8 elements -> 25 * 2 / 8 = 6.25 (NOT divided by the mask area).
    torch.testing.assert_close(per_sample_region_mse(pred, eps, mask, 5.0), torch.tensor([6.25, 0.0]))


def test_learner_region_errors_random_and_channel_mask():
    gen = torch.Generator().manual_seed(1)
    pred, eps = torch.randn(4, 4, 6, 6, generator=gen), torch.randn(4, 4, 6, 6, generator=gen)
    mask = (torch.rand(4, 1, 6, 6, generator=gen) > 0.6).float()
    expected = ((5.0 * (mask > 0).float() * (pred - eps)) ** 2).mean(dim=(1, 2, 3))
    masks = {"face": mask, "hand": torch.zeros_like(mask)}
    torch.testing.assert_close(region_errors(pred, eps, "face", masks, 5.0), expected)
    torch.testing.assert_close(per_sample_region_mse(pred, eps, mask.expand(4, 4, 6, 6), 5.0), expected)
    hand = region_errors(pred, eps, "hand", masks, 5.0)
    assert (hand == 0).all() and hand.dtype == torch.float32
    torch.testing.assert_close(region_errors(pred, eps, "global", masks, 5.0).mean(), F.mse_loss(pred, eps))


def test_region_gradient_only_inside_mask():
    pred = torch.randn(1, 4, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    per_sample_region_mse(pred, torch.zeros(1, 4, 4, 4), mask).sum().backward()
    assert pred.grad[..., 2:, :].abs().sum() == 0 and pred.grad[..., :2, :].abs().sum() > 0


def test_bad_shapes_raise():
    x = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        per_sample_mse(x, torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="does not fit"):
        per_sample_region_mse(x, x, torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="dims"):
        per_sample_region_mse(x, x, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        per_sample_region_mse(x, x, torch.zeros(2, 1, 4, 4), scale=0.0)
