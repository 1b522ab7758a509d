"""HPSv2 / HPSv2.1: a global human-preference reward (Wu et al. 2023, "Human Preference Score v2").

Reference: tgxs002/HPSv2, ``hpsv2/img_score.py`` (``score``) and its open_clip fork
(``hpsv2/src/open_clip``). The model is open_clip ``ViT-H-14`` fine-tuned on HPD v2; the published
checkpoints ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (hub ``xswu/HPSv2``) are
``{"state_dict": {...}}`` in open_clip's key layout. Per image and its prompt::

    score = <f_img / |f_img|, f_txt / |f_txt|>        (a cosine: no logit_scale, no 100x)

Preprocessing is the fork's ``preprocess_val`` (``light_augmentation=True`` so
``resize_longest_max=True``), which letterboxes instead of cropping: the uint8 image becomes a float
tensor in [0, 1] (``ToTensor``), the LONGER side is resized to 224 with torchvision's tensor bicubic
(``round(side * 224 / long)``, antialiased as torchvision >= 0.17 does by default; no clamping), the
result is zero-padded to 224 x 224 (left/top get ``pad // 2``) and normalized with CLIP mean / std.
The reference skips the resize and the padding when the longer side is already 224, which breaks
on a non-square image; we pad it.

Text: open_clip's tokenizer (CLIP BPE, lower-cased, ``[sot] + tokens[:75] + [eot]``, 77 long) via
``rewards.clip_common.load_clip_tokenizer``. open_clip first runs ``ftfy.fix_text`` and
``html.unescape`` twice; we do the same (ftfy only if it is installed: without it, only text that
ftfy would repair, such as mojibake or curly quotes, tokenizes differently).

open_clip cannot be installed here (it pulls torchvision), so the checkpoint is converted to
transformers' ``CLIPModel`` by :func:`convert_open_clip_state_dict`; ``tests/rewards`` checks the
conversion against an independent re-implementation of open_clip's forward pass.

:meth:`HPSv2.score_tensor` is the same score on float images, differentiable w.r.t. the pixels (the direct reward
losses, learner.loss=draft): the letterbox's own ops from ToTensor on (:func:`letterbox_tensor`), the text side
without gradient.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewards.base import Reward, RewardError, RewardResult
from rewards.blip_preprocess import CLIP_MEAN, CLIP_STD
from rewards.clip_common import CONTEXT_LENGTH, EOT_ID, SOT_ID, load_clip_tokenizer, torch_dtype, unit

HUB_ID = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# open_clip ViT-H-14: vision width 1280 with head width 80, text width 1024 with 16 heads. Head
# counts are not recoverable from weight shapes, everything else is (see clip_config_from_open_clip).
VIT_H_VISION_HEADS, VIT_H_TEXT_HEADS = 16, 16

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_GLOBAL = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_NORMS = {
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "ln_final": "text_model.final_layer_norm",
}
# open_clip multiplies by these (x @ proj); nn.Linear stores the transpose.
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Deterministic buffers some open_clip versions saved; rebuilt by the model, so dropped.
_IGNORED = {"attn_mask", "visual.attn_mask"}


def convert_open_clip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip CLIP state dict (ViT image tower, built-in text tower) to ``CLIPModel`` keys.

    Fused attention ``attn.in_proj_weight`` (3D, D) / ``in_proj_bias`` (3D,) are split in order
    q, k, v; ``visual.proj`` (W, E) and ``text_projection`` (W, E) are transposed; LayerNorms,
    MLPs (``c_fc``/``c_proj`` -> ``fc1``/``fc2``) and embeddings are renamed.

    Raises:
        RewardError: listing every key that has no place in the layout.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _IGNORED:
            continue
        m = _BLOCK.match(key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[-1]  # weight / bias
                if value.shape[0] % 3:
                    raise RewardError(f"{key} has shape {tuple(value.shape)}: first dim not divisible by 3")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
                continue
            base, _, leaf = rest.rpartition(".")
            if base in _BLOCK_PARTS and leaf in ("weight", "bias"):
                out[f"{prefix}{_BLOCK_PARTS[base]}.{leaf}"] = value
                continue
        elif key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()
            continue
        else:
            base, _, leaf = key.rpartition(".")
            if base in _NORMS and leaf in ("weight", "bias"):
                out[f"{_NORMS[base]}.{leaf}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise RewardError(f"open_clip checkpoint has keys outside the ViT CLIP layout: {sorted(unknown)[:10]}")
    return out


def _n_blocks(state: Mapping[str, torch.Tensor], visual: bool) -> int:
    ids = {int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and bool(m.group(1)) == visual}
    return max(ids) + 1 if ids else 0


def clip_config_from_open_clip(
    state: Mapping[str, torch.Tensor], vision_heads: int = VIT_H_VISION_HEADS, text_heads: int = VIT_H_TEXT_HEADS
):
    """A ``CLIPConfig`` matching the open_clip weight shapes (GELU, LayerNorm eps 1e-5).

    Raises:
        RewardError: a required key is missing, or a width is not divisible by its head count.
    """
    from transformers import CLIPConfig

    need = [
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "logit_scale",
    ]
    absent = [k for k in need if k not in state]
    if absent:
        raise RewardError(f"open_clip checkpoint lacks {absent}: not an open_clip ViT CLIP state dict")
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vocab, t_width = state["token_embedding.weight"].shape
    for width, heads, tower in ((v_width, vision_heads, "vision"), (t_width, text_heads, "text")):
        if heads < 1 or width % heads:
            raise RewardError(f"{tower} width {width} is not divisible by {tower}_heads={heads}")
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5)
    vision = dict(
        hidden_size=int(v_width),
        num_attention_heads=vision_heads,
        patch_size=int(patch),
        image_size=int(grid * patch),
        num_hidden_layers=_n_blocks(state, visual=True),
        intermediate_size=int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        **common,
    )
    text = dict(
        hidden_size=int(t_width),
        num_attention_heads=text_heads,
        vocab_size=int(vocab),
        max_position_embeddings=int(state["positional_embedding"].shape[0]),
        num_hidden_layers=_n_blocks(state, visual=False),
        intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        bos_token_id=SOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        **common,
    )
    # eos_token_id != 2 makes CLIPTextTransformer pool the FIRST end-of-text token, which is
    # open_clip's argmax(ids) position (end-of-text has the largest id).
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(state["visual.proj"].shape[1]))


def load_open_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """Read an HPSv2 checkpoint (``{"state_dict": ...}`` or a bare state dict) with weights_only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean the file is unusable
        raise RewardError(f"cannot load {path} with torch.load(weights_only=True): {e}") from e
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(
            f"{path} is not an open_clip state dict (a mapping of tensors, optionally under 'state_dict')"
        )
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_clip_from_open_clip(
    state: Mapping[str, torch.Tensor],
    vision_heads: int = VIT_H_VISION_HEADS,
    text_heads: int = VIT_H_TEXT_HEADS,
    dtype: torch.dtype = torch.float32,
):
    """A ``CLIPModel`` holding exactly the open_clip weights (strict load), in eval mode."""
    from transformers import CLIPModel

    config = clip_config_from_open_clip(state, vision_heads, text_heads)
    converted = {k: v.to(dtype) for k, v in convert_open_clip_state_dict(state).items()}
    # Built on the meta device: a random init of ViT-H (~1e9 values) would take most of a minute.
    with torch.device("meta"):
        model = CLIPModel(config)
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        raise RewardError(f"open_clip weights do not fit the CLIP config derived from them: {e}") from e
    for module in model.modules():  # the non-persistent position_ids buffers are still on meta
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name != "position_ids":
                    raise RewardError(f"CLIPModel buffer {name!r} has no value after loading")
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval().requires_grad_(False)


def letterbox(image: np.ndarray, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """HPSv2's ``preprocess_val`` on one uint8 RGB image (H, W, 3) -> float32 (3, size, size)."""
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise RewardError(f"cannot preprocess an empty image of shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)  # ToTensor
    return letterbox_tensor(x, size, antialias)


def letterbox_tensor(x: torch.Tensor, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """:func:`letterbox` from ToTensor's output on: float (3, H, W) in [0, 1] -> (3, size, size), differentiable."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)  # Python round, as in ResizeMaxSize
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)[0]
    ph, pw = size - x.shape[1], size - x.shape[2]
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def clean_prompt(text: str) -> str:
    """open_clip's ``basic_clean`` before BPE: ftfy (when installed), html.unescape twice."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return html.unescape(html.unescape(text)).strip()


def resolve_checkpoint(source: str, version: str, revision: str | None, cache_dir: str | None) -> Path:
    """A checkpoint file, a directory holding ``CHECKPOINTS[version]``, or a hub id -> local file."""
    if version not in CHECKPOINTS:
        raise RewardError(f"HPSv2 options: version={version!r}: must be one of {sorted(CHECKPOINTS)}")
    name = CHECKPOINTS[version]
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / name).is_file():
            raise RewardError(f"HPSv2: {path} has no {name} (an open_clip ViT-H-14 state dict)")
        return path / name
    if path.exists() or source.count("/") != 1 or source.endswith((".pt", ".pth", ".bin")):
        raise RewardError(f"HPSv2: checkpoint {source!r} is not a file, a directory or a hub id 'owner/name'")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, name, revision=revision, cache_dir=cache_dir))
    except Exception as e:  # network, auth, missing file: all mean "no weights", say which
        raise RewardError(f"HPSv2: cannot fetch {name} from hub repo {source!r}: {e}") from e


class HPSv2(Reward):
    """HPSv2 / HPSv2.1 on uint8 images and their prompts.

    Args:
        checkpoint: a ``.pt`` file, a directory holding it, or a hub id (default ``xswu/HPSv2``).
        version: ``v2.1`` (default, the README's example) or ``v2.0``; picks the file name in a
            directory or hub repo. Scores of the two versions are not comparable.
        bpe_path: CLIP ``bpe_simple_vocab_16e6.txt.gz`` (default: the copy shipped with rlfh).
        vision_heads / text_heads: attention heads (ViT-H-14: 16 / 16).
        antialias: antialiased bicubic resize (torchvision >= 0.17 default; False: older torchvision).
        batch_size: images per forward pass. device: torch device. dtype: model dtype name.
        revision / cache_dir: hub revision and cache.

    Raises:
        RewardError: bad options, missing or malformed checkpoint, or a bad tokenizer file.
    """

    name = "hpsv2"
    region = "global"
    differentiable_score = True

    def __init__(
        self,
        checkpoint: str = HUB_ID,
        version: str = "v2.1",
        bpe_path: str | None = None,
        vision_heads: int = VIT_H_VISION_HEADS,
        text_heads: int = VIT_H_TEXT_HEADS,
        antialias: bool = True,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        cache_dir: str | None = None,
    ):
        if batch_size < 1:
            raise RewardError(f"HPSv2 options: batch_size={batch_size!r}: at least 1")
        self.batch_size, self.antialias = int(batch_size), bool(antialias)
        torch_type = torch_dtype(dtype, "HPSv2")
        self.tokenizer = load_clip_tokenizer(bpe_path)
        path = resolve_checkpoint(checkpoint, version, revision, cache_dir)
        state = load_open_clip_state(path)
        try:
            self.model = build_clip_from_open_clip(state, vision_heads, text_heads, torch_type).to(device)
        except RewardError as e:
            raise RewardError(f"HPSv2: {path}: {e}") from e
        if self.model.config.text_config.vocab_size != len(self.tokenizer):
            raise RewardError(
                f"HPSv2: {path} has a {self.model.config.text_config.vocab_size}-token text "
                f"embedding but the CLIP tokenizer has {len(self.tokenizer)} tokens"
            )
        self.image_size = self.model.config.vision_config.image_size

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """open_clip token ids (B, 77), padded with end-of-text (the text tower never sees padding)."""
        enc = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=CONTEXT_LENGTH,
            return_tensors="pt",
        )
        return enc.input_ids

    @torch.no_grad()
    def features(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text features, float32 (B, E) each."""
        p = next(self.model.parameters())
        img, txt = [], []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack(
                [letterbox(im, self.image_size, self.antialias) for im in images[i : i + self.batch_size]]
            )
            ids = self.tokenize(prompts[i : i + self.batch_size])
            out_i = self.model.get_image_features(pixel_values=pixels.to(p.device, p.dtype))
            out_t = self.model.get_text_features(input_ids=ids.to(p.device))
            img.append(unit(getattr(out_i, "pooler_output", out_i)))
            txt.append(unit(getattr(out_t, "pooler_output", out_t)))
        return torch.cat(img).cpu(), torch.cat(txt).cpu()

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The score of float images (B, 3, H, W) in [0, 1] (the letterbox's ops from ToTensor on, so equal to
        :meth:`score` on uint8-valued images), differentiable w.r.t. the pixels, and (B,) True."""
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise RewardError(
                f"{self.name}: images must be (B, 3, H, W) with one prompt each, got {tuple(images.shape)}"
            )
        p = next(self.model.parameters())
        pixels = torch.stack([letterbox_tensor(im.float(), self.image_size, self.antialias) for im in images])
        out_i = self.model.get_image_features(pixel_values=pixels.to(p.device, p.dtype))
        with torch.no_grad():
            out_t = self.model.get_text_features(input_ids=self.tokenize(prompts).to(p.device))
        img, txt = unit(getattr(out_i, "pooler_output", out_i)), unit(getattr(out_t, "pooler_output", out_t))
        scores = (img.float() * txt.float()).sum(-1).to(images.device)
        return scores, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        if len(images) == 0:
            return []
        img, txt = self.features(images, prompts)
        values = (img * txt).sum(-1).double().numpy()
        if not np.all(np.isfinite(values)):
            raise RewardError(f"{self.name}: the model returned non-finite scores {values.tolist()}")
        return [RewardResult(float(v)) for v in values]
