"""Detector boxes -> latent-size region masks, as FairHuman builds them (arXiv 2507.02714;
reference PRIS-CV/FairHuman, train_text_to_image_lora_sdxl_mpd_fair.py).

For one image and one region (``face``, ``hand``, ...):

1. fill every box on a black canvas of the image size (PIL ``ImageDraw.rectangle`` semantics: the
   corners are truncated to integers and both end pixels are included);
2. dilate with a 16x16 rectangular kernel (``cv2.dilate`` with ``getStructuringElement(MORPH_RECT,
   (16, 16))``, default anchor: the anchor of an even kernel sits at index k//2, so a filled pixel
   range [a, b] grows to [a - 7, b + 8], i.e. [a - (k - 1 - k//2), b + k//2]);
3. resize to latent size (H/8, W/8) with ``torch.nn.functional.interpolate(mode="nearest")``, the
   reference's call (latent pixel i samples image pixel floor(i * H / h));
4. binarize (> 0).

The reference normalizes the 0/255 mask to [-1, 1] before resizing and keeps ``> 0``; with nearest
sampling the values stay 0/255, so ``> 0`` on the raw mask is the same set. Dilation of a union of
boxes is the union of the dilated boxes, so step 2 is done per box exactly, without an image-size
convolution. An image without detections in a region gets an all-zero mask.

Shapes: boxes in pixels of an (H, W) image; masks (h, w) = latent size, batches (B, R, h, w).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewards.base import Detection, RewardError

DILATE_KERNEL = 16  # FairHuman's mask_dilate(value=16)
VAE_DOWNSAMPLE = 8  # SDXL's VAE: latent (H/8, W/8)

Box = Sequence[float]


def _box_of(b: Detection | Box) -> tuple[float, float, float, float]:
    box = b.box if isinstance(b, Detection) else tuple(b)
    if len(box) != 4:
        raise RewardError(f"a box needs 4 numbers (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RewardError(f"box {box!r} has a non-finite coordinate")
    if x2 < x1 or y2 < y1:
        raise RewardError(f"box {box!r} has x2 < x1 or y2 < y1")
    return x1, y1, x2, y2


def _span(lo: float, hi: float, size: int, grow_lo: int, grow_hi: int) -> tuple[int, int] | None:
    """Inclusive pixel span of [lo, hi] filled PIL-style then dilated, clipped to [0, size-1]."""
    # PIL truncates toward zero (int()), then clips; a span entirely outside the canvas is empty.
    a, b = int(lo), int(hi)
    if b < 0 or a > size - 1:
        return None
    a, b = max(a, 0), min(b, size - 1)
    return max(a - grow_lo, 0), min(b + grow_hi, size - 1)


def pixel_mask(boxes: Sequence[Detection | Box], image_hw: tuple[int, int], dilate: int = DILATE_KERNEL) -> np.ndarray:
    """Filled and dilated boxes at image size (steps 1-2).

    Args:
        boxes: detections or (x1, y1, x2, y2) boxes in image pixels.
        image_hw: (H, W) of the image the boxes refer to.
        dilate: side of the square dilation kernel; 0 or 1 disables dilation.

    Returns:
        (H, W) bool array.
    """
    h, w = (int(v) for v in image_hw)
    if h <= 0 or w <= 0:
        raise RewardError(f"image size must be positive, got {image_hw!r}")
    if dilate < 0:
        raise RewardError(f"dilate must be >= 0, got {dilate}")
    k = max(int(dilate), 1)
    grow_lo, grow_hi = k - 1 - k // 2, k // 2  # cv2's default anchor (k//2, k//2)
    mask = np.zeros((h, w), dtype=bool)
    for b in boxes:
        x1, y1, x2, y2 = _box_of(b)
        xs, ys = _span(x1, x2, w, grow_lo, grow_hi), _span(y1, y2, h, grow_lo, grow_hi)
        if xs is not None and ys is not None:
            mask[ys[0] : ys[1] + 1, xs[0] : xs[1] + 1] = True
    return mask


def latent_hw_of(image_hw: tuple[int, int], downsample: int = VAE_DOWNSAMPLE) -> tuple[int, int]:
    """Latent (h, w) of an (H, W) image; raises if H or W is not a multiple of ``downsample``."""
    h, w = (int(v) for v in image_hw)
    if h % downsample or w % downsample:
        raise RewardError(
            f"image size {h}x{w} is not a multiple of the VAE factor {downsample}; pass latent_hw explicitly"
        )
    return h // downsample, w // downsample


def region_mask(
    boxes: Sequence[Detection | Box],
    image_hw: tuple[int, int],
    latent_hw: tuple[int, int] | None = None,
    dilate: int = DILATE_KERNEL,
) -> torch.Tensor:
    """One region's latent mask (steps 1-4).

    Args:
        boxes: detections or (x1, y1, x2, y2) boxes in image pixels.
        image_hw: (H, W) of the image.
        latent_hw: (h, w) of the latent; default (H/8, W/8).
        dilate: dilation kernel side (FairHuman: 16).

    Returns:
        (h, w) float32 tensor of 0.0 / 1.0.
    """
    lh, lw = latent_hw_of(image_hw) if latent_hw is None else (int(latent_hw[0]), int(latent_hw[1]))
    if lh <= 0 or lw <= 0:
        raise RewardError(f"latent size must be positive, got {latent_hw!r}")
    full = torch.from_numpy(pixel_mask(boxes, image_hw, dilate)).to(torch.float32)
    small = F.interpolate(full[None, None], size=(lh, lw), mode="nearest")[0, 0]
    return (small > 0).to(torch.float32)


def region_masks(
    regions: Sequence[Mapping[str, Sequence[Detection | Box]]],
    names: Sequence[str],
    image_hw: tuple[int, int],
    latent_hw: tuple[int, int] | None = None,
    dilate: int = DILATE_KERNEL,
) -> torch.Tensor:
    """Masks for a batch of images and a list of region names.

    Args:
        regions: per image, region name -> boxes (e.g. ``RewardResult.regions``); a name missing
            for an image means no detection there.
        names: region names, in the order of the output's R axis (e.g. ``["face", "hand"]``).
        image_hw: (H, W) shared by the batch's images.
        latent_hw: (h, w); default (H/8, W/8).
        dilate: dilation kernel side.

    Returns:
        (B, R, h, w) float32 tensor of 0.0 / 1.0; an empty region is all zeros.
    """
    if not names:
        raise RewardError("region_masks needs at least one region name")
    lh, lw = latent_hw_of(image_hw) if latent_hw is None else (int(latent_hw[0]), int(latent_hw[1]))
    out = torch.zeros(len(regions), len(names), lh, lw, dtype=torch.float32)
    for i, per_image in enumerate(regions):
        for r, name in enumerate(names):
            boxes = per_image.get(name) or []
            if boxes:
                out[i, r] = region_mask(boxes, image_hw, (lh, lw), dilate)
    return out
