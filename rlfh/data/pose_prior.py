"""Pose priors for the HcP layer (rlfh/losses/hcp.py): MediaPipe Pose landmarks rendered as heatmaps.

For an image (H, W) and the landmarks of its people (those with visibility >= ``min_visibility``):

    heat(x, y) = max over landmarks k of exp(-((x - x_k)^2 + (y - y_k)^2) / (2 sigma^2)),  at pixel centers
    sigma      = ``data.hcp_priors.sigma`` * min(H, W)   (default 0.03: 31 px at 1024 px, 2 px at 64 px)
    prior      = heat averaged over 8x8 blocks -> (1, H/8, W/8), the latent grid

An image in which no person (or no visible landmark) was found gets an all-zero prior, which the
loss skips. Batches carry the priors in fields of their own (``PairBatch.priors_w`` / ``priors_l``,
``SampleBatch.priors``), selected with the rows as the face / hand masks are; the per-round source
is rlfh/data/sources/hcp_priors.py.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LATENT_SCALE = 8


def pose_heatmap(
    people: np.ndarray, image_hw: tuple[int, int], sigma: float, min_visibility: float = 0.5
) -> np.ndarray:
    """The latent-size prior of one image.

    Args:
        people: (P, K, 3) landmarks: x, y in the image's pixels, visibility.
        image_hw: (H, W), multiples of 8.
        sigma: Gaussian width as a fraction of min(H, W).
        min_visibility: landmarks below this visibility are left out.

    Returns:
        (1, H/8, W/8) float32 in [0, 1]; zeros without a visible landmark.
    """
    h, w = image_hw
    points = people.reshape(-1, 3)
    points = points[points[:, 2] >= min_visibility]
    heat = np.zeros((h, w), np.float32)
    if len(points):
        s = sigma * min(h, w)
        ys, xs = np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5
        for x, y, _ in points:
            gx = np.exp(-((xs - x) ** 2) / (2 * s * s))
            gy = np.exp(-((ys - y) ** 2) / (2 * s * s))
            np.maximum(heat, gy[:, None] * gx[None, :], out=heat)
    return heat.reshape(h // LATENT_SCALE, LATENT_SCALE, w // LATENT_SCALE, LATENT_SCALE).mean((1, 3))[None]


class PosePriors:
    """Images -> latent-size pose priors with MediaPipe Pose (rewards.detectors.mediapipe_backend.py).

    Args:
        sigma, min_visibility: see :func:`pose_heatmap`.
        landmarker: images (B, H, W, 3) uint8 -> list of (P, 33, 3); default MediaPipe Pose, built on first use.
    """

    def __init__(
        self,
        sigma: float,
        min_visibility: float = 0.5,
        landmarker: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    ):
        self.sigma, self.min_visibility = sigma, min_visibility
        self._landmarker = landmarker
        self._detector = None  # the MediaPipe graph this object built, released by close()

    def close(self) -> None:
        """Release the MediaPipe graph (before interpreter exit: see rewards/detectors/mediapipe_backend.py)."""
        if self._detector is not None:
            self._detector.close()
            self._detector = self._landmarker = None

    def __enter__(self) -> "PosePriors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, 1, H/8, W/8) float32 priors."""
        if self._landmarker is None:
            from rewards.detectors.mediapipe_backend import MediaPipePoseLandmarker

            self._detector = MediaPipePoseLandmarker()
            self._landmarker = self._detector.landmarks
        images = np.asarray(images)
        found = self._landmarker(images)
        hw = images.shape[1:3]
        return np.stack([pose_heatmap(p, hw, self.sigma, self.min_visibility) for p in found]).astype(np.float32)
