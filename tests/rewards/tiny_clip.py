"""Seeded tiny CLIP-family checkpoints in the published layouts, plus open_clip's forward pass.

* :func:`save_pickscore_dir`: a Hugging Face ``CLIPModel`` folder with its processor files, as
  ``yuvalkirstain/PickScore_v1`` + ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` publish them;
* :func:`save_openai_clip_dir`: the same files in one folder, as ``openai/clip-vit-large-patch14``
  publishes them (CLIPScore's model);
* :func:`open_clip_state`: a state dict in open_clip's ViT CLIP key layout, written out key by key
  here (independently of ``rewards.hpsv2``'s conversion table), saved like HPSv2's checkpoints;
* :func:`aesthetic_state`: the aesthetic head's ``layers.N.*`` state dict;
* :func:`open_clip_features`: open_clip's ``encode_image`` / ``encode_text`` re-implemented on a
  raw open_clip state dict in float64 (pre-LN blocks with fused q/k/v, causal text mask, CLS / first
  argmax-token pooling, ``x @ proj``), the reference for the HPSv2 conversion test.

Every matrix gets std 1/sqrt(fan_in) and LayerNorms random gains: with std-0.02 inits the image
and the prompt barely move the score, and a dependence or parity check would prove nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.clip_common import load_clip_tokenizer

VOCAB, CONTEXT = 49408, 77  # the real CLIP BPE vocabulary, so the shipped tokenizer is used
TINY = dict(width=32, layers=2, heads=2, patch=32, image=224, embed=16)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tiny_hf_clip(seed: int, hidden_act: str = "gelu", embed: int = TINY["embed"]):
    """A random ``CLIPModel`` with ViT-B/32-like geometry at width 32 (224 px, 7 x 7 patches)."""
    from transformers import CLIPConfig, CLIPModel

    w = TINY["width"]
    common = dict(
        hidden_size=w,
        intermediate_size=4 * w,
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        hidden_act=hidden_act,
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, **common),
        vision_config=dict(image_size=TINY["image"], patch_size=TINY["patch"], **common),
        projection_dim=embed,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    _randomize_(model, seed)
    return model.eval()


def save_pickscore_dir(directory: Path, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` folder plus the processor files as the laion ViT-H-14 repo has them."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_hf_clip(seed).save_pretrained(directory)
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json (the legacy feature-extractor
    # format with integer sizes, which transformers 5 still reads).
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": 224,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "size": 224,
            },
            indent=2,
        )
    )
    load_clip_tokenizer().save_pretrained(directory)
    return directory


def save_openai_clip_dir(directory: Path, seed: int = 0) -> Path:
    """``openai/clip-vit-large-patch14``'s layout: ``CLIPModel`` weights and config, its legacy
    ``preprocessor_config.json`` (the same fields and values as laion's above) and the CLIP BPE
    tokenizer files (``vocab.json``, ``merges.txt``, ``tokenizer.json``), all in one folder."""
    return save_pickscore_dir(directory, seed)


def open_clip_state(
    seed: int,
    width: int = TINY["width"],
    layers: int = TINY["layers"],
    patch: int = 16,
    image: int = 64,
    text_width: int = 24,
    embed: int = TINY["embed"],
) -> dict[str, torch.Tensor]:
    """A random open_clip ViT CLIP state dict (the key names and shapes of ``open_clip.CLIP``)."""
    g = torch.Generator().manual_seed(seed)

    def mat(*shape: int, fan_in: int | None = None) -> torch.Tensor:
        return torch.randn(shape, generator=g) / math.sqrt(fan_in or shape[-1])

    def vec(n: int, base: float = 0.0) -> torch.Tensor:
        return base + 0.1 * torch.randn(n, generator=g)

    def blocks(prefix: str, d: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out.update(
                {
                    p + "ln_1.weight": vec(d, 1.0),
                    p + "ln_1.bias": vec(d),
                    p + "attn.in_proj_weight": mat(3 * d, d),
                    p + "attn.in_proj_bias": vec(3 * d),
                    p + "attn.out_proj.weight": mat(d, d),
                    p + "attn.out_proj.bias": vec(d),
                    p + "ln_2.weight": vec(d, 1.0),
                    p + "ln_2.bias": vec(d),
                    p + "mlp.c_fc.weight": mat(4 * d, d),
                    p + "mlp.c_fc.bias": vec(4 * d),
                    p + "mlp.c_proj.weight": mat(d, 4 * d),
                    p + "mlp.c_proj.bias": vec(d),
                }
            )
        return out

    grid = image // patch
    state = {
        "positional_embedding": 0.5 * torch.randn(CONTEXT, text_width, generator=g),
        "text_projection": mat(text_width, embed, fan_in=text_width),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "visual.class_embedding": torch.randn(width, generator=g),
        "visual.positional_embedding": 0.5 * torch.randn(grid * grid + 1, width, generator=g),
        "visual.proj": mat(width, embed, fan_in=width),
        "visual.conv1.weight": mat(width, 3, patch, patch, fan_in=3 * patch * patch),
        "visual.ln_pre.weight": vec(width, 1.0),
        "visual.ln_pre.bias": vec(width),
        "visual.ln_post.weight": vec(width, 1.0),
        "visual.ln_post.bias": vec(width),
        "token_embedding.weight": torch.randn(VOCAB, text_width, generator=g),
        "ln_final.weight": vec(text_width, 1.0),
        "ln_final.bias": vec(text_width),
    }
    state.update(blocks("visual.", width))
    state.update(blocks("", text_width))
    return state


def aesthetic_state(seed: int, input_size: int = TINY["embed"]) -> dict[str, torch.Tensor]:
    """The head's published keys: Linear layers at Sequential indices 0, 2, 4, 6, 7."""
    g = torch.Generator().manual_seed(seed)
    dims = [input_size, 1024, 128, 64, 16, 1]
    state = {}
    for idx, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"layers.{idx}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{idx}.bias"] = 0.1 * torch.randn(fan_out, generator=g)
    return state


def _block(x: torch.Tensor, s: dict, p: str, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), s[p + "ln_1.weight"], s[p + "ln_1.bias"], eps=1e-5)
    q, k, v = (h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        logits = logits + mask
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (d,), s[p + "ln_2.weight"], s[p + "ln_2.bias"], eps=1e-5)
    h = F.gelu(h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"])
    return x + h @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]


def _n_layers(s: dict, prefix: str) -> int:
    return len({k.split(".")[len(prefix.split(".")) + 1] for k in s if k.startswith(prefix + "transformer.resblocks.")})


def open_clip_features(state: dict, pixels: torch.Tensor, ids: torch.Tensor, vision_heads: int, text_heads: int):
    """open_clip's unnormalized (image, text) features in float64: (B, E), (B, E)."""
    s = {k: v.double() for k, v in state.items()}
    # Vision: patchify conv (no bias), [CLS] + patches, + pos, ln_pre, blocks, ln_post(CLS) @ proj.
    x = F.conv2d(pixels.double(), s["visual.conv1.weight"], stride=s["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (B, grid^2, W)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], eps=1e-5)
    for i in range(_n_layers(s, "visual.")):
        x = _block(x, s, f"visual.transformer.resblocks.{i}.", vision_heads, None)
    img = F.layer_norm(x[:, 0], (d,), s["visual.ln_post.weight"], s["visual.ln_post.bias"], eps=1e-5) @ s["visual.proj"]
    # Text: embeddings + pos, causal blocks, ln_final, token at argmax(id) (end of text) @ projection.
    t = s["token_embedding.weight"][ids] + s["positional_embedding"]
    n, d = t.shape[1], t.shape[-1]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(_n_layers(s, "")):
        t = _block(t, s, f"transformer.resblocks.{i}.", text_heads, causal)
    t = F.layer_norm(t, (d,), s["ln_final.weight"], s["ln_final.bias"], eps=1e-5)
    txt = t[torch.arange(t.shape[0]), ids.argmax(dim=-1)] @ s["text_projection"]
    return img, txt
