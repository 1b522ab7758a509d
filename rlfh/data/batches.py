"""The batch types of the data -> learner seam: what one round trains on.

Built by :func:`rlfh.data.pairs.learner_batch` from a round's scored samples (or a rollout log), read
by the steps in :mod:`rlfh.learner.steps`. Arrays are numpy so that Ray ships them zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import numpy as np
import torch

# {prompt: the model family's per-prompt rows as float32 arrays (SDXL: prompt_embeds (77, D), pooled (P,);
# SD1.5: prompt_embeds (77, D))}: what the rollout actors conditioned
# on (rollouts.types.RolloutBatch.conditioning). The learner takes its prompt embeddings from here
# instead of running the text encoders (LearnerEngine.take_conditioning); None: it encodes them.
Conditioning = dict[str, tuple[np.ndarray, ...]]


@dataclass
class ScoredSamples:
    """A round's scored samples, what :func:`rlfh.data.pairs.learner_batch` builds the batch from.

    latents (N, 4, h, w); the prompt, group key (prompt, or (round, prompt)), score
    (:func:`rlfh.data.pairs.learner_scores`; None: unusable) and detected regions ({region:
    [Detection]}) of each sample; the images' (H, W). DDPO's recorded ``trajectory`` (the rollout
    batch's dict) with the sampler ``settings``; the rollout actors' ``conditioning``; the decoded
    ``images`` (N, H, W, 3) uint8 where a data source reads them; HcP's pose ``priors`` (N, 1, h, w)
    (rlfh/data/sources/hcp_priors.py), which go with the batch's rows.
    """

    latents: np.ndarray
    prompts: Sequence[str]
    groups: Sequence[Hashable]
    scores: Sequence[Optional[float]]
    regions: Sequence[dict]
    image_hw: tuple[int, int]
    trajectory: Optional[dict] = None
    settings: object = None  # rollouts.types.SamplerSettings
    conditioning: Optional[Conditioning] = None
    images: Optional[np.ndarray] = None
    priors: Optional[np.ndarray] = None
    ids: Optional[Sequence[str]] = None  # rollout ids (offline, from the log): people's labels name them
    values: Optional[dict] = None  # {reward: value per sample} as scored (online), for GARDO's uncertainty
    kl_gate: Optional[np.ndarray] = None  # (N,) bool: the samples that get the KL term (gardo); None: all
    embeddings: Optional[np.ndarray] = None  # (N, D), a NaN row without one: GARDO's diversity-aware advantage

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PairBatch:
    """Winner / loser latents (N, 4, h, w) float32, the prompt of each pair, region masks (N, 1, h, w),
    HcP's pose priors of the winners and losers (N, 1, h, w; None without ``model.hcp``), and which
    pairs are ALIGNED region pairs, ``aligned`` (N,) bool: an image and its inpainted copy, equal
    outside the region's mask (rlfh/data/region_pairs.py), the only pairs the guidance loss trains on
    (rlfh/losses/guidance.py); None: none is."""

    latents_w: np.ndarray
    latents_l: np.ndarray
    prompts: list[str]
    masks_w: dict[str, np.ndarray] = field(default_factory=dict)
    masks_l: dict[str, np.ndarray] = field(default_factory=dict)
    conditioning: Conditioning | None = None
    priors_w: np.ndarray | None = None
    priors_l: np.ndarray | None = None
    aligned: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def aligned_rows(self) -> np.ndarray:
        """(N,) bool: the pairs that are aligned region pairs (all false when ``aligned`` is None)."""
        return np.zeros(len(self), bool) if self.aligned is None else np.asarray(self.aligned, bool)


@dataclass
class SampleBatch:
    """Samples for weighted or advantage losses: latents (N, 4, h, w), prompts, region masks (N, 1, h, w),
    HcP's pose priors (N, 1, h, w; None without ``model.hcp``) and each sample's signal, one field
    per meaning: ``weights`` (N,), the per-sample loss weights of RWR and filtered (None for NFT and
    AWM); ``advantages`` (N,), the per-prompt advantage A clipped to +-5 of NFT and AWM (None for RWR
    and filtered), from which NFT's step takes its r (:func:`rlfh.losses.nft.nft_reward_weight`)."""

    latents: np.ndarray
    prompts: list[str]
    weights: np.ndarray | None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    conditioning: Conditioning | None = None
    priors: np.ndarray | None = None
    advantages: np.ndarray | None = None
    kl_gate: np.ndarray | None = None  # (N,) bool: the rows that get the KL term (gardo); None: every row

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class TrajectoryBatch:
    """DDPO samples: the recorded SDE window of each trajectory, x_j..x_{j+W} (N, W+1, 4, h, w) (the
    whole x_T..x_0 with W = T, j = 0 without a window), its sampling log-probs (N, W), the window's
    timesteps (W,) and start j (the same for the whole round), per-prompt advantages (N,), prompts,
    and the sampler settings (CFG, eta)."""

    latents: np.ndarray
    log_probs: np.ndarray
    timesteps: np.ndarray
    advantages: np.ndarray
    prompts: list[str]
    settings: object  # rollouts.types.SamplerSettings
    window_start: int = 0  # j: the denoising step (0 = first) the recorded window starts at
    conditioning: Conditioning | None = None
    kl_gate: np.ndarray | None = None  # (N,) bool: the rows that get the KL term (gardo); None: every row

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PromptBatch:
    """The prompts of a round's scored samples, which a direct reward loss (learner.loss=draft) samples again
    itself from the current weights with gradient (its own x_T from the learner's generator)."""

    prompts: list[str]
    conditioning: Conditioning | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def rows(a: np.ndarray, idx: list[int], device) -> torch.Tensor:
    """Rows ``idx`` of a batch array as a float32 tensor on ``device`` (a copy: Ray hands out read-only arrays)."""
    return torch.from_numpy(np.array(a[idx], dtype=np.float32)).to(device)
