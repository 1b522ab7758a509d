"""Collapse and hacking metrics (rlfh.eval.diversity) on worked numbers, and the guards that log
them and stop on guards.max_face_identity_sim (fake scorers: no Ray, no model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from rewards.base import Detection, RewardResult
from rewards.composite import ScoredBatch
from rlfh.eval.diversity import face_identity_similarity, face_lists, image_diversity, reward_gap
from rlfh.eval.guards import Guards


def _img(value: int, side: int = 32) -> np.ndarray:
    return np.full((side, side, 3), value, np.uint8)


def test_image_diversity_worked_numbers():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    # prompt a: black vs white -> RMS 1; prompt b: the same image twice -> 0; c: one image, skipped
    images = [_img(0), _img(255), noise, noise.copy(), _img(7)]
    d = image_diversity(images, ["a", "a", "b", "b", "c"])
    assert d["value"] == pytest.approx(0.5) and d["n_prompts"] == 2 and d["n_pairs"] == 2 and d["reason"] is None
    # identical within every prompt: 0
    assert image_diversity([noise, noise, _img(3), _img(3)], ["x", "x", "y", "y"])["value"] == 0.0
    # three images of one prompt: pairs (0, 51) -> 0.2, (0, 255) -> 1, (51, 255) -> 0.8 -> mean 2/3
    assert image_diversity([_img(0), _img(51), _img(255)], ["p"] * 3)["value"] == pytest.approx(2 / 3)
    one = image_diversity([_img(0), _img(9)], ["a", "b"])
    assert one["value"] is None and ">= 2 seeds per prompt" in one["reason"]


def test_face_identity_similarity_worked_numbers():
    e = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # cosine ignores the length
    s = face_identity_similarity(e, [0, 1, 2])
    assert s["value"] == pytest.approx(1 / 3) and s["n_pairs"] == 3  # (0,1)=1, (0,2)=0, (1,2)=0
    # faces 0 and 1 in one image: that pair is left out -> (0,2)=0, (1,2)=0
    assert face_identity_similarity(e, [0, 0, 2])["value"] == pytest.approx(0.0)
    assert face_identity_similarity(np.ones((3, 4)), [0, 1, 2])["value"] == pytest.approx(1.0)
    lone = face_identity_similarity(e[:2], [4, 4])
    assert lone["value"] is None and "1 image(s)" in lone["reason"]
    none = face_identity_similarity(None, [], reason="no embedder")
    assert none["value"] is None and none["reason"] == "no embedder"


def test_reward_gap_and_face_lists():
    g = reward_gap([3.0, 5.0], [1.0, None, 2.0])
    assert g["value"] == pytest.approx(2.5) and g["train_mean"] == 4.0 and g["heldout_mean"] == 1.5
    assert reward_gap([], [1.0])["value"] is None and "training-prompt" in reward_gap([], [1.0])["reason"]
    d = Detection((0, 0, 4, 4), 0.99)
    assert face_lists([{"face": [d]}, {"hand": []}]) == [[d], []]
    assert face_lists([{"hand": []}]) is None  # no reward looked for faces


class _Scorer:
    """Scores every image by its mean brightness with a face box; embeds faces as given."""

    def __init__(self, embeddings):
        self.embeddings, self.embed_calls = embeddings, 0

    def score(self, images, prompts):
        res = [RewardResult(float(im.mean()) / 255, regions={"face": [Detection((0, 0, 8, 8), 0.99)]}) for im in images]
        return ScoredBatch({"bright": res}, {"bright": 1.0}, {"bright": "face"})

    def face_embeddings(self, images, faces):
        self.embed_calls += 1
        assert faces is not None and len(faces) == len(images)
        return {"embeddings": self.embeddings, "owners": list(range(len(images))), "source": "fake", "reason": None}


class _Fleet:
    def __init__(self, images):
        self.images = images

    def submit(self, prompts, seeds, settings, batch_size):
        return prompts

    def collect(self, prompts):
        return SimpleNamespace(images=self.images, prompts=prompts)


def _guards(images, embeddings, **gc):
    g = {
        **dict(
            every=1,
            heldout_prompts=["a", "b"],
            seeds_per_prompt=2,
            heldout_rewards=[],
            max_heldout_drop=None,
            max_reference_mse=None,
            max_face_identity_sim=None,
        ),
        **gc,
    }
    cfg = SimpleNamespace(guards=SimpleNamespace(**g), rollout=SimpleNamespace(sample_batch_size_per_actor=4))
    scorer = _Scorer(embeddings)
    return Guards(cfg, _Fleet(images), None, scorer), scorer


def test_guards_log_collapse_metrics_and_stop_on_one_face():
    # held-out prompts a, a, b, b: images 0/255 (a) and 102/102 (b) -> diversity (1 + 0) / 2
    images = np.stack([_img(0), _img(255), _img(102), _img(102)])
    same = np.tile([[0.6, 0.8]], (4, 1))
    guards, scorer = _guards(images, same, max_face_identity_sim=0.95)
    metrics = {"reward/combined/mean": 0.6}
    stop = guards.check(0, metrics)
    assert metrics["collapse/face_identity_sim"] == pytest.approx(1.0)
    assert metrics["collapse/image_diversity"] == pytest.approx(0.5)
    # held-out combined = mean brightness (0 + 1 + 0.4 + 0.4) / 4 = 0.45 -> gap 0.6 - 0.45
    assert metrics["heldout/reward_gap"] == pytest.approx(0.15)
    assert stop is not None and "max_face_identity_sim" in stop and scorer.embed_calls == 1
    # varied faces: pairs of orthogonal / equal unit vectors -> similarity below the limit, no stop
    varied = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # 2 of 6 pairs equal -> 1/3
    guards, _ = _guards(images, varied, max_face_identity_sim=0.95)
    metrics = {}
    assert guards.check(0, metrics) is None
    assert metrics["collapse/face_identity_sim"] == pytest.approx(1 / 3)
    assert metrics["heldout/reward_gap"] is None and "training-prompt" in metrics["heldout/reward_gap_reason"]
