"""MediaPipe face and hand detectors (FairHuman's evaluation detectors, arXiv 2507.02714).

Both run MediaPipe's Tasks API on CPU with the TFLite models that
``python -m rewards.detectors.get_models`` extracts from the mediapipe 0.10.21 wheel:

* :class:`MediaPipeFaceDetector` (backend ``mediapipe_face``): BlazeFace through
  ``mediapipe.tasks.vision.FaceDetector``; confidence = the detection score.
* :class:`MediaPipeHandDetector` (backend ``mediapipe_hand``): ``HandLandmarker`` (palm detector +
  21-landmark model). The box is the extent of the 21 landmarks, clipped to the image;
  confidence = the handedness score (what FairHuman averages as its hand metric); label = the
  handedness ("Left"/"Right") as MediaPipe reports it. MediaPipe assumes a mirrored (selfie) image,
  so on an ordinary photo its "Left" is the person's right hand; the label is passed on unchanged.
* :class:`MediaPipePoseLandmarker`: ``PoseLandmarker`` (BlazePose detector + 33-landmark model, from
  MediaPipe Pose's models in that wheel): landmarks per person in the image's pixels with
  MediaPipe's visibility, what was found and nothing filled in (the HcP layer's pose prior,
  rlfh/data/pose_prior.py). Not a region detector: it returns points, not boxes.

Images are processed one at a time in IMAGE mode (no tracking between images of a batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rewards.base import Detection, RewardError, check_images
from rewards.detectors.get_models import FETCH_COMMAND, HAND_TASK, POSE_TASK, models_dir

FACE_MODELS = {
    "short_range": "face_detection_short_range.tflite",  # MediaPipe's default (model_selection=0)
    "full_range": "face_detection_full_range_sparse.tflite",
}
# The short-range graph's smallest SSD anchor, as a share of the letterboxed (square) input's side:
# min_scale of its anchors (mediapipe/modules/face_detection/face_detection_short_range.pbtxt).
SHORT_RANGE_MIN_SCALE = 0.1484375


def _model_path(directory: str | Path | None, filename: str) -> Path:
    path = models_dir(directory) / filename
    if not path.is_file():
        raise RewardError(
            f"MediaPipe model {path} is missing: run `{FETCH_COMMAND}` (add --dir {path.parent} "
            f"or set RLFH_MODELS_DIR for a non-default location)"
        )
    return path


def _import_mediapipe() -> Any:
    try:
        import mediapipe
        from mediapipe.tasks.python import BaseOptions, vision
    except ImportError as e:
        raise RewardError(f"the MediaPipe detectors need the 'detect' extra (pip install -e '.[detect]'): {e}") from e
    return mediapipe, BaseOptions, vision


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise RewardError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class _TaskDetector:
    """Shared plumbing around one MediaPipe Tasks object."""

    region = ""
    _task: Any = None

    def close(self) -> None:
        """Release the MediaPipe graph; safe to call twice.

        Call it (or use the detector as a context manager) when done: mediapipe 1.2.2's own
        ``__del__`` at interpreter exit runs after its worker thread is gone and prints an ignored
        ``TypeError``; closing earlier avoids that noise. An ``atexit`` hook cannot, since atexit
        runs after the thread pools have shut down.
        """
        if self._task is not None:
            self._task.close()
            self._task = None

    def __enter__(self) -> "_TaskDetector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mp_image(self, image: np.ndarray) -> Any:
        return self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        """Detect in a batch.

        Args:
            images: (B, H, W, 3) uint8 RGB.

        Returns:
            One list of :class:`Detection` per image, boxes in that image's pixels.
        """
        images = check_images(images)
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        raise NotImplementedError


class MediaPipeFaceDetector(_TaskDetector):
    """BlazeFace face detector.

    Args:
        models_dir: directory holding the ``.tflite`` files (default: see ``get_models.models_dir``).
        model: ``"short_range"`` (MediaPipe's default, faces within about 2 m / large in frame) or
            ``"full_range"``.
        min_confidence: detector score threshold (MediaPipe's default 0.5).
        nms_threshold: suppression IoU threshold (MediaPipe's default 0.3).

    Raises:
        RewardError: unknown model name, bad thresholds, model file missing, mediapipe not installed.
    """

    region = "face"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        model: str = "short_range",
        min_confidence: float = 0.5,
        nms_threshold: float = 0.3,
    ):
        if model not in FACE_MODELS:
            raise RewardError(f"MediaPipe face model {model!r} is unknown; choose one of {sorted(FACE_MODELS)}")
        path = _model_path(models_dir, FACE_MODELS[model])
        self._mp, BaseOptions, vision = _import_mediapipe()
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=_check_unit("min_confidence", min_confidence),
            min_suppression_threshold=_check_unit("nms_threshold", nms_threshold),
        )
        self.model = model
        self._task = vision.FaceDetector.create_from_options(options)

    def smallest_region_px(self, height: int, width: int) -> float | None:
        """The side of the smallest face the model has an anchor for in an image of this size (the
        image is letterboxed into a square, so it scales with the longer side); None for full range."""
        return SHORT_RANGE_MIN_SCALE * max(height, width) if self.model == "short_range" else None

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        out = []
        for det in self._task.detect(self._mp_image(image)).detections:
            bb = det.bounding_box  # integer pixels, may reach past the border
            x1, y1 = max(0.0, float(bb.origin_x)), max(0.0, float(bb.origin_y))
            x2, y2 = min(float(w), float(bb.origin_x + bb.width)), min(float(h), float(bb.origin_y + bb.height))
            if x2 <= x1 or y2 <= y1:
                continue
            out.append(Detection((x1, y1, x2, y2), float(det.categories[0].score)))
        return out


class MediaPipeHandDetector(_TaskDetector):
    """Hand detector from MediaPipe's HandLandmarker.

    Args:
        models_dir: directory holding ``hand_landmarker.task``.
        num_hands: most hands reported per image. MediaPipe Hands' default (and FairHuman's) is 2,
            but the Tasks graph keeps only the ``num_hands`` best palm candidates *before* the
            landmark model's presence check, so one rejected false palm hides a real hand: on
            insightface's t1.jpg, 2 finds one of the two raised hands and 4 finds both. Default 4.
        min_detection_confidence: palm detector threshold (MediaPipe's default 0.5).
        min_presence_confidence: landmark model's hand presence threshold (default 0.5).

    Raises:
        RewardError: bad options, model file missing, mediapipe not installed.
    """

    region = "hand"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        num_hands: int = 4,
        min_detection_confidence: float = 0.5,
        min_presence_confidence: float = 0.5,
    ):
        if not isinstance(num_hands, int) or num_hands < 1:
            raise RewardError(f"num_hands must be a positive integer, got {num_hands!r}")
        path = _model_path(models_dir, HAND_TASK)
        self._mp, BaseOptions, vision = _import_mediapipe()
        options = vision.HandLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            num_hands=num_hands,
            min_hand_detection_confidence=_check_unit("min_detection_confidence", min_detection_confidence),
            min_hand_presence_confidence=_check_unit("min_presence_confidence", min_presence_confidence),
        )
        self._task = vision.HandLandmarker.create_from_options(options)

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        result = self._task.detect(self._mp_image(image))
        out = []
        for landmarks, handedness in zip(result.hand_landmarks, result.handedness):
            # Landmarks are normalized to [0, 1] but may fall outside the frame: clip the extent.
            xs = np.clip([p.x * w for p in landmarks], 0.0, w)
            ys = np.clip([p.y * h for p in landmarks], 0.0, h)
            box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            top = handedness[0]
            out.append(Detection(box, float(top.score), top.category_name))
        return out


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

    def __init__(
        self,
        models_dir: str | Path | None = None,
        num_poses: int = 4,
        min_detection_confidence: float = 0.5,
        min_presence_confidence: float = 0.5,
    ):
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
            out.append(
                np.array(
                    [
                        [(p.x * w, p.y * h, p.visibility if p.visibility is not None else 1.0) for p in person]
                        for person in people
                    ],
                    np.float32,
                ).reshape(len(people), NUM_LANDMARKS, 3)
            )
        return out
