"""Who closes a detector: the reward that built it from a backend name (and the RewardSet, command
or actor that holds the reward), never the reward that was handed an instance, whose giver owns it."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.base import Detection
from rewards.composite import RewardSet, WeightedReward
from rewards.face_confidence import FaceDetectionConfidence
from rewards.hand import HandConfidence


class CountingDetector:
    """A detector that counts its close() calls."""

    built: list["CountingDetector"] = []

    def __init__(self, region: str = "face"):
        self.region, self.closed = region, 0
        CountingDetector.built.append(self)

    def detect(self, images):
        return [[Detection((1.0, 1.0, 9.0, 9.0), 0.9)] for _ in images]

    def close(self):
        self.closed += 1


def test_a_reward_closes_the_detector_it_built_and_not_one_it_was_given():
    CountingDetector.built.clear()
    given = CountingDetector()
    built = FaceDetectionConfidence(f"{__name__}:CountingDetector")
    hand = HandConfidence(f"{__name__}:CountingDetector", detector_options={"region": "hand"})
    built.name = "built_face"  # two face rewards in one set need their own names
    rewards = RewardSet(
        [WeightedReward(FaceDetectionConfidence(given), 1.0), WeightedReward(built, 1.0), WeightedReward(hand, 1.0)]
    )
    with rewards:
        scored = rewards(np.zeros((2, 16, 16, 3), np.uint8), ["a", "b"])
    assert scored.combined() == [pytest.approx(2.7)] * 2
    assert [d.closed for d in CountingDetector.built] == [0, 1, 1]
    rewards.close()  # a second close reaches the detectors again; theirs must tolerate it (MediaPipe's does)
    assert given.closed == 0


def test_mediapipe_detector_closes_once_and_twice_safely():
    pytest.importorskip("mediapipe")
    from rewards.detectors import get_models
    from rewards.detectors.base import build_detector

    if get_models.missing_models():
        pytest.skip("the MediaPipe models are not fetched (python -m rewards.detectors.get_models)")
    det = build_detector("mediapipe_face")
    assert det.smallest_region_px(64, 64) == pytest.approx(9.5)
    det.close()
    det.close()  # the second does nothing: the graph is released once
