"""Diffusion-DPO loss (Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908, eq. 14; reference: SalesforceAIResearch/DiffusionDPO train.py).

For a pair (x_w, x_l) noised with the SAME timestep t and the SAME noise eps::

    mse_theta_* = mean_{C,H,W} (eps_theta(x_t^*, t, c) - eps)^2        (* in {w, l})
    mse_ref_*   = mean_{C,H,W} (eps_ref(x_t^*, t, c) - eps)^2
    model_diff  = mse_theta_w - mse_theta_l
    ref_diff    = mse_ref_w - mse_ref_l
    logits      = -0.5 * (model_diff - ref_diff)       (the implicit log-ratio margin; trl's "logits")
    inside      = beta * logits
    loss        = -log sigmoid(inside), averaged over pairs
    implicit accuracy = fraction of pairs with inside > 0 (ties count 0.5, diffusers' convention)

The per-sample errors come from rlfh/losses/region_mse.py (``per_sample_mse`` for the whole image,
``per_sample_region_mse`` for a region); the hinge and IPO losses on the same ``logits`` are in
rlfh/losses/dpo_variants.py.

Code name -> paper symbol: ``mse_theta_*`` uses eps_theta(x_t^*, t), ``mse_ref_*`` eps_ref, the
target is eps (or the v-target for v-prediction models, the velocity eps - x0 for flow-matching
models: the flow DPO of Flow-Factory and VideoDPO; the learner takes it from the family's noise
schedule), ``beta`` = beta_DPO (5000 for SDXL; the paper's T * omega(lambda_t) is folded into it).
The reference model for LoRA training is the same denoiser with adapters disabled.

Shapes: every MSE input (B,), B = number of pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlfh.losses.guidance import DPOGuidanceConfig


@dataclass
class DPOOutput:
    """Loss and per-pair diagnostics; every tensor except ``loss`` is detached, shape (B,)."""

    loss: Tensor
    inside: Tensor
    mse_theta_w: Tensor
    mse_theta_l: Tensor
    mse_ref_w: Tensor
    mse_ref_l: Tensor

    def metrics(self, prefix: str = "dpo") -> dict[str, float]:
        return {
            f"loss/{prefix}": float(self.loss.detach()),
            f"{prefix}/implicit_acc": float(implicit_accuracy(self.inside)),
            f"{prefix}/inside": float(self.inside.mean()),
            f"{prefix}/mse_theta_w": float(self.mse_theta_w.mean()),
            f"{prefix}/mse_theta_l": float(self.mse_theta_l.mean()),
            f"{prefix}/mse_ref_w": float(self.mse_ref_w.mean()),
            f"{prefix}/mse_ref_l": float(self.mse_ref_l.mean()),
        }


def check_beta(beta: float) -> float:
    """beta as a float; raises ValueError unless finite and > 0."""
    beta = float(beta)
    if not (beta > 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite positive number, got {beta}")
    return beta


def dpo_logits(mse_theta_w: Tensor, mse_theta_l: Tensor, mse_ref_w: Tensor, mse_ref_l: Tensor) -> Tensor:
    """Implicit log-ratio margin ``-0.5 * ((mse_theta_w - mse_theta_l) - (mse_ref_w - mse_ref_l))``, (B,).

    Positive when the policy improved the winner relative to the loser more than the reference
    did. The reference terms are detached.

    Raises:
        ValueError: if the inputs are not four 1-D tensors of the same non-zero length.
    """
    inputs = {"mse_theta_w": mse_theta_w, "mse_theta_l": mse_theta_l, "mse_ref_w": mse_ref_w, "mse_ref_l": mse_ref_l}
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1 or shapes["mse_theta_w"][0] == 0:
        raise ValueError(f"all four MSE inputs must be 1-D of the same length B > 0 (one value per pair), got {shapes}")
    model_diff = mse_theta_w - mse_theta_l
    ref_diff = (mse_ref_w - mse_ref_l).detach()  # the reference gets no gradient
    return -0.5 * (model_diff - ref_diff)


def implicit_accuracy(margin: Tensor) -> Tensor:
    """Fraction of pairs with a positive margin (``inside`` or ``logits``), ties counted 0.5; detached scalar."""
    margin = margin.detach()
    return ((margin > 0).to(torch.float32) + 0.5 * (margin == 0).to(torch.float32)).mean()


def dpo_loss_from_mse(
    mse_theta_w: Tensor,
    mse_theta_l: Tensor,
    mse_ref_w: Tensor,
    mse_ref_l: Tensor,
    beta: float,
) -> DPOOutput:
    """The Diffusion-DPO sigmoid loss ``mean(-log sigmoid(beta * logits))`` from per-pair errors, each (B,)."""
    inside = check_beta(beta) * dpo_logits(mse_theta_w, mse_theta_l, mse_ref_w, mse_ref_l)
    loss = -F.logsigmoid(inside).mean()
    return DPOOutput(
        loss=loss,
        inside=inside.detach(),
        mse_theta_w=mse_theta_w.detach(),
        mse_theta_l=mse_theta_l.detach(),
        mse_ref_w=mse_ref_w.detach(),
        mse_ref_l=mse_ref_l.detach(),
    )


@dataclass(frozen=True)
class DPOConfig:
    """``learner.dpo``: Diffusion-DPO and its variants (``learner.loss`` dpo, dpo_hinge, dpo_ipo)."""

    beta: float = 5000.0  # Diffusion-DPO beta (arXiv 2311.12908); the reference launchers use 5000 for SD1.5 and SDXL
    pair_strategy: Literal["best_worst", "all"] = "best_worst"  # best_worst: a pair per prompt group; all: every pair
    guidance: DPOGuidanceConfig = field(default_factory=DPOGuidanceConfig)

    def problems(self, key: str) -> list[str]:
        return [] if self.beta > 0 else [f"{key}.beta={self.beta}: must be > 0"]
