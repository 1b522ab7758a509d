"""The flow-matching foundation (families/flow.py) on worked numbers: the forward process and velocity
target against diffusers' ``FlowMatchEulerDiscreteScheduler``, and the Flow-GRPO SDE step against its
formula (flow_grpo's ``sde_step_with_logprob``), computed here by hand."""

import math

import pytest
import torch

from families.flow import FlowSchedule, flow_sde_step_with_logprob, sde_step_coefficients
from families.sd3 import SD3

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sd3_scheduler(steps: int | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if steps:
        s.set_timesteps(steps)
    return s


def test_sde_step_worked_numbers():
    """sigma = 0.5 -> 0.25, a = 1: s_t = sqrt(0.5 / 0.5) = 1, dt = -0.25, so
    mu = x (1 - 0.25 / (2 * 0.5)) + v (1 + 0.5 / (2 * 0.5)) (-0.25) = 0.75 x - 0.375 v and std = sqrt(0.25) = 0.5.
    x = 2, v = 1: mu = 1.125; z = 0.4: x' = 1.325; log p = -0.2^2 / (2 * 0.25) - log 0.5 - log sqrt(2 pi)."""
    x, v, z = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 0.4)
    out = flow_sde_step_with_logprob(v, x, torch.tensor(0.5), torch.tensor(0.25), sigma_max=0.9, eta=1.0, noise=z)
    assert float(out.mean) == pytest.approx(1.125, abs=1e-6)
    assert float(out.std_dev) == pytest.approx(0.5, abs=1e-7)
    assert float(out.prev_sample) == pytest.approx(1.325, abs=1e-6)
    assert float(out.log_prob) == pytest.approx(-0.08 - math.log(0.5) - LOG_SQRT_2PI, abs=1e-6)
    # scoring the recorded x' gives the same log-prob
    again = flow_sde_step_with_logprob(
        v, x, torch.tensor(0.5), torch.tensor(0.25), sigma_max=0.9, eta=1.0, prev_sample=out.prev_sample
    )
    assert torch.equal(again.log_prob, out.log_prob)


def test_sde_step_at_sigma_one_uses_the_schedules_second_sigma():
    """sigma = 1 -> 0.8 with sigma_max = 0.8, a = 0.5: s_t = 0.5 sqrt(1 / 0.2) = sqrt(1.25), dt = -0.2, so
    mu = x (1 - 1.25 * 0.1) + v (1 + 0) (-0.2) = 0.875 x - 0.2 v and std = sqrt(1.25 * 0.2) = 0.5."""
    x = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)
    v = torch.tensor([-1.0, 0.5]).reshape(2, 1, 1, 1)
    out = flow_sde_step_with_logprob(v, x, 1.0, 0.8, sigma_max=0.8, eta=0.5, noise=torch.zeros_like(x))
    torch.testing.assert_close(out.mean.flatten(), torch.tensor([1.075, 2.525]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.std_dev, torch.tensor([0.5, 0.5]), rtol=0, atol=1e-7)
    assert torch.allclose(out.log_prob, torch.full((2,), -math.log(0.5) - LOG_SQRT_2PI), atol=1e-6)
    k, std = sde_step_coefficients(torch.tensor(1.0), torch.tensor(0.8), 0.8, 0.5)
    assert float(k) == pytest.approx(-0.2) and float(std) == pytest.approx(0.5)


def test_sde_step_mean_is_the_euler_step_as_the_noise_vanishes_and_moves_by_k_per_unit_velocity():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    tiny = flow_sde_step_with_logprob(v, x, 0.7, 0.4, sigma_max=0.9, eta=1e-6, noise=torch.zeros_like(x))
    torch.testing.assert_close(tiny.mean, x + (0.4 - 0.7) * v, rtol=0, atol=1e-6)
    a = flow_sde_step_with_logprob(v, x, 0.7, 0.4, sigma_max=0.9, eta=0.8, noise=torch.zeros_like(x)).mean
    b = flow_sde_step_with_logprob(v + 1, x, 0.7, 0.4, sigma_max=0.9, eta=0.8, noise=torch.zeros_like(x)).mean
    k, _ = sde_step_coefficients(torch.tensor(0.7), torch.tensor(0.4), 0.9, 0.8)
    torch.testing.assert_close(b - a, torch.full_like(a, float(k)), rtol=0, atol=1e-5)


def test_sde_step_refuses_what_has_no_density():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        flow_sde_step_with_logprob(x, x, 0.5, 0.25, sigma_max=0.9, eta=0.0)
    with pytest.raises(ValueError, match="denoising step"):
        flow_sde_step_with_logprob(x, x, 0.25, 0.5, sigma_max=0.9, eta=1.0)


def test_flow_schedule_against_diffusers():
    """Training timesteps are the scheduler's (shifted) ones; x_t is its ``scale_noise``; the target is
    eps - x0, and x_t - sigma target recovers x0 (x0_scale = sigma)."""
    sched = sd3_scheduler()
    fs = FlowSchedule.from_config(sched.config)
    t = fs.draw_timesteps(64, torch.Generator().manual_seed(0))
    assert set(t.tolist()) <= set(sched.timesteps.tolist()) and t.dtype == torch.float32
    assert float(t.median()) > 500  # shift 3 puts most of the training on the noisier half
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t3 = t[:3]
    x_t = fs.add_noise(x0, eps, t3)
    torch.testing.assert_close(x_t, sched.scale_noise(x0, t3, eps), rtol=0, atol=1e-6)
    target = fs.target(x0, eps, t3)
    assert torch.equal(target, eps - x0)
    sigma = fs.x0_scale(t3, torch.device("cpu"))
    torch.testing.assert_close(x_t - sigma.view(-1, 1, 1, 1) * target, x0, rtol=0, atol=1e-5)
    assert torch.equal(fs.flow_time(t3, torch.device("cpu")), sigma)


def test_the_sd3_familys_steps_match_the_stock_scheduler():
    """The deterministic step is the scheduler's Euler step (without its step counter), and the SDE step
    reads the sigmas of the timestep it is given."""
    fam, sched = SD3(), sd3_scheduler(5)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        stock = sched.step(v, t, x, return_dict=False)[0]
        assert torch.equal(fam.deterministic_step(sched, v, t.item(), x), stock)
        out = fam.step_with_logprob(sched, v, t.item(), x, eta=1.0, noise=torch.zeros_like(x))
        sigma, nxt = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        want = flow_sde_step_with_logprob(v, x, sigma, nxt, sigma_max=float(sched.sigmas[1]), eta=1.0, noise=0 * x)
        assert torch.equal(out.mean, want.mean)
    with pytest.raises(ValueError, match="not among the sampler's"):
        fam.step_with_logprob(sched, v, 123.0, x, eta=1.0)
