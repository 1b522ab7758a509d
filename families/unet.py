"""What the UNet families (SD1.5, SDXL) share: loading a diffusers pipeline with rlfh's model
settings, the DDPM forward process and target (:mod:`families.schedule`) and the stochastic DDIM step
with its log-prob (:mod:`families.ddim`). A UNet family adds its pipeline class, its tiny model and its
text conditioning; its LoRA file is its pipeline's ``save_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from families.base import ModelFamily, ModelSource
from families.ddim import ddim_scheduler, scheduler_step_with_logprob
from families.schedule import DDPMSchedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_loading() -> None:
    """Per-component loading bars from every actor drown the run's own progress bar."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class UNetFamily(ModelFamily):
    """A pipeline whose denoiser is a ``UNet2DConditionModel`` trained on a DDPM schedule."""

    denoiser = "unet"
    latent_factor = 8

    def pipeline_type(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's ``from_pretrained`` / ``from_single_file``."""
        return {}

    def load(self, source: ModelSource, path: str, device: str | torch.device) -> Any:
        from diffusers import AutoencoderKL

        quiet_loading()
        dtype = DTYPES[source.dtype]
        kwargs: dict[str, Any] = {"dtype": dtype, **self.load_kwargs()}
        if source.vae_path:
            kwargs["vae"] = AutoencoderKL.from_pretrained(source.vae_path, dtype=dtype)
        cls = self.pipeline_type()
        if Path(path).suffix in (".safetensors", ".ckpt"):
            pipe = cls.from_single_file(path, **kwargs)
        else:
            pipe = cls.from_pretrained(path, revision=source.revision, variant=source.variant, **kwargs)
        self.check(pipe, path)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def check(self, pipe: Any, path: str) -> None:
        """Refuse a pipeline whose modules do not fit together the way this family calls them."""

    # ------------------------------------------------------------------ training and stochastic sampling
    def noise_schedule(self, scheduler_config: Any) -> DDPMSchedule:
        return DDPMSchedule.from_config(scheduler_config)

    def stochastic_scheduler(self, scheduler_config: Any) -> Any:
        return ddim_scheduler(scheduler_config)

    def step_with_logprob(self, scheduler, model_output, t, sample, eta, prev_sample=None, noise=None, generator=None):
        return scheduler_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, prev_sample=prev_sample, noise=noise, generator=generator
        )

    # ------------------------------------------------------------------ export
    def save_lora(self, directory: str | Path, peft_state: dict[str, Tensor], adapter: dict) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        self.pipeline_type().save_lora_weights(
            directory, unet_lora_layers=convert_state_dict_to_diffusers(peft_state), unet_lora_adapter_metadata=adapter
        )
