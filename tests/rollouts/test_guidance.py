"""FaceScore's sampling guidance (arXiv 2406.17100, appendix, eqs. 5-6): the formulas on worked numbers."""

import pytest
import torch

from rollouts.guidance import ScoreGuidance, guided_eps, x0_estimate


def test_x0_estimate_eq5():
    # abar 0.64: z_0 = (z_t - 0.6 eps) / 0.8
    z = torch.tensor([[1.0, -0.4]])
    eps = torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(x0_estimate(z, eps, 0.64), torch.tensor([[0.875, -2.0]]))
    # one abar per sample: (1 - 0.6) / 0.8, (1 - 0.8) / 0.6
    z2, eps2 = torch.ones(2, 1), torch.ones(2, 1)
    torch.testing.assert_close(x0_estimate(z2, eps2, torch.tensor([0.64, 0.36])), torch.tensor([[0.5], [1 / 3]]))


def test_guided_eps_eq6_with_clamp():
    eps = torch.tensor([0.5, -0.2, 0.0])
    grad = torch.tensor([2.0, -10.0, 1.0])
    # mu * grad = (0.2, -1.0, 0.1); clamped to 0.5: (0.2, -0.5, 0.1)
    torch.testing.assert_close(guided_eps(eps, grad, 0.1, 0.5), torch.tensor([0.3, 0.3, -0.1]))
    torch.testing.assert_close(guided_eps(eps, grad, 0.1, None), torch.tensor([0.3, 0.8, -0.1]))


def test_gradient_is_taken_at_z_t_through_eq5_with_eps_constant():
    # score = sum_c,h,w weight * image with image = first 3 channels of z_0: d score / d z_t = weight / sqrt(abar)
    weight = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    guide = ScoreGuidance(lambda im: (im * weight).sum((1, 2, 3)), mu=0.3, clamp=None)
    z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    grad = guide.gradient(z, eps, 0.25, lambda x0: x0[:, :3])
    expected = torch.zeros_like(z)
    expected[:, :3] = weight / 0.5
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(guide.apply(z, eps, 0.25, lambda x0: x0[:, :3]), eps - 0.3 * expected)
    # nothing to score (a constant score): no guidance
    flat = ScoreGuidance(lambda im: torch.zeros(im.shape[0]), mu=1.0)
    torch.testing.assert_close(flat.apply(z, eps, 0.25, lambda x0: x0[:, :3]), eps)


@pytest.mark.parametrize("mu, clamp", [(0.0, None), (-1.0, None), (1.0, 0.0)])
def test_bad_knobs_are_refused(mu, clamp):
    with pytest.raises(ValueError, match="score guidance"):
        ScoreGuidance(lambda im: im.sum((1, 2, 3)), mu=mu, clamp=clamp)
