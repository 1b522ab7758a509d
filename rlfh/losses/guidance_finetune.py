"""Fine-tuning with the guidance loss alone on aligned region pairs (``learner.loss: guidance``), as
FaceScore v1 fine-tunes SD1.5.

Source: FaceScore (Liao et al., arXiv 2406.17100, v1) fine-tunes the model with "a guidance loss on the
denoising trajectories of (good, bad) face pairs" made by inpainting, which "pushes the trajectory of
bad faces toward that of good ones", with no preference loss beside it. The per-pair term is the one
rlfh/losses/guidance.py writes out (our reading; the paper publishes no formula). This file is the
objective that trains on it alone, per region, on the ALIGNED pairs of the batch only (an image and its
inpainted copy, equal outside the inpainting mask M: ``PairBatch.aligned``); a pair of two different
samples has no trajectory of the winner "at the same place" to pull toward, so it adds nothing.

For an aligned pair (x_0^w, x_0^l), t ~ U{0..T-1}, eps ~ N(0, I), and each region r of
``learner.regions.names``:

    x_t^l = sqrt(abar_t) x_0^l + sqrt(1 - abar_t) eps
    eps*  = (x_t^l - sqrt(abar_t) x_0^w) / sqrt(1 - abar_t)                 (guidance.winner_noise)
    L_r   = mean over the aligned pairs with r of mean_{C,H,W} (m_r * (eps_theta(x_t^l, t, c) - eps*))^2
    loss  = sum_r c_r L_r,   c from the fairness rule (``learner.regions.fairness``; MPD by default)

m_r is the loser's mask of r (the inpainted region's mask; zero for the other local regions of a region
pair), and 1 everywhere for ``global``: outside M x_0^w = x_0^l, so there eps* = eps and the global
objective is the plain denoising loss of the image, which keeps what was not inpainted in place. One
UNet call per pair (the loser's x_t^l), no reference model. v-prediction models regress v* instead
(the learner's ``prediction_target`` of x_0^w and eps*). Reductions as in rlfh/losses/region_mse.py
(scale 1, mean over ALL latent elements).

Config: the regions and their balance are ``learner.regions``; the family reads no knob of its own (it is
filed under ``learner.dpo``, whose beta and guidance term it does not use). Its pairs come from
``data.region_pairs`` online or from a rollout log of region pairs (``rlfh make-region-pairs``) offline;
a config with neither is refused (rlfh/config/rules.py).

Shapes: pred, target (B, C, h, w); masks {region: (B, 1, h, w)}; aligned (B,) bool.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlfh.losses.guidance import guidance_loss

__all__ = ["guidance_objectives"]


def guidance_objectives(
    pred: Tensor, target: Tensor, masks: dict[str, Tensor], aligned: Tensor, regions: list[str]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """{region: L_r} for the regions some aligned pair of the micro-batch has, and ``loss/guidance/<r>``
    (the plain mean error of those pairs).

    Args:
        pred: eps_theta (or v) at the losers' x_t^l, with its gradient.
        target: eps* (or v*), :func:`rlfh.losses.guidance.winner_noise`.
        masks: the losers' region masks; aligned: which pairs are region pairs.
        regions: ``learner.regions.names``.
    """
    objectives: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    rows = aligned.to(device=pred.device, dtype=torch.bool)
    metrics["guidance/aligned_share"] = float(rows.float().mean()) if rows.numel() else 0.0
    if not bool(rows.any()):
        return objectives, metrics
    for region in regions:
        if region != "global" and region not in masks:
            raise ValueError(f"learner.regions.names has {region!r}, but the batch holds masks of {sorted(masks)}")
        mask = None if region == "global" else masks[region][rows]
        term, err = guidance_loss(pred[rows], target[rows], mask)
        if term is None:
            continue
        objectives[region] = term
        present = torch.ones_like(err, dtype=torch.bool) if mask is None else mask.flatten(1).amax(1) > 0
        metrics[f"loss/guidance/{region}"] = float(err.detach()[present].mean())
    return objectives, metrics
