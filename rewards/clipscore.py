"""CLIPScore: image-text agreement of a CLIP model (Hessel et al. 2021, "CLIPScore", EMNLP), as
FairHuman (arXiv 2507.02714) reports it beside its face and hand metrics.

Per image and its prompt, with unit CLIP embeddings e_img, e_txt::

    CLIPScore = w * max(<e_img, e_txt>, 0)

Hessel et al. use ``w = 2.5`` (default here; values mostly in [0, 1]); torchmetrics'
``CLIPScore`` (``functional/multimodal/clip_score.py``) uses ``w = 100`` with
``openai/clip-vit-large-patch14``, the default model here: ``w: 100`` reproduces its numbers. Hessel
et al. prefix the caption with "A photo depicts" (``prefix``), torchmetrics does not (default: no
prefix).

The model is a transformers ``CLIPModel`` folder or hub id with its processor files in the same
place (``openai/clip-vit-large-patch14``'s layout: ``config.json``, ``model.safetensors``,
``preprocessor_config.json``, ``vocab.json``, ``merges.txt``, ``tokenizer.json``), read by
:class:`rewards.pickscore.PickScore`'s loader: the PIL image processor (shorter side to 224,
bicubic, center crop, CLIP mean / std; no torchvision) and a tokenizer checked to be CLIP's BPE, so a
degenerate offline tokenizer fails loudly instead of scoring every prompt alike. Prompts are
truncated to 77 tokens. ``info["cosine"]`` keeps the cosine. :meth:`CLIPScore.score_tensor` is the same score on
float images, differentiable w.r.t. the pixels (PickScore's torch preprocessing, ``rewards/pickscore.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rewards.base import RewardError, RewardResult
from rewards.pickscore import PickScore

MODEL_ID = "openai/clip-vit-large-patch14"
HESSEL_W = 2.5
HESSEL_PREFIX = "A photo depicts"


class CLIPScore(PickScore):
    """CLIPScore of uint8 images against their prompts.

    Args:
        model: local ``CLIPModel`` directory or hub id (default ``openai/clip-vit-large-patch14``).
        processor: where the processor files are (default: ``model``).
        w: the scale (2.5: Hessel et al.; 100: torchmetrics).
        prefix: text put before every prompt with a space (Hessel et al.: "A photo depicts"); "" none.
        batch_size / device / dtype / revision / cache_dir: as for PickScore.

    Raises:
        RewardError: bad options, missing weights or processor files, or a tokenizer that is not CLIP's.
    """

    name = "clipscore"
    region = "global"
    title = "CLIPScore"

    def __init__(
        self,
        model: str = MODEL_ID,
        processor: str | None = None,
        w: float = HESSEL_W,
        prefix: str = "",
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        cache_dir: str | None = None,
    ):
        if not (isinstance(w, (int, float)) and w > 0):
            raise RewardError(f"CLIPScore options: w={w!r}: a positive scale (2.5 Hessel et al., 100 torchmetrics)")
        super().__init__(model, processor or model, batch_size, device, dtype, revision, cache_dir)
        self.w, self.prefix = float(w), str(prefix)

    def texts(self, prompts: Sequence[str]) -> list[str]:
        return [f"{self.prefix} {p}" if self.prefix else p for p in prompts]

    def score_tensor(self, images, prompts: Sequence[str]):
        """:meth:`score` of float images (B, 3, H, W) in [0, 1], differentiable w.r.t. the pixels (zero gradient
        where the cosine is negative, as ``max(cos, 0)`` has), and (B,) True."""
        scores = self.w * self.cosine_tensor(images, self.texts(prompts)).clamp(min=0.0)
        return scores, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        if len(images) == 0:
            return []
        img, txt = self.embeddings(images, self.texts(prompts))
        cos = (img * txt).sum(-1).double().numpy()
        if not np.all(np.isfinite(cos)):
            raise RewardError(f"{self.name}: the model returned non-finite cosines {cos.tolist()}")
        return [RewardResult(self.w * max(float(c), 0.0), info={"cosine": float(c)}) for c in cos]
