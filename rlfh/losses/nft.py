"""DiffusionNFT: negative-aware fine-tuning on the forward process, in epsilon (or v) parameterization.

Paper: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv
2509.16117 (reference: NVlabs/DiffusionNFT, scripts/train_nft_sd3.py, written for SD3's rectified
flow). The derivations for SDXL are written out in docs/online_rl.md.

The paper's objective (rectified flow, x_t = (1 - t) x_0 + t eps, target velocity v = eps - x_0;
v_old the sampling ("old") policy's prediction, a constant; v_theta the trained one):

    v_+ = (1 - beta) v_old + beta v_theta          implicit positive policy
    v_- = (1 + beta) v_old - beta v_theta          implicit negative policy
    L   = E_{c, x_0 ~ pi_old, t, eps} [ r ||v_+ - v||^2 + (1 - r) ||v_- - v||^2 ]

with r in [0, 1] the "optimality probability" of the sample. The reference implementation maps the
clipped group advantage to it, r = clip(0.5 + 0.5 * clip(A, -c, c) / c, 0, 1) (:func:`nft_reward_weight`),
divides the loss by beta so that its gradient does not shrink with beta, and multiplies it by c
(``scale`` here), which makes the gradient at the old policy the advantage-weighted one (below).

Epsilon parameterization (SDXL; the same holds for v-prediction). For any Gaussian forward process
x_t = a_t x_0 + s_t eps, at a fixed (x_t, t) every prediction target is an affine function of any other:
for the flow above eps_hat = x_t + (1 - t) v_hat, and for VP (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t))
eps_hat = sqrt(abar_t) v_hat + s_t x_t with SDXL's v. An affine map f(u) = P x_t + Q u commutes with
the combinations above because their coefficients sum to 1 ((1 - beta) + beta = (1 + beta) - beta = 1):
f(v_+) = (1 - beta) f(v_old) + beta f(v_theta). So the implicit policies are the same policies in eps
space,

    eps_+ = (1 - beta) eps_old + beta eps_theta,   eps_- = (1 + beta) eps_old - beta eps_theta,

and v_+ - v = Q^{-1}(eps_+ - eps) makes the velocity loss the eps loss times the time weight Q_t^{-2}
(1 / (1 - t)^2 for the flow). The paper's result (the optimum's positive policy is the reward-tilted
one) holds for every positive time weighting, so we keep SDXL's own weighting, the plain eps-MSE of
its pre-training (L_simple), as Diffusion-DPO and RWR here do:

    l_+ = mean over C,H,W of (eps_+ - eps)^2,   l_- = mean over C,H,W of (eps_- - eps)^2
    L   = scale * sum_b [ r_b l_+,b + (1 - r_b) l_-,b ] / (beta B)    (:func:`nft_loss`; scale = c in the learner)

(for a region: the FairHuman masked error of rlfh/losses/region_mse.py of eps_+ and eps_-).

Adaptive weighting (the reference's default; in the learner ``learner.nft.weighting: adaptive``).
The reference measures each implicit prediction's error in x_0 space and divides it by its own
detached mean magnitude (train_nft_sd3.py, "adaptive weighting"):

    l_+ = mean (x0_+ - x0)^2 / sg(max(mean |x0_+ - x0|, 1e-5)),  x0_+ = x_t - t v_+  (flow)

In eps parameterization x0_hat = (x_t - s_t eps_hat) / a_t, so x0_hat - x0 = -k_t (eps_hat - eps) with
k_t = s_t / a_t (v-prediction: x0 = a_t x_t - s_t v, k_t = s_t; the flow: k_t = t / (1 - t)). With
e = eps_hat - eps (for a region, its masked difference s 1[M > 0] e):

    l = k_t^2 mean e^2 / sg(max(k_t mean |e|, 1e-5))          (:func:`adaptive_errors`)

that is the eps-MSE under the per-sample weight k_t / sg(mean |e|): noisy steps count more (k_t runs
from 0.03 to 14.6 over SDXL's schedule), and every sample's gradient has the same size however well
the model already denoises it. At eps_theta = eps_old (e_+ = e_- = e) the gradient becomes
2 clip(A, -c, c) k_t e / (mean |e| C H W B): AWM's first gradient, reweighted per sample by
k_t / mean |e|. The learner's default is the plain eps-MSE: on the tiny default (t ~ U{0..999}) the
adaptive weight, dominated by the noisiest steps, learned a third as much in 10 rounds (docs/online_rl.md).

What the gradient does: at eps_theta = eps_old (the first step after sampling),
dL/d eps_theta = 2 scale (2 r - 1) (eps_old - eps) / (C H W B), i.e. the denoising-loss gradient
weighted by 2r - 1 = clip(A, -c, c) / c (times c = clip(A, -c, c) with scale = c): samples above
their group's mean are pulled towards, those below pushed away, exactly as advantage-weighted
matching (rlfh/losses/awm.py) does at its ratio 1. Away from eps_old the negative
branch is a convex loss too, so unlike a negative-weighted MSE the objective stays bounded below.

Notation (code name -> paper symbol):
    pred      -> eps_theta (v_theta in the paper), carries the gradient
    old_pred  -> eps_old, the sampling policy's prediction on the same x_t (detached here)
    target    -> eps (v = eps - x_0 in the paper)
    r         -> r, the optimality probability in [0, 1]
    beta      -> beta, the guidance strength of the implicit policies (0.1 - 1 in the paper)
    scale     -> adv_clip_max of the reference (c), a constant factor of the loss

Shapes: pred, old_pred, target (B, C, H, W); r (B,); per-sample errors (B,); the loss ().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rlfh.losses.kl import upcast
from rlfh.losses.region_mse import per_sample_mse

__all__ = [
    "NFTConfig",
    "NFTLossOutput",
    "adaptive_errors",
    "implicit_predictions",
    "nft_loss",
    "nft_loss_from_errors",
    "nft_reward_weight",
]


class NFTLossOutput(NamedTuple):
    """Result of :func:`nft_loss` / :func:`nft_loss_from_errors`.

    Attributes:
        loss: scalar L.
        positive: mean of scale * r * l_+ / beta, detached.
        negative: mean of scale * (1 - r) * l_- / beta, detached.
    """

    loss: Tensor
    positive: Tensor
    negative: Tensor


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"nft beta must be finite and > 0, got {beta}")
    return beta


def nft_reward_weight(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """r = clip(0.5 + 0.5 * clip(A, -c, c) / c, 0, 1), detached; the reference's normalization.

    A = 0 gives r = 1/2 (no push either way), A >= c gives 1 (positive only), A <= -c gives 0.

    Raises:
        ValueError: if ``clip`` is not finite and > 0 or the advantages are not finite.
    """
    clip = float(clip)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"advantage clip must be finite and > 0, got {clip}")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError(f"advantages must be finite, got {advantages.tolist()}")
    a = advantages.detach().clamp(-clip, clip)
    return (0.5 + 0.5 * a / clip).clamp(0.0, 1.0)


def nft_signal(advantages: Tensor, learner_cfg) -> Tensor:
    """NFT's per-sample signal r from a SampleBatch's advantages, c = ``learner.nft.adv_clip``
    (:func:`nft_reward_weight`; the loss registry's ``signal`` of nft)."""
    return nft_reward_weight(advantages, learner_cfg.nft.adv_clip)


def implicit_predictions(pred: Tensor, old_pred: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(eps_+, eps_-) = ((1 - beta) eps_old + beta eps_theta, (1 + beta) eps_old - beta eps_theta).

    ``old_pred`` is detached: the old (sampling) policy is a constant of the loss.
    """
    beta = _check_beta(beta)
    if pred.shape != old_pred.shape:
        raise ValueError(
            f"pred and old_pred must have the same shape, got {tuple(pred.shape)} and {tuple(old_pred.shape)}"
        )
    old = old_pred.detach().to(pred.dtype)
    return (1.0 - beta) * old + beta * pred, (1.0 + beta) * old - beta * pred


def nft_loss_from_errors(err_pos: Tensor, err_neg: Tensor, r: Tensor, beta: float, scale: float = 1.0) -> NFTLossOutput:
    """scale * sum_b [ r_b l_+,b + (1 - r_b) l_-,b ] / (beta B) from the per-sample errors of eps_+ and
    eps_- (B,).

    Raises:
        ValueError: on mismatched or empty shapes, r outside [0, 1], a bad beta or scale.
    """
    beta = _check_beta(beta)
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"nft scale must be finite and > 0, got {scale}")
    if err_pos.ndim != 1 or err_pos.shape != err_neg.shape or err_pos.shape != r.shape or err_pos.shape[0] == 0:
        raise ValueError(
            f"err_pos, err_neg and r must all be (B,) with B > 0, got {tuple(err_pos.shape)}, "
            f"{tuple(err_neg.shape)} and {tuple(r.shape)}"
        )
    r = r.detach().to(err_pos.dtype)
    if bool(((r < 0) | (r > 1) | ~torch.isfinite(r)).any()):
        raise ValueError(f"r must lie in [0, 1] (nft_reward_weight), got {r.tolist()}")
    pos, neg = scale * r * err_pos / beta, scale * (1.0 - r) * err_neg / beta
    return NFTLossOutput(loss=(pos + neg).mean(), positive=pos.detach().mean(), negative=neg.detach().mean())


def nft_loss(
    pred: Tensor,
    old_pred: Tensor,
    target: Tensor,
    r: Tensor,
    beta: float,
    adaptive: bool = False,
    x0_scale: Tensor | None = None,
    scale: float = 1.0,
) -> NFTLossOutput:
    """The DiffusionNFT loss on whole samples (eps-MSE, or the reference's adaptive x_0 weighting).

    Args:
        pred: eps_theta (B, C, H, W), with gradient.
        old_pred: eps_old on the same x_t, t, c (B, C, H, W); treated as a constant.
        target: eps (or v for v-prediction models), (B, C, H, W).
        r: optimality probabilities in [0, 1], (B,).
        beta: > 0.
        adaptive: weight each sample's error as the reference does in x_0 space,
            ||x0_+ - x0||^2 / sg(mean |x0_+ - x0|) with x0_hat - x0 = -x0_scale (eps_hat - eps).
        x0_scale: s_t / a_t per sample (B,), needed with ``adaptive``.
        scale: constant factor (the reference's c = adv_clip_max).

    Returns:
        NFTLossOutput(loss, positive, negative).
    """
    pos, neg = implicit_predictions(pred, old_pred, beta)
    if not adaptive:
        return nft_loss_from_errors(per_sample_mse(pos, target), per_sample_mse(neg, target), r, beta, scale)
    if x0_scale is None or x0_scale.shape != pred.shape[:1]:
        raise ValueError(f"adaptive weighting needs x0_scale = s_t / a_t of shape ({pred.shape[0]},)")
    return nft_loss_from_errors(
        adaptive_errors(pos - target, x0_scale), adaptive_errors(neg - target, x0_scale), r, beta, scale
    )


def adaptive_errors(diff: Tensor, x0_scale: Tensor) -> Tensor:
    """The reference's adaptive x_0-space error per sample from an eps-space difference, (B,):
    with d = k (eps_hat - eps) (= -(x0_hat - x0)), mean d^2 / sg(max(mean |d|, 1e-5)).

    Args:
        diff: eps_hat - eps (or a region's masked difference), (B, C, H, W), with gradient.
        x0_scale: k = s_t / a_t per sample (s_t for v-prediction), (B,); a constant.
    """
    if x0_scale.shape != diff.shape[:1]:
        raise ValueError(f"x0_scale must be ({diff.shape[0]},), got {tuple(x0_scale.shape)}")
    diff = upcast(diff)
    d = diff * x0_scale.detach().to(diff.dtype).reshape(-1, *([1] * (diff.ndim - 1)))
    weight = d.detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)  # the reference's, no gradient
    return d.pow(2).flatten(1).mean(dim=1) / weight


@dataclass(frozen=True)
class NFTConfig:
    """``learner.nft``: DiffusionNFT (arXiv 2509.16117).

    Attributes:
        weighting: the per-sample error: SDXL's plain eps-MSE, or the reference's adaptive x0-space weighting
            (:func:`adaptive_errors`; it learns less on the tiny default model, docs/online_rl.md).
    """

    beta: float = 0.1  # strength of the implicit positive / negative policies (the reference: 1, and 0.1 for OCR)
    weighting: Literal["adaptive", "eps_mse"] = "eps_mse"
    adv_clip: float = 5.0  # c of r = 0.5 + 0.5 clip(A, -c, c) / c from the per-prompt advantage A

    def problems(self, key: str) -> list[str]:
        knobs = (("beta", self.beta), ("adv_clip", self.adv_clip))
        return [f"{key}.{name}={v}: must be finite and > 0" for name, v in knobs if not 0 < v < math.inf]
