"""The ImageReward architecture (also FaceScore's) on maintained transformers BLIP classes.

ImageReward (Xu et al. 2023, reference THUDM/ImageReward) scores an (image, prompt) pair as::

    v = ViT(image)                                   # (B, 1 + (S/P)^2, D_v), BLIP ViT-L/16, S = 224
    h = BERT(prompt tokens, cross-attending to v)    # (B, 35, 768), med_config.json
    r = MLP(h[:, 0])                                 # (B, 1): 768 -> 1024 -> 128 -> 64 -> 16 -> 1

The BLIP ViT is ``transformers.BlipVisionModel`` and BLIP's ``med.py`` BERT is
``transformers.BlipTextModel`` (the same modules under other names). The MLP has dropouts between
its linears and no activations, exactly like the reference. ``r`` is the RAW score: ImageReward
normalizes it afterwards, FaceScore does not (see rewards/imagereward.py and rewards/facescore.py).

Checkpoints are the published plain state dicts (``ImageReward.pt``, ``FS_model.pt``) with keys
``blip.visual_encoder.*`` (timm-style ViT), ``blip.text_encoder.*`` (med.py BERT),
``blip.vision_proj.*``, ``blip.text_proj.*`` (BLIP's contrastive heads: loaded, unused by the
score) and ``mlp.layers.{0,2,4,6,7}.*``. :func:`published_to_internal` maps them explicitly, and
loading is strict: any missing, unexpected or mis-shaped key is an error (the reference loads with
``strict=False``, which would silently keep random weights). The ViT's depth, width, patch and image
size are read from the checkpoint; its head count is an option (default width / 64: 16 for ViT-L).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from rewards.base import RewardError

# BLIP's ITC projection width (BLIP_Pretrain embed_dim): only the shapes of the unused heads.
_PROJ_DIM = 256
# Text features feeding the MLP; fixed by the published head (MLP(768)).
_MLP_INPUT = 768
# The published MLP: Linear indices in nn.Sequential (dropouts at 1, 3, 5 carry no weights).
_MLP_LINEARS = (0, 2, 4, 6, 7)

# timm ViT names (published, after "blip.visual_encoder.") -> BlipVisionModel names.
_VISION_GLOBAL = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# med.py registers position_ids as a persistent buffer; transformers does not. Checked, not loaded.
_TEXT_POSITION_IDS = "blip.text_encoder.embeddings.position_ids"


@dataclass(frozen=True)
class VisionSpec:
    """Shape of the BLIP ViT image encoder.

    Attributes:
        width: token width D_v (1024 for ViT-L).
        depth: number of transformer blocks (24 for ViT-L).
        heads: attention heads (16 for ViT-L); not recoverable from weights, hence an option.
        patch: patch size P in pixels (16).
        image_size: input side S in pixels (224).
        mlp_dim: hidden width of each block's MLP (4 * D_v).
    """

    width: int
    depth: int
    heads: int
    patch: int
    image_size: int
    mlp_dim: int

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], heads: int | None = None) -> "VisionSpec":
        """Read the ViT shape from a published-layout state dict.

        Raises:
            RewardError: if the ViT keys are absent or inconsistent.
        """
        p = "blip.visual_encoder."
        try:
            patch_w = state[p + "patch_embed.proj.weight"]  # (D_v, 3, P, P)
            pos = state[p + "pos_embed"]  # (1, 1 + (S/P)^2, D_v)
            fc1 = state[p + "blocks.0.mlp.fc1.weight"]  # (mlp_dim, D_v)
        except KeyError as e:
            raise RewardError(f"checkpoint has no BLIP image encoder key {e.args[0]!r}") from None
        width, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
        blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"blocks\.(\d+)\.", k))}
        grid = round((pos.shape[1] - 1) ** 0.5)
        if grid * grid != pos.shape[1] - 1 or blocks != set(range(len(blocks))):
            raise RewardError(f"checkpoint ViT is inconsistent: pos_embed {tuple(pos.shape)}, blocks {sorted(blocks)}")
        heads = heads if heads is not None else width // 64
        if heads <= 0 or width % heads:
            raise RewardError(f"vision_heads={heads} does not divide the ViT width {width}")
        return cls(width, len(blocks), heads, patch, grid * patch, int(fc1.shape[0]))


def text_config_from_med(med: Mapping[str, object], encoder_width: int):
    """Build a BlipTextConfig from ImageReward's ``med_config.json``.

    ``encoder_width`` (the cross-attention key/value input) is the ViT width, as BLIP_Pretrain sets
    it, whatever med_config says. ``is_decoder=True`` only makes transformers build the
    cross-attention layers; the forward pass runs bidirectionally like med.py's multimodal mode.
    """
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise RewardError("med_config.json must set add_cross_attention: true (the reward cross-attends to the image)")
    if med.get("hidden_size") != _MLP_INPUT:
        raise RewardError(
            f"med_config.json hidden_size must be {_MLP_INPUT} (the MLP input), got {med.get('hidden_size')!r}"
        )
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )
    missing = [k for k in keys if k not in med]
    if missing:
        raise RewardError(f"med_config.json lacks {missing}")
    cfg = BlipTextConfig(
        **{k: med[k] for k in keys},
        encoder_hidden_size=encoder_width,
        is_decoder=True,
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.1)),
    )
    return cfg


class BlipRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head: raw ImageReward-architecture scores.

    Args:
        vision: ViT shape (see :class:`VisionSpec`).
        med: the parsed ``med_config.json``.
    """

    def __init__(self, vision: VisionSpec, med: Mapping[str, object]):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision_spec = vision
        vcfg = BlipVisionConfig(
            hidden_size=vision.width,
            intermediate_size=vision.mlp_dim,
            num_hidden_layers=vision.depth,
            num_attention_heads=vision.heads,
            image_size=vision.image_size,
            patch_size=vision.patch,
            hidden_act="gelu",
            layer_norm_eps=1e-6,  # BLIP's ViT: exact GELU, LayerNorm eps 1e-6
            attention_dropout=0.0,
        )
        self.visual_encoder = BlipVisionModel(vcfg)
        self.text_encoder = BlipTextModel(text_config_from_med(med, vision.width), add_pooling_layer=False)
        self.vision_proj = nn.Linear(vision.width, _PROJ_DIM)
        self.text_proj = nn.Linear(_MLP_INPUT, _PROJ_DIM)
        self.mlp = nn.Sequential(
            nn.Linear(_MLP_INPUT, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores.

        Args:
            pixel_values: (B, 3, S, S) CLIP-normalized images.
            input_ids: (B, L) or (1, L) token ids (broadcast over B).
            attention_mask: same shape as ``input_ids``.

        Returns:
            (B,) float32 raw MLP outputs (before any normalization).
        """
        b = pixel_values.shape[0]
        if input_ids.shape[0] == 1 and b > 1:
            input_ids, attention_mask = input_ids.expand(b, -1), attention_mask.expand(b, -1)
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state  # (B, N, D_v)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state  # (B, L, 768)
        return self.mlp(text[:, 0, :].float()).squeeze(-1)


def published_to_internal(key: str) -> str | None:
    """Map a published checkpoint key to this model's key; None for keys of no known family."""
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder.") :]
        if rest in _VISION_GLOBAL:
            return "visual_encoder." + _VISION_GLOBAL[rest]
        m = re.fullmatch(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", rest)
        if m:
            return f"visual_encoder.encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"
        return None
    for prefix in ("blip.text_encoder.", "blip.vision_proj.", "blip.text_proj."):
        if key.startswith(prefix):
            return key[len("blip.") :]
    m = re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", key)
    if m and int(m.group(1)) in _MLP_LINEARS:
        return f"mlp.{m.group(1)}.{m.group(2)}"
    return None


def internal_to_published(key: str) -> str:
    """Inverse of :func:`published_to_internal` (used to export weights in the published layout)."""
    if key.startswith("visual_encoder."):
        rest = key[len("visual_encoder.") :]
        inv = {v: k for k, v in _VISION_GLOBAL.items()}
        if rest in inv:
            return "blip.visual_encoder." + inv[rest]
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        blk = {v: k for k, v in _VISION_BLOCK.items()}
        if m and m.group(2) in blk:
            return f"blip.visual_encoder.blocks.{m.group(1)}.{blk[m.group(2)]}.{m.group(3)}"
    elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.")):
        return "blip." + key
    elif m := re.fullmatch(r"mlp\.(\d+)\.(weight|bias)", key):
        return f"mlp.layers.{m.group(1)}.{m.group(2)}"
    raise KeyError(f"no published name for model key {key!r}")


def export_published_state_dict(model: BlipRewardModel) -> dict[str, torch.Tensor]:
    """The model's weights under the published key names (plus med.py's position_ids buffer)."""
    out = {internal_to_published(k): v.detach().clone() for k, v in model.state_dict().items()}
    n_pos = model.text_encoder.config.max_position_embeddings
    out[_TEXT_POSITION_IDS] = torch.arange(n_pos).expand((1, -1)).clone()
    return out


def load_published_state_dict(model: BlipRewardModel, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a published-layout state dict strictly.

    Raises:
        RewardError: listing every unknown, unexpected, missing or mis-shaped key.
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown, problems = [], []
    for key, value in state.items():
        if key == _TEXT_POSITION_IDS:
            # A buffer, not a weight: only check it holds the positions transformers recomputes.
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                problems.append(f"{key} is not 0..{value.numel() - 1}")
            continue
        name = published_to_internal(key)
        if name is None:
            unknown.append(key)
        elif name not in own:
            problems.append(f"unexpected key {key} (-> {name})")
        elif tuple(own[name].shape) != tuple(value.shape):
            problems.append(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[name].shape)}")
        else:
            mapped[name] = value
    missing = sorted(set(own) - set(mapped) - {n for n in own if n in _shape_problem_names(problems)})
    problems += [f"missing key {internal_to_published(n)}" for n in missing]
    problems += [f"unknown key {k}" for k in unknown]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RewardError(
            f"checkpoint {source} does not match the ImageReward architecture "
            f"({len(problems)} problems):\n  {shown}{more}"
        )
    model.load_state_dict(mapped, strict=True)


def _shape_problem_names(problems: list[str]) -> set[str]:
    # Mis-shaped keys are already reported; do not report them a second time as missing.
    out = set()
    for p in problems:
        m = re.match(r"(\S+): checkpoint shape", p)
        if m and (name := published_to_internal(m.group(1))):
            out.add(name)
    return out


def resolve_model_files(
    source: str, weights_name: str, revision: str | None = None, cache_dir: str | None = None
) -> tuple[Path, Path]:
    """Find ``weights_name`` and ``med_config.json`` in a local directory or a hub repository.

    Args:
        source: a local directory holding both files, or a hub id such as ``THUDM/ImageReward``.
        weights_name: ``ImageReward.pt`` or ``FS_model.pt``.
        revision: hub revision (branch, tag or commit) for a hub id.
        cache_dir: hub cache directory (default: the huggingface_hub cache).

    Raises:
        RewardError: if a file is missing locally or cannot be downloaded.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = (path / weights_name, path / "med_config.json")
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise RewardError(f"model directory {path} lacks {absent}")
        return files
    if path.exists() or source.count("/") != 1:
        raise RewardError(f"model source {source!r} is neither a directory nor a hub id 'owner/name'")
    from huggingface_hub import hf_hub_download

    try:
        return tuple(
            Path(hf_hub_download(source, name, revision=revision, cache_dir=cache_dir))
            for name in (weights_name, "med_config.json")
        )
    except Exception as e:  # network, auth, missing file: all mean "no weights", say which
        raise RewardError(f"cannot fetch {weights_name} / med_config.json from hub repo {source!r}: {e}") from e


def load_blip_reward_model(
    source: str,
    weights_name: str,
    *,
    vision_heads: int | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BlipRewardModel:
    """Build the model from a published checkpoint, strictly, in eval mode.

    Args:
        source: local directory or hub id (see :func:`resolve_model_files`).
        weights_name: checkpoint file name in ``source``.
        vision_heads: ViT attention heads (default: width / 64).
        revision: hub revision.
        cache_dir: hub cache directory.
        device: where to put the model.
        dtype: parameter dtype (the MLP input is cast to float32 like the reference).

    Raises:
        RewardError: if files are missing or the checkpoint does not fit the architecture.
    """
    weights, med_path = resolve_model_files(source, weights_name, revision, cache_dir)
    try:
        med = json.loads(med_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RewardError(f"cannot read {med_path}: {e}") from e
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean the file is unusable
        raise RewardError(f"cannot load {weights} as a plain state dict (weights_only=True): {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(f"{weights} is not a plain state dict of tensors")
    model = BlipRewardModel(VisionSpec.from_state_dict(state, vision_heads), med)
    load_published_state_dict(model, state, str(weights))
    model = model.to(device=device, dtype=dtype)
    model.mlp.float()  # forward feeds the MLP float32 features, as the reference does
    return model.eval().requires_grad_(False)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model_and_tokenizer(
    source: str,
    weights_name: str,
    *,
    vision_heads: int | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    tokenizer_dir: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
):
    """Model (see :func:`load_blip_reward_model`) plus its validated tokenizer.

    Raises:
        RewardError: on any loading problem, an unknown dtype, or a tokenizer whose size differs
            from the checkpoint's word-embedding table.
    """
    from rewards.blip_preprocess import load_blip_tokenizer

    if dtype not in _DTYPES:
        raise RewardError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    tokenizer = load_blip_tokenizer(tokenizer_dir)
    model = load_blip_reward_model(
        source,
        weights_name,
        vision_heads=vision_heads,
        revision=revision,
        cache_dir=cache_dir,
        device=device,
        dtype=_DTYPES[dtype],
    )
    if model.text_encoder.config.vocab_size != len(tokenizer):
        raise RewardError(
            f"{source}: text vocab {model.text_encoder.config.vocab_size} != tokenizer size {len(tokenizer)}"
        )
    return model, tokenizer
