"""The reward contract shared by every reward, the server and the learner.

A reward is a callable on a batch of images and their prompts::

    reward(images: np.ndarray (B, H, W, 3) uint8 RGB, prompts: list[str]) -> list[RewardResult]

returning one :class:`RewardResult` per image: either a finite value, or ``value=None`` with a
``reason`` (no face found, model missing for this image, ...). A reward never invents a number:
what it cannot compute it says so. It also reports what it detected (``regions``), so the learner
can build per-region masks without running the detectors twice.

``Reward`` subclasses set ``name`` (the key in metrics and the rollout log) and ``region`` (the
learner objective the reward feeds: ``global``, ``face``, ``hand`` or any other name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# The fixed text a region scorer of the ImageReward architecture reads beside a region crop: FaceScore's
# "A face." (arXiv 2406.17100), and the same form for a hand score trained the way FaceScore was.
REGION_PROMPTS = {"face": "A face.", "hand": "A hand."}


class RewardError(RuntimeError):
    """A reward could not run at all (weights missing, bad input, NaN output)."""


@dataclass(frozen=True)
class Detection:
    """One detected region in image pixel coordinates.

    Attributes:
        box: (x1, y1, x2, y2) in pixels of the scored image, x to the right, y down.
        confidence: detector confidence in [0, 1].
        label: optional detector label (e.g. handedness "Left"/"Right").
    """

    box: tuple[float, float, float, float]
    confidence: float
    label: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"box": [float(v) for v in self.box], "confidence": float(self.confidence)}
        if self.label is not None:
            out["label"] = self.label
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Detection":
        box = d["box"]
        if len(box) != 4:
            raise ValueError(f"a detection box needs 4 numbers (x1, y1, x2, y2), got {box!r}")
        return cls(tuple(float(v) for v in box), float(d["confidence"]), d.get("label"))


@dataclass(frozen=True)
class RewardResult:
    """One reward's verdict on one image.

    Attributes:
        value: the score, or None when it cannot be computed for this image.
        reason: why ``value`` is None (required then, forbidden otherwise).
        regions: what the reward detected, by region name (``{"face": [Detection, ...]}``).
        info: extra per-image numbers (per-face scores, ...), JSON-serialisable.
    """

    value: float | None
    reason: str | None = None
    regions: dict[str, list[Detection]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.value is None:
            if not self.reason:
                raise ValueError("a RewardResult without a value must give a reason")
        else:
            if self.reason is not None:
                raise ValueError("a RewardResult with a value must not carry a reason")
            if not math.isfinite(self.value):
                raise RewardError(f"reward value {self.value!r} is not finite")

    @classmethod
    def missing(cls, reason: str, **kw: Any) -> "RewardResult":
        return cls(value=None, reason=reason, **kw)

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "reason": self.reason,
            "regions": {k: [d.to_json() for d in v] for k, v in self.regions.items()},
            "info": self.info,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RewardResult":
        regions = {k: [Detection.from_json(x) for x in v] for k, v in (d.get("regions") or {}).items()}
        value = d.get("value")
        return cls(None if value is None else float(value), d.get("reason"), regions, d.get("info") or {})


class Reward:
    """Base class for rewards. Subclasses implement :meth:`score`.

    ``__call__`` validates the batch and the results so every reward obeys the same contract.
    """

    name: str = "reward"
    region: str = "global"
    # True for rewards whose score() takes ``sources``: per image None or the decoded file as a PIL
    # image in its own mode (RGBA, LA, P; rewards.wire.DecodedImage.source), for preprocessing
    # that, like the references, resizes in that mode before converting to RGB.
    reads_sources: bool = False
    # True for rewards that implement score_tensor: the direct reward losses (learner.loss=draft,
    # rlfh/losses/draft.py) back-propagate through it and refuse any reward without it
    differentiable_score: bool = False

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        raise NotImplementedError

    def score_tensor(self, images: Any, prompts: Sequence[str]) -> tuple[Any, Any]:
        """The reward of float images (B, 3, H, W) in [0, 1], differentiable w.r.t. the pixels, and where it
        applies: ((B,) float32 scores, (B,) bool present). Regions are found without gradient (on the
        detached image) and scored on crops taken by indexing, so the gradient reaches the region's pixels.
        Only for rewards with ``differentiable_score``."""
        raise NotImplementedError(f"{self.name}: not a differentiable reward (no score_tensor)")

    def close(self) -> None:
        """Release what the reward holds outside Python's memory (a detector it built: a MediaPipe
        graph); the owner of the reward calls it when done. Safe to call twice; nothing by default."""

    def __call__(
        self, images: np.ndarray, prompts: Sequence[str], sources: Sequence[Any] | None = None
    ) -> list[RewardResult]:
        images = check_images(images)
        if len(prompts) != len(images):
            raise RewardError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        if sources is not None and not self.reads_sources:
            raise RewardError(f"{self.name}: does not read source images (reads_sources is False)")
        if sources is not None and len(sources) != len(images):
            raise RewardError(f"{self.name}: got {len(images)} images but {len(sources)} sources")
        results = (
            self.score(images, list(prompts)) if sources is None else self.score(images, list(prompts), sources=sources)
        )
        if len(results) != len(images):
            raise RewardError(f"{self.name}: returned {len(results)} results for {len(images)} images")
        return results


def check_images(images: np.ndarray) -> np.ndarray:
    """Check a batch is uint8 (B, H, W, 3); raise RewardError naming what is wrong."""
    if not isinstance(images, np.ndarray):
        raise RewardError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise RewardError(f"images must have shape (B, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise RewardError(f"images must be uint8 RGB, got dtype {images.dtype}")
    return images
