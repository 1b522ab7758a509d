"""Guidance loss on the denoising trajectories of (good, bad) pairs: the loser's trajectory pushed
toward the winner's.

Source: FaceScore (Liao et al., arXiv 2406.17100, seed 001) fine-tunes SD1.5 with "a guidance loss on
the denoising trajectories of (good, bad) face pairs" made by inpainting, which "pushes the trajectory
of bad faces toward that of good ones". The paper publishes no formula. What follows is OUR READING,
not the paper's equation:

For a pair (x_0^w, x_0^l) that differs only inside the mask m (FaceScore's inpainted faces), noise
the loser, x_t^l = sqrt(abar_t) x_0^l + sqrt(1 - abar_t) eps, and ask the model to predict, at the
loser's noisy latent, the noise that denoises it to the WINNER:

    eps*  = (x_t^l - sqrt(abar_t) x_0^w) / sqrt(1 - abar_t)         (:func:`winner_noise`)
          = eps + sqrt(abar_t / (1 - abar_t)) (x_0^l - x_0^w)
    L     = E_t mean_{C,H,W} ( m * (eps_theta(x_t^l, t, c) - eps*) )^2   (:func:`guidance_loss`)

eps* is the unique noise for which the forward process from x_0^w reaches the same x_t^l, so the
one-step prediction x0_hat = (x_t^l - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) lands on x_0^w
exactly when eps_theta = eps*: inside m the loser's trajectory is bent onto the winner's, outside m
nothing is asked. Equivalently L = E_t (abar_t / (1 - abar_t)) mean (m * (x0_hat - x_0^w))^2, an
x_0 regression weighted by the SNR as the plain eps loss is. It can be combined with Diffusion-DPO
by a weight, ``loss = L_DPO + coef * L`` (``learner.dpo.guidance.coef``), and it is computed on the same
x_t^l, t and eps as DPO's loser half, so it costs no extra UNet call.

v-prediction models: the same x_t^l and x_0^w give the target v* = sqrt(abar_t) eps* -
sqrt(1 - abar_t) x_0^w (what the learner's ``LearnerEngine.prediction_target`` returns for
``prediction_type: v_prediction``), and the loss is the masked MSE to v*.

Reductions follow rlfh/losses/region_mse.py: the per-pair error is the mean over ALL C*H*W latent
elements of the masked squared difference (not normalized by the mask area: FairHuman's region error
with s = 1), and the batch mean is over the pairs whose mask is non-empty (a pair without the region
adds nothing). ``m`` = 1 everywhere for the ``global`` region.

Notation (code name -> symbol):
    x_t          -> x_t^l, the loser noised at t (what the UNet saw)
    x0_winner    -> x_0^w
    alpha_bar    -> abar_t (the noise scheduler's alphas_cumprod[t])
    pred         -> eps_theta(x_t^l, t, c) (or v)
    target       -> eps* (or v*)
    mask         -> m, 0/1 at latent size

Shapes: x_t, x0_winner, pred, target (B, C, h, w); alpha_bar (B,); mask (B, 1, h, w) or None (global).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlfh.losses.region_mse import per_sample_mse, per_sample_region_mse

__all__ = ["DPOGuidanceConfig", "guidance_loss", "winner_noise"]


def winner_noise(x_t: Tensor, x0_winner: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps* = (x_t^l - sqrt(abar_t) x_0^w) / sqrt(1 - abar_t), float32, no gradient.

    Raises:
        ValueError: on mismatched shapes or abar outside (0, 1) (t = T-1 of a zero-terminal-SNR
            schedule has no eps*: sqrt(abar) = 0 makes every x_0 equally far).
    """
    if x_t.shape != x0_winner.shape or x_t.ndim < 2:
        raise ValueError(
            f"x_t and x0_winner must have the same shape (B, C, h, w), got {tuple(x_t.shape)} and "
            f"{tuple(x0_winner.shape)}"
        )
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x_t.device).reshape(-1)
    if a.shape[0] != x_t.shape[0]:
        raise ValueError(f"alpha_bar must be (B,) = ({x_t.shape[0]},), got {tuple(a.shape)}")
    if bool(((a <= 0) | (a >= 1)).any()):
        raise ValueError(f"alpha_bar must be in (0, 1), got {a.tolist()}")
    a = a.view(-1, *([1] * (x_t.ndim - 1)))
    return (x_t.detach().float() - a.sqrt() * x0_winner.detach().float()) / (1 - a).sqrt()


def guidance_loss(pred: Tensor, target: Tensor, mask: Tensor | None, coef: float = 1.0) -> tuple[Tensor | None, Tensor]:
    """coef * mean over pairs with the region of mean_{C,H,W} (m * (pred - target))^2.

    Args:
        pred: the policy's prediction at x_t^l, (B, C, h, w), with its gradient.
        target: eps* (:func:`winner_noise`) or v*, (B, C, h, w); detached here.
        mask: m (B, 1, h, w), any dtype (only m > 0 counts); None: the whole latent (``global``).
        coef: the term's weight (``learner.dpo.guidance.coef``), finite and >= 0.

    Returns:
        (loss, per-pair errors (B,) without coef): loss is None when no pair has the region.

    Raises:
        ValueError: on a bad coef or shapes.
    """
    coef = float(coef)
    if not (coef >= 0 and math.isfinite(coef)):
        raise ValueError(f"guidance coef must be finite and >= 0, got {coef}")
    target = target.detach()
    if mask is None:
        err = per_sample_mse(pred, target)
        present = torch.ones_like(err, dtype=torch.bool)
    else:
        err = per_sample_region_mse(pred, target, mask, scale=1.0)
        present = mask.flatten(1).amax(1) > 0
    if not bool(present.any()):
        return None, err
    return coef * err[present].mean(), err


@dataclass(frozen=True)
class DPOGuidanceConfig:
    """``learner.dpo.guidance``: the guidance term of the DPO losses (:func:`guidance_loss`)."""

    coef: float = 0.0  # weight of the term pulling the loser's denoising toward the winner (FaceScore); 0 = off
    region: str = "face"  # mask m: the loser's detections of this region (face, hand, ...), or global (whole latent)

    def problems(self, key: str) -> list[str]:
        p = (
            []
            if 0 <= self.coef < math.inf
            else [f"{key}.coef={self.coef}: must be finite and >= 0 (0 turns the guidance term off)"]
        )
        if not self.region.strip():
            p.append(f"{key}.region is empty: name a detected region (face, hand) or global")
        return p
