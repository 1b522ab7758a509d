"""How well each logged reward agrees with people's labels of the same images.

For every label that is not a tie (each labeler's last label of a task), the pair (winner, loser):

* ranking accuracy: the share of pairs whose reward ranks the people's winner higher (a tie in the
  reward counts half; a pair with a missing or non-finite value is left out and counted), with a
  percentile-bootstrap 95% interval over pairs: FaceScore's validation of its metric against
  annotated pairs (arXiv 2406.17100);
* correlation: Spearman's rho between the reward's difference and the people's preference over all
  two-image labels, ties included: first shown minus second shown against +1 (first preferred), 0
  (tie), -1 (second preferred); ranks with ties get their average rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def latest_labels(table) -> list:
    """The labels that count, one per (labeler, task): each labeler's last word on a task."""
    last: dict[tuple[str, str], Any] = {}
    for lab in table.labels():
        last[(lab.labeler, lab.task)] = lab
    return list(last.values())


def average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x, y) -> float | None:
    """Spearman's rho with average ranks for ties; None with fewer than 3 values or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def reward_agreement(log_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{reward: {accuracy, ci95, pairs, missing, spearman, spearman_n}} over the log's labels."""
    from rlfh.labeling.table import LabelsTable
    from rlfh.stats import bootstrap_ci
    from rollouts.log import RolloutLog

    labels = latest_labels(LabelsTable(log_dir))
    values: dict[str, dict[str, float | None]] = {}
    for r in RolloutLog(log_dir).records(["rollout_id", "rewards"]):
        for rw in r["rewards"]:
            v = rw["value"]
            values.setdefault(rw["name"], {})[r["rollout_id"]] = v if v is not None and math.isfinite(v) else None
    out = {}
    for name, vals in values.items():
        hits, missing, diffs, prefs = [], 0, [], []
        for lab in labels:
            if not lab.tie:
                w, l = vals.get(lab.winner), vals.get(lab.loser)
                if w is None or l is None:
                    missing += 1
                else:
                    hits.append(1.0 if w > l else 0.5 if w == l else 0.0)
            if len(lab.records) == 2:
                a, b = (vals.get(r) for r in lab.records)
                if a is not None and b is not None:
                    diffs.append(a - b)
                    prefs.append(0.0 if lab.tie else (1.0 if lab.winner == lab.records[0] else -1.0))
        ci = bootstrap_ci(hits)
        out[name] = {
            "accuracy": float(np.mean(hits)) if hits else None,
            "ci95": None if ci is None else list(ci),
            "pairs": len(hits),
            "missing": missing,
            "spearman": spearman(diffs, prefs),
            "spearman_n": len(diffs),
        }
    return out


def format_agreement(agreement: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["  reward agreement with people (ranking accuracy [95% CI], pairs; Spearman's rho, labels):"]
    for name, a in agreement.items():
        acc = "n/a" if a["accuracy"] is None else f"{a['accuracy']:.3f}"
        ci = "" if a["ci95"] is None else f" [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        rho = "n/a" if a["spearman"] is None else f"{a['spearman']:.3f}"
        lines.append(f"    {name:<28} {acc}{ci}, {a['pairs']} pairs ({a['missing']} missing); rho {rho}, "
                     f"{a['spearman_n']} labels")  # fmt: skip
    return lines
