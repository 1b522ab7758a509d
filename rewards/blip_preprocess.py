"""Inputs of the ImageReward / FaceScore models: tokenizer, crops and CLIP-style preprocessing.

Image preprocessing in both references (THUDM/ImageReward ``_transform``, FaceScore ``_transform``)
is torchvision on a PIL image::

    Resize(224, BICUBIC)   # shorter side -> 224, longer -> int(224 * long / short), PIL bicubic
    CenterCrop(224)        # top = int(round((h - 224) / 2)), left likewise (Python round)
    ToTensor(), Normalize(CLIP mean, CLIP std)

:func:`preprocess_pil` reproduces this with PIL directly (no torchvision). :func:`preprocess_tensor`
is the differentiable twin on float tensors. PIL resizes a uint8 image in two 1-D passes
(horizontal, then vertical), rounding to uint8 after each; its bicubic (a = -0.5, support scaled
with the downsampling factor) is torch's ``F.interpolate(mode="bicubic", antialias=True)``. With
``match_pil=True`` the tensor path does the same two passes and rounds with a straight-through
estimator (forward: ``floor(x + 0.5)`` clipped to [0, 255]; backward: identity), so its forward
equals PIL's up to rare 1/255 steps from PIL's fixed-point weights, while the gradient is that of
the smooth resize. ``match_pil=False`` is one smooth 2-D resize clamped to [0, 1].

Face crops (FaceScore ``crop_face_image``): box (x1, y1, x2, y2) -> pixel slice
``[int(y1 - 1) : int(y2 + 1), int(x1 - 1) : int(x2 + 1)]`` with Python's ``int`` (truncation toward
zero), i.e. one extra pixel per side. The end is clamped to the image like slicing does. A start
below zero makes the reference's slice wrap around to the far edge (an empty or wrong crop); we
clamp it to 0 instead, the only intended difference.
"""

from __future__ import annotations

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
        raise RewardError(f"tokenizer from {where} has {len(tok)} tokens, expected bert-base-uncased's "
                          f"{BERT_VOCAB_SIZE}: the vocabulary is missing or degenerate")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    ids = tok(CHECK_TEXT).input_ids
    if len(tok) != TOKENIZER_SIZE or ids != CHECK_IDS:
        raise RewardError(f"tokenizer from {where} is wrong: {len(tok)} tokens (want {TOKENIZER_SIZE}), "
                          f"{CHECK_TEXT!r} -> {ids} (want {CHECK_IDS})")
    return tok


def tokenize(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each (B, 35), padded and truncated like the references."""
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                    return_tensors="pt")
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


def preprocess_pil(image: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """CLIP preprocessing of one uint8 RGB image (H, W, 3) -> float32 (3, size, size)."""
    from PIL import Image

    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise RewardError(f"cannot preprocess an empty image of shape {image.shape}")
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    oh, ow = resized_size(h, w, size)
    if (oh, ow) != (h, w):
        pil = pil.resize((ow, oh), Image.BICUBIC)
    top, left = _center_offsets(oh, ow, size)
    pil = pil.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return _normalize(x)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # uint8 rounding in the forward pass, identity in the backward pass (straight-through).
    return x + (torch.floor(x + 0.5).clamp(0.0, 255.0) - x).detach()


def preprocess_tensor(image: torch.Tensor, size: int = IMAGE_SIZE, match_pil: bool = True) -> torch.Tensor:
    """Differentiable CLIP preprocessing of one float image (3, H, W) in [0, 1] -> (3, size, size).

    Args:
        image: (3, H, W) float RGB in [0, 1]; may require grad.
        size: output side.
        match_pil: emulate PIL's uint8 two-pass resize with straight-through rounding (see the
            module docstring); False: one smooth bicubic resize.
    """
    h, w = image.shape[-2:]
    oh, ow = resized_size(h, w, size)
    x = image[None] * 255.0  # (1, 3, H, W) on the uint8 scale
    if match_pil:
        x = _round_ste(x)  # the PIL path sees a uint8 image
        if ow != w:
            x = _round_ste(F.interpolate(x, size=(h, ow), mode="bicubic", align_corners=False, antialias=True))
        if oh != h:
            x = _round_ste(F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False, antialias=True))
    elif (oh, ow) != (h, w):
        x = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 255.0)
    top, left = _center_offsets(oh, ow, size)
    return _normalize(x[0, :, top:top + size, left:left + size] / 255.0)


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
