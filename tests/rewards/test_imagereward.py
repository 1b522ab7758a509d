"""ImageReward (global) on tiny random weights saved in the published layout."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.base import RewardError
from rewards.imagereward import IR_MEAN, IR_STD, ImageReward
from rewards.registry import build_reward
from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    model = random_model(TINY_VISION, TINY_MED_CONFIG, seed=2)
    return save_published(model, TINY_MED_CONFIG, tmp_path_factory.mktemp("ir"), "ImageReward.pt")


@pytest.fixture(scope="module")
def reward(ir_dir):
    return build_reward("imagereward", {"model": str(ir_dir), "vision_heads": 2, "batch_size": 2})


def test_normalized_score_and_prompt_dependence(reward):
    import skimage.data

    img = skimage.data.coffee()  # (400, 600, 3): exercises the resize + center crop
    a, b, a2 = reward(np.stack([img, img, img]), ["a cup of coffee", "a red car", "a cup of coffee"])
    assert reward.name == "imagereward" and reward.region == "global"
    for res in (a, b):
        assert res.value == pytest.approx((res.info["raw"] - IR_MEAN) / IR_STD, abs=1e-12)
    assert abs(a.value - b.value) > 1e-3  # the prompt matters
    # Batching (2 per pass, the third alone) does not change a score.
    assert a2.value == pytest.approx(a.value, abs=1e-5)


def test_bad_options(ir_dir):
    with pytest.raises(RewardError, match="batch_size"):
        ImageReward(str(ir_dir), batch_size=0)
    with pytest.raises(RewardError, match="dtype"):
        ImageReward(str(ir_dir), dtype="float64")


def test_score_tensor_equals_score_and_has_gradients(reward):
    """The differentiable path (learner.loss=draft): equal to the uint8 reward on uint8-valued images (the same
    Pillow resize weights, straight-through rounding), with a gradient on the pixels."""
    import skimage.data
    import torch

    img = skimage.data.coffee()[:200, :300]
    (res,) = reward(img[None], ["a cup of coffee"])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    scores, present = reward.score_tensor(x, ["a cup of coffee"])
    assert present.tolist() == [True] and abs(scores.item() - res.value) < 1e-4
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
