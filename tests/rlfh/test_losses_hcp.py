"""The HcP alignment loss and the pose heatmap on worked numbers (rlfh/losses/hcp.py, rlfh/data/pose_prior.py)."""

import math

import numpy as np
import pytest
import torch

from rlfh.data.pose_prior import pose_heatmap
from rlfh.losses.hcp import hcp_alignment_loss, human_map, pooled_prior


def test_human_map_sums_the_human_tokens_attention():
    m_h = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]])  # (B=1, N=2, L=3)
    s = human_map(m_h, torch.tensor([[False, True, True]]))
    torch.testing.assert_close(s, torch.tensor([[0.8, 0.4]]))


def test_alignment_loss_on_worked_numbers():
    # latent 2x2; item 0 has a pose at the top-left cell, item 1 is left out (keep)
    prior = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.3, 0.3], [0.3, 0.3]]]])  # (2, 1, 2, 2)
    maps = [
        (1, torch.tensor([[0.5, 0.5, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])),  # err item 0: (0.25 + 0.25) / 4 = 0.125
        (1, torch.tensor([[1.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])),  # err 0
        (2, torch.tensor([[0.75], [9.0]])),  # pooled prior 0.25: err (0.75 - 0.25)^2 = 0.25
        (4, torch.tensor([[5.0], [5.0]])),  # a factor with no weight: not counted
    ]
    weights = {1: 0.5, 2: 2.0}
    loss = hcp_alignment_loss(maps, prior, weights, torch.tensor([True, False]))
    # 0.5 * mean(0.125, 0) + 2.0 * 0.25 = 0.03125 + 0.5
    assert float(loss) == pytest.approx(0.53125, abs=1e-7)
    # both items kept: item 1's error is the mean over both
    err1 = 0.5 * np.mean([np.mean((9.0 - 0.3) ** 2)] * 2) + 2.0 * (9.0 - 0.3) ** 2
    both = hcp_alignment_loss(maps, prior, weights, torch.tensor([True, True]))
    assert float(both) == pytest.approx((0.53125 + err1) / 2, rel=1e-6)
    assert hcp_alignment_loss(maps, prior, weights, torch.tensor([False, False])) is None
    assert hcp_alignment_loss(maps, prior, {8: 1.0}, torch.tensor([True, True])) is None


def test_alignment_loss_gradient_pulls_the_map_toward_the_prior():
    prior = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    s = torch.tensor([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    hcp_alignment_loss([(1, s)], prior, {1: 1.0}, torch.tensor([True])).backward()
    # d/ds mean (s - p)^2 = 2 (s - p) / 4
    torch.testing.assert_close(s.grad, torch.tensor([[-0.25, 0.25, 0.0, 0.0]]))


def test_pooled_prior_averages_blocks():
    prior = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(pooled_prior(prior, 2), torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    torch.testing.assert_close(pooled_prior(prior, 1), prior.flatten(1))


def test_pose_heatmap_renders_gaussians_at_visible_landmarks_and_pools_to_latent():
    h, w, sigma = 16, 24, 0.125  # sigma = 2 px on the 16 px side
    people = np.array([[[5.0, 3.0, 0.9], [20.0, 12.0, 0.2]]], np.float32)  # the second is not visible enough
    got = pose_heatmap(people, (h, w), sigma, min_visibility=0.5)
    assert got.shape == (1, 2, 3)
    full = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            full[y, x] = math.exp(-((x + 0.5 - 5.0) ** 2 + (y + 0.5 - 3.0) ** 2) / (2 * 2.0**2))
    want = full.reshape(2, 8, 3, 8).mean((1, 3))
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-7)
    # the invisible landmark drew nothing: its cell stays ~0; no person -> all zeros
    assert got[0, 1, 2] < 1e-6
    assert not pose_heatmap(np.zeros((0, 33, 3), np.float32), (h, w), sigma).any()
    # two landmarks: the max of their Gaussians, not the sum
    two = pose_heatmap(np.array([[[5.0, 3.0, 1.0], [5.0, 3.0, 1.0]]], np.float32), (h, w), sigma)
    np.testing.assert_allclose(two, got, rtol=1e-6)
