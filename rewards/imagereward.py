"""ImageReward: a global human-preference reward (Xu et al. 2023, NeurIPS; THUDM/ImageReward).

Reference: THUDM/ImageReward, ``ImageReward/ImageReward.py`` (``ImageReward.score``). Per image:

1. the WHOLE image is CLIP-preprocessed like the reference's ``_transform(224)``: shorter side
   resized to 224 (PIL bicubic), center-cropped to 224 x 224, normalized with CLIP mean / std
   (``rewards.blip_preprocess.preprocess_pil``); nothing is padded, so a non-square image loses
   its long-side margins exactly as in the reference;
2. its own prompt is tokenized (max_length 35, padded, truncated);
3. ``r = MLP(BERT(prompt | ViT(image))[CLS])`` (``rewards.blip_reward_model``);
4. the value is normalized: ``(r - 0.16717362830052426) / 1.0333394966054072`` (the reference's
   ``mean`` / ``std``, so that scores are roughly standard over its benchmark).

``info["raw"]`` keeps ``r``. The reward's region is ``global``.

:meth:`ImageReward.score_tensor` is the same score on float images, differentiable w.r.t. the pixels (ReFL's
use of it, and rlfh's direct reward losses): the resize by Pillow's own bicubic weights with straight-through
rounding (``rewards.blip_preprocess.preprocess_tensor``), so on uint8-valued images it equals :meth:`score`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from rewards.base import Reward, RewardError, RewardResult
from rewards.blip_preprocess import preprocess_pil, preprocess_tensor, tokenize

IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
HUB_ID = "THUDM/ImageReward"
WEIGHTS_NAME = "ImageReward.pt"


class ImageReward(Reward):
    """ImageReward v1.0 on uint8 images and their prompts.

    Args:
        model: local directory or hub id holding ``ImageReward.pt`` and ``med_config.json``.
        batch_size: images per forward pass.
        device: torch device of the model.
        dtype: model dtype name (``float32``, ``float16``, ``bfloat16``).
        vision_heads: ViT attention heads (default width / 64, i.e. 16 for ViT-L).
        revision: hub revision. cache_dir: hub cache. tokenizer_dir: a local bert-base-uncased
            tokenizer directory (default: the vocab shipped with rlfh).

    Raises:
        RewardError: bad options, missing weights, or a checkpoint that does not fit.
    """

    name = "imagereward"
    region = "global"
    reads_sources = True  # RGBA / LA / palette files are resized in their own mode, as the reference does
    differentiable_score = True

    def __init__(
        self,
        model: str = HUB_ID,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        vision_heads: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        tokenizer_dir: str | None = None,
    ):
        from rewards.blip_reward_model import load_model_and_tokenizer

        if batch_size < 1:
            raise RewardError(f"ImageReward options: batch_size={batch_size!r}: at least 1")
        self.batch_size = int(batch_size)
        self.model, self.tokenizer = load_model_and_tokenizer(
            model,
            WEIGHTS_NAME,
            vision_heads=vision_heads,
            revision=revision,
            cache_dir=cache_dir,
            tokenizer_dir=tokenizer_dir,
            device=device,
            dtype=dtype,
        )

    @torch.no_grad()
    def raw_scores(
        self, images: np.ndarray, prompts: Sequence[str], sources: Sequence[Any] | None = None
    ) -> np.ndarray:
        """Unnormalized MLP outputs r for (B, H, W, 3) uint8 images -> float64 (B,).

        ``sources``: per image None or the file's PIL image in its own mode (preprocessed instead).
        """
        p = next(self.model.parameters())
        inputs = [im if sources is None or sources[k] is None else sources[k] for k, im in enumerate(images)]
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess_pil(im) for im in inputs[i : i + self.batch_size]])
            ids, mask = tokenize(self.tokenizer, prompts[i : i + self.batch_size])
            out.append(
                self.model(pixels.to(p.device, p.dtype), ids.to(p.device), mask.to(p.device)).double().cpu().numpy()
            )
        return np.concatenate(out) if out else np.zeros(0)

    def score(
        self, images: np.ndarray, prompts: Sequence[str], sources: Sequence[Any] | None = None
    ) -> list[RewardResult]:
        raw = self.raw_scores(images, prompts, sources)
        if not np.all(np.isfinite(raw)):
            raise RewardError(f"{self.name}: the model returned non-finite scores {raw.tolist()}")
        return [RewardResult(float((r - IR_MEAN) / IR_STD), info={"raw": float(r)}) for r in raw]

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized score of float images (B, 3, H, W) in [0, 1], differentiable w.r.t. the pixels, and
        (B,) True: the whole image always applies."""
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise RewardError(
                f"{self.name}: images must be (B, 3, H, W) with one prompt each, got {tuple(images.shape)}"
            )
        p = next(self.model.parameters())
        pixels = torch.stack([preprocess_tensor(im.float()) for im in images]).to(p.device, p.dtype)
        ids, mask = tokenize(self.tokenizer, list(prompts))
        raw = self.model(pixels, ids.to(p.device), mask.to(p.device)).float().to(images.device)
        return (raw - IR_MEAN) / IR_STD, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
