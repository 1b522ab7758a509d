"""Face embeddings from the configured rewards' models (rewards.embeddings, RewardSet.face_embeddings)
on the tiny seeded BLIP checkpoint, and the face identity similarity they give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.base import Detection
from rewards.composite import RewardSet, WeightedReward
from rewards.detectors.base import FixedBoxes
from rewards.embeddings import NO_EMBEDDER, blip_embeddings, find_embedder
from rewards.facescore import FaceScore
from rewards.jpeg import JpegCompressibility
from rlfh.eval.diversity import face_similarity_from
from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

FACE = (175.0, 25.0, 265.0, 140.0)  # the astronaut's face in skimage.data.astronaut()
OTHER = (230.0, 400.0, 300.0, 470.0)


@pytest.fixture(scope="module")
def facescore(tmp_path_factory):
    d = save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=0),
        TINY_MED_CONFIG,
        tmp_path_factory.mktemp("fs"),
        "FS_model.pt",
    )
    return FaceScore(str(d), detector=FixedBoxes([[]]), vision_heads=2)


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()


def test_blip_embedding_is_blips_image_feature(facescore, astronaut):
    from rewards.blip_preprocess import crop_bounds, preprocess_pil

    y0, y1, x0, x1 = crop_bounds(FACE, 512, 512)
    crop = astronaut[y0:y1, x0:x1]
    (e,) = blip_embeddings(facescore.model, [crop])
    m = facescore.model
    with torch.no_grad():  # normalize(vision_proj(ViT [CLS])), written out
        cls = m.visual_encoder(pixel_values=preprocess_pil(crop)[None]).last_hidden_state[0, 0]
        ref = m.vision_proj(cls).double()
    assert e.shape == (256,) and np.linalg.norm(e) == pytest.approx(1.0)
    assert e == pytest.approx((ref / ref.norm()).numpy(), abs=1e-6)


def test_identical_faces_similarity_one_different_less(facescore, astronaut):
    rs = RewardSet([WeightedReward(JpegCompressibility(), 1.0), WeightedReward(facescore, 1.0)])
    images = np.stack([astronaut, astronaut, astronaut])
    same = [[Detection(FACE, 0.99)]] * 3
    sim = face_similarity_from(rs.face_embeddings(images, same))
    assert sim["value"] == pytest.approx(1.0, abs=1e-9) and sim["n_pairs"] == 3
    assert sim["source"].startswith("facescore: BLIP")
    mixed = [[Detection(FACE, 0.99)], [Detection(FACE, 0.99)], [Detection(OTHER, 0.99)]]
    other = face_similarity_from(rs.face_embeddings(images, mixed))
    assert other["value"] < 1.0 - 1e-3 and other["n_faces"] == 3
    # faces below FaceScore's 0.9 confidence are not embedded: one image left -> not computable
    low = [[Detection(FACE, 0.99)], [Detection(FACE, 0.5)], []]
    none = face_similarity_from(rs.face_embeddings(images, low))
    assert none["value"] is None and "1 image(s)" in none["reason"]
    # no regions given: the face reward's own detector finds them
    facescore.detector = FixedBoxes(same)
    assert face_similarity_from(rs.face_embeddings(images))["value"] == pytest.approx(1.0, abs=1e-9)


def test_no_embedding_model_says_why():
    rs = RewardSet([WeightedReward(JpegCompressibility(), 1.0)])
    got = rs.face_embeddings(np.zeros((2, 8, 8, 3), np.uint8), [[Detection((0, 0, 4, 4), 1.0)]] * 2)
    assert got["embeddings"] is None and got["reason"] == NO_EMBEDDER
    sim = face_similarity_from(got)
    assert sim["value"] is None and sim["reason"] == NO_EMBEDDER
    assert find_embedder([]) == (None, NO_EMBEDDER)
