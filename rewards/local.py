"""LocalIR and LocalHPS: ImageReward and HPSv2 scored on face crops, FaceScore's baselines (Liao et
al. 2024, arXiv 2406.17100, Tables 2 and 6: the general preference models applied to the face
region only, to show that a face-specific scorer is needed).

Per image, exactly FaceScore's pipeline (:class:`rewards.facescore.FaceScore`) with the scorer
swapped:

1. detect the regions (default: faces with RetinaFace, as FaceScore); keep those with confidence
   >= ``threshold`` (0.9);
2. crop each box widened by 1 px per side (:func:`rewards.facescore.region_crops`);
3. score every crop with the wrapped reward: ImageReward's normalized value (``local_ir``), or the
   HPSv2 cosine (``local_hps``), each with its own preprocessing of the crop;
4. aggregate an image's crop scores with ``mean`` (default), ``min`` or ``area_weighted``.

The text the wrapped reward reads with a crop: the paper does not say; ``text: region`` (default)
gives FaceScore's fixed "A face." (``rewards.base.REGION_PROMPTS``), so that LocalIR differs from
FaceScore only in its weights; ``text: image`` gives each image's own prompt. No scored region
gives an explicit missing result; ``info["face_scores"]`` holds one score per detection (None: not
scored), as FaceScore's.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rewards.base import REGION_PROMPTS, Reward, RewardError, RewardResult
from rewards.detectors.base import Detector, build_detector, close_detector
from rewards.facescore import AGGREGATIONS, CONFIDENCE_THRESHOLD, DEFAULT_DETECTORS, region_crops, region_results

TEXTS = ("region", "image")


class LocalReward(Reward):
    """A global image-text reward scored on the crops of one region's detections.

    Args:
        inner: the wrapped reward; its ``score`` is called on a list of crops of any sizes.
        detector: a :class:`Detector` or a backend name (default: the region's, RetinaFace for faces).
        detector_options: keyword arguments for ``build_detector`` (only with a backend name).
        threshold: minimum detector confidence of a scored region (FaceScore: 0.9).
        aggregation: ``mean``, ``min`` or ``area_weighted`` over an image's scored crops.
        region: the region name (``face``, ``hand``, ...).
        text: ``region`` (the fixed region text, "A face.") or ``image`` (each image's prompt).

    Raises:
        RewardError: bad options, or a detector of another region.
    """

    region = "face"

    def __init__(
        self,
        inner: Reward,
        detector: str | Detector | None = None,
        detector_options: dict[str, Any] | None = None,
        threshold: float = CONFIDENCE_THRESHOLD,
        aggregation: str = "mean",
        region: str = "face",
        text: str = "region",
    ):
        problems = []
        if text not in TEXTS:
            problems.append(f"text={text!r}: use one of {TEXTS}")
        elif text == "region" and region not in REGION_PROMPTS:
            problems.append(f"region={region!r} has no fixed text ({REGION_PROMPTS}): use text='image'")
        if detector is None and region not in DEFAULT_DETECTORS:
            problems.append(f"region={region!r} has no default detector ({DEFAULT_DETECTORS}): give detector=")
        if aggregation not in AGGREGATIONS:
            problems.append(f"aggregation={aggregation!r}: use one of {AGGREGATIONS}")
        if not 0.0 <= threshold <= 1.0:
            problems.append(f"threshold={threshold!r}: a confidence in [0, 1]")
        if detector_options and not isinstance(detector, str):
            problems.append("detector_options are only for a detector given by backend name")
        if problems:
            raise RewardError(f"{self.name} options: " + "; ".join(problems))
        detector = DEFAULT_DETECTORS[region] if detector is None else detector
        self._owns_detector = isinstance(detector, str)
        self.detector = build_detector(detector, **(detector_options or {})) if isinstance(detector, str) else detector
        if getattr(self.detector, "region", "face") != region:
            raise RewardError(
                f"{self.name} on region {region!r} needs a {region} detector, got {self.detector.region!r}"
            )
        self.inner, self.region, self.text = inner, region, text
        self.threshold, self.aggregation = float(threshold), aggregation
        self.reads_sources = bool(getattr(inner, "reads_sources", False))

    def close(self) -> None:
        if self._owns_detector:
            close_detector(self.detector)

    def score(
        self, images: np.ndarray, prompts: Sequence[str], sources: Sequence[Any] | None = None
    ) -> list[RewardResult]:
        detections = self.detector.detect(images)
        if len(detections) != len(images):
            raise RewardError(f"{self.name}: detector returned {len(detections)} lists for {len(images)} images")
        crops, owner, areas = region_crops(images, detections, self.threshold, sources)
        texts = [REGION_PROMPTS[self.region] if self.text == "region" else prompts[b] for b, _ in owner]
        scores = [r.value for r in self.inner.score(crops, texts)] if crops else []
        if any(v is None for v in scores):
            raise RewardError(f"{self.name}: the wrapped {self.inner.name} gave no value for a crop")
        return region_results(detections, owner, scores, areas, self.region, self.threshold, self.aggregation)


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    local_keys = ("detector", "detector_options", "threshold", "aggregation", "region", "text")
    return {k: v for k, v in options.items() if k in local_keys}, {
        k: v for k, v in options.items() if k not in local_keys
    }


class LocalIR(LocalReward):
    """ImageReward on region crops (FaceScore's LocalIR). Options: :class:`LocalReward`'s, the rest
    go to :class:`rewards.imagereward.ImageReward` (``model``, ``batch_size``, ``device``, ...)."""

    name = "local_ir"

    def __init__(self, **options: Any):
        from rewards.imagereward import ImageReward

        local, inner = _split(options)
        super().__init__(ImageReward(**inner), **local)


class LocalHPS(LocalReward):
    """HPSv2 on region crops (FaceScore's LocalHPS). Options: :class:`LocalReward`'s, the rest go
    to :class:`rewards.hpsv2.HPSv2` (``checkpoint``, ``version``, ``batch_size``, ...)."""

    name = "local_hps"

    def __init__(self, **options: Any):
        from rewards.hpsv2 import HPSv2

        local, inner = _split(options)
        super().__init__(HPSv2(**inner), **local)
