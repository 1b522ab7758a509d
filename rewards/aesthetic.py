"""LAION aesthetic predictor v2: a global, prompt-free image-quality reward.

Reference: christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``. The published
head ``sac+logos+ava1-l14-linearMSE.pth`` is a plain state dict of an MLP on CLIP ViT-L/14 image
embeddings (``layers.{0,2,4,6,7}.{weight,bias}``)::

    e = CLIP_L14.encode_image(preprocess(image))       (B, 768)
    e = e / |e|_2                                      (a zero norm is left unscaled, as in ``normalized``)
    score = L5(L4(D3(L3(D2(L2(D1(L1(e))))))))          L: 768->1024->128->64->16->1, D: dropout 0.2, 0.2, 0.1

There are no activations (the ReLUs are commented out in the reference) and the dropouts are off at
inference, so the head is affine in ``e``. Scores are on the AVA 1-10 rating scale.

The CLIP encoder is OpenAI's ViT-L/14 (hub ``openai/clip-vit-large-patch14`` in transformers'
``CLIPModel`` format: ``get_image_features`` is ``encode_image``). Preprocessing is OpenAI CLIP's
``preprocess`` (torchvision on PIL: resize shorter side to 224 bicubic, center crop with
``round``, CLIP mean / std), i.e. ``rewards.blip_preprocess.preprocess_pil``. The prompt is unused.

:meth:`AestheticScore.score_tensor` is the same score on float images, differentiable w.r.t. the pixels (AlignProp
trains on this reward), with the tensor preprocessing that equals the PIL one on uint8-valued images
(``rewards.blip_preprocess.preprocess_tensor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rewards.base import Reward, RewardError, RewardResult
from rewards.blip_preprocess import preprocess_pil, preprocess_tensor
from rewards.clip_common import load_hf_model, torch_dtype

CLIP_ID = "openai/clip-vit-large-patch14"
WEIGHTS_NAME = "sac+logos+ava1-l14-linearMSE.pth"
WEIGHTS_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor (" + WEIGHTS_NAME + ")"


class AestheticMLP(nn.Module):
    """The predictor head; parameter names match the published ``.pth`` (``layers.N.*``).

    Args:
        input_size: CLIP embedding size (768 for ViT-L/14).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, input_size) unit embeddings -> (B,) scores."""
        return self.layers(embeddings)[:, 0]


def load_mlp(path: str | Path) -> AestheticMLP:
    """The head from a published state dict, strictly, in float32 eval mode.

    Raises:
        RewardError: the file is missing, not a plain state dict, or not this MLP's layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RewardError(f"aesthetic: MLP weights not found at {path} (get {WEIGHTS_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean the file is unusable
        raise RewardError(f"aesthetic: cannot load {path} with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or "layers.0.weight" not in state or state["layers.0.weight"].ndim != 2:
        raise RewardError(
            f"aesthetic: {path} is not the predictor's state dict (expected keys "
            "layers.{0,2,4,6,7}.{weight,bias}, layers.0.weight of shape (1024, 768))"
        )
    mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RewardError(f"aesthetic: {path} does not fit the 768-1024-128-64-16-1 MLP: {e}") from e
    return mlp.float().eval().requires_grad_(False)


def unit_or_zero(e: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm; a zero row stays zero (the reference's ``normalized``)."""
    norm = e.norm(dim=-1, keepdim=True)
    return e / torch.where(norm == 0, torch.ones_like(norm), norm)


class AestheticScore(Reward):
    """LAION aesthetic predictor v2 on uint8 images (prompts are ignored).

    Args:
        mlp_weights: path of ``sac+logos+ava1-l14-linearMSE.pth`` (required; published on GitHub,
            not on the model hub).
        clip_model: local ``CLIPModel`` directory or hub id (default ``openai/clip-vit-large-patch14``).
        batch_size: images per forward pass.
        device: torch device. dtype: CLIP dtype name (the head always runs in float32).
        revision / cache_dir: hub revision and cache for ``clip_model``.

    Raises:
        RewardError: bad options, missing weights, or an MLP input size that differs from the CLIP
            embedding size.
    """

    name = "aesthetic"
    region = "global"
    differentiable_score = True

    def __init__(
        self,
        mlp_weights: str | None = None,
        clip_model: str = CLIP_ID,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        cache_dir: str | None = None,
    ):
        from transformers import CLIPModel

        if mlp_weights is None:
            raise RewardError(f"aesthetic options: mlp_weights is required: the path of {WEIGHTS_URL}")
        if batch_size < 1:
            raise RewardError(f"aesthetic options: batch_size={batch_size!r}: at least 1")
        self.batch_size = int(batch_size)
        self.mlp = load_mlp(mlp_weights).to(device)
        self.clip = load_hf_model(
            CLIPModel,
            clip_model,
            "aesthetic CLIP",
            revision=revision,
            cache_dir=cache_dir,
            dtype=torch_dtype(dtype, "aesthetic"),
            device=device,
        )
        dim = self.clip.config.projection_dim
        if self.mlp.layers[0].in_features != dim:
            raise RewardError(
                f"aesthetic: the MLP takes {self.mlp.layers[0].in_features}-d embeddings but "
                f"{clip_model!r} gives {dim}-d ones (the head was trained on CLIP ViT-L/14)"
            )
        self.image_size = self.clip.config.vision_config.image_size

    @torch.no_grad()
    def embeddings(self, images: np.ndarray) -> torch.Tensor:
        """Unit CLIP image embeddings, float32 (B, 768)."""
        p = next(self.clip.parameters())
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess_pil(im, self.image_size) for im in images[i : i + self.batch_size]])
            feats = self.clip.get_image_features(pixel_values=pixels.to(p.device, p.dtype))
            out.append(unit_or_zero(getattr(feats, "pooler_output", feats).float()))
        return torch.cat(out)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        if len(images) == 0:
            return []
        with torch.no_grad():
            values = self.mlp(self.embeddings(images)).double().cpu().numpy()
        if not np.all(np.isfinite(values)):
            raise RewardError(f"{self.name}: the model returned non-finite scores {values.tolist()}")
        return [RewardResult(float(v)) for v in values]

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The score of float images (B, 3, H, W) in [0, 1], differentiable w.r.t. the pixels, and (B,) True."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise RewardError(f"{self.name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        p = next(self.clip.parameters())
        pixels = torch.stack([preprocess_tensor(im.float(), self.image_size) for im in images]).to(p.device, p.dtype)
        feats = self.clip.get_image_features(pixel_values=pixels)
        e = unit_or_zero(getattr(feats, "pooler_output", feats).float())
        m = next(self.mlp.parameters())
        scores = self.mlp(e.to(m.device)).to(images.device)
        return scores, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
