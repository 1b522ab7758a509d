"""Trust regions for the per-step policy gradient over DDIM transitions: DPPO's KL mask and GRPO-Guard.

Sources: Flow-DPPO, Ping et al., "Divergence Proximal Policy Optimization for Flow Matching Models",
arXiv 2606.11025 (reference: Tencent-Hunyuan/UniRL, unirl/algorithms/flowdppo.py; as in verl-omni's
``flow_dppo`` loss); GRPO-Guard, Wang et al., "Mitigating Implicit Over-Optimization in Flow Matching
via Regulated Clipping", arXiv 2510.22319. Today's ratio clipping (``clip``) is rlfh/losses/ddpo.py.
Derivations for the DDIM-eta step: docs/online_rl.md.

Each trained DDIM step is a Gaussian policy pi(x_{t-1} | x_t) = N(mu, sigma_t^2 I) whose std sigma_t
is fixed by the schedule and eta (rollouts/ddim_logprob.py), so the policy and the sampling ("old")
policy differ only in their means. With D = C*H*W, per latent element as the recorded log-probs:

    KL_t    = KL(pi_old || pi_theta) = mean over C,H,W of (mu_theta - mu_old)^2 / (2 sigma_t^2)
                                                                        (:func:`gaussian_mean_kl`)

``dppo`` (Flow-DPPO): no clipping; the surrogate -A rho of a (sample, step) is dropped when the step
is outside the KL trust region AND the ratio still moves in the advantage's direction:

    m     = 0 if KL_t > delta and ((A > 0 and rho > 1) or (A < 0 and rho < 1)), else 1 (detached)
    L     = mean_{b, t} m * (-A_b rho_{b,t})                                    (:func:`dppo_loss`)

Steps pulling back towards the old policy, and steps within delta, keep their gradient.

``guard`` (GRPO-Guard's ratio normalization, our reading of the paper and of the public trainers).
With x_{t-1} = mu_old + sigma z recorded by the sampler and Delta = mu_theta - mu_old,

    log rho = mean [ (x - mu_old)^2 - (x - mu_theta)^2 ] / (2 sigma^2) = mean(Delta z) / sigma - KL_t

Under the sampling policy E[log rho] = -KL_t < 0: the ratio drifts below 1 as training moves the mean,
more at low-noise steps (small sigma), so a symmetric clip band is mostly hit on one side, and the
spread mean(Delta z) / sigma grows as 1 / sigma, so low-noise steps dominate the gradient. The
normalized log-ratio removes the drift and the 1 / sigma scale:

    log rho~ = sigma_t (log rho + KL_t) = mean over C,H,W of (Delta * z)    (:func:`guard_log_ratio`)
    L        = mean max(-A rho~, -A clip(rho~, 1 - eps, 1 + eps))           (:func:`guard_loss`)

E[log rho~] = 0 at every step; at theta = old its gradient is sigma_t d log rho = mean(z d mu_theta),
the same scale at every step (GRPO-Guard's per-step gradient re-weighting). KL_t carries the
gradient (it is a function of mu_theta), as in the reference trainer's ``mse`` term.

Shapes: log_prob, old_log_prob, kl, std per step (B,) or (B, T); mean, old_mean (B, C, H, W);
advantages (B,); losses and diagnostics ().
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlfh.losses.ddpo import ddpo_clipped_loss

__all__ = ["TrustRegionOutput", "dppo_loss", "gaussian_mean_kl", "guard_log_ratio", "guard_loss", "log_ratio_drift"]


def upcast(x: Tensor) -> Tensor:
    """Half/bfloat16 -> float32 (squares of small gaps lose nothing); float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class TrustRegionOutput(NamedTuple):
    """Result of :func:`dppo_loss` / :func:`guard_loss`.

    Attributes:
        loss: scalar surrogate.
        limited_frac: fraction of (sample, step) terms masked (dppo) or clipped (guard), detached.
        ratio_mean: mean of the (normalized, for guard) ratio, detached.
        log_ratio_mean: mean raw log rho (the drift; <= 0 in expectation), detached.
        kl_mean: mean KL_t, detached.
    """

    loss: Tensor
    limited_frac: Tensor
    ratio_mean: Tensor
    log_ratio_mean: Tensor
    kl_mean: Tensor


def gaussian_mean_kl(mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """mean over non-batch dims of (mu_theta - sg(mu_old))^2 / (2 sigma^2), (B,); gradient through ``mean``.

    Raises:
        ValueError: on shape mismatches or a non-positive std.
    """
    if mean.ndim < 2 or mean.shape != old_mean.shape:
        raise ValueError(f"mean and old_mean must both be (B, ...), got {tuple(mean.shape)} and {tuple(old_mean.shape)}")
    std = torch.as_tensor(std, device=mean.device)
    if std.ndim == 0:
        std = std.expand(mean.shape[0])
    if std.shape != mean.shape[:1] or bool((std <= 0).any()):
        raise ValueError(f"std must be positive, a scalar or ({mean.shape[0]},), got {std.tolist()}")
    d = upcast(mean) - upcast(old_mean.detach())
    return d.pow(2).flatten(1).mean(dim=1) / (2 * std.to(d.dtype) ** 2)


def _advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.shape == like.shape:
        return advantages.detach().to(like.dtype)
    if advantages.shape == like.shape[:1]:
        return advantages.detach().to(like.dtype).reshape(advantages.shape + (1,) * (like.ndim - 1))
    raise ValueError(f"advantages must be ({like.shape[0]},) or {tuple(like.shape)}, got {tuple(advantages.shape)}")


def _check_same(log_prob: Tensor, **others: Tensor) -> None:
    if log_prob.ndim not in (1, 2) or log_prob.shape[0] == 0:
        raise ValueError(f"log_prob must be (B,) or (B, T), got {tuple(log_prob.shape)}")
    for name, t in others.items():
        if t.shape != log_prob.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal log_prob shape {tuple(log_prob.shape)}")


def dppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, threshold: float) -> TrustRegionOutput:
    """Flow-DPPO: mean of m * (-A rho), m the asymmetric KL trust-region mask (see the module doc).

    Args:
        log_prob: log pi_theta of the recorded steps, (B,) or (B, T), with gradient.
        old_log_prob: the sampler's log-probs, same shape; a constant.
        advantages: A, (B,) or the shape of ``log_prob``; a constant.
        kl: KL_t per (sample, step) from :func:`gaussian_mean_kl`, same shape as ``log_prob``
            (only compared with the threshold: no gradient flows through it).
        threshold: delta > 0.
    """
    threshold = float(threshold)
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"trust-region KL threshold must be finite and > 0, got {threshold}")
    _check_same(log_prob, old_log_prob=old_log_prob, kl=kl)
    adv = _advantages(advantages, log_prob)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        away = ((adv > 0) & (ratio > 1)) | ((adv < 0) & (ratio < 1))
        blocked = (kl.detach() > threshold) & away
    loss = torch.where(blocked, torch.zeros_like(ratio), -adv * ratio).mean()
    return TrustRegionOutput(loss=loss, limited_frac=blocked.to(log_prob.dtype).mean(), ratio_mean=ratio.detach().mean(),
                             log_ratio_mean=log_ratio.detach().mean(), kl_mean=kl.detach().mean())


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, kl: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's normalized log-ratio sigma_t (log rho + KL_t), the shape of ``log_prob``.

    ``std`` is sigma_t per (sample, step), the shape of ``log_prob`` or (B,) (broadcast over steps).
    """
    _check_same(log_prob, old_log_prob=old_log_prob, kl=kl)
    std = torch.as_tensor(std, device=log_prob.device, dtype=log_prob.dtype)
    if std.shape != log_prob.shape:
        std = _advantages(std, log_prob)  # the same broadcasting as advantages
    if bool((std <= 0).any()):
        raise ValueError("std must be > 0")
    return std * (log_prob - old_log_prob.detach() + kl)


def guard_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, std: Tensor,
               clip_range: float) -> TrustRegionOutput:
    """The clipped surrogate of rlfh/losses/ddpo.py on GRPO-Guard's normalized ratio exp(sigma (log rho + KL))."""
    normalized = guard_log_ratio(log_prob, old_log_prob, kl, std)
    out = ddpo_clipped_loss(normalized, torch.zeros_like(normalized), advantages, clip_range)
    return TrustRegionOutput(loss=out.loss, limited_frac=out.clipfrac, ratio_mean=out.ratio_mean,
                             log_ratio_mean=(log_prob - old_log_prob).detach().mean(), kl_mean=kl.detach().mean())


def log_ratio_drift(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """Per-timestep drift of the log-ratio: mean over samples of log rho, (T,) for (B, T) inputs, () for (B,).

    Under the sampling policy its expectation is -KL_t: a drift away from 0 measures how far the
    policy has moved at that step (the quantity GRPO-Guard's normalization removes)."""
    _check_same(log_prob, old_log_prob=old_log_prob)
    return (log_prob - old_log_prob).detach().mean(dim=0)
