"""Several rewards scored together: the object the reward actor and the server hold.

Each image gets every reward's :class:`RewardResult`. The learner's scalar objective for an image
is the weighted sum of the rewards that have a value for it (:func:`combined_scores`); an image
where a reward with non-zero weight has no value, or a non-finite one, gets no combined score (it is
logged, never trained on as if it scored 0). Per-region scores (``global``, ``face``, ``hand``, ...)
sum only the rewards of that region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from rewards.base import Detection, Reward, RewardError, RewardResult
from rewards.registry import build_reward


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def combined_scores(values: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float | None]:
    """Per image, sum_n weights[n] * values[n][i] over the rewards in ``values``.

    A value that is None, NaN or inf counts as missing: the image gets None when a reward with
    non-zero weight is missing (or the sum itself overflows), and a zero-weight reward is skipped.
    No rewards at all gives None for every image.

    Args:
        values: {reward name: one value per image}, every list the same length.
        weights: {reward name: weight}, covering every name of ``values``.
    """
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise ValueError(f"rewards hold different numbers of values: { {n: len(v) for n, v in values.items()} }")
    out: list[float | None] = []
    for i in range(lengths.pop() if lengths else 0):
        total: float | None = 0.0
        for n, vs in values.items():
            if not _finite(vs[i]):
                if weights[n] != 0.0:
                    total = None
                    break
                continue
            total += weights[n] * vs[i]
        out.append(total if values and _finite(total) else None)
    return out


def nonfinite_counts(values: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """``reward/<name>/nonfinite``: how many of each reward's values are NaN or inf (counted as missing)."""
    return {
        f"reward/{n}/nonfinite": float(sum(v is not None and not math.isfinite(v) for v in vs))
        for n, vs in values.items()
    }


@dataclass(frozen=True)
class WeightedReward:
    reward: Reward
    weight: float

    @property
    def name(self) -> str:
        return self.reward.name

    @property
    def region(self) -> str:
        return getattr(self.reward, "region", "global")


@dataclass
class ScoredBatch:
    """Every reward's results for one batch; ``results[name][i]`` is image i's verdict."""

    results: dict[str, list[RewardResult]]
    weights: dict[str, float]
    regions_of: dict[str, str]

    def __len__(self) -> int:
        return len(next(iter(self.results.values()))) if self.results else 0

    def values(self, region: str | None = None) -> dict[str, list[float | None]]:
        """{reward name: value per image} for the rewards (of ``region`` if given)."""
        return {
            n: [r.value for r in res]
            for n, res in self.results.items()
            if region is None or self.regions_of[n] == region
        }

    def combined(self, region: str | None = None) -> list[float | None]:
        """:func:`combined_scores` over the rewards (of ``region`` if given); None if incomplete."""
        values = self.values(region)
        return combined_scores(values, self.weights) if values else [None] * len(self)

    def regions(self, i: int) -> dict[str, list[Detection]]:
        """Union of what every reward detected in image i, by region name."""
        merged: dict[str, list[Detection]] = {}
        for res in self.results.values():
            for region, dets in res[i].regions.items():
                merged.setdefault(region, [])
                merged[region].extend(d for d in dets if d not in merged[region])
        return merged

    def means(self) -> dict[str, float]:
        """``reward/<name>/mean``, ``/std``, ``/missing_frac`` (non-finite counts as missing) and
        ``/nonfinite`` for logging."""
        metrics: dict[str, float] = nonfinite_counts(self.values())
        for n, res in self.results.items():
            vals = [r.value for r in res if _finite(r.value)]
            if vals:
                metrics[f"reward/{n}/mean"] = float(np.mean(vals))
                metrics[f"reward/{n}/std"] = float(np.std(vals))
            metrics[f"reward/{n}/missing_frac"] = 1.0 - len(vals) / max(len(res), 1)
        comb = [v for v in self.combined() if v is not None]
        if comb:
            metrics["reward/combined/mean"] = float(np.mean(comb))
        return metrics


def _score_one(r: WeightedReward, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
    """One reward on the batch; a RewardError is raised again naming the reward and the images that
    fail when scored alone (the reward's own message, e.g. a NaN value refused by RewardResult,
    knows neither its config name nor the image). Rescoring runs only on this failure path."""
    try:
        return r.reward(images, prompts)
    except RewardError as e:
        bad = []
        for i in range(len(prompts)):
            try:
                r.reward(images[i : i + 1], list(prompts[i : i + 1]))
            except RewardError:
                bad.append(i)
        n = len(prompts)
        if not bad:
            where = f"a batch of {n} images (no image fails alone)"
        else:
            listed = ", ".join(f"{i} (prompt {prompts[i]!r:.80})" for i in bad[:5])
            where = f"image{'s' if len(bad) > 1 else ''} {listed}{' and more' if len(bad) > 5 else ''} of {n}"
        raise RewardError(f"reward {r.name!r} failed on {where}: {e}") from e


class RewardSet:
    """The configured rewards, scored together on each batch."""

    def __init__(self, rewards: Sequence[WeightedReward]):
        names = [r.name for r in rewards]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"reward names must be unique, got duplicates {sorted(dup)}; set `name:` in the config")
        if not rewards:
            raise ValueError("at least one reward is needed")
        self.rewards = list(rewards)

    @classmethod
    def from_config(cls, entries: Sequence[Any]) -> "RewardSet":
        """Build from config entries with ``target``, ``name``, ``weight`` and ``options``."""
        return cls([WeightedReward(build_reward(e.target, dict(e.options), e.name), float(e.weight)) for e in entries])

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def close(self) -> None:
        """Close every reward (:meth:`rewards.base.Reward.close`: the detectors they built); safe
        to call twice. A reward not derived from Reward may have no ``close``."""
        for r in self.rewards:
            close = getattr(r.reward, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def face_embeddings(self, images: np.ndarray, faces: Sequence[Sequence[Detection]] | None = None) -> dict[str, Any]:
        """Embeddings of the faces in ``images`` from a configured reward's model, for the face
        identity similarity (``rlfh.eval.diversity``; which model: ``rewards.embeddings.find_embedder``).

        Args:
            images: uint8 (B, H, W, 3).
            faces: per image its face detections (``ScoredBatch.regions(i)["face"]``); None runs the
                detector of the configured face reward.

        Returns:
            ``{"embeddings": (N, D), "owners": image index per face, "source": model}``, or
            ``{"embeddings": None, "reason": why not}``.
        """
        from rewards.embeddings import find_embedder

        if not hasattr(self, "_embedder"):  # found once: the reward models do not change
            self._embedder = find_embedder([r.reward for r in self.rewards])
        embedder, reason = self._embedder
        if embedder is None:
            return {"embeddings": None, "owners": [], "source": None, "reason": reason}
        if faces is None:
            detector = next(
                (
                    getattr(r.reward, "detector", None)
                    for r in self.rewards
                    if r.region == "face" and getattr(r.reward, "detector", None) is not None
                ),
                None,
            )
            if detector is None:
                return {
                    "embeddings": None,
                    "owners": [],
                    "source": embedder.source,
                    "reason": "no face regions were given and no configured face reward has a detector",
                }
            faces = detector.detect(images)
        return {**embedder.faces(images, faces), "reason": None}

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> ScoredBatch:
        return ScoredBatch(
            results={r.name: _score_one(r, images, prompts) for r in self.rewards},
            weights={r.name: r.weight for r in self.rewards},
            regions_of={r.name: r.region for r in self.rewards},
        )
