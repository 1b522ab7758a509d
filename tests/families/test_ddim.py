"""Tests for families/ddim.py: parity with diffusers' DDIMScheduler.step and exact re-scoring."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from families.ddim import ddim_step_with_logprob, scheduler_step_with_logprob


def _sdxl_like_scheduler(num_steps=10, **overrides):
    config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    config.update(overrides)
    sched = DDIMScheduler(**config)
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("step_index", [0, 4, 9])
def test_matches_diffusers_step_and_gaussian_logprob(step_index):
    sched = _sdxl_like_scheduler()
    gen = torch.Generator().manual_seed(step_index)
    x_t, eps_hat, z = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    t = int(sched.timesteps[step_index])
    ours = scheduler_step_with_logprob(sched, eps_hat, t, x_t, eta=1.0, noise=z)
    ref = sched.step(eps_hat, t, x_t, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
    # Independent reference for the log-prob: the DDIM mean is diffusers' step with zero noise,
    # sigma_t = eta * sqrt(variance); log N(x_{t-1}; mu, sigma^2) averaged over C, H, W.
    mean = sched.step(eps_hat, t, x_t, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    sigma = float(sched._get_variance(t, prev_t)) ** 0.5
    expected = torch.distributions.Normal(mean, sigma).log_prob(ref).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours.log_prob, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.std_dev, torch.full((2,), sigma))


def test_rescoring_recorded_step_is_exact_and_differentiable():
    sched = _sdxl_like_scheduler()
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 8, 8, generator=gen)
    eps_hat = torch.randn(3, 4, 8, 8, generator=gen)
    t = sched.timesteps[3].repeat(3)  # batched timesteps
    rec = scheduler_step_with_logprob(sched, eps_hat, t, x_t, generator=gen)
    eps_new = eps_hat.clone().requires_grad_(True)
    again = scheduler_step_with_logprob(sched, eps_new, t, x_t, prev_sample=rec.prev_sample)
    assert torch.equal(again.log_prob.detach(), rec.log_prob)  # exactly the recorded value
    assert torch.equal(again.prev_sample, rec.prev_sample)
    again.log_prob.sum().backward()
    assert eps_new.grad is not None and eps_new.grad.abs().sum() > 0
    # Closed form at the sampled point: log_prob = mean(-z^2 / 2) - log sigma - log sqrt(2 pi).
    z = (rec.prev_sample - rec.mean) / rec.std_dev[:, None, None, None]
    closed = (-(z**2) / 2).mean(dim=(1, 2, 3)) - torch.log(rec.std_dev) - math.log(math.sqrt(2 * math.pi))
    torch.testing.assert_close(rec.log_prob, closed, rtol=1e-5, atol=1e-5)


def test_half_precision_rescoring_exact():
    sched = _sdxl_like_scheduler()
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 4, 4, generator=gen).to(torch.bfloat16)
    eps_hat = torch.randn(2, 4, 4, 4, generator=gen).to(torch.bfloat16)
    t = int(sched.timesteps[5])
    rec = scheduler_step_with_logprob(
        sched, eps_hat, t, x_t, noise=torch.randn(2, 4, 4, 4, generator=gen).to(torch.bfloat16)
    )
    assert rec.prev_sample.dtype == torch.bfloat16
    again = scheduler_step_with_logprob(sched, eps_hat, t, x_t, prev_sample=rec.prev_sample)
    assert torch.equal(again.log_prob, rec.log_prob)


def test_errors():
    sched = _sdxl_like_scheduler()
    x = torch.zeros(1, 4, 4, 4)
    t = int(sched.timesteps[0])
    with pytest.raises(ValueError, match="eta"):
        scheduler_step_with_logprob(sched, x, t, x, eta=0.0)
    with pytest.raises(ValueError, match="not both"):
        scheduler_step_with_logprob(sched, x, t, x, prev_sample=x, noise=x)
    with pytest.raises(ValueError, match="same shape"):
        scheduler_step_with_logprob(sched, x, t, torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="timesteps must lie"):
        scheduler_step_with_logprob(sched, x, 5000, x)
    # set_alpha_to_one=True makes the last step deterministic: no density.
    sched1 = _sdxl_like_scheduler(set_alpha_to_one=True)
    with pytest.raises(ValueError, match="sigma_t is 0"):
        scheduler_step_with_logprob(sched1, x, int(sched1.timesteps[-1]), x)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler_step_with_logprob(DDIMScheduler(), x, 1, x)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step_with_logprob(
            x,
            1,
            x,
            alphas_cumprod=sched.alphas_cumprod,
            final_alpha_cumprod=1.0,
            step_ratio=100,
            prediction_type="sample",
        )


@pytest.mark.parametrize(
    "overrides", [{"prediction_type": "v_prediction"}, {"clip_sample": True, "clip_sample_range": 1.0}]
)
def test_matches_diffusers_other_configs(overrides):
    sched = _sdxl_like_scheduler(**overrides)
    gen = torch.Generator().manual_seed(5)
    x_t, out, z = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    for t in (int(sched.timesteps[2]), int(sched.timesteps[-1])):
        ours = scheduler_step_with_logprob(sched, out, t, x_t, eta=1.0, noise=z)
        ref = sched.step(out, t, x_t, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
