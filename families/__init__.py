"""Model families: one adapter per diffusers pipeline class (the interface: :mod:`families.base`).

The registry below maps a family's name to its adapter; :func:`detect_family` reads which one a
model is from its ``model_index.json`` (``_class_name``) or a single file's keys, and
:func:`load_pipeline` loads it. This package imports nothing of rlfh, rollouts or rewards: the
sampler and the learner both import it.

Adding a family: write ``families/<name>.py`` with a :class:`families.base.ModelFamily` subclass and
add one line to :data:`FAMILIES` (docs/extending.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from families.base import (
    Conditioning,
    ModelFamily,
    ModelSource,
    PromptCache,
    PromptRows,
    StepOutput,
    first_of_each,
    with_negative,
)
from families.flux import Flux
from families.sd3 import SD3
from families.sd15 import SD15
from families.sdxl import DTYPES, SDXL
from families.tiny import TINY_ID, TINY_PREFIX, make_tiny_model, resolve_model_path

__all__ = [
    "Conditioning",
    "DTYPES",
    "FAMILIES",
    "ModelFamily",
    "PromptCache",
    "PromptRows",
    "StepOutput",
    "TINY_ID",
    "add_lora",
    "detect_family",
    "family_of",
    "first_of_each",
    "get_family",
    "load_pipeline",
    "make_tiny_model",
    "resolve_model_path",
    "with_negative",
]

FAMILIES: dict[str, ModelFamily] = {
    "sdxl": SDXL(),
    "sd15": SD15(),
    "sd3": SD3(),
    "flux": Flux(),
}

# Pipelines of the families rlfh is designed for but has no adapter for yet.
NOT_YET: dict[str, str] = {}

# A key only each family's original single-file checkpoints have.
SINGLE_FILE_KEYS = {
    "conditioner.embedders.1.model.ln_final.weight": "StableDiffusionXLPipeline",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": "StableDiffusionPipeline",
    "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": "StableDiffusion3Pipeline",
    "double_blocks.0.img_attn.qkv.weight": "FluxPipeline",
}


def known_classes() -> list[str]:
    return sorted([f.pipeline_class for f in FAMILIES.values()] + list(NOT_YET))


def get_family(name: str) -> ModelFamily:
    """The adapter of family ``name``."""
    if name in FAMILIES:
        return FAMILIES[name]
    planned = sorted(NOT_YET.values())
    if name in planned:
        raise NotImplementedError(f"model family {name!r} is not implemented yet; rlfh implements {sorted(FAMILIES)}")
    raise ValueError(f"unknown model family {name!r}; rlfh knows {sorted(FAMILIES)} (planned: {planned})")


def family_for_class(class_name: str, where: str) -> ModelFamily:
    """The adapter of the diffusers pipeline class ``class_name`` (read from ``where``)."""
    for family in FAMILIES.values():
        if family.pipeline_class == class_name:
            return family
    if class_name in NOT_YET:
        raise NotImplementedError(
            f"{where}: {class_name} (family {NOT_YET[class_name]!r}) is not implemented yet; "
            f"rlfh implements {sorted(f.pipeline_class for f in FAMILIES.values())}"
        )
    raise ValueError(f"{where}: unknown pipeline class {class_name!r}; rlfh knows {known_classes()}")


def family_of(pipe: Any) -> ModelFamily:
    """The adapter of a loaded pipeline (by its class)."""
    return family_for_class(type(pipe).__name__, "the pipeline")


def single_file_class(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    for key, cls in SINGLE_FILE_KEYS.items():
        if key in keys:
            return cls
    raise ValueError(
        f"model.path={path}: no key of a known single-file checkpoint ({known_classes()}); "
        f"convert it to a diffusers folder"
    )


def detect_family(path: str, revision: str | None = None) -> ModelFamily:
    """The family of the model at ``path`` (``rlfh:tiny-<family>``, a diffusers folder, a hub id or a
    single ``.safetensors`` / ``.ckpt`` file).

    Raises:
        FileNotFoundError: a local path that does not exist, with what was expected there.
        NotImplementedError: a family rlfh is designed for but does not implement yet.
        ValueError: an unknown pipeline class, naming the ones rlfh knows.
    """
    if path.startswith(TINY_PREFIX):
        return get_family(path[len(TINY_PREFIX) :])
    p = Path(path)
    if p.suffix in (".safetensors", ".ckpt"):
        if not p.is_file():
            raise FileNotFoundError(f"model.path={path}: single-file checkpoint not found")
        # the original .ckpt format is a pickle: no keys to read without loading it
        return family_for_class(single_file_class(p), f"model.path={path}") if p.suffix == ".safetensors" else SDXL()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
    if looks_local and not (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model.path={path}: no diffusers pipeline there (expected model_index.json, the denoiser, vae/, "
            f"text encoders and tokenizers). Write a tiny one with `rlfh make-tiny-model {path}` or point "
            f"model.path at a diffusers folder or hub id of {known_classes()}"
        )
    if looks_local:
        index = json.loads((p / "model_index.json").read_text())
    else:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=revision)
    return family_for_class(index.get("_class_name", "<none>"), f"model.path={path}")


def load_pipeline(source: ModelSource, device: str | torch.device = "cpu") -> Any:
    """Load the pipeline ``source.path`` names (:func:`detect_family`, :func:`resolve_model_path`)
    through its family's adapter.

    Args:
        source: a :class:`rlfh.config.schema.ModelConfig` (path, family, revision, variant, vae_path,
            dtype); ``family`` None: read from the model (:func:`detect_family`).
        device: where to put the modules.
    """
    path = resolve_model_path(source.path)
    family = get_family(source.family) if source.family else detect_family(path, source.revision)
    return family.load(source, path, device)


def add_lora(model: Any, rank: int, alpha: float, target_modules) -> None:
    """Give the denoiser ``model`` the policy's LoRA adapter (peft; B starts at zero, so the policy
    starts at the base).

    The one builder for the learner and the rollout actors: weight sync copies the learner's adapter
    into the actors' by name, so both sides must build it alike. A (the gaussian init) is drawn from
    torch's global RNG; the learner seeds it, an actor's is overwritten at the first sync.
    """
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    )
