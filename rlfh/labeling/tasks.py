"""What a labeler is asked, from a rollout log: one task per prompt group or pair of images.

A prompt group is the log's samples of one (round, prompt), the way they competed in training (an
image and its inpainted copy, linked by ``region_pair``, form a group of their own). By mode:

* ``best-worst``: one task per group of two or more images: pick the best and the worst (with two
  images, the best alone: the other is the worst). One DPO pair, as ``pair_strategy: best_worst``.
* ``pairwise``: one task per pair of images within a group (every pair: k images give k(k-1)/2).
* ``win-tie-lose``: as pairwise, for logs of two images a group (``rlfh eval --human-pairs``).

A task's key is its sorted rollout ids joined by ``+``: the same on every start, so labels resume.
Tasks are ordered by round, then prompt, as the log holds them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlfh.labeling.table import MODES

COLUMNS = ["rollout_id", "round", "prompt", "seed", "rewards", "regions", "sampler", "region_pair"]


@dataclass(frozen=True)
class Item:
    """One image of a task: its rollout id, size, rewards and detected boxes (shown only on request)."""

    rollout_id: str
    seed: int | None
    height: int
    width: int
    rewards: dict[str, float | None] = field(default_factory=dict)
    boxes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    key: str
    prompt: str
    round: int
    items: tuple[Item, ...]


def group_key(r: dict) -> tuple:
    rp = r.get("region_pair")
    if rp:
        return ("region_pair", rp.get("source_id") or r["rollout_id"])
    return ("round", r["round"], r["prompt"])


def _item(r: dict) -> Item:
    s = r.get("sampler") or {}
    rewards = {
        rw["name"]: (rw["value"] if rw["value"] is not None and math.isfinite(rw["value"]) else None)
        for rw in r.get("rewards") or []
    }
    boxes = [
        {"region": g["region"], "box": [g["x1"], g["y1"], g["x2"], g["y2"]], "confidence": g["confidence"]}
        for g in r.get("regions") or []
    ]
    return Item(r["rollout_id"], r.get("seed"), int(s.get("height") or 0), int(s.get("width") or 0), rewards, boxes)


def build_tasks(records: list[dict], mode: str) -> list[Task]:
    """The tasks of ``mode`` over rollout-log records (:data:`COLUMNS`), in log order."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: use one of {MODES}")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    tasks = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if mode == "best-worst":
            subsets = [members]
        else:
            subsets = [list(p) for p in itertools.combinations(members, 2)]
        for sub in subsets:
            key = "+".join(sorted(r["rollout_id"] for r in sub))
            tasks.append(Task(key, sub[0]["prompt"], int(sub[0]["round"]), tuple(_item(r) for r in sub)))
    return tasks


def load_tasks(log_dir: str | Path, mode: str) -> list[Task]:
    """The tasks of a rollout log (checksums verified by the log reader)."""
    from rollouts.log import RolloutLog

    tasks = build_tasks(RolloutLog(log_dir).records(COLUMNS), mode)
    if not tasks:
        raise ValueError(f"the rollout log {log_dir} holds no prompt group of two or more images: nothing to label")
    return tasks
