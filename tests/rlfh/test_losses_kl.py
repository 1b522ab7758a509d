"""Tests for rlfh/losses/kl.py: the KL between reverse transitions as a weighted eps gap."""

import math

import pytest
import torch

from families.ddim import ddim_step_with_logprob
from rlfh.losses.kl import ddim_transition_coefficients, eps_kl, per_sample_eps_kl, transition_kl_weight


def test_worked_numbers():
    # abar_t = 0.5 -> abar_prev = 0.8, eta = 1: sigma^2 = 0.2/0.5 * (1 - 0.5/0.8) = 0.15,
    # k = sqrt(1 - 0.8 - 0.15) - sqrt(0.8 * 0.5 / 0.5) = sqrt(0.05) - sqrt(0.8) = -0.6708..., k^2 = 0.45,
    # w = 0.45 / (2 * 0.15) = 1.5
    x_coef, k, sigma = ddim_transition_coefficients(0.5, 0.8, 1.0)
    assert float(sigma) ** 2 == pytest.approx(0.15)
    assert float(k) == pytest.approx(math.sqrt(0.05) - math.sqrt(0.8))
    assert float(x_coef) == pytest.approx(math.sqrt(1.6))
    assert float(transition_kl_weight(0.5, 0.8, 1.0)) == pytest.approx(1.5)
    assert float(transition_kl_weight(0.5, 0.8, 1.0, "v_prediction")) == pytest.approx(0.75)  # abar_t * w
    # eps gap 2 everywhere: coef 0.1 * mean(4) = 0.4; with the weight 1.5: 0.6
    pred, ref = torch.full((2, 4, 2, 2), 3.0), torch.full((2, 4, 2, 2), 1.0)
    torch.testing.assert_close(eps_kl(pred, ref, 0.1), torch.tensor(0.4))
    torch.testing.assert_close(eps_kl(pred, ref, 0.1, torch.full((2,), 1.5)), torch.tensor(0.6))


def test_weight_times_eps_gap_is_the_gaussian_kl_of_the_ddim_step():
    """||mu_theta - mu_ref||^2 / (2 sigma^2) from families/ddim.py's means equals w_t ||eps gap||^2."""
    g = torch.Generator().manual_seed(0)
    alphas = torch.tensor([0.95, 0.8, 0.5, 0.2], dtype=torch.float64)
    for t, step_ratio, eta in ((2, 1, 1.0), (3, 2, 1.0), (3, 1, 0.5)):
        x = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
        e1, e2 = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
        kw = dict(alphas_cumprod=alphas, final_alpha_cumprod=1.0, step_ratio=step_ratio, eta=eta, generator=g)
        s1 = ddim_step_with_logprob(e1, t, x, **kw)
        s2 = ddim_step_with_logprob(e2, t, x, **kw)
        kl = (s1.mean - s2.mean).pow(2).flatten(1).mean(1) / (2 * s1.std_dev**2)
        w = transition_kl_weight(alphas[t], alphas[t - step_ratio], eta)
        torch.testing.assert_close(kl, per_sample_eps_kl(e1, e2, w.expand(3)))


def test_eta_one_consecutive_steps_give_ddpm_elbo_weights():
    # DDPM (Ho et al. eq. 11-12): mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), sigma^2 = beta~_t
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    t = torch.tensor([1, 10, 500, 999])
    x_coef, k, sigma = ddim_transition_coefficients(abar[t], abar[t - 1], 1.0)
    torch.testing.assert_close(x_coef, 1 / alphas[t].sqrt())
    torch.testing.assert_close(k, -betas[t] / (alphas[t].sqrt() * (1 - abar[t]).sqrt()))
    beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
    torch.testing.assert_close(sigma**2, beta_tilde)
    torch.testing.assert_close(
        transition_kl_weight(abar[t], abar[t - 1]), betas[t] ** 2 / (2 * beta_tilde * alphas[t] * (1 - abar[t]))
    )


def test_gradient_only_into_the_policy_and_bad_inputs():
    pred, ref = torch.zeros(2, 1, 1, 1, requires_grad=True), torch.ones(2, 1, 1, 1, requires_grad=True)
    eps_kl(pred, ref, 2.0).backward()
    assert ref.grad is None
    torch.testing.assert_close(pred.grad, torch.full((2, 1, 1, 1), -2.0))  # 2 * 2 * (0 - 1) / 2
    with pytest.raises(ValueError, match="coef"):
        eps_kl(pred, ref, -1.0)
    with pytest.raises(ValueError, match="denoising step"):
        transition_kl_weight(0.8, 0.5)
    with pytest.raises(ValueError, match="eta"):
        transition_kl_weight(0.5, 0.8, 0.0)
