"""Advantage Weighted Matching (AWM): the policy gradient with the denoising loss as log-likelihood.

Paper: Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models",
arXiv 2509.25050 (their implementation is for flow models: reference scxue/advantage_weighted_matching,
``compute_log_prob_awm`` in scripts/train_sd3_awm.py, with a PPO-clipped ratio against the sampling policy
on the same noised x_t and optional KL terms to the base model and to an EMA of the policy). Derivations
for SDXL: docs/online_rl.md.

The weighting of log p: the reference's trainer takes e = mean((v_theta - v)^2) and offers several weightings
of log p (``config.train.weighting``: "Uniform" log p = -e, "t", "t**2", "huber", "ghuber"), and every
published config (config/dgx_awm.py) sets the generalised Huber one,

    log p = -((e + 1e-10)^q - 1e-10^q) * sigma_t / q,   q = ``ghuber_power`` = 0.25,

with sigma_t the flow time (the noise fraction of x_t). rlfh's default is the plain L_simple form below
(w_t = 1, the reference's "Uniform" weighting); ``learner.awm.weighting: ghuber`` is the published configs'
(:func:`ghuber_error`), carried to a DDPM model through the flow time of x_t / (a + b),

    sigma_t = b / (a + b),   a = sqrt(abar_t), b = sqrt(1 - abar_t),

and the flow-velocity error of the same prediction (x_t = a x0_hat + b eps_hat fixes both from one output):
e_v = e_x0 ((a + b) / b)^2 = e k_t^2 / sigma_t^2, with e the error of the UNet's own target (eps or v) and
k_t = ``DDPMSchedule.x0_scale`` (x0_hat - x0 = -k_t (pred - target)); for eps prediction e_v = e / (1 - sigma_t)^2.

AWM replaces DDPO's per-step log-probability of a recorded reverse trajectory by the pre-training
(denoising score-matching) loss on the final sample re-noised with fresh noise, which is, up to a
constant and a positive time weighting, the negative ELBO of x_0 (Ho et al., arXiv 2006.11239, eq. 12):

    l_theta(x_0, t, eps) = -w_t * mean over C,H,W of (eps_theta(x_t, t, c) - eps)^2,
                           x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  w_t = 1 (L_simple)
    rho   = exp(l_theta - l_old)         l_old: the sampling policy on the same (x_t, t, c), a constant
    L     = mean_b max(-A_b rho_b, -A_b clip(rho_b, 1 - eps_c, 1 + eps_c))          (:func:`awm_loss`)

(plus a KL term to a reference, rlfh/losses/kl.py; AWM regularizes towards an EMA of the policy:
``learner.reference.model: ema``). In the SDXL eps parameterization the matching loss is the UNet's own
training loss, the target being the noise (or v for v-prediction), so nothing else changes.

As the generalization of reward-weighted regression (rlfh/losses/rwr.py): at rho = 1 (the first step
after sampling, or on-policy with ``old_error=None``) the gradient is

    dL/dtheta = mean_b A_b * d/dtheta mean (eps_theta - eps)^2

the denoising loss weighted by the advantage. RWR is the same with the weights w_b = N softmax(beta r)
>= 0 (mean 1) in place of A_b; AWM's A_b are signed and mean-zero per prompt group (rlfh/losses/
advantages.py), so below-average samples are pushed away instead of merely pulled towards less,
the baseline removes the reward's common part (lower variance), and the clipped ratio keeps later
inner epochs near the sampling policy.

Notation (code name -> paper symbol):
    error      -> mean (eps_theta - eps)^2 per sample (with the gradient), = -l_theta
    old_error  -> the sampling policy's error on the same x_t (constant), = -l_old; None: on-policy
    advantages -> A
    clip_range -> the PPO clip epsilon

Shapes: error, old_error, advantages (B,); the loss and diagnostics ().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["AWMConfig", "AWMLossOutput", "GHuber", "awm_loss", "ghuber_error"]

GHUBER_DELTA = 1e-10  # the reference's offset inside the power (and subtracted at zero error)


class GHuber(NamedTuple):
    """The per-sample inputs of :func:`ghuber_error`: q, k_t (B,) and sigma_t (B,)."""

    power: float
    x0_scale: Tensor
    flow_time: Tensor


def ghuber_error(error: Tensor, g: GHuber) -> Tensor:
    """-log p of the reference's "ghuber" weighting from the UNet-target error e (B,):
    ((e_v + delta)^q - delta^q) sigma_t / q with e_v = e k_t^2 / sigma_t^2 (module docstring)."""
    k, s = g.x0_scale.to(error.dtype), g.flow_time.to(error.dtype)
    e_v = error * (k / s) ** 2
    delta = torch.tensor(GHUBER_DELTA, dtype=error.dtype, device=error.device)
    return ((e_v + delta) ** g.power - delta**g.power) * s / g.power


class AWMLossOutput(NamedTuple):
    """Result of :func:`awm_loss`.

    Attributes:
        loss: scalar clipped surrogate.
        clipfrac: fraction of samples with |rho - 1| > clip_range, detached.
        ratio_mean: mean rho, detached.
    """

    loss: Tensor
    clipfrac: Tensor
    ratio_mean: Tensor


def awm_loss(
    error: Tensor, advantages: Tensor, old_error: Tensor | None = None, clip_range: float = 0.2
) -> AWMLossOutput:
    """mean_b max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(old_error - error).

    Args:
        error: per-sample matching error mean (eps_theta - eps)^2 (or a region's masked error), (B,),
            with gradient.
        advantages: A, (B,); a constant.
        old_error: the sampling policy's error on the same noised input, (B,); a constant. None:
            on-policy, rho = exp(sg(error) - error) = 1 with the gradient of -error.
        clip_range: eps > 0.

    Raises:
        ValueError: on shapes other than (B,), B > 0, non-finite advantages or a bad clip range.
    """
    clip_range = float(clip_range)
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(f"clip_range must be finite and > 0, got {clip_range}")
    if error.ndim != 1 or error.shape[0] == 0 or advantages.shape != error.shape:
        raise ValueError(
            f"error and advantages must both be (B,) with B > 0, got {tuple(error.shape)} and {tuple(advantages.shape)}"
        )
    if old_error is not None and old_error.shape != error.shape:
        raise ValueError(f"old_error must be {tuple(error.shape)}, got {tuple(old_error.shape)}")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError(f"advantages must be finite, got {advantages.tolist()}")
    adv = advantages.detach().to(error.dtype)
    old = (error if old_error is None else old_error).detach().to(error.dtype)
    log_ratio = old - error  # l_theta - l_old with l = -error
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1.0).abs() > clip_range).to(error.dtype).mean()
    return AWMLossOutput(loss=loss, clipfrac=clipfrac, ratio_mean=ratio.detach().mean())


@dataclass(frozen=True)
class AWMConfig:
    """``learner.awm``: Advantage Weighted Matching (arXiv 2509.25050)."""

    clip_range: float = 0.2  # PPO clip of the ratio exp(old error - error)
    weighting: Literal["uniform", "ghuber"] = "uniform"  # log p: -e (L_simple), or the reference configs' ghuber
    ghuber_power: float = 0.25  # q of weighting=ghuber (the reference's configs: 0.25)

    def problems(self, key: str) -> list[str]:
        p = [] if 0 < self.clip_range < math.inf else [f"{key}.clip_range={self.clip_range}: must be finite and > 0"]
        if not 0 < self.ghuber_power <= 1:
            p.append(f"{key}.ghuber_power={self.ghuber_power}: must be in (0, 1]")
        return p
