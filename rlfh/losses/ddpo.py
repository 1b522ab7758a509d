"""DDPO clipped importance-ratio policy-gradient loss.

Paper: Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301
(reference: kvablack/ddpo-pytorch, scripts/train.py); the clipped surrogate is PPO's (Schulman et
al., arXiv 1707.06347).

Each denoising step of a stochastic DDIM sampler (eta = 1) is a Gaussian policy
pi(x_{t-1} | x_t, c); its log-prob comes from families/ddim.py (on flow-matching models, the
Flow-GRPO SDE step of families/flow.py: Liu et al., arXiv 2505.05470). With the log-prob recorded
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
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["DDPOConfig", "DDPOLossOutput", "ddpo_clipped_loss"]


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


@dataclass(frozen=True)
class DDPOConfig:
    """``learner.ddpo``: the per-step policy gradient on recorded trajectories, its SDE window and its trust region.

    Attributes:
        window: W consecutive steps sampled with eta > 0 and trained, eta = 0 elsewhere; null = every step.
            The window's start is drawn per round and shared by the round's samples (``rlfh.data.pairs.ddpo_window``).
        branch: with ``window``, a prompt group shares x_T and the deterministic steps before the window,
            sampled once, and its samples branch at the window (TempFlow-GRPO; ``rlfh.data.pairs.ddpo_branch_seeds``).
        trust_region: clip (PPO's ratio clip), dppo (Flow-DPPO's KL mask) or guard (GRPO-Guard's normalized
            ratio); docs/online_rl.md, section 5.
        trust_region_kl: trust_region=dppo masks the steps moving with their advantage whose KL to the sampling
            policy (mean over latent elements, x space) reaches this; 1e-5 is Flow-DPPO's reference for lr 3e-4
            (the KL grows as lr^2).
    """

    clip_range: float = 1e-4  # ratio clip epsilon (trust_region=clip; guard: of its normalized ratio)
    timestep_fraction: float = 1.0  # share of each trajectory's recorded steps (all, or the window's) trained per epoch
    window: Optional[int] = None
    window_max_start: Optional[int] = None  # the window's start is drawn per round in 0..this; null = steps - window
    branch: bool = False
    trust_region: Literal["clip", "dppo", "guard"] = "clip"
    trust_region_kl: float = 1e-5

    def problems(self, key: str) -> list[str]:
        p = [] if self.clip_range > 0 else [f"{key}.clip_range={self.clip_range}: must be > 0"]
        if not 0 < self.timestep_fraction <= 1:
            p.append(f"{key}.timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        if not 0 < self.trust_region_kl < math.inf:
            p.append(f"{key}.trust_region_kl={self.trust_region_kl}: must be finite and > 0")
        if self.window is not None and self.window < 1:
            p.append(f"{key}.window={self.window}: must be >= 1 or null (every step stochastic)")
        if self.window_max_start is not None and (self.window is None or self.window_max_start < 0):
            p.append(f"{key}.window_max_start={self.window_max_start}: needs {key}.window and must be >= 0")
        if self.branch and self.window is None:
            p.append(
                f"{key}.branch=true branches a prompt group's trajectories at the SDE window: it needs "
                f"learner.loss=ddpo and {key}.window"
            )
        return p
