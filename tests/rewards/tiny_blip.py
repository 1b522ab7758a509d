"""Seeded random-weight ImageReward-architecture checkpoints in the published file layout.

Used by the reward tests (tiny ViT, 2-layer text encoder) and by the parity test (the reference's
full ViT-L/16 + med_config text encoder). The weights go through ``export_published_state_dict`` and
``torch.save`` exactly as ``FS_model.pt`` / ``ImageReward.pt`` are published: a plain state dict
with ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``blip.vision_proj.*``, ``blip.text_proj.*``
and ``mlp.layers.{0,2,4,6,7}.*`` keys, next to a ``med_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rewards.blip_reward_model import BlipRewardModel, VisionSpec, export_published_state_dict

# ImageReward's med_config.json (train/src/config/med_config.json in THUDM/ImageReward).
FULL_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
# hidden 768 and vocab 30524 are fixed by the MLP input and the tokenizer; the rest is shrunk.
TINY_MED_CONFIG = {**FULL_MED_CONFIG, "num_hidden_layers": 2, "intermediate_size": 128, "max_position_embeddings": 64}
TINY_VISION = VisionSpec(width=64, depth=2, heads=2, patch=16, image_size=224, mlp_dim=128)
# Lookup tables keep their init; all other matrices are rescaled in random_model.
_TABLES = ("word_embeddings", "position_embedding", "class_embedding")
VIT_L = VisionSpec(width=1024, depth=24, heads=16, patch=16, image_size=224, mlp_dim=4096)


def random_model(vision: VisionSpec, med: dict, seed: int) -> BlipRewardModel:
    """A seeded random model whose scores spread over O(1) across images.

    Every matrix (linear, conv, MLP) gets std 1/sqrt(fan_in) and every LayerNorm random
    gains/biases: with transformers' std-0.02 init and the reference's tiny MLP init, the image
    barely moves the score (differences ~1e-6) and a 1e-4 parity check would prove nothing.
    """
    torch.manual_seed(seed)
    model = BlipRewardModel(vision, med)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and not any(k in name for k in _TABLES):
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_published(model: BlipRewardModel, med: dict, directory: Path, weights_name: str) -> Path:
    """Write ``weights_name`` + ``med_config.json`` into ``directory`` in the published layout."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(export_published_state_dict(model), directory / weights_name)
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    return directory
