"""PickScore: a global human-preference reward (Kirstain et al. 2023, "Pick-a-Pic", NeurIPS).

Reference: yuvalkirstain/PickScore, README "Inference with PickScore". The model is a CLIP ViT-H/14
fine-tuned on Pick-a-Pic (hub ``yuvalkirstain/PickScore_v1``, ``CLIPModel`` format); its inputs
come from the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Per image and its prompt::

    e_img = get_image_features(processor(image)),  e_txt = get_text_features(tokenize(prompt))
    score = logit_scale.exp() * <e_img / |e_img|, e_txt / |e_txt|>      (logit_scale.exp() ~ 100)

Preprocessing is ``CLIPImageProcessorPil``, transformers 5's PIL/numpy backend, which is the math
of the ``CLIPImageProcessor`` the reference ran (transformers 4): shorter side to 224 with PIL
bicubic (longer side ``int(224 * long / short)``), center crop 224 with top ``(h - 224) // 2``,
``/ 255``, CLIP mean / std. It is loaded explicitly so that installing torchvision does not switch
it to the tensor backend. Text: CLIP BPE, truncated to 77 tokens; the text tower pools the first
end-of-text token under a causal mask, so padding does not change a prompt's embedding.

The reference scores several images against ONE prompt; the reward contract gives each image its
own prompt, so this takes the diagonal of that computation. ``info["cosine"]`` keeps the cosine.

:meth:`PickScore.score_tensor` is the same score on float images, differentiable w.r.t. the pixels (the direct
reward losses, learner.loss=draft): :func:`processor_tensor` runs the processor's steps in torch, Pillow's
fixed-point bicubic in the forward pass (``rewards.blip_preprocess.pil_bicubic_tensor``, bit for bit on
uint8-valued images, a smooth gradient), the floor-centred crop, ``rescale_factor`` and mean / std, so on
uint8-valued images it equals :meth:`PickScore.score` up to float summation order (below 1e-4 on the tiny
weights, ``tests/rewards/test_global_rewards.py``). The text side runs without gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rewards.base import Reward, RewardError, RewardResult
from rewards.blip_preprocess import pil_bicubic_tensor, resized_size
from rewards.clip_common import CONTEXT_LENGTH, check_clip_tokenizer, load_hf_model, torch_dtype, unit

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_processor(source: str, revision: str | None = None, cache_dir: str | None = None, what: str = "PickScore"):
    """The PIL CLIP image processor and the CLIP tokenizer of ``source`` (directory or hub id);
    ``what`` names the reward in errors.

    Raises:
        RewardError: files missing or unreadable, or a tokenizer that is not CLIP's BPE.
    """
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    local = Path(source).expanduser().is_dir()
    kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=local)
    layout = "preprocessor_config.json plus tokenizer.json or vocab.json + merges.txt"
    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(source, **kw)
    except Exception as e:  # OSError / ValueError / JSON errors: all mean "no usable processor"
        raise RewardError(f"{what}: cannot load the image processor from {source!r} (expected {layout}): {e}") from e
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, **kw)
    except Exception as e:
        raise RewardError(f"{what}: cannot load the tokenizer from {source!r} (expected {layout}): {e}") from e
    check_clip_tokenizer(tokenizer, source)
    return image_processor, tokenizer


def processor_tensor(image: torch.Tensor, processor) -> torch.Tensor:
    """``CLIPImageProcessorPil`` of one float image (3, H, W) in [0, 1], differentiable: -> (3, crop_h, crop_w).

    Raises:
        RewardError: a processor setting the torch path does not reproduce (a resample other than bicubic, a
            size without ``shortest_edge`` or ``height``/``width``, a crop larger than the resized image).
    """
    x = image * 255.0  # the processor's PIL resize sees the uint8 image
    if processor.do_resize:
        if int(processor.resample) != 3:
            raise RewardError(f"processor resample={processor.resample!r}: the differentiable path is bicubic (3)")
        size = processor.size
        if size.shortest_edge and not size.longest_edge:
            oh, ow = resized_size(*x.shape[-2:], size.shortest_edge)
        elif size.height and size.width:
            oh, ow = size.height, size.width
        else:
            raise RewardError(f"processor size={dict(size)}: the differentiable path takes shortest_edge or height")
        x = pil_bicubic_tensor(x, oh, ow)
    if processor.do_center_crop:
        ch, cw = processor.crop_size.height, processor.crop_size.width
        h, w = x.shape[-2:]
        if ch > h or cw > w:
            raise RewardError(f"processor crop_size {ch}x{cw} is larger than the resized image {h}x{w}")
        top, left = (h - ch) // 2, (w - cw) // 2  # transformers' center_crop: floor, not torchvision's round
        x = x[:, top : top + ch, left : left + cw]
    x = x * processor.rescale_factor if processor.do_rescale else x
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        x = (x - mean) / std
    return x


class PickScore(Reward):
    """PickScore v1 on uint8 images and their prompts.

    Args:
        model: local ``CLIPModel`` directory or hub id (default ``yuvalkirstain/PickScore_v1``).
        processor: local directory or hub id holding the processor files (default
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); may be the model directory.
        batch_size: images per forward pass.
        device: torch device. dtype: ``float32``, ``float16`` or ``bfloat16``.
        revision: hub revision of ``model``. cache_dir: hub cache.

    Raises:
        RewardError: bad options, missing weights or processor files, a degenerate tokenizer, or a
            processor whose crop size differs from the model's input size.
    """

    name = "pickscore"
    region = "global"
    title = "PickScore"  # in error messages (CLIPScore shares this loader)
    differentiable_score = True

    def __init__(
        self,
        model: str = MODEL_ID,
        processor: str = PROCESSOR_ID,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        cache_dir: str | None = None,
    ):
        from transformers import CLIPModel

        if batch_size < 1:
            raise RewardError(f"{self.title} options: batch_size={batch_size!r}: at least 1")
        self.batch_size = int(batch_size)
        self.image_processor, self.tokenizer = load_processor(processor, cache_dir=cache_dir, what=self.title)
        self.model = load_hf_model(
            CLIPModel,
            model,
            self.title,
            revision=revision,
            cache_dir=cache_dir,
            dtype=torch_dtype(dtype, self.title),
            device=device,
        )
        crop = self.image_processor.crop_size
        size = self.model.config.vision_config.image_size
        if not self.image_processor.do_center_crop or (crop["height"], crop["width"]) != (size, size):
            raise RewardError(
                f"{self.title}: processor {processor!r} crops to {crop} but the model takes {size}x{size}"
            )

    @torch.no_grad()
    def embeddings(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text embeddings, float32 (B, D) each."""
        p = next(self.model.parameters())
        img, txt = [], []
        for i in range(0, len(images), self.batch_size):
            pixels = self.image_processor(
                images=list(images[i : i + self.batch_size]), return_tensors="pt"
            ).pixel_values
            enc = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=CONTEXT_LENGTH,
                return_tensors="pt",
            )
            img.append(unit(_pooled(self.model.get_image_features(pixel_values=pixels.to(p.device, p.dtype)))))
            txt.append(
                unit(
                    _pooled(
                        self.model.get_text_features(
                            input_ids=enc.input_ids.to(p.device), attention_mask=enc.attention_mask.to(p.device)
                        )
                    )
                )
            )
        return torch.cat(img).cpu(), torch.cat(txt).cpu()

    def cosine_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosines (B,) of float images (B, 3, H, W) in [0, 1] with their prompts, differentiable w.r.t. the
        pixels (the text side without gradient)."""
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise RewardError(
                f"{self.name}: images must be (B, 3, H, W) with one prompt each, got {tuple(images.shape)}"
            )
        p = next(self.model.parameters())
        pixels = torch.stack([processor_tensor(im.float(), self.image_processor) for im in images])
        img = unit(_pooled(self.model.get_image_features(pixel_values=pixels.to(p.device, p.dtype))))
        with torch.no_grad():
            enc = self.tokenizer(
                list(prompts), padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt"
            )
            ids, mask = enc.input_ids.to(p.device), enc.attention_mask.to(p.device)
            txt = unit(_pooled(self.model.get_text_features(input_ids=ids, attention_mask=mask)))
        return (img * txt).sum(-1).to(images.device)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`score` of float images (B, 3, H, W) in [0, 1], differentiable w.r.t. the pixels, and (B,) True."""
        scale = self.model.logit_scale.detach().float().exp()
        scores = scale.to(images.device) * self.cosine_tensor(images, prompts)
        return scores, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        if len(images) == 0:
            return []
        img, txt = self.embeddings(images, prompts)
        cos = (img * txt).sum(-1).double()
        scale = float(self.model.logit_scale.detach().float().exp())
        values = (scale * cos).numpy()
        if not np.all(np.isfinite(values)):
            raise RewardError(f"{self.name}: the model returned non-finite scores {values.tolist()}")
        return [RewardResult(float(v), info={"cosine": float(c)}) for v, c in zip(values, cos.numpy())]
