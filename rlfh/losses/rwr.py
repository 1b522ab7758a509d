"""Reward-weighted regression (RWR) for diffusion models.

Papers: Peters & Schaal, "Reinforcement Learning by Reward-Weighted Regression for Operational Space
Control" (ICML 2007); applied to text-to-image diffusion by Lee et al., "Aligning Text-to-Image
Models using Human Feedback", arXiv 2302.12192, and used as the RWR baseline of DDPO (Black et al.,
"Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301, section 4.1).

Formula, on the model's own samples x_0 of one round (N scored samples, rewards r), re-noised with
fresh eps as in ordinary diffusion training:

    w_b = N * exp(beta * r_b) / sum_{b' in round} exp(beta * r_b')     (:func:`rwr_weights`)
    l_b = mean over C,H,W of (eps_hat_b - eps_b)^2                    (rlfh/losses/region_mse.py)
          or of (s * 1[M_b > 0] * (eps_hat_b - eps_b))^2 for a region
    L   = sum_{b in m} w_b * l_b / |m|,   m = the micro-batch's samples with w_b > 0
                                                                      (:func:`weighted_loss`)

The softmax runs over the whole round (every data-parallel rank gets slices of the same weights);
scaling it by N gives mean weight 1, so L stays on the scale of the plain MSE: beta = 0 gives w = 1
and the plain mean MSE, beta -> inf regresses onto the best sample only. A weight that underflows to
0 drops its sample. The weights are constants (no gradient flows into rewards). Filtered fine-tuning
(rlfh/losses/filtered.py) is the same loss with 0/1 weights.

Notation (code name -> paper symbol):
    rewards -> r(x_0, c)
    beta    -> beta, the inverse temperature of exp(beta r)
    per_sample_loss -> l_b

Shapes: rewards and weights (N,) for the round; per_sample_loss and its weights (B,) for a micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

__all__ = ["RWRConfig", "check_rewards", "rwr_weights", "weighted_loss"]


def check_rewards(rewards: np.ndarray) -> np.ndarray:
    """Rewards as a float64 (N,) array; raises ValueError unless 1-D, non-empty and finite.

    Missing or non-finite rewards are dropped by the caller (rlfh/data/pairs.py) before weighting:
    one NaN would otherwise make every weight NaN.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.shape[0] == 0:
        raise ValueError(f"rewards must be 1-D with one value per sample (N,), got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(
            f"rewards must be finite (drop missing ones first), got non-finite values at "
            f"{np.flatnonzero(~np.isfinite(r)).tolist()}"
        )
    return r


def rwr_weights(rewards: np.ndarray, beta: float) -> np.ndarray:
    """w = N * softmax(beta * r) over the round, max-shifted so large rewards stay finite; float64 (N,).

    Raises:
        ValueError: on a bad shape, non-finite rewards or a negative / non-finite beta.
    """
    r = check_rewards(rewards)
    beta = float(beta)
    if not (beta >= 0.0 and math.isfinite(beta)):
        raise ValueError(f"rwr beta must be finite and >= 0, got {beta}")
    e = np.exp(beta * (r - r.max()))
    return e / e.sum() * r.shape[0]


def weighted_loss(per_sample_loss: Tensor, weights: Tensor) -> Tensor:
    """sum_b w_b * l_b / B over a micro-batch's samples that carry weight, each (B,), B > 0.

    Raises:
        ValueError: if the shapes differ, are not 1-D or are empty.
    """
    if per_sample_loss.ndim != 1 or per_sample_loss.shape != weights.shape or per_sample_loss.shape[0] == 0:
        raise ValueError(
            f"per_sample_loss and weights must both be (B,) with B > 0, got "
            f"{tuple(per_sample_loss.shape)} and {tuple(weights.shape)}"
        )
    return (weights.detach() * per_sample_loss).sum() / per_sample_loss.shape[0]


@dataclass(frozen=True)
class RWRConfig:
    """``learner.rwr``: reward-weighted regression."""

    beta: float = 1.0  # weights N * softmax(beta * r) over the round (:func:`rwr_weights`)
