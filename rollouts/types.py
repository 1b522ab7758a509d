"""Data passed between rollout actors, the reward server, the rollout log and the learner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SamplerSettings:
    """Everything besides prompt and seed that determines a sample."""

    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str
    height: int
    width: int
    eta: float = 0.0
    scheduler: str = "default"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RolloutBatch:
    """Samples from one policy version.

    Shapes: ``images`` uint8 (B, H, W, 3) RGB; ``latents`` float32 (B, 4, H/8, W/8), the final
    denoised latents in UNet space (before dividing by the VAE scaling factor), which is what the
    diffusion losses train on.
    """

    images: np.ndarray
    latents: np.ndarray
    prompts: list[str]
    seeds: list[int]
    settings: SamplerSettings
    policy_version: int
    model_id: str
    rollout_ids: list[str] = field(default_factory=list)
    # DDPO only: {"latents": (B, T+1, 4, h, w) x_T..x_0, "log_probs": (B, T), "timesteps": (T,)}
    trajectory: dict[str, np.ndarray] | None = None
    # {prompt: (prompt_embeds (77, D) float32, pooled (P,) float32)} for the batch's distinct prompts,
    # as the sampler conditioned on them (positive only: no negative prompt, no CFG stacking), so the
    # learner can take them instead of running the frozen text encoders again. Arrays are read-only:
    # the sampler's prompt cache shares them.
    conditioning: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("no rollout batches to concatenate")
        first = batches[0]
        return RolloutBatch(
            images=np.concatenate([b.images for b in batches]),
            latents=np.concatenate([b.latents for b in batches]),
            prompts=[p for b in batches for p in b.prompts],
            seeds=[s for b in batches for s in b.seeds],
            settings=first.settings,
            policy_version=min(b.policy_version for b in batches),
            model_id=first.model_id,
            rollout_ids=[r for b in batches for r in b.rollout_ids],
            trajectory=None if first.trajectory is None else {
                "latents": np.concatenate([b.trajectory["latents"] for b in batches]),
                "log_probs": np.concatenate([b.trajectory["log_probs"] for b in batches]),
                "timesteps": first.trajectory["timesteps"],
            },
            conditioning=None if any(b.conditioning is None for b in batches) else {
                p: c for b in batches for p, c in b.conditioning.items()},
        )
