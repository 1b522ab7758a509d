"""What the UNet families (SD1.5, SDXL) share: loading a diffusers pipeline with rlfh's model
settings, the DDPM forward process and target (:mod:`families.schedule`) and the stochastic DDIM step
with its log-prob (:mod:`families.ddim`). A UNet family adds its pipeline class, its tiny model and its
text conditioning; its LoRA file is its pipeline's ``save_lora_weights``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from families.ddim import (
    ddim_scheduler,
    ddim_transition_coefficients,
    scheduler_alpha_bars,
    scheduler_step_with_logprob,
)
from families.loading import DTYPES, DiffusersFamily, quiet_loading  # noqa: F401  (re-exported)
from families.schedule import DDPMSchedule


class UNetFamily(DiffusersFamily):
    """A pipeline whose denoiser is a ``UNet2DConditionModel`` trained on a DDPM schedule."""

    denoiser = "unet"
    latent_factor = 8

    # ------------------------------------------------------------------ training and stochastic sampling
    def noise_schedule(self, scheduler_config: Any) -> DDPMSchedule:
        return DDPMSchedule.from_config(scheduler_config)

    def stochastic_scheduler(self, scheduler_config: Any) -> Any:
        return ddim_scheduler(scheduler_config)

    def step_coefficients(self, scheduler: Any, t: Any, eta: float) -> tuple[Tensor, Tensor]:
        """k_t of mu_t = sqrt(abar_t' / abar_t) x_t + k_t eps_hat and the DDIM-eta std sigma_t; k_t times
        sqrt(abar_t) for v-prediction (eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) x_t)."""
        a, a_prev = scheduler_alpha_bars(scheduler, t)
        a, a_prev = a.double().cpu(), a_prev.double().cpu()
        _, k, sigma = ddim_transition_coefficients(a, a_prev, eta)
        if scheduler.config.prediction_type == "v_prediction":
            k = k * a.sqrt()
        return k, sigma

    def step_with_logprob(self, scheduler, model_output, t, sample, eta, prev_sample=None, noise=None, generator=None):
        return scheduler_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, prev_sample=prev_sample, noise=noise, generator=generator
        )
