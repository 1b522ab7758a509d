"""FaceScore on tiny random weights saved in the published layout (FS_model.pt + med_config.json)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.base import Detection, RewardError
from rewards.blip_preprocess import CLIP_MEAN, CLIP_STD, crop_bounds, preprocess_pil, preprocess_tensor
from rewards.detectors.base import FixedBoxes
from rewards.facescore import FaceScore, aggregate, detections_to_boxes
from rewards.registry import build_reward
from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

FACE = (175.0, 25.0, 265.0, 140.0)  # the astronaut's face in skimage.data.astronaut() (512 x 512)
HAND = (230.0, 400.0, 300.0, 470.0)  # another region of the same photo


@pytest.fixture(scope="module")
def fs_dir(tmp_path_factory):
    model = random_model(TINY_VISION, TINY_MED_CONFIG, seed=0)
    return save_published(model, TINY_MED_CONFIG, tmp_path_factory.mktemp("fs"), "FS_model.pt")


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()  # (512, 512, 3) uint8 RGB


@pytest.fixture(scope="module")
def reward(fs_dir):
    return FaceScore(str(fs_dir), detector=FixedBoxes([[]]), vision_heads=2)


def _with(reward, boxes, **kw):
    reward.detector = FixedBoxes(boxes)
    for k, v in kw.items():
        setattr(reward, k, v)
    return reward


def test_astronaut_face(reward, astronaut):
    (res,) = _with(reward, [[Detection(FACE, 0.99)]], aggregation="mean")(astronaut[None], ["ignored"])
    assert res.value is not None and np.isfinite(res.value)
    assert res.regions == {"face": [Detection(FACE, 0.99)]}
    assert res.info["face_scores"] == [pytest.approx(res.value)]
    y0, y1, x0, x1 = crop_bounds(FACE, 512, 512)
    assert res.value == pytest.approx(float(reward.score_crops([astronaut[y0:y1, x0:x1]])[0]), abs=1e-6)
    # The pixels matter: another crop of the same photo scores differently.
    (other,) = _with(reward, [[Detection(HAND, 0.99)]])(astronaut[None], ["x"])
    assert abs(other.value - res.value) > 1e-3


def test_no_face_is_explicitly_missing(reward, astronaut):
    low = Detection(FACE, 0.89)
    none, below = _with(reward, [[], [low]])(np.stack([astronaut, astronaut]), ["a", "b"])
    assert none.value is None and "no face" in none.reason and none.regions == {"face": []}
    assert below.value is None and "0.9" in below.reason
    assert below.regions == {"face": [low]} and below.info["face_scores"] == [None]


def test_aggregation_modes(reward, astronaut):
    dets = [Detection(FACE, 0.99), Detection(HAND, 0.95), Detection((0, 0, 30, 30), 0.5)]
    values = {}
    for mode in ("mean", "min", "area_weighted"):
        (res,) = _with(reward, [dets], aggregation=mode)(astronaut[None], ["x"])
        values[mode] = res.value
    s = _with(reward, [dets])(astronaut[None], ["x"])[0].info["face_scores"]
    assert s[2] is None  # below 0.9: detected, reported, not scored
    a = [(141 - 24) * (266 - 174), (471 - 399) * (301 - 229)]  # widened crop areas
    assert values["mean"] == pytest.approx((s[0] + s[1]) / 2)
    assert values["min"] == pytest.approx(min(s[0], s[1]))
    assert values["area_weighted"] == pytest.approx((a[0] * s[0] + a[1] * s[1]) / (a[0] + a[1]))
    assert len({round(v, 6) for v in values.values()}) == 3


def test_aggregate_worked_numbers():
    assert aggregate([1.0, 3.0], [1.0, 3.0], "mean") == 2.0
    assert aggregate([1.0, 3.0], [1.0, 3.0], "min") == 1.0
    assert aggregate([1.0, 3.0], [1.0, 3.0], "area_weighted") == 2.5
    with pytest.raises(RewardError, match="aggregation"):
        aggregate([1.0], [1.0], "median")


def test_crop_bounds_follow_the_reference():
    # int() truncation of x1-1, y1-1, x2+1, y2+1 (the reference's crop_face_image).
    assert crop_bounds((10.6, 20.2, 50.4, 60.9), 100, 100) == (19, 61, 9, 51)
    assert crop_bounds((0.5, 0.2, 99.5, 99.9), 100, 100) == (0, 100, 0, 100)  # int(-0.5) == 0; end clamped
    assert crop_bounds((-5.0, 10.0, 20.0, 30.0), 100, 100) == (9, 31, 0, 21)  # negative start clamped
    assert crop_bounds((150.0, 10.0, 160.0, 30.0), 100, 100) is None


def test_preprocess_pil_no_resize_is_plain_normalization():
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = preprocess_pil(img)
    expect = (
        torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)
    ) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-6)
    # 224 x 448: no resize, center crop keeps columns 112..335.
    wide = np.random.default_rng(1).integers(0, 256, (224, 448, 3), dtype=np.uint8)
    assert torch.allclose(preprocess_pil(wide), preprocess_pil(wide[:, 112:336]), atol=0)


def test_tensor_preprocess_matches_pil(astronaut):
    from PIL import Image

    big = np.asarray(Image.fromarray(astronaut).resize((1024, 768), Image.BICUBIC))  # an SDXL-sized image
    crops = [
        astronaut[y0:y1, x0:x1]
        for y0, y1, x0, x1 in [(24, 142, 174, 266), (9, 61, 9, 51), (0, 512, 0, 512), (10, 20, 10, 300), (0, 5, 0, 7)]
    ]
    for crop in [*crops, big, big[100:700, 300:650]]:
        t = preprocess_tensor(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255)
        # Pillow's own fixed-point weights: the same uint8 pixels, down- and upsampling alike.
        assert torch.equal(t, preprocess_pil(crop)), crop.shape


def test_differentiable_matches_and_has_gradients(reward, astronaut):
    dets = [Detection(FACE, 0.99), Detection(HAND, 0.95), Detection((1.5, 2.5, 40.0, 33.0), 0.97)]
    (res,) = _with(reward, [dets])(astronaut[None], ["x"])
    image = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    boxes = detections_to_boxes([dets])
    assert boxes.shape == (3, 5) and boxes[:, 0].tolist() == [0, 0, 0]
    scores = reward.differentiable()(image, boxes)
    # Same crops and the same preprocessed pixels: equal up to float summation order.
    assert np.abs(scores.detach().numpy() - res.info["face_scores"]).max() < 1e-5
    whole = reward.differentiable()(image, [[0, 0.0, 0.0, 512.0, 512.0]])  # a whole image, 512 -> 224
    (res_whole,) = _with(reward, [[Detection((0.0, 0.0, 512.0, 512.0), 0.99)]])(astronaut[None], ["x"])
    assert abs(whole.item() - res_whole.value) < 1e-5
    scores.sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert image.grad[0, :, 300:, 350:].abs().sum() == 0  # no box there
    with pytest.raises(RewardError, match="empty crop"):
        reward.differentiable()(image, [[0, 600.0, 600.0, 700.0, 700.0]])


def test_score_tensor_trains_the_face_only(reward, astronaut):
    """The direct reward losses' entry (learner.loss=draft): faces found on the detached image, the crop's pixels
    alone get gradient, an image without a face is flagged absent (its score a constant 0), and the score is
    the uint8 reward's within the smooth resize's ~1e-3."""
    (res,) = _with(reward, [[Detection(FACE, 0.99)]], aggregation="mean")(astronaut[None], ["x"])
    _with(reward, [[Detection(FACE, 0.99)], []])
    image = torch.from_numpy(np.stack([astronaut, astronaut])).permute(0, 3, 1, 2).float().div(255)
    image.requires_grad_(True)
    scores, present = reward.score_tensor(image, ["x", "y"])
    assert present.tolist() == [True, False] and scores[1].item() == 0.0
    assert abs(scores[0].item() - res.value) < 5e-3
    scores.sum().backward()
    y0, y1, x0, x1 = crop_bounds(FACE, 512, 512)
    inside = image.grad[0, :, y0:y1, x0:x1].abs().sum()
    assert inside > 0 and image.grad.abs().sum() == pytest.approx(float(inside)) and image.grad[1].abs().sum() == 0


def test_registry_and_options(fs_dir, astronaut):
    r = build_reward(
        "facescore",
        {
            "model": str(fs_dir),
            "vision_heads": 2,
            "aggregation": "min",
            "detector": FixedBoxes([[Detection(FACE, 0.99)]]),
        },
    )
    assert r.name == "facescore" and r.region == "face" and r.aggregation == "min"
    assert r(astronaut[None], ["x"])[0].value is not None
    with pytest.raises(RewardError, match="aggregation='median'"):
        FaceScore(str(fs_dir), detector=FixedBoxes([[]]), aggregation="median")
    with pytest.raises(RewardError, match="face detector"):
        FaceScore(str(fs_dir), detector=FixedBoxes([[]], region="hand"), vision_heads=2)
    with pytest.raises(RewardError, match="lacks"):
        FaceScore(str(fs_dir.parent), detector=FixedBoxes([[]]))
    with pytest.raises(RewardError, match="detector backend"):
        FaceScore(str(fs_dir), detector="no_such_backend")


def test_hand_region_reads_a_hand_prompt_and_hand_boxes(fs_dir, astronaut):
    """region=hand: the same scorer on hand boxes with the fixed text "A hand." (a hand score trained
    by `rlfh train-reward region=hand`)."""
    from rewards.blip_preprocess import tokenize

    boxes = [[Detection(HAND, 0.95)]]
    hand = build_reward(
        "facescore",
        {"model": str(fs_dir), "vision_heads": 2, "region": "hand", "detector": FixedBoxes(boxes, region="hand")},
        name="handscore",
    )
    (res,) = hand(astronaut[None], ["x"])
    assert hand.region == "hand" and hand.prompt == "A hand."
    assert res.regions == {"hand": boxes[0]} and res.info["hand_scores"] == [pytest.approx(res.value)]
    y0, y1, x0, x1 = crop_bounds(HAND, 512, 512)
    pixels = preprocess_pil(astronaut[y0:y1, x0:x1])[None]
    with torch.no_grad():
        expected = [float(hand.model(pixels, *tokenize(hand.tokenizer, [p]))) for p in ("A hand.", "A face.")]
    assert res.value == pytest.approx(expected[0], abs=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-4  # the text matters: it is not the face score of the same crop
    (none,) = _with(hand, [[]])(astronaut[None], ["x"])
    assert none.value is None and "no hand" in none.reason
    with pytest.raises(RewardError, match="needs a hand detector"):
        FaceScore(str(fs_dir), detector=FixedBoxes([[]]), region="hand", vision_heads=2)
    with pytest.raises(RewardError, match="region='elbow' has no default prompt"):
        FaceScore(str(fs_dir), detector=FixedBoxes([[]], region="elbow"), region="elbow", vision_heads=2)
    elbow = FaceScore(
        str(fs_dir), detector=FixedBoxes([[]], region="elbow"), region="elbow", prompt="An elbow.", vision_heads=2
    )
    assert elbow.prompt == "An elbow." and elbow.region == "elbow"
