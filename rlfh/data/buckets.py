"""Multi-aspect training (``rollout.resolutions``): SDXL was trained on aspect-ratio buckets, its
micro-conditioning telling the UNet each image's size, and its users sample at those buckets.

A round's prompt groups are spread over the buckets, all samples of a group at one bucket (the
group's samples are compared with each other: pairs, per-prompt advantages), chosen by a hash of
the prompt and the group's first seed: a pure function of the round's schedule, so resumes and
re-issued shares repeat it, and a prompt meets different buckets in different rounds. Each bucket
is sampled, scored, logged and built into a learner batch of its own; the learner trains the
round's buckets one after the other (:class:`BucketBatches`), never stacking latents of different
sizes, each bucket's conditioning carrying its own size (SDXL's time ids, ``ModelFamily.conditioning``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Bucket:
    """One resolution of a round and the positions of its samples in the round's order."""

    height: int
    width: int
    index: tuple[int, ...]


def bucket_of(prompt: str, group_seed: int, n: int) -> int:
    """The bucket (0..n-1) of a prompt group: sha256 of the prompt and the group's first seed (Python's
    own ``hash`` of a string changes with every process)."""
    digest = hashlib.sha256(f"{group_seed}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def assign_buckets(
    prompts: Sequence[str], seeds: Sequence[int], resolutions: Sequence[Sequence[int]], default: tuple[int, int]
) -> list[Bucket]:
    """The round's samples by bucket, in the order of ``resolutions`` (empty buckets left out), each
    keeping the round's order; without ``resolutions``, one bucket ``default`` (height, width) of all."""
    if not resolutions:
        return [Bucket(default[0], default[1], tuple(range(len(prompts))))]
    first: dict[str, int] = {}
    for p, s in zip(prompts, seeds):
        first.setdefault(p, int(s))
    which = [bucket_of(p, first[p], len(resolutions)) for p in prompts]
    buckets = []
    for k, (h, w) in enumerate(resolutions):
        index = tuple(i for i, b in enumerate(which) if b == k)
        if index:
            buckets.append(Bucket(int(h), int(w), index))
    return buckets


# stats of a batch builder that count (summed over the buckets); the others are means (weighted by size)
COUNTED = ("/count", "/kept", "/unscored")


def merge_stats(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """One round's builder stats from each bucket's (sample count, stats)."""
    if len(parts) == 1:
        return dict(parts[0][1])
    keys = dict.fromkeys(k for _, st in parts for k in st)
    out = {}
    for k in keys:
        have = [(n, st[k]) for n, st in parts if k in st]
        if k.endswith(COUNTED):
            out[k] = float(sum(v for _, v in have))
        else:
            total = sum(n for n, _ in have)
            out[k] = float(sum(n * v for n, v in have) / total) if total else float(np.mean([v for _, v in have]))
    return out


@dataclass
class BucketBatches:
    """A round's learner batches, one per bucket (each a PairBatch, SampleBatch or TrajectoryBatch of one
    resolution); trained in turn by ``rlfh.learner.steps.train``."""

    parts: list[Any]
    conditioning: dict | None = field(default=None)

    def __post_init__(self):
        tables = [p.conditioning for p in self.parts]
        if self.conditioning is None and tables and all(t is not None for t in tables):
            self.conditioning = {k: v for t in tables for k, v in t.items()}

    @property
    def prompts(self) -> list[str]:
        return [p for part in self.parts for p in part.prompts]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


def concat_scored(parts: list[Any]) -> Any:
    """The buckets' ``rewards.composite.ScoredBatch`` es as one, in bucket order (the round's metrics and grid)."""
    if len(parts) == 1:
        return parts[0]
    from rewards.composite import ScoredBatch

    first = parts[0]
    results = {name: [r for part in parts for r in part.results[name]] for name in first.results}
    return ScoredBatch(results, first.weights, first.regions_of)


def round_batch(parts: list[Any]) -> Any:
    """The one learner batch of a round of one bucket (the batch itself), else :class:`BucketBatches`."""
    return parts[0] if len(parts) == 1 else BucketBatches(parts)
