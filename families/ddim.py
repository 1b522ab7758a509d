"""The DDIM step of UNet families, with the Gaussian log-probability of the sampled x_{t-1}.

Papers: DDIM, Song et al., "Denoising Diffusion Implicit Models", arXiv 2010.02502, eqs. (12) and
(16); DDPO, Black et al., arXiv 2305.13301 (reference: kvablack/ddpo-pytorch,
ddpo_pytorch/diffusers_patch/ddim_with_logprob.py). Same arithmetic as diffusers'
``DDIMScheduler.step`` (prediction types "epsilon" and "v_prediction", optional x_0 clipping).

With a_t = alphas_cumprod[t], t' = t - num_train_timesteps // num_inference_steps and
a_{t'} = alphas_cumprod[t'] (final_alpha_cumprod when t' < 0):

    x0_hat  = (x_t - sqrt(1 - a_t) * eps_hat) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_{t'}) / (1 - a_t) * (1 - a_t / a_{t'}))
    mu_t    = sqrt(a_{t'}) * x0_hat + sqrt(1 - a_{t'} - sigma_t^2) * eps_hat
    x_{t-1} = mu_t + sigma_t * z,   z ~ N(0, I)
    log pi(x_{t-1} | x_t) = mean over C,H,W of [ -(x_{t-1} - mu_t)^2 / (2 sigma_t^2) - log sigma_t - log sqrt(2 pi) ]

The log-prob is averaged (not summed) over the non-batch dims, as ddpo-pytorch does. It is computed
for x_{t-1} exactly as returned (after the cast to the sample dtype), so recomputing it later from the
stored (x_t, x_{t-1}, t) and the same eps_hat reproduces the recorded value exactly. Differences from
ddpo-pytorch: t' < 0 uses final_alpha_cumprod like diffusers (ddpo-pytorch clamps t' to 0; the two
agree for SDXL, whose scheduler has set_alpha_to_one=False); a step with sigma_t = 0 (eta = 0, or the
last step under set_alpha_to_one=True) has no density and raises ValueError.

Notation (code name -> paper symbol):
    model_output -> eps_hat = eps_theta(x_t, t, c) (or v for v_prediction)
    sample       -> x_t
    prev_sample  -> x_{t-1}
    mean         -> mu_t
    std_dev      -> sigma_t(eta)
    eta          -> eta (1 for DDPO)

Shapes: model_output, sample, prev_sample, noise (B, C, H, W); timestep int or (B,) long;
log_prob (B,); std_dev (B,).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from families.base import StepOutput
from families.schedule import per_sample

__all__ = [
    "ddim_scheduler",
    "ddim_transition_coefficients",
    "ddim_step_with_logprob",
    "scheduler_alpha_bars",
    "scheduler_step_with_logprob",
    "step_alpha_bars",
]

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddim_scheduler(config):
    """DDIM with the model's noise schedule: the stochastic (eta > 0) Gaussian steps DDPO scores.

    Pinned like SDXL's published scheduler config: no x0 clipping (latents are not in [-1, 1]) and
    set_alpha_to_one=False, so the last step keeps a non-zero variance and a log-prob.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)


def ddim_step_with_logprob(
    model_output: Tensor,
    timestep: Union[int, Tensor],
    sample: Tensor,
    *,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: Union[float, Tensor],
    step_ratio: int,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
    prev_sample: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1} with the log-prob of x_{t-1}; pure function of the schedule.

    Pass ``prev_sample`` to score a recorded step (no sampling); otherwise x_{t-1} is drawn with
    ``noise`` (z) or fresh noise from ``generator``.

    Args:
        model_output: eps_hat (or v), shape (B, C, H, W); the gradient flows through it into log_prob.
        timestep: t, an int or a (B,) integer tensor, in [0, len(alphas_cumprod)).
        sample: x_t, shape (B, C, H, W).
        alphas_cumprod: a_t for every training timestep, shape (num_train_timesteps,).
        final_alpha_cumprod: a_{t'} used when t' < 0.
        step_ratio: num_train_timesteps // num_inference_steps, > 0.
        eta: DDIM noise scale, > 0 (1.0 for DDPO).
        prediction_type: "epsilon" or "v_prediction".
        clip_sample_range: clamp x0_hat to [-r, r] when given (scheduler ``clip_sample``).
        prev_sample: recorded x_{t-1}, shape (B, C, H, W); excludes ``noise`` and ``generator``.
        noise: z, shape (B, C, H, W); excludes ``generator``.
        generator: torch generator for z.

    Returns:
        StepOutput(prev_sample, log_prob, mean, std_dev).

    Raises:
        ValueError: on bad shapes, timesteps out of range, conflicting arguments or sigma_t = 0.
    """
    if sample.ndim < 2 or model_output.shape != sample.shape:
        raise ValueError(
            f"model_output and sample must have the same shape (B, C, H, W), got {tuple(model_output.shape)} "
            f"and {tuple(sample.shape)}"
        )
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    if not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be finite and > 0 for a log-prob to exist (DDPO uses 1.0), got {eta}")
    if int(step_ratio) != step_ratio or step_ratio <= 0:
        raise ValueError(f"step_ratio must be a positive integer, got {step_ratio}")
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(alphas_cumprod.shape)}")
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("pass either prev_sample (score a recorded step) or noise/generator (sample), not both")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    for name, t in (("prev_sample", prev_sample), ("noise", noise)):
        if t is not None and t.shape != sample.shape:
            raise ValueError(f"{name} must have shape {tuple(sample.shape)}, got {tuple(t.shape)}")

    batch, ndim, device = sample.shape[0], sample.ndim, sample.device
    num_train = alphas_cumprod.shape[0]
    t = torch.as_tensor(timestep, device=alphas_cumprod.device).long()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be an int or a ({batch},) tensor, got shape {tuple(t.shape)}")
    if bool((t < 0).any()) or bool((t >= num_train).any()):
        raise ValueError(f"timesteps must lie in [0, {num_train}), got {t.tolist()}")
    t_prev = t - int(step_ratio)

    # Schedule coefficients, (B,), in the dtype of alphas_cumprod (float32 for diffusers).
    a_t, a_prev = step_alpha_bars(alphas_cumprod, final_alpha_cumprod, t, step_ratio)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    variance = (b_prev / b_t) * (1 - a_t / a_prev)
    std_dev = eta * variance**0.5  # (B,)
    if bool((std_dev <= 0).any()):
        raise ValueError(
            f"sigma_t is 0 at timesteps {t.tolist()} (prev {t_prev.tolist()}): the step is deterministic and has "
            "no log-prob; use eta > 0 and a scheduler with set_alpha_to_one=False (as SDXL's)"
        )
    a_t, a_prev, b_t, std_dev = (x.to(device) for x in (a_t, a_prev, b_t, std_dev))
    a_t_, a_prev_, b_t_, std_ = (per_sample(x, ndim) for x in (a_t, a_prev, b_t, std_dev))

    if prediction_type == "epsilon":
        x0_hat = (sample - b_t_**0.5 * model_output) / a_t_**0.5
        eps_hat = model_output
    else:  # v_prediction
        x0_hat = a_t_**0.5 * sample - b_t_**0.5 * model_output
        eps_hat = a_t_**0.5 * model_output + b_t_**0.5 * sample
    if clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)  # eps_hat kept, as diffusers' default
    mean = a_prev_**0.5 * x0_hat + (1 - a_prev_ - std_**2) ** 0.5 * eps_hat  # mu_t, (B, C, H, W)

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype)
        prev_sample = (mean + std_ * noise).to(sample.dtype)

    x_prev = prev_sample.detach()
    x_prev = x_prev if x_prev.dtype in (torch.float32, torch.float64) else x_prev.float()
    log_prob = (
        -((x_prev - mean) ** 2) / (2 * std_**2) - torch.log(std_) - math.log(math.sqrt(2 * math.pi))
    )  # (B, C, H, W)
    log_prob = log_prob.mean(dim=tuple(range(1, ndim)))  # (B,)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std_dev=std_dev)


def ddim_transition_coefficients(alpha_bar, alpha_bar_prev, eta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(sqrt(a' / a), k_t, sigma_t) of mu = sqrt(a' / a) x_t + k_t eps_hat and the step's std, float64.

    Raises:
        ValueError: unless 0 < a < a' <= 1 and eta >= 0 is finite.
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    ap = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    if bool(((a <= 0) | (a >= ap) | (ap > 1)).any()):
        raise ValueError(f"need 0 < abar_t < abar_prev <= 1 (a denoising step), got {a.tolist()} -> {ap.tolist()}")
    sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
    k = (1 - ap - sigma2).clamp(min=0).sqrt() - (ap * (1 - a) / a).sqrt()
    return (ap / a).sqrt(), k, sigma2.sqrt()


def step_alpha_bars(
    alphas_cumprod: Tensor, final_alpha_cumprod: Union[float, Tensor], timestep: Union[int, Tensor], step_ratio: int
) -> tuple[Tensor, Tensor]:
    """(a_t, a_{t'}) of the step from t, t' = t - step_ratio (``final_alpha_cumprod`` when t' < 0), in the
    dtype and on the device of ``alphas_cumprod``; the shape of ``timestep``."""
    t = torch.as_tensor(timestep, device=alphas_cumprod.device).long()
    t_prev = t - int(step_ratio)
    final = torch.as_tensor(final_alpha_cumprod, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    return alphas_cumprod[t], torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], final)


def scheduler_alpha_bars(scheduler: Any, timestep: Union[int, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`step_alpha_bars` with the schedule of a diffusers ``DDIMScheduler`` after ``set_timesteps``:
    the (a_t, a_{t'}) :func:`scheduler_step_with_logprob` steps with."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps(n) first")
    return step_alpha_bars(
        scheduler.alphas_cumprod,
        scheduler.final_alpha_cumprod,
        timestep,
        scheduler.config.num_train_timesteps // scheduler.num_inference_steps,
    )


def scheduler_step_with_logprob(
    scheduler: Any,
    model_output: Tensor,
    timestep: Union[int, Tensor],
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> StepOutput:
    """:func:`ddim_step_with_logprob` with the schedule read from a diffusers ``DDIMScheduler``.

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` after ``set_timesteps``.
        model_output: eps_hat, shape (B, C, H, W).
        timestep: t, int or (B,) tensor (one of ``scheduler.timesteps``).
        sample: x_t, shape (B, C, H, W).
        eta: DDIM noise scale, > 0.
        prev_sample: recorded x_{t-1} to score instead of sampling.
        noise: z for sampling.
        generator: torch generator for sampling.

    Returns:
        StepOutput(prev_sample, log_prob, mean, std_dev).

    Raises:
        ValueError: if the scheduler has no timesteps set, uses thresholding or an unsupported
            prediction type, or on any error of :func:`ddim_step_with_logprob`.
    """
    config = scheduler.config
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps(n) first")
    if getattr(config, "thresholding", False):
        raise ValueError("dynamic thresholding makes the step non-Gaussian in x0; set thresholding=False")
    return ddim_step_with_logprob(
        model_output,
        timestep,
        sample,
        alphas_cumprod=scheduler.alphas_cumprod,
        final_alpha_cumprod=scheduler.final_alpha_cumprod,
        step_ratio=config.num_train_timesteps // scheduler.num_inference_steps,
        eta=eta,
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if getattr(config, "clip_sample", False) else None,
        prev_sample=prev_sample,
        noise=noise,
        generator=generator,
    )
