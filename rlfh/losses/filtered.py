"""Filtered fine-tuning (reward-thresholded supervised fine-tuning on the model's own samples).

Papers: Lee et al., "Aligning Text-to-Image Models using Human Feedback", arXiv 2302.12192, and the
filtering baselines of DDPO (Black et al., arXiv 2305.13301) / RAFT (Dong et al., arXiv 2304.06767).

Formula, on the model's own samples x_0 of one round with rewards r, re-noised with fresh eps:

    C   = the given threshold, or the (1 - top_fraction) quantile of the round's rewards
          (numpy's linear interpolation), so about ``top_fraction`` of the samples pass
    k_b = 1[r_b >= C]                                                 (:func:`filter_weights`)
    l_b = mean over C,H,W of (eps_hat_b - eps_b)^2                    (rlfh/losses/region_mse.py)
          or of (s * 1[M_b > 0] * (eps_hat_b - eps_b))^2 for a region
    L   = sum_b k_b * l_b / sum_b k_b                                 (mean over the kept samples)

L is :func:`rlfh.losses.rwr.weighted_loss` with the 0/1 weights k: dropped samples never reach the
learner, and a micro-batch (or region) with no kept sample gives no objective at all.

Notation (code name -> paper symbol):
    rewards   -> r(x_0, c)
    threshold -> C (None: from ``top_fraction``)

Shapes: rewards and weights (N,) for the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from rlfh.losses.rwr import check_rewards

__all__ = ["FilteredConfig", "filter_weights"]


def filter_weights(rewards: np.ndarray, threshold: float | None, top_fraction: float) -> np.ndarray:
    """k_b = 1[r_b >= C] as float64 (N,); C = ``threshold``, else the top ``top_fraction`` quantile.

    Raises:
        ValueError: on a bad shape, non-finite rewards or threshold, or top_fraction outside (0, 1].
    """
    r = check_rewards(rewards)
    if threshold is None:
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        c = float(np.quantile(r, 1.0 - top_fraction))
    else:
        c = float(threshold)
        if not math.isfinite(c):
            raise ValueError(f"threshold must be finite, got {c}")
    return (r >= c).astype(np.float64)


@dataclass(frozen=True)
class FilteredConfig:
    """``learner.filtered``: filtered fine-tuning on the round's best samples."""

    threshold: Optional[float] = None  # keep r >= threshold; null keeps the top fraction
    top_fraction: float = 0.5  # share of the round's samples kept when threshold is null

    def problems(self, key: str) -> list[str]:
        return [] if 0 < self.top_fraction <= 1 else [f"{key}.top_fraction={self.top_fraction}: must be in (0, 1]"]
