"""CLIPScore and LocalIR / LocalHPS (FaceScore's baselines) on tiny random weights in the published layouts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards.base import Detection, RewardError
from rewards.blip_preprocess import crop_bounds
from rewards.detectors.base import FixedBoxes
from rewards.registry import build_reward
from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published
from tests.rewards.tiny_clip import open_clip_state, save_openai_clip_dir

FACE = (175.0, 25.0, 265.0, 140.0)  # the astronaut's face in skimage.data.astronaut() (512 x 512)
OTHER = (230.0, 400.0, 300.0, 470.0)
PROMPTS = ["an astronaut in a white suit", "a red car on a bridge", "a bowl of soup", "a cat", "two dogs", "a tree"]


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()


# ---------------------------------------------------------------- CLIPScore


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_openai_clip_dir(tmp_path_factory.mktemp("clip"), seed=6)


@pytest.fixture(scope="module")
def clipscore(clip_dir):
    return build_reward("clipscore", {"model": str(clip_dir), "batch_size": 4})


def _cosines(reward, image, prompts):
    m = reward.model
    pixels = reward.image_processor(images=[image], return_tensors="pt").pixel_values
    ids = reward.tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        e_i = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        e_t = m.text_projection(m.text_model(**ids).pooler_output)
    return F.cosine_similarity(e_i, e_t).double().numpy()


def test_clipscore_formula_is_hessel(clipscore):
    import skimage.data

    coffee = np.ascontiguousarray(skimage.data.coffee()[:, :400])
    res = clipscore(np.stack([coffee] * len(PROMPTS)), PROMPTS)
    cos = _cosines(clipscore, coffee, PROMPTS)  # recomputed outside the reward's code path
    assert clipscore.name == "clipscore" and clipscore.region == "global" and clipscore.w == 2.5
    for r, c in zip(res, cos):
        assert r.info["cosine"] == pytest.approx(c, abs=1e-5)
        assert r.value == pytest.approx(2.5 * max(c, 0.0), abs=1e-5)
    # this random model (seed 6) gives both signs on the coffee photo: max(cos, 0) acts on both sides
    assert (cos > 0.02).any() and (cos < -0.02).any()
    assert len({round(r.value, 6) for r in res if r.value > 0}) > 1  # the prompt matters


def test_clipscore_options(clip_dir, clipscore, astronaut):
    tm = build_reward("clipscore", {"model": str(clip_dir), "w": 100.0})  # torchmetrics' scale
    pos = [r for r in clipscore(np.stack([astronaut] * 6), PROMPTS)]
    big = tm(np.stack([astronaut] * 6), PROMPTS)
    for a, b in zip(pos, big):
        assert b.value == pytest.approx(40.0 * a.value, abs=1e-3)
    hessel = build_reward("clipscore", {"model": str(clip_dir), "prefix": "A photo depicts"})
    with_prefix = hessel(astronaut[None], PROMPTS[:1])[0].info["cosine"]
    assert with_prefix == pytest.approx(_cosines(clipscore, astronaut, ["A photo depicts " + PROMPTS[0]])[0], abs=1e-5)
    with pytest.raises(RewardError, match="w=0"):
        build_reward("clipscore", {"model": str(clip_dir), "w": 0})


def test_clipscore_refuses_missing_tokenizer(clip_dir, tmp_path):
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(clip_dir, bare)
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    # offline, transformers builds a 2-token tokenizer from what is left: refused, not scored with
    with pytest.raises(RewardError, match="has 2 tokens, expected CLIP's 49408"):
        build_reward("clipscore", {"model": str(bare)})


# ---------------------------------------------------------------- LocalIR / LocalHPS


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    model = random_model(TINY_VISION, TINY_MED_CONFIG, seed=2)
    return save_published(model, TINY_MED_CONFIG, tmp_path_factory.mktemp("ir"), "ImageReward.pt")


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": open_clip_state(seed=3)}, d / "HPS_v2.1_compressed.pt")
    return d


def _local(target, options, boxes):
    r = build_reward(target, {**options, "detector": FixedBoxes([[]])})
    r.detector = FixedBoxes(boxes)
    return r


@pytest.mark.parametrize("target", ["local_ir", "local_hps"])
def test_local_rewards_score_the_crop_with_the_wrapped_reward(target, ir_dir, hps_dir, astronaut):
    options = (
        {"model": str(ir_dir), "vision_heads": 2}
        if target == "local_ir"
        else {"checkpoint": str(hps_dir), "vision_heads": 2, "text_heads": 2}
    )
    plain = build_reward("imagereward" if target == "local_ir" else "hpsv2", options)
    y0, y1, x0, x1 = crop_bounds(FACE, 512, 512)
    face_crop = np.ascontiguousarray(astronaut[y0:y1, x0:x1])
    on_crop = plain(face_crop[None], ["A face."])[0].value  # the crop scored alone by the global reward
    boxes = [[Detection(FACE, 0.99), Detection(OTHER, 0.95), Detection(OTHER, 0.5)], []]
    r = _local(target, options, boxes)
    assert r.name == target and r.region == "face"
    a, none = r(np.stack([astronaut, astronaut]), ["an astronaut", "an astronaut"])
    y0, y1, x0, x1 = crop_bounds(OTHER, 512, 512)
    other = plain(np.ascontiguousarray(astronaut[y0:y1, x0:x1])[None], ["A face."])[0].value
    assert a.info["face_scores"][0] == pytest.approx(on_crop, abs=1e-5)
    assert a.info["face_scores"][2] is None  # below FaceScore's 0.9 threshold: not scored
    assert a.value == pytest.approx((on_crop + other) / 2, abs=1e-5) and abs(on_crop - other) > 1e-4
    assert none.value is None and "no face with confidence >= 0.9" in none.reason
    assert r.reads_sources == (target == "local_ir")  # as the wrapped reward: ImageReward resizes files in their mode
    if r.reads_sources:  # the crop then comes from the decoded file (an RGB file: the same pixels)
        from PIL import Image

        src = Image.fromarray(astronaut)
        with_src = r(np.stack([astronaut, astronaut]), ["an astronaut"] * 2, sources=[src, None])[0]
        assert with_src.value == pytest.approx(a.value, abs=1e-6)
    # text: image reads each image's own prompt with the crop instead of "A face."
    r2 = _local(target, {**options, "text": "image"}, [[Detection(FACE, 0.99)]])
    own = r2(astronaut[None], ["an astronaut"])[0].value
    assert own == pytest.approx(plain(face_crop[None], ["an astronaut"])[0].value, abs=1e-5)
    assert abs(own - on_crop) > 1e-4


def test_local_reward_bad_options(ir_dir):
    with pytest.raises(RewardError, match="text='x'"):
        build_reward("local_ir", {"model": str(ir_dir), "vision_heads": 2, "detector": FixedBoxes([]), "text": "x"})
    with pytest.raises(RewardError, match="region='torso' has no fixed text"):
        build_reward(
            "local_ir",
            {"model": str(ir_dir), "vision_heads": 2, "detector": FixedBoxes([], region="torso"), "region": "torso"},
        )
    with pytest.raises(RewardError, match="bad options"):
        build_reward("local_ir", {"model": str(ir_dir), "no_such_option": 1})
