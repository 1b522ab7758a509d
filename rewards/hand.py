"""Hand confidence reward: FairHuman's hand metric (arXiv 2507.02714).

FairHuman scores hands with MediaPipe Hands and reports the mean *handedness score* over every
detected hand (reference: PRIS-CV/FairHuman ``evaluate/hand_confidence.py``). Per image we take,
for each hand MediaPipe's HandLandmarker reports, its handedness score (the classifier confidence
that the crop is a left or a right hand: high for a well-formed hand, low for a malformed one),
and aggregate per image with ``mean`` (default), ``min`` or ``max``. The landmark model's hand
presence score is not exposed by the Tasks API (``presence`` is None); it only gates detections
through ``min_presence_confidence``.

An image with no hand gets ``RewardResult.missing("no hand detected")``, never a 0, and still
reports ``regions={"hand": []}``. Regions carry every detected hand (box = landmark extent).

:class:`DetectionConfidence` is the shared implementation; ``rewards.face_confidence`` reuses it
for the face metric.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from rewards.base import Reward, RewardError, RewardResult
from rewards.detectors.base import Detector, build_detector, close_detector

AGGREGATES: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": lambda xs: float(np.mean(xs)),
    "min": lambda xs: float(np.min(xs)),
    "max": lambda xs: float(np.max(xs)),
}


class DetectionConfidence(Reward):
    """Reward = aggregate of a detector's confidences on one region.

    Args:
        detector: a :class:`Detector` instance, or a backend name for ``build_detector``.
        detector_options: keyword arguments for ``build_detector`` (only with a backend name).
        aggregate: ``mean``, ``min`` or ``max`` over the image's detections.
        min_confidence: detections below this are ignored (0 keeps all the detector returned).

    Raises:
        RewardError: unknown aggregate, bad threshold, detector of another region, detector build errors.
    """

    name = "detection_confidence"
    region = ""
    what = "object"  # for the missing reason: "no <what> detected"

    def __init__(
        self,
        detector: Detector | str,
        detector_options: dict[str, Any] | None = None,
        aggregate: str = "mean",
        min_confidence: float = 0.0,
    ):
        if aggregate not in AGGREGATES:
            raise RewardError(f"{self.name}: aggregate {aggregate!r} is unknown; choose one of {sorted(AGGREGATES)}")
        if not 0.0 <= min_confidence <= 1.0:
            raise RewardError(f"{self.name}: min_confidence must be in [0, 1], got {min_confidence!r}")
        self._owns_detector = isinstance(detector, str)  # a detector given as an instance is its giver's to close
        if isinstance(detector, str):
            detector = build_detector(detector, **(detector_options or {}))
        elif detector_options:
            raise RewardError(f"{self.name}: detector_options only apply when detector is a backend name")
        if getattr(detector, "region", self.region) != self.region:
            raise RewardError(f"{self.name}: needs a {self.region!r} detector, got one for {detector.region!r}")
        self.detector = detector
        self.aggregate = aggregate
        self.min_confidence = float(min_confidence)

    def close(self) -> None:
        if self._owns_detector:
            close_detector(self.detector)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        per_image = self.detector.detect(images)
        if len(per_image) != len(images):
            raise RewardError(f"{self.name}: detector returned {len(per_image)} results for {len(images)} images")
        results = []
        for dets in per_image:
            kept = [d for d in dets if d.confidence >= self.min_confidence]
            regions = {self.region: kept}
            if not kept:
                results.append(RewardResult.missing(f"no {self.what} detected", regions=regions))
                continue
            scores = [d.confidence for d in kept]
            results.append(
                RewardResult(
                    AGGREGATES[self.aggregate](scores),
                    regions=regions,
                    info={f"{self.what}_scores": scores, f"num_{self.what}s": len(kept)},
                )
            )
        return results


class HandConfidence(DetectionConfidence):
    """FairHuman's hand metric: handedness score per hand, aggregated per image.

    Args:
        detector: backend name or instance (default ``mediapipe_hand``).
        detector_options: options for the backend, e.g. ``{"models_dir": ..., "num_hands": 4}``.
        aggregate: ``mean`` (default), ``min`` or ``max``.
        min_confidence: ignore hands with a lower handedness score.
    """

    name = "hand_confidence"
    region = "hand"
    what = "hand"

    def __init__(
        self,
        detector: Detector | str = "mediapipe_hand",
        detector_options: dict[str, Any] | None = None,
        aggregate: str = "mean",
        min_confidence: float = 0.0,
    ):
        super().__init__(detector, detector_options, aggregate, min_confidence)
