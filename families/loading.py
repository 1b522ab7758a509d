"""Loading a diffusers pipeline with rlfh's model settings and saving its denoiser's LoRA where the stock
pipeline's ``load_lora_weights`` reads it: what every family built on a diffusers pipeline class shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from families.base import ModelFamily, ModelSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_loading() -> None:
    """Per-component loading bars from every actor drown the run's own progress bar."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class DiffusersFamily(ModelFamily):
    """A family whose pipeline is the diffusers class ``pipeline_class``."""

    def pipeline_type(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_kwargs(self, path: str) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's ``from_pretrained`` / ``from_single_file`` of ``path``."""
        return {}

    def load(self, source: ModelSource, path: str, device: str | torch.device) -> Any:
        from diffusers import AutoencoderKL

        quiet_loading()
        dtype = DTYPES[source.dtype]
        kwargs: dict[str, Any] = {"dtype": dtype, **self.load_kwargs(path)}
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

    # ------------------------------------------------------------------ export
    def lora_file_state(self, peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The LoRA's keys as the pipeline's LoRA training script saves them: diffusers' names for a UNet
        (``convert_state_dict_to_diffusers``, as train_dreambooth_lora_sdxl.py); a transformer's peft keys
        as they are (train_dreambooth_lora_sd3.py, _flux.py)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state) if self.denoiser == "unet" else peft_state

    def save_lora(self, directory: str | Path, peft_state: dict[str, Tensor], adapter: dict) -> None:
        self.pipeline_type().save_lora_weights(
            directory,
            **{
                f"{self.denoiser}_lora_layers": self.lora_file_state(peft_state),
                f"{self.denoiser}_lora_adapter_metadata": adapter,
            },
        )
