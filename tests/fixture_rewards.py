"""Rewards for tests, loaded through the config like any user reward (``module:callable``)."""

from __future__ import annotations

import numpy as np

from rewards.base import Detection, Reward, RewardResult
from rewards.jpeg import jpeg_size_kb


class CompressibleFace(Reward):
    """JPEG compressibility of a fixed "face" box region, reported as a detection in every image.

    A stand-in for a face reward on the tiny model (whose samples hold no faces): it exercises the
    region path (detections -> masks -> per-region losses -> MPD) with a real, image-dependent value.
    """

    name = "compressible_face"
    region = "face"

    def __init__(self, box: tuple[float, float, float, float] = (8.0, 8.0, 40.0, 40.0)):
        self.box = tuple(float(v) for v in box)

    def score(self, images, prompts):
        x1, y1, x2, y2 = (int(v) for v in self.box)
        return [
            RewardResult(
                -jpeg_size_kb(np.ascontiguousarray(im[y1:y2, x1:x2])), regions={"face": [Detection(self.box, 0.99)]}
            )
            for im in images
        ]
