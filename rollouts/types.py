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


@dataclass(frozen=True)
class SDEWindow:
    """Where a recorded (DDPO) trajectory is stochastic: denoising steps ``start .. start + size - 1``
    (step 0 is the first, at the largest t) sample with DDIM eta > 0 and are recorded; the others are
    deterministic DDIM (eta = 0) and are not. ``SDEWindow(0, num_inference_steps)`` is plain DDPO
    (every step stochastic and recorded). As Flow-GRPO-Fast (arXiv 2505.05470) and MixGRPO
    (arXiv 2507.21802): only the window's steps are policy actions, so only they are trained."""

    start: int
    size: int

    def check(self, num_steps: int) -> None:
        if not (self.size >= 1 and 0 <= self.start and self.start + self.size <= num_steps):
            raise ValueError(f"SDE window {self} does not fit in {num_steps} denoising steps")


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
    # DDPO only, the SDE window j..j+W-1 (W = T, j = 0 without one): {"latents": (B, W+1, 4, h, w)
    # x_j..x_{j+W} (x_T..x_0 for the whole trajectory), "log_probs": (B, W), "timesteps": (W,),
    # "window_start": () int64 j}
    trajectory: dict[str, np.ndarray] | None = None
    # {prompt: the family's per-prompt rows, float32 (SDXL: prompt_embeds (77, D), pooled (P,); SD1.5:
    # prompt_embeds (77, D))} for the batch's distinct prompts,
    # as the sampler conditioned on them (positive only: no negative prompt, no CFG stacking), so the
    # learner can take them instead of running the frozen text encoders again. Arrays are read-only:
    # the sampler's prompt cache shares them.
    conditioning: dict[str, tuple[np.ndarray, ...]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("no rollout batches to concatenate")
        first = batches[0]
        if first.trajectory is not None:
            for b in batches[1:]:
                if int(b.trajectory["window_start"]) != int(first.trajectory["window_start"]) or not np.array_equal(
                    b.trajectory["timesteps"], first.trajectory["timesteps"]
                ):
                    raise ValueError("rollout batches recorded over different SDE windows cannot be concatenated")
        return RolloutBatch(
            images=np.concatenate([b.images for b in batches]),
            latents=np.concatenate([b.latents for b in batches]),
            prompts=[p for b in batches for p in b.prompts],
            seeds=[s for b in batches for s in b.seeds],
            settings=first.settings,
            policy_version=min(b.policy_version for b in batches),
            model_id=first.model_id,
            rollout_ids=[r for b in batches for r in b.rollout_ids],
            trajectory=None
            if first.trajectory is None
            else {
                "latents": np.concatenate([b.trajectory["latents"] for b in batches]),
                "log_probs": np.concatenate([b.trajectory["log_probs"] for b in batches]),
                "timesteps": first.trajectory["timesteps"],
                "window_start": first.trajectory["window_start"],
            },
            conditioning=None
            if any(b.conditioning is None for b in batches)
            else {p: c for b in batches for p, c in b.conditioning.items()},
        )
