"""Global and per-region epsilon-MSE objectives of FairHuman.

Paper: FairHuman, "Boosting Hand and Face Quality in Human Image Generation with Minimum Potential
Delay Fairness in Diffusion Models", arXiv 2507.02714 (reference: PRIS-CV/FairHuman,
examples/text_to_image/train_text_to_image_lora_sdxl_mpd_fair.py): three objectives per sample,
global, face and hand, combined by the MPD rule of rlfh/losses/fairness.py.

Formulas (mean over every latent element, C*H*W, of one sample; the batch reduction is the
caller's, rlfh/losses/objectives.py):

    l_global = mean( (eps_hat - eps)^2 )
    l_r      = mean( (s * 1[M_r > 0] * (eps_hat - eps))^2 ),   r any local region (face, hand),  s = 5

The region losses are NOT normalized by the mask area: the effective weight is s^2 times the mask
fraction, and a sample without the region contributes exactly 0. Both return one value per sample,
shape (B,), so that Diffusion-DPO can be computed per region: the per-pair, per-region MSEs of
winner/loser under the policy and the reference feed the DPO loss.

Notation (code name -> paper symbol):
    pred    -> eps_hat = eps_theta(x_t, t, c), the UNet output (epsilon prediction)
    target  -> eps, the noise added to the clean latent
    mask    -> M_r, region mask at latent resolution (detector boxes, dilated, resized, binarized)
    scale   -> s (5 in the reference)

Shapes: pred, target (B, C, H, W) (SDXL: (B, 4, H/8, W/8)); mask (B, 1, H, W) or (B, C, H, W),
any dtype (only ``mask > 0`` is used); results (B,).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FAIRHUMAN_REGION_SCALE", "per_sample_mse", "per_sample_region_mse", "region_difference"]

FAIRHUMAN_REGION_SCALE = 5.0


def _upcast(x: Tensor) -> Tensor:
    """Half/bfloat16 -> float32 (as diffusers' training scripts do); float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_pred_target(pred: Tensor, target: Tensor) -> None:
    if pred.ndim < 2:
        raise ValueError(f"pred must have a batch dimension and at least one more, got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def _check_mask(mask: Tensor, pred: Tensor) -> None:
    if mask.ndim != pred.ndim:
        raise ValueError(
            f"mask must have the same number of dims as pred ({pred.ndim}: (B, 1 or C, H, W)), "
            f"got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:] or mask.shape[1] not in (1, pred.shape[1]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not fit pred shape {tuple(pred.shape)}: expected "
            f"({pred.shape[0]}, 1 or {pred.shape[1]}, *{tuple(pred.shape[2:])}); resize masks to latent size first"
        )


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Plain epsilon-MSE per sample: mean over all non-batch dims of (eps_hat - eps)^2.

    Args:
        pred: eps_hat, shape (B, C, H, W) (any number of trailing dims).
        target: eps, same shape as ``pred``.

    Returns:
        Tensor of shape (B,); half/bfloat16 inputs are upcast to float32.

    Raises:
        ValueError: if the shapes differ or there is no batch dimension.
    """
    _check_pred_target(pred, target)
    diff = _upcast(pred) - _upcast(target)
    return diff.pow(2).flatten(1).mean(dim=1)


def per_sample_region_mse(pred: Tensor, target: Tensor, mask: Tensor, scale: float = FAIRHUMAN_REGION_SCALE) -> Tensor:
    """FairHuman region loss per sample: mean over ALL C*H*W elements of (s * 1[M > 0] * (eps_hat - eps))^2.

    Not normalized by the mask area; a sample whose mask is empty gives exactly 0.

    Args:
        pred: eps_hat, shape (B, C, H, W).
        target: eps, shape (B, C, H, W).
        mask: M_r at latent resolution, shape (B, 1, H, W) (broadcast over channels) or (B, C, H, W).
        scale: s, the region amplification (5.0 in FairHuman). Must be finite and > 0.

    Returns:
        Tensor of shape (B,).

    Raises:
        ValueError: on mismatched shapes or a non-positive scale.
    """
    return region_difference(pred, target, mask, scale).pow(2).flatten(1).mean(dim=1)


def region_difference(pred: Tensor, target: Tensor, mask: Tensor, scale: float = FAIRHUMAN_REGION_SCALE) -> Tensor:
    """s * 1[M > 0] * (eps_hat - eps), (B, C, H, W): the masked difference whose mean square is
    :func:`per_sample_region_mse` (DiffusionNFT's adaptive weighting also takes its mean magnitude).

    Raises:
        ValueError: on mismatched shapes or a non-positive scale.
    """
    _check_pred_target(pred, target)
    _check_mask(mask, pred)
    scale = float(scale)
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    diff = _upcast(pred) - _upcast(target)  # (B, C, H, W)
    indicator = (mask > 0).to(diff.dtype)  # 1[M > 0], (B, 1 or C, H, W)
    return diff * indicator * scale
