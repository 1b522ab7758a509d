"""Image embeddings from the configured reward models, for collapse metrics (face identity
similarity across samples, ``rlfh.eval.diversity``): no extra model is loaded.

Which embedding, in order of preference (:func:`find_embedder`):

1. a face reward built on BLIP (``facescore``): its ViT image encoder, fine-tuned on face crops;
2. any other reward built on BLIP (``imagereward``): the same architecture, trained on whole images;
3. any reward with an ``embed_images(crops) -> (N, D)`` method (the hook for your own reward).

The BLIP embedding of a crop is BLIP's image feature for image-text contrast (Li et al., "BLIP",
arXiv 2201.12086; reference salesforce/BLIP ``models/blip_retrieval.py``:
``F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)``): the ViT's [CLS] token after its
final LayerNorm, projected by ``vision_proj`` to 256 dims, unit length. The crop is CLIP-preprocessed
exactly as FaceScore scores it (``rewards.blip_preprocess.preprocess_pil``). It is not a face
recognition embedding: two photos of one person are close, but so are two similar-looking people,
so a high similarity says the faces look alike, which is what identity collapse looks like.

None of these: no embedding, and the metric is reported as not computable with the reason
(:data:`NO_EMBEDDER`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

NO_EMBEDDER = (
    "no configured reward exposes image embeddings (facescore or imagereward, "
    "or a reward with an embed_images(crops) method)"
)
FACE_CONFIDENCE = 0.9  # FaceScore's threshold: only faces it would score are embedded


def blip_embeddings(model, crops: Sequence[Any], batch_size: int = 16) -> np.ndarray:
    """BLIP image features of crops (uint8 (h, w, 3) arrays or PIL images of any size): float64
    (N, 256), each row of unit length; (0, 0) for no crops."""
    import torch

    from rewards.blip_preprocess import preprocess_pil

    p = next(model.parameters())
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            pixels = torch.stack([preprocess_pil(c) for c in crops[i : i + batch_size]]).to(p.device, p.dtype)
            cls = model.visual_encoder(pixel_values=pixels).last_hidden_state[:, 0, :]
            out.append(torch.nn.functional.normalize(model.vision_proj(cls).double(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@dataclass
class Embedder:
    """Embeds crops with one reward's model. ``source`` names it (recorded with the metric)."""

    source: str
    embed: Callable[[Sequence[Any]], np.ndarray]
    face_threshold: float = FACE_CONFIDENCE

    def faces(self, images: np.ndarray, faces: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """Embed the faces of each image that have confidence >= ``face_threshold``.

        Args:
            images: uint8 (B, H, W, 3).
            faces: per image, its face :class:`rewards.base.Detection` list.

        Returns:
            ``{"embeddings": (N, D) float64, "owners": N image indices, "source": ...}``.
        """
        from rewards.blip_preprocess import crop_bounds

        if len(faces) != len(images):
            raise ValueError(f"{len(faces)} face lists for {len(images)} images")
        crops, owners = [], []
        for b, dets in enumerate(faces):
            h, w = images[b].shape[:2]
            for d in dets:
                bounds = crop_bounds(d.box, h, w) if d.confidence >= self.face_threshold else None
                if bounds is not None:
                    y0, y1, x0, x1 = bounds
                    crops.append(images[b, y0:y1, x0:x1])
                    owners.append(b)
        emb = self.embed(crops) if crops else np.zeros((0, 0))
        return {"embeddings": np.asarray(emb, dtype=np.float64), "owners": owners, "source": self.source}


def find_embedder(rewards: Sequence[Any]) -> tuple[Embedder | None, str | None]:
    """The embedder of the first fitting reward (see the module docstring), or (None, reason).

    Args:
        rewards: reward objects (``rewards.base.Reward``), in config order.
    """
    from rewards.blip_reward_model import BlipRewardModel

    def blip(r) -> bool:
        return isinstance(getattr(r, "model", None), BlipRewardModel)

    for r in rewards:  # 1. a BLIP face reward
        if blip(r) and getattr(r, "region", "global") == "face":
            return Embedder(
                f"{r.name}: BLIP image encoder (face crops)",
                lambda c, m=r.model: blip_embeddings(m, c),
                float(getattr(r, "threshold", FACE_CONFIDENCE)),
            ), None
    for r in rewards:  # 2. another BLIP reward
        if blip(r):
            return Embedder(
                f"{r.name}: BLIP image encoder (trained on whole images, not faces)",
                lambda c, m=r.model: blip_embeddings(m, c),
            ), None
    for r in rewards:  # 3. a reward's own hook
        if callable(getattr(r, "embed_images", None)):
            return Embedder(f"{r.name}: embed_images", r.embed_images), None
    return None, NO_EMBEDDER
