"""Inputs of the ImageReward / FaceScore models: tokenizer, crops and CLIP-style preprocessing.

Image preprocessing in both references (THUDM/ImageReward ``_transform``, FaceScore ``_transform``)
is torchvision on a PIL image::

    Resize(224, BICUBIC)   # shorter side -> 224, longer -> int(224 * long / short), PIL bicubic
    CenterCrop(224)        # top = int(round((h - 224) / 2)), left likewise (Python round)
    ToTensor(), Normalize(CLIP mean, CLIP std)

:func:`preprocess_pil` reproduces this with PIL directly (no torchvision), also on a PIL image in
its file's mode (RGBA, LA, P), which like the references it resizes in that mode and converts to
RGB after the crop. :func:`preprocess_tensor` is the differentiable twin on float tensors. PIL
resizes a uint8 image in two 1-D passes (horizontal, then vertical) with fixed-point weights
(22 fractional bits), rounding to uint8 after each; its bicubic (a = -0.5, support scaled with the
downsampling factor) is torch's ``F.interpolate(mode="bicubic", antialias=True)`` up to that
fixed point. With ``match_pil=True`` the tensor path applies Pillow's own integer weights
(:func:`pil_resize_weights`) in the same two passes, so its forward pass equals PIL's bit for bit
on uint8-valued images (inputs are rounded to the uint8 grid first), and its backward pass is that
of the same weights as real numbers (straight-through: the rounding is identity in the gradient).
``match_pil=False`` is one smooth 2-D resize clamped to [0, 1]. Scores through the tensor path
therefore equal those through :func:`preprocess_pil` up to float summation order (FaceScore: below
1e-4, ``tests/rewards/test_facescore.py``).

Face crops (FaceScore ``crop_face_image``): box (x1, y1, x2, y2) -> pixel slice
``[int(y1 - 1) : int(y2 + 1), int(x1 - 1) : int(x2 + 1)]`` with Python's ``int`` (truncation toward
zero), i.e. one extra pixel per side. The end is clamped to the image like slicing does. A start
below zero makes the reference's slice wrap around to the far edge (an empty or wrong crop); we
clamp it to 0 instead, the only intended difference.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewards.base import RewardError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
MAX_TEXT_LENGTH = 35  # both references: padding="max_length", truncation=True, max_length=35

# bert-base-uncased vocab shipped with rlfh (Apache-2.0; see rewards/assets/bert-base-uncased/README.md).
VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "bert-base-uncased" / "vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
BERT_VOCAB_SIZE = 30522
# BLIP's init_tokenizer adds [DEC] as bos and [ENC] as an additional special token: 30522, 30523.
TOKENIZER_SIZE = BERT_VOCAB_SIZE + 2
# Known-good encoding, checked at load: catches an all-[UNK] or otherwise wrong vocabulary.
CHECK_TEXT, CHECK_IDS = "A face.", [101, 1037, 2227, 1012, 102]


def load_blip_tokenizer(tokenizer_dir: str | None = None, vocab_file: str | None = None):
    """BLIP's BERT tokenizer (bert-base-uncased + [DEC], [ENC]), validated.

    Args:
        tokenizer_dir: a local bert-base-uncased tokenizer directory (what the reference loads);
            default: the vocab shipped with rlfh.
        vocab_file: a bert-base-uncased ``vocab.txt`` to use instead (ignored with tokenizer_dir).

    Returns:
        A ``transformers.BertTokenizer`` with 30524 tokens.

    Raises:
        RewardError: when the vocabulary is missing or degenerate (``BertTokenizer.from_pretrained``
            offline can return a 5-token tokenizer that maps every word to [UNK]).
    """
    from transformers import BertTokenizer

    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise RewardError(f"tokenizer_dir {tokenizer_dir!r} is not a directory")
        tok = BertTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        where = tokenizer_dir
    else:
        path = Path(vocab_file) if vocab_file is not None else VOCAB_PATH
        if not path.is_file():
            raise RewardError(f"bert-base-uncased vocab not found at {path}")
        if vocab_file is None and hashlib.sha256(path.read_bytes()).hexdigest() != VOCAB_SHA256:
            raise RewardError(f"{path} is not the bert-base-uncased vocab (sha256 mismatch)")
        # Positional: the keyword is vocab_file in transformers 4 but vocab in 5, and an unknown
        # keyword is silently ignored (giving the degenerate 5-token tokenizer checked below).
        tok = BertTokenizer(str(path), do_lower_case=True)
        where = str(path)
    if len(tok) != BERT_VOCAB_SIZE:
        raise RewardError(
            f"tokenizer from {where} has {len(tok)} tokens, expected bert-base-uncased's "
            f"{BERT_VOCAB_SIZE}: the vocabulary is missing or degenerate"
        )
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    ids = tok(CHECK_TEXT).input_ids
    if len(tok) != TOKENIZER_SIZE or ids != CHECK_IDS:
        raise RewardError(
            f"tokenizer from {where} is wrong: {len(tok)} tokens (want {TOKENIZER_SIZE}), "
            f"{CHECK_TEXT!r} -> {ids} (want {CHECK_IDS})"
        )
    return tok


def tokenize(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each (B, 35), padded and truncated like the references."""
    enc = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
    )
    return enc.input_ids, enc.attention_mask


def resized_size(h: int, w: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (h, w): shorter side -> size, longer truncated."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _center_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision center_crop: Python round (half to even) of the half margin.
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def preprocess_pil(image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """CLIP preprocessing of one image -> float32 (3, size, size), in the references' order.

    Args:
        image: uint8 RGB array (H, W, 3), or a PIL image in mode RGB, RGBA, L, LA or P. A PIL image
            is resized in its own mode and converted to RGB after the crop, as the references'
            ``_transform`` does: Pillow resizes RGBA / LA with premultiplied alpha and a palette
            image by nearest neighbour, so this differs from preprocessing its RGB conversion.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            raise RewardError(f"cannot preprocess a PIL image of mode {image.mode!r}")
        pil = image
    else:
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise RewardError(f"cannot preprocess an empty image of shape {image.shape}")
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    w, h = pil.size
    if h == 0 or w == 0:
        raise RewardError(f"cannot preprocess an empty image of size {h}x{w}")
    oh, ow = resized_size(h, w, size)
    if (oh, ow) != (h, w):
        pil = pil.resize((ow, oh), Image.BICUBIC)
    top, left = _center_offsets(oh, ow, size)
    pil = pil.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return _normalize(x)


# Pillow's 8-bit resampling (libImaging/Resample.c): coefficients in double, rounded to signed
# fixed point with 22 fractional bits, each output = clip8((2^21 + sum(pixel * coeff)) >> 22).
_PIL_PRECISION_BITS = 22


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


@functools.lru_cache(maxsize=64)
def pil_resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point bicubic weights of a 1-D resize, as an integer-valued (out, in) matrix.

    Reproduces ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's Resample.c, so that
    ``floor((2^21 + W @ x) / 2^22)`` clipped to [0, 255] is Pillow's output on uint8 x, bit for bit.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2, widened when downsampling (antialias)
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = _pil_bicubic((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = k.sum()
        if total != 0.0:
            k = k / total
        # C's (int) truncates toward zero after adding +-0.5: round half away from zero.
        out[xx, xmin:xmax] = np.trunc(k * (1 << _PIL_PRECISION_BITS) + np.where(k < 0, -0.5, 0.5))
    return out


def _pil_resize_pass(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One 1-D Pillow bicubic pass along ``dim`` of uint8-valued x; straight-through gradient.

    Forward: Pillow's fixed-point arithmetic exactly (float64 sums of integers < 2^53 are exact).
    Backward: the same weights as real numbers (a smooth antialiased bicubic resize).
    """
    kint = torch.from_numpy(pil_resize_weights(x.shape[dim], out_size)).to(x.device)
    xt = x.movedim(dim, -1)
    smooth = xt @ (kint / (1 << _PIL_PRECISION_BITS)).to(x.dtype).T
    with torch.no_grad():
        fixed = xt.detach().double() @ kint.T + (1 << (_PIL_PRECISION_BITS - 1))
        exact = torch.floor(fixed / (1 << _PIL_PRECISION_BITS)).clamp(0.0, 255.0).to(x.dtype)
    return (smooth + (exact - smooth).detach()).movedim(-1, dim)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # uint8 rounding in the forward pass, identity in the backward pass (straight-through).
    return x + (torch.floor(x + 0.5).clamp(0.0, 255.0) - x).detach()


def pil_bicubic_tensor(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's uint8 bicubic resize of a (C, H, W) float tensor on the 0..255 scale -> (C, height, width).

    Forward: the input rounded to uint8, then Pillow's two fixed-point passes (horizontal first, each only where
    the size changes), bit for bit; backward: straight-through rounding and the passes' real-valued weights.
    """
    x = _round_ste(x)  # the PIL path sees a uint8 image
    if width != x.shape[-1]:
        x = _pil_resize_pass(x, -1, width)
    if height != x.shape[-2]:
        x = _pil_resize_pass(x, -2, height)
    return x


def preprocess_tensor(image: torch.Tensor, size: int = IMAGE_SIZE, match_pil: bool = True) -> torch.Tensor:
    """Differentiable CLIP preprocessing of one float image (3, H, W) in [0, 1] -> (3, size, size).

    Args:
        image: (3, H, W) float RGB in [0, 1]; may require grad.
        size: output side.
        match_pil: Pillow's uint8 two-pass resize in the forward pass, bit for bit on uint8-valued
            images, with a smooth gradient (see the module docstring); False: one smooth bicubic
            resize.
    """
    h, w = image.shape[-2:]
    oh, ow = resized_size(h, w, size)
    x = image * 255.0  # (3, H, W) on the uint8 scale
    if match_pil:
        x = pil_bicubic_tensor(x, oh, ow)
    elif (oh, ow) != (h, w):
        x = F.interpolate(x[None], size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)[0].clamp(
            0.0, 255.0
        )
    top, left = _center_offsets(oh, ow, size)
    return _normalize(x[:, top : top + size, left : left + size] / 255.0)


def crop_bounds(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int] | None:
    """FaceScore's crop of ``box`` widened by 1 px per side, as pixel bounds (y0, y1, x0, x1).

    Returns None when the crop is empty (box outside the image or degenerate).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    y0, y_end = max(int(y1 - 1), 0), min(int(y2 + 1), height)
    x0, x_end = max(int(x1 - 1), 0), min(int(x2 + 1), width)
    if y_end <= y0 or x_end <= x0:
        return None
    return y0, y_end, x0, x_end
