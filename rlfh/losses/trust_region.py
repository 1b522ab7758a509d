"""Trust regions for the per-step policy gradient over DDIM transitions: DPPO's KL mask and GRPO-Guard.

Sources: Flow-DPPO, Ping et al., "Divergence Proximal Policy Optimization for Flow Matching Models",
arXiv 2606.11025, eq. 14 (the KL) and 18 (the mask) as UniRL's README numbers them; its reference
trainer Tencent-Hunyuan/UniRL (unirl/algorithms/flowdppo.py, ``_flowdppo_kl_adv_loss``; FlowDPPO/README.md) and
verl-omni's
``FlowDPPOLoss`` (verl_omni/trainer/diffusion/diffusion_algos.py, docs/algo/flowdppo.md). GRPO-Guard,
Wang et al., "Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping", arXiv
2510.22319, as Flow-Factory's ``GRPOGuardTrainer`` (X-GenGroup/Flow-Factory, trainers/grpo.py) and
verl-omni's ``GRPOGuardLoss`` implement it. Today's ratio clipping (``clip``) is rlfh/losses/ddpo.py.
Derivations for the DDIM-eta step: docs/online_rl.md.

Each trained DDIM step is a Gaussian policy pi(x_{t-1} | x_t) = N(mu, sigma_t^2 I) whose std sigma_t
is fixed by the schedule and eta (families/ddim.py), so the policy and the sampling ("old")
policy differ only in their means. Per latent element, as the recorded log-probs:

    KL_t    = KL(pi_old || pi_theta) = mean over C,H,W of (mu_theta - mu_old)^2 / (2 sigma_t^2)
                                                                        (:func:`gaussian_mean_kl`)

the references' ``kl_score`` exactly: the next-latent means (x space, not eps), the step's own std,
reduced by a mean (the paper's eq. 14 divided by D = C*H*W).

``dppo`` (Flow-DPPO): no clipping; the surrogate -A rho of a (sample, step) is dropped only when the
step is outside the KL trust region AND the ratio still moves in the advantage's direction (the
paper's eq. 18, the references' ``pos_rm | neg_rm``; a symmetric mask on KL_t alone would also drop
the corrective terms):

    m     = 0 if KL_t >= delta and ((A > 0 and rho > 1) or (A < 0 and rho < 1)), else 1 (detached)
    L     = mean_{b, t} m * (-A_b rho_{b,t})                                    (:func:`dppo_loss`)

Steps pulling back towards the old policy, and steps within delta, keep their gradient. delta is
``learner.ddpo.trust_region_kl``, 1e-5 by default: the references' ``kl_mask_threshold`` in the same units.

``guard`` (GRPO-Guard's ratio normalization). With x_{t-1} = mu_old + sigma z recorded by the sampler
and Delta = mu_theta - mu_old,

    log rho = mean [ (x - mu_old)^2 - (x - mu_theta)^2 ] / (2 sigma^2) = mean(Delta z) / sigma - KL_t

Under the sampling policy E[log rho] = -KL_t < 0: the ratio drifts below 1 as training moves the mean,
more at low-noise steps (small sigma), so a symmetric clip band is mostly hit on one side, and the
spread mean(Delta z) / sigma grows as 1 / sigma. The normalized log-ratio removes the drift and the
1 / sigma scale:

    log rho~ = sigma_t (log rho + KL_t) = mean over C,H,W of (Delta * z)    (:func:`guard_log_ratio`)
    L        = mean max(-A rho~, -A clip(rho~, 1 - eps, 1 + eps))           (:func:`guard_loss`)

which is Flow-Factory's ratio exp((log p - log p_old) s + mse / (2 s)) with s = sigma_t and mse =
mean(Delta^2) (verl-omni's is the same). E[log rho~] = 0 at every step; at theta = old its gradient is
sigma_t d log rho = mean(z d mu_theta), of one scale at every step in mu space. rho~ - 1 is of order
rms(Delta) / sqrt(D), so eps must be of that scale: DDPO's 1e-4 (``learner.ddpo.clip_range``'s
default; verl-omni's guard example uses 2e-6), not PPO's 0.2, at which the tiny model's 12 rounds of
tests/rlfh/test_ddpo.py clip nothing. KL_t carries the gradient (it is a function of mu_theta), as in
the references' ``mse`` term.

The paper's second part, a 1 / dt weight on each step's loss (verl-omni divides by -dt; Flow-Factory
does not), equalizes the per-step gradient in the network's output space: in Flow-GRPO's SDE
d mu / d v = (1 + a^2 / 2) dt. The DDIM step's mean is sqrt(a' / a) x_t + k_t eps_hat (rlfh/losses/kl.py),
so the same weight here is

    lambda_t = 1 / |k_t|  (1 / (|k_t| sqrt(abar_t)) for v-prediction),   L = mean lambda_t max(...)

and at theta = old each step's gradient is -A mean(z d eps_theta) up to sign, of one scale at every
step (``step_weight``; rlfh/learner/ddpo_steps.py: mean_jacobian). lambda spans 0.55 -> 48 over a 4-step
SDXL schedule: the last step (sigma_t = 0.02) barely depends on eps_hat. On the tiny model's 12 rounds
of tests/rlfh/test_ddpo.py at eps = 1e-4 the reward rose 0.044 -> 0.200 with it and 0.044 -> 0.089
without.

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
        raise ValueError(
            f"mean and old_mean must both be (B, ...), got {tuple(mean.shape)} and {tuple(old_mean.shape)}"
        )
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


def dppo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, threshold: float
) -> TrustRegionOutput:
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
        blocked = (kl.detach() >= threshold) & away  # the references' kl_score >= threshold
    loss = torch.where(blocked, torch.zeros_like(ratio), -adv * ratio).mean()
    return TrustRegionOutput(
        loss=loss,
        limited_frac=blocked.to(log_prob.dtype).mean(),
        ratio_mean=ratio.detach().mean(),
        log_ratio_mean=log_ratio.detach().mean(),
        kl_mean=kl.detach().mean(),
    )


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


def guard_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    kl: Tensor,
    std: Tensor,
    clip_range: float,
    step_weight: Tensor | float = 1.0,
) -> TrustRegionOutput:
    """The clipped surrogate of rlfh/losses/ddpo.py on GRPO-Guard's normalized ratio exp(sigma (log rho + KL)),
    each term times its step's ``step_weight`` lambda_t > 0 (a scalar, (B,) or the shape of ``log_prob``)."""
    normalized = guard_log_ratio(log_prob, old_log_prob, kl, std)
    weight = torch.as_tensor(step_weight, device=log_prob.device, dtype=log_prob.dtype)
    if weight.ndim == 0:
        weight = weight.expand(log_prob.shape)
    elif weight.shape != log_prob.shape:
        weight = _advantages(weight, log_prob)  # (B,): the advantages' broadcasting
    if not bool(((weight > 0) & torch.isfinite(weight)).all()):
        raise ValueError("step_weight must be finite and > 0")
    # lambda max(-A rho, -A clip(rho)) = max(-(lambda A) rho, -(lambda A) clip(rho)) for lambda > 0
    out = ddpo_clipped_loss(
        normalized, torch.zeros_like(normalized), _advantages(advantages, log_prob) * weight, clip_range
    )
    return TrustRegionOutput(
        loss=out.loss,
        limited_frac=out.clipfrac,
        ratio_mean=out.ratio_mean,
        log_ratio_mean=(log_prob - old_log_prob).detach().mean(),
        kl_mean=kl.detach().mean(),
    )


def log_ratio_drift(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """Per-timestep drift of the log-ratio: mean over samples of log rho, (T,) for (B, T) inputs, () for (B,).

    Under the sampling policy its expectation is -KL_t: a drift away from 0 measures how far the
    policy has moved at that step (the quantity GRPO-Guard's normalization removes)."""
    _check_same(log_prob, old_log_prob=old_log_prob)
    return (log_prob - old_log_prob).detach().mean(dim=0)
