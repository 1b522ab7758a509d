"""The DDPM forward process of UNet families: noising, the training target, alpha-bars, the x0 scale.

Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239; v-prediction: Salimans & Ho,
"Progressive Distillation for Fast Sampling of Diffusion Models", arXiv 2202.00512, sec. 4.
With abar_t = prod_{s <= t} (1 - beta_s) (``alphas_cumprod`` of the model's scheduler config):

    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                 (add_noise)
    target = eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0     (target; the config's prediction_type)
    x0_hat - x0 = -k_t (pred - target),  k_t = sqrt(1 - abar_t) / sqrt(abar_t) (eps), sqrt(1 - abar_t) (v)

``add_noise`` and ``target`` do diffusers' ``DDPMScheduler.add_noise`` / ``get_velocity`` arithmetic
in the same order (the coefficients in the sample's dtype), so their results equal diffusers' bit for
bit. The DDIM sampler step of the same schedule is in :mod:`families.ddim`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def per_sample(x: Tensor, ndim: int) -> Tensor:
    """A (B,) coefficient shaped (B, 1, ..., 1) to broadcast over a sample of ``ndim`` dims."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


class DDPMSchedule:
    """The forward process and target of a model trained with a DDPM schedule.

    Args:
        alphas_cumprod: abar_t for every training timestep, (T,), float32 as diffusers computes it.
        prediction_type: ``epsilon`` or ``v_prediction``.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; rlfh trains {PREDICTION_TYPES}")
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, scheduler_config: Any) -> "DDPMSchedule":
        """From a pipeline's scheduler config (any diffusers scheduler of the DDPM family: the betas
        are computed by diffusers' ``DDPMScheduler``, the one implementation of the beta schedules)."""
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(scheduler_config)
        return cls(ddpm.alphas_cumprod, ddpm.config.prediction_type)

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) per sample in ``like``'s dtype, shaped to broadcast over it."""
        # kept on the samples' device after the first call, as diffusers does
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        abar = self.alphas_cumprod.to(dtype=like.dtype)[t.to(like.device)]
        return per_sample(abar**0.5, like.ndim), per_sample((1 - abar) ** 0.5, like.ndim)

    def draw_timesteps(self, count: int, generator: torch.Generator) -> Tensor:
        """t ~ U{0..T-1}, (count,) long."""
        return torch.randint(0, self.num_train_timesteps, (count,), generator=generator)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the denoiser should output at :meth:`add_noise`'s x_t: eps, or v."""
        if self.prediction_type == "epsilon":
            return eps
        a, s = self.coefficients(t, x0)
        return a * eps - s * x0

    def alpha_bar(self, t: Tensor, device: torch.device) -> Tensor:
        """abar_t (float32, on ``device``) at timesteps ``t``."""
        return self.alphas_cumprod.to(device)[t.to(device)].float()

    def x0_scale(self, t: Tensor, device: torch.device) -> Tensor:
        """k_t per sample (B,), float32: x0_hat - x0 = -k_t (pred - target) (DiffusionNFT's adaptive
        weighting)."""
        abar = self.alpha_bar(t, device).double()  # the schedule is float32: exact in double
        k = (1 - abar).sqrt()
        if self.prediction_type == "epsilon":
            k = k / abar.sqrt()
        return k.float()

    def flow_time(self, t: Tensor, device: torch.device) -> Tensor:
        """sigma_t = b / (a + b), a = sqrt(abar_t), b = sqrt(1 - abar_t), float32 (B,): x_t / (a + b) =
        (1 - sigma_t) x0 + sigma_t eps is the flow-matching path."""
        abar = self.alpha_bar(t, device).double()
        a, b = abar.sqrt(), (1 - abar).sqrt()
        return (b / (a + b)).float()
