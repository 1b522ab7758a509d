"""DDPO clipped importance-ratio policy-gradient loss.

Paper: Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301
(reference: kvablack/ddpo-pytorch, scripts/train.py); the clipped surrogate is PPO's (Schulman et
al., arXiv 1707.06347).

Each denoising step of a stochastic DDIM sampler (eta = 1) is a Gaussian policy
pi(x_{t-1} | x_t, c); its log-prob comes from families/ddim.py. With the log-prob recorded
at sampling time (old policy) and the one recomputed now on the same (x_t, x_{t-1}, t, c):

    rho_t = exp(logp_theta(x_{t-1} | x_t) - logp_old(x_{t-1} | x_t))
    L     = mean_{b, t} max(-A_b * rho_t, -A_b * clip(rho_t, 1 - eps, 1 + eps)),   eps = 1e-4

At rho = 1 (first inner epoch) the loss is -mean(A) and its gradient is -mean(A * grad logp): plain
REINFORCE. Advantages come from rlfh/losses/advantages.py (per-prompt z-scores clipped to +-5).

Notation (code name -> paper symbol):
    log_prob     -> log pi_theta(x_{t-1} | x_t, c)
    old_log_prob -> log pi_old(x_{t-1} | x_t, c), recorded by the sampler
    advantages   -> A(x_0, c)
    clip_range   -> epsilon of the clipped surrogate (1e-4 in ddpo-pytorch)

Shapes: log_prob, old_log_prob (B,) for one step or (B, T) for T steps; advantages (B,) (broadcast
over steps) or the same shape as log_prob; the loss and the diagnostics are scalars ().
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DDPOLossOutput", "ddpo_clipped_loss"]


class DDPOLossOutput(NamedTuple):
    """Result of :func:`ddpo_clipped_loss`.

    Attributes:
        loss: scalar clipped surrogate loss.
        approx_kl: 0.5 * mean((logp - logp_old)^2), detached (ddpo-pytorch's diagnostic).
        clipfrac: fraction of elements with |rho - 1| > clip_range, detached.
        ratio_mean: mean of rho, detached.
    """

    loss: Tensor
    approx_kl: Tensor
    clipfrac: Tensor
    ratio_mean: Tensor


def ddpo_clipped_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4
) -> DDPOLossOutput:
    """Clipped-ratio policy-gradient loss mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))).

    Args:
        log_prob: log pi_theta of the recorded steps, shape (B,) or (B, T); carries the gradient.
        old_log_prob: log pi_old recorded at sampling time, same shape; treated as a constant.
        advantages: A, shape (B,) or the shape of ``log_prob``; treated as a constant.
        clip_range: eps > 0.

    Returns:
        DDPOLossOutput(loss, approx_kl, clipfrac, ratio_mean).

    Raises:
        ValueError: on mismatched shapes or a non-positive clip range.
    """
    clip_range = float(clip_range)
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(f"clip_range must be finite and > 0, got {clip_range}")
    if log_prob.ndim not in (1, 2) or log_prob.shape[0] == 0:
        raise ValueError(f"log_prob must be (B,) or (B, T), got shape {tuple(log_prob.shape)}")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"old_log_prob shape {tuple(old_log_prob.shape)} must equal log_prob shape {tuple(log_prob.shape)}"
        )
    if advantages.shape == log_prob.shape:
        adv = advantages
    elif advantages.shape == log_prob.shape[:1]:
        adv = advantages.reshape(advantages.shape + (1,) * (log_prob.ndim - 1))  # (B, 1)
    else:
        raise ValueError(
            f"advantages must be (B,) = ({log_prob.shape[0]},) or {tuple(log_prob.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    adv = adv.detach().to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob.detach()  # (B,) or (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * log_ratio.pow(2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).to(log_prob.dtype).mean()
        ratio_mean = ratio.mean()
    return DDPOLossOutput(loss=loss, approx_kl=approx_kl, clipfrac=clipfrac, ratio_mean=ratio_mean)
