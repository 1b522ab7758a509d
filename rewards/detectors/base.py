"""The detector contract: a batch of images in, per-image detections out.

    detector.detect(images: np.ndarray (B, H, W, 3) uint8 RGB) -> list[list[Detection]]

Boxes are (x1, y1, x2, y2) in pixels of the given image. Detectors return every detection above
their own backend threshold with its confidence; callers (FaceScore's >= 0.9 rule, the hand reward)
filter by confidence themselves, so the rule lives next to the method that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, Sequence

import numpy as np

from rewards.base import Detection, RewardError

# backend name -> "module:factory"; filled in by the backend modules' authors.
BACKENDS: dict[str, str] = {
    "mediapipe_face": "rewards.detectors.mediapipe_backend:MediaPipeFaceDetector",
    "mediapipe_hand": "rewards.detectors.mediapipe_backend:MediaPipeHandDetector",
    "insightface": "rewards.detectors.insightface_backend:InsightFaceDetector",
    "retinaface": "rewards.detectors.retinaface_backend:RetinaFaceDetector",
}


class Detector(Protocol):
    region: str  # "face" or "hand"

    def detect(self, images: np.ndarray) -> list[list[Detection]]: ...

    # Optional: ``close()`` releases what the detector holds outside Python (a MediaPipe graph; see
    # :func:`close_detector`); ``smallest_region_px(height, width)`` the side in pixels of the
    # smallest region it can find in an image of that size, when the model states one.


def close_detector(detector: Any) -> None:
    """``detector.close()`` where it has one. A detector's owner (the reward that built it from a
    backend name, the command that built it) calls this when done, rather than leaving it to a
    ``__del__`` at interpreter exit, which for MediaPipe runs after its worker thread is gone."""
    close = getattr(detector, "close", None)
    if callable(close):
        close()


class FixedBoxes:
    """Detector that returns given boxes: for scoring known regions and for tests."""

    def __init__(self, boxes: Sequence[Sequence[Detection]], region: str = "face"):
        self.boxes = [list(b) for b in boxes]
        self.region = region

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        if len(images) != len(self.boxes):
            raise RewardError(f"FixedBoxes holds boxes for {len(self.boxes)} images, got {len(images)}")
        return [list(b) for b in self.boxes]


def build_detector(backend: str, **options: Any) -> Detector:
    """Build a detector by backend name (see ``BACKENDS``) or ``module:callable``."""
    path = BACKENDS.get(backend, backend)
    if ":" not in path:
        raise RewardError(f"unknown detector backend {backend!r}; known: {sorted(BACKENDS)} or 'module:callable'")
    module_name, attr = path.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"detector backend {backend!r} is not available: {e}") from e
    return factory(**options)
