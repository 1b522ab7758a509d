"""Hinge and IPO variants of Diffusion-DPO.

Papers: Diffusion-DPO, Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908 (reference: SalesforceAIResearch/DiffusionDPO train.py);
hinge (SLiC), Zhao et al., arXiv 2305.10425; IPO, Azar et al., "A General Theoretical Paradigm to
Understand Learning from Human Preferences", arXiv 2310.12036. The loss definitions follow trl's
DPOTrainer loss types "hinge" and "ipo".

Diffusion-DPO replaces the log-likelihood ratio log pi_theta(x)/pi_ref(x) by the Gaussian
log-density of the noise prediction, log N(eps; eps_hat, I) = -0.5 * ||eps_hat - eps||^2 + const,
averaged over latent elements. With the same t and eps for winner and loser:

    model_diff = mse_theta_w - mse_theta_l
    ref_diff   = mse_ref_w   - mse_ref_l
    logits     = -0.5 * (model_diff - ref_diff)             # trl's "logits"; dpo.dpo_logits
    sigmoid:  -log sigma(beta * logits)                      # rlfh/losses/dpo.py; inside = beta * logits
    hinge:     relu(1 - beta * logits)   = relu(1 - inside)
    ipo:       (logits - 1 / (2 * beta))^2                  # beta plays IPO's tau

Each loss is averaged over the B pairs. beta maps exactly as in trl: the same ``beta`` that makes
``inside = -0.5 * beta * (model_diff - ref_diff)`` in the sigmoid loss multiplies the margin in the
hinge loss, and is IPO's regularization tau (target margin 1 / (2 tau)). Caution: the per-element
MSE margins are small (~1e-3), so Diffusion-DPO's beta (5000 in its reference launchers) gives an IPO
target margin of 1e-4 in these units; IPO's beta has to be tuned on its own, not copied from the sigmoid run.

Notation (code name -> paper symbol):
    mse_theta_w, mse_theta_l -> ||eps - eps_theta(x^w_t, t)||^2, ||eps - eps_theta(x^l_t, t)||^2 (mean over C,H,W)
    mse_ref_w, mse_ref_l     -> the same with the frozen reference eps_ref
    beta                     -> beta (Diffusion-DPO; T * omega(lambda_t) is folded into it), tau for IPO
    logits                   -> h_theta margin of the implicit log-ratios (trl's ``logits``)

Shapes: every MSE input (B,), B = number of preference pairs; results are scalars ().
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from rlfh.losses.dpo import check_beta, dpo_logits

__all__ = ["dpo_hinge_loss", "dpo_ipo_loss", "dpo_variant_loss", "DPO_VARIANTS"]

DPO_VARIANTS = ("hinge", "ipo")


def dpo_hinge_loss(
    mse_theta_w: Tensor, mse_theta_l: Tensor, mse_ref_w: Tensor, mse_ref_l: Tensor, beta: float
) -> Tensor:
    """Hinge (SLiC) Diffusion-DPO: ``mean(relu(1 - beta * logits))``, trl's ``loss_type="hinge"``.

    Args:
        mse_theta_w: policy MSE on the winners, shape (B,).
        mse_theta_l: policy MSE on the losers, shape (B,).
        mse_ref_w: reference MSE on the winners, shape (B,).
        mse_ref_l: reference MSE on the losers, shape (B,).
        beta: the Diffusion-DPO beta (> 0); ``beta * logits`` is the sigmoid loss's ``inside``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on bad shapes or a non-positive beta.
    """
    beta = check_beta(beta)
    logits = dpo_logits(mse_theta_w, mse_theta_l, mse_ref_w, mse_ref_l)  # (B,)
    return F.relu(1.0 - beta * logits).mean()


def dpo_ipo_loss(mse_theta_w: Tensor, mse_theta_l: Tensor, mse_ref_w: Tensor, mse_ref_l: Tensor, beta: float) -> Tensor:
    """IPO Diffusion-DPO: ``mean((logits - 1 / (2 * beta))^2)``, trl's ``loss_type="ipo"`` (beta = tau).

    Args:
        mse_theta_w: policy MSE on the winners, shape (B,).
        mse_theta_l: policy MSE on the losers, shape (B,).
        mse_ref_w: reference MSE on the winners, shape (B,).
        mse_ref_l: reference MSE on the losers, shape (B,).
        beta: IPO's tau (> 0); the target margin is 1 / (2 * beta).

    Returns:
        Scalar loss.

    Raises:
        ValueError: on bad shapes or a non-positive beta.
    """
    beta = check_beta(beta)
    logits = dpo_logits(mse_theta_w, mse_theta_l, mse_ref_w, mse_ref_l)  # (B,)
    return (logits - 1.0 / (2.0 * beta)).pow(2).mean()


def dpo_variant_loss(
    kind: Literal["hinge", "ipo"],
    mse_theta_w: Tensor,
    mse_theta_l: Tensor,
    mse_ref_w: Tensor,
    mse_ref_l: Tensor,
    beta: float,
) -> Tensor:
    """Dispatch to :func:`dpo_hinge_loss` or :func:`dpo_ipo_loss` by name.

    Args:
        kind: "hinge" or "ipo".
        mse_theta_w: policy MSE on the winners, shape (B,).
        mse_theta_l: policy MSE on the losers, shape (B,).
        mse_ref_w: reference MSE on the winners, shape (B,).
        mse_ref_l: reference MSE on the losers, shape (B,).
        beta: see the chosen loss.

    Returns:
        Scalar loss.

    Raises:
        ValueError: for an unknown ``kind`` (the sigmoid loss lives in rlfh/losses/dpo.py).
    """
    if kind == "hinge":
        return dpo_hinge_loss(mse_theta_w, mse_theta_l, mse_ref_w, mse_ref_l, beta)
    if kind == "ipo":
        return dpo_ipo_loss(mse_theta_w, mse_theta_l, mse_ref_w, mse_ref_l, beta)
    raise ValueError(f"unknown DPO variant {kind!r}; expected one of {DPO_VARIANTS} (sigmoid is in rlfh.losses.dpo)")
