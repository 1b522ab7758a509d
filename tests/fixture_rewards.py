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


class BrightFace(Reward):
    """The mean brightness of a fixed "face" box, differentiable (``score_tensor``): a stand-in for FaceScore
    in the direct reward losses on the tiny model. The box is "detected" in every image, as a detector
    would find it on the detached image; the crop is taken by indexing, so only its pixels get gradient."""

    name = "bright_face"
    region = "face"
    differentiable_score = True

    def __init__(self, box: tuple[float, float, float, float] = (8.0, 8.0, 40.0, 40.0)):
        self.box = tuple(int(v) for v in box)

    def score_tensor(self, images, prompts):
        import torch

        x1, y1, x2, y2 = self.box
        scores = images[:, :, y1:y2, x1:x2].mean(dim=(1, 2, 3))
        return scores, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

    def score(self, images, prompts):
        x1, y1, x2, y2 = self.box
        return [
            RewardResult(float(im[y1:y2, x1:x2].mean() / 255.0), regions={"face": [Detection(self.box, 0.99)]})
            for im in images
        ]


class RedImage(Reward):
    """The mean of the red channel minus the mean of the others over the whole image, differentiable: a global
    reward beside :class:`BrightFace` (several differentiable rewards, per region)."""

    name = "red_image"
    region = "global"
    differentiable_score = True

    def score_tensor(self, images, prompts):
        import torch

        scores = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
        return scores, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

    def score(self, images, prompts):
        x = images.astype(np.float64) / 255.0
        return [RewardResult(float(im[..., 0].mean() - im[..., 1:].mean())) for im in x]
