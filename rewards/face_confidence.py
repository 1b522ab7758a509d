"""Face detection confidence reward: FairHuman's face metric (arXiv 2507.02714).

FairHuman reports the mean MediaPipe face detection score (BlazeFace short range, default options;
reference: PRIS-CV/FairHuman ``evaluate/face_confidence.py``) over every detected face. Per image we
aggregate the scores of that image's faces (``mean`` default, ``min`` / ``max`` selectable); an
image with no face gets ``RewardResult.missing("no face detected")`` with ``regions={"face": []}``.
"""

from __future__ import annotations

from typing import Any

from rewards.detectors.base import Detector
from rewards.hand import DetectionConfidence


class FaceDetectionConfidence(DetectionConfidence):
    """FairHuman's face metric: MediaPipe face detection score, aggregated per image.

    Args:
        detector: backend name or instance (default ``mediapipe_face``).
        detector_options: options for the backend, e.g. ``{"models_dir": ..., "model": "short_range"}``.
        aggregate: ``mean`` (default), ``min`` or ``max``.
        min_confidence: ignore faces with a lower score (the detector itself keeps >= 0.5).
    """

    name = "face_detection_confidence"
    region = "face"
    what = "face"

    def __init__(
        self,
        detector: Detector | str = "mediapipe_face",
        detector_options: dict[str, Any] | None = None,
        aggregate: str = "mean",
        min_confidence: float = 0.0,
    ):
        super().__init__(detector, detector_options, aggregate, min_confidence)
