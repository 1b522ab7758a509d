"""The guidance loss (rlfh/losses/guidance.py) on worked numbers, eps* computed by hand."""

import math

import pytest
import torch

from rlfh.losses.guidance import guidance_loss, winner_noise


def test_winner_noise_and_masked_loss_on_worked_numbers():
    # one pair, latent (1, 1, 1, 2): abar = 0.64, so sqrt(abar) = 0.8, sqrt(1 - abar) = 0.6
    x_t = torch.tensor([[[[1.0, -0.2]]]])
    x0_w = torch.tensor([[[[0.5, 1.0]]]])
    eps_star = winner_noise(x_t, x0_w, torch.tensor([0.64]))
    # by hand: (1.0 - 0.8 * 0.5) / 0.6 = 1.0 ; (-0.2 - 0.8 * 1.0) / 0.6 = -5/3
    torch.testing.assert_close(eps_star, torch.tensor([[[[1.0, -5.0 / 3.0]]]]))
    # the forward process from the winner with eps* reaches the same x_t
    torch.testing.assert_close(0.8 * x0_w + 0.6 * eps_star, x_t)

    pred = torch.tensor([[[[0.5, 0.0]]]], requires_grad=True)
    mask = torch.tensor([[[[1.0, 0.0]]]])  # only the first element is inside m
    loss, err = guidance_loss(pred, eps_star, mask, coef=2.0)
    # mean over both elements of (m * (pred - eps*))^2 = ((0.5 - 1.0)^2 + 0) / 2 = 0.125; times coef 2
    assert math.isclose(float(err[0].detach()), 0.125, rel_tol=1e-6)
    assert math.isclose(float(loss), 0.25, rel_tol=1e-6)
    loss.backward()
    # d/dpred of 2 * ((pred - eps*)^2 * m) / 2 = 2 m (pred - eps*)
    torch.testing.assert_close(pred.grad, torch.tensor([[[[-1.0, 0.0]]]]))

    whole, _ = guidance_loss(pred.detach(), eps_star, None)  # global: no mask
    assert math.isclose(float(whole), (0.25 + (5.0 / 3.0) ** 2) / 2, rel_tol=1e-6)


def test_pairs_without_the_region_do_not_dilute_the_mean():
    pred = torch.zeros(3, 4, 2, 2)
    target = torch.ones(3, 4, 2, 2)
    mask = torch.zeros(3, 1, 2, 2)
    mask[0, :, 0, 0] = 1.0  # pair 0: one of four positions (4 of 16 elements) -> 0.25
    mask[2] = 1.0  # pair 2: everywhere -> 1.0
    loss, err = guidance_loss(pred, target, mask)
    torch.testing.assert_close(err, torch.tensor([0.25, 0.0, 1.0]))
    assert math.isclose(float(loss), (0.25 + 1.0) / 2)
    none, _ = guidance_loss(pred, target, torch.zeros(3, 1, 2, 2))
    assert none is None


def test_v_prediction_target_is_the_winners_velocity():
    """With a v-prediction scheduler the learner's target is v* = sqrt(abar) eps* - sqrt(1 - abar) x_0^w."""
    from diffusers import DDPMScheduler

    from families.schedule import DDPMSchedule

    sched = DDPMScheduler(prediction_type="v_prediction")
    schedule = DDPMSchedule.from_config(sched.config)  # what the learner trains with
    g = torch.Generator().manual_seed(0)
    x0_w, x0_l, eps = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([10, 600])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0_l + (1 - a).sqrt() * eps
    eps_star = winner_noise(x_t, x0_w, schedule.alpha_bar(t, torch.device("cpu")))
    v_star = schedule.target(x0_w, eps_star, t)
    torch.testing.assert_close(v_star, a.sqrt() * eps_star - (1 - a).sqrt() * x0_w)
    # v* means "x_0 = x_0^w" at x_t: x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v*
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v_star, x0_w, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused():
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match=r"alpha_bar must be in \(0, 1\)"):
        winner_noise(x, x, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        winner_noise(x, x[:1], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        guidance_loss(x, x, None, coef=-1.0)
