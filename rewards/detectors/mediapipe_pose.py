"""MediaPipe Pose landmarks: BlazePose's 33 body landmarks per person (the HcP layer's pose prior).

Runs MediaPipe Tasks' ``PoseLandmarker`` on CPU in IMAGE mode with ``pose_landmarker.task``, which
``python -m rewards.detectors.get_models`` assembles from the mediapipe 0.10.21 wheel's pose models
(MediaPipe Pose's detector and full landmark model). Landmarks are returned in the image's pixels
with MediaPipe's visibility score; they are what the model found, never filled in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewards.base import RewardError, check_images
from rewards.detectors.get_models import POSE_TASK
from rewards.detectors.mediapipe_backend import _check_unit, _import_mediapipe, _model_path, _TaskDetector

NUM_LANDMARKS = 33  # BlazePose topology: 0 nose .. 10 mouth, 11-22 arms and hands, 23-32 legs and feet


class MediaPipePoseLandmarker(_TaskDetector):
    """Pose landmarks of up to ``num_poses`` people per image.

    Args:
        models_dir: directory holding ``pose_landmarker.task`` (default: see ``get_models.models_dir``).
        num_poses: most people reported per image.
        min_detection_confidence: pose detector threshold (MediaPipe's default 0.5).
        min_presence_confidence: landmark model's pose presence threshold (default 0.5).

    Raises:
        RewardError: bad options, model file missing, mediapipe not installed.
    """

    region = "pose"

    def __init__(self, models_dir: str | Path | None = None, num_poses: int = 4,
                 min_detection_confidence: float = 0.5, min_presence_confidence: float = 0.5):
        if not isinstance(num_poses, int) or num_poses < 1:
            raise RewardError(f"num_poses must be a positive integer, got {num_poses!r}")
        path = _model_path(models_dir, POSE_TASK)
        self._mp, BaseOptions, vision = _import_mediapipe()
        options = vision.PoseLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            num_poses=num_poses,
            min_pose_detection_confidence=_check_unit("min_detection_confidence", min_detection_confidence),
            min_pose_presence_confidence=_check_unit("min_presence_confidence", min_presence_confidence),
        )
        self._task = vision.PoseLandmarker.create_from_options(options)

    def landmarks(self, images: np.ndarray) -> list[np.ndarray]:
        """Pose landmarks per image.

        Args:
            images: (B, H, W, 3) uint8 RGB.

        Returns:
            One (P, 33, 3) float32 array per image: x, y in that image's pixels (may fall outside it)
            and visibility in [0, 1]; P = 0 when no person was found.
        """
        images = check_images(images)
        out = []
        for image in images:
            h, w = image.shape[:2]
            people = self._task.detect(self._mp_image(image)).pose_landmarks
            out.append(np.array([[(p.x * w, p.y * h, p.visibility if p.visibility is not None else 1.0) for p in person]
                                 for person in people], np.float32).reshape(len(people), NUM_LANDMARKS, 3))
        return out
