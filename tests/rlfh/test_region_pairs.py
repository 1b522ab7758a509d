"""FaceScore's region pairs: the area-ratio -> strength rule, the dilated box mask, the pair builder
and its config rules, on worked numbers (fast, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from rlfh.config.schema import DEFAULT_STRENGTH_TABLE, ConfigError, RegionPairsConfig, config_from_dict
from rlfh.data.region_pairs import (
    area_ratio,
    concat_pairs,
    inpaint_mask,
    noise_strength,
    plan_inpainting,
    region_pair_batch,
)


def test_area_ratio_counts_the_union_of_filled_pixels():
    # PIL fills both end pixels of a box: (8, 8, 40, 40) covers 33 x 33 pixels of 64 x 64
    assert area_ratio([(8, 8, 40, 40)], (64, 64)) == pytest.approx(33 * 33 / 4096)
    # corners truncate: (10, 10, 17.9, 13.5) -> x 10..17 (8 px), y 10..13 (4 px)
    assert area_ratio([(10, 10, 17.9, 13.5)], (64, 64)) == pytest.approx(32 / 4096)
    # two overlapping 11 x 11 boxes sharing a 6 x 11 strip: 121 + 121 - 66 pixels
    assert area_ratio([(0, 0, 10, 10), (5, 0, 15, 10)], (64, 64)) == pytest.approx(176 / 4096)


def test_strength_table_maps_smaller_regions_to_smaller_strength():
    table = DEFAULT_STRENGTH_TABLE  # [[0.02, 0.1], [0.05, 0.2], [0.1, 0.3], [1.0, 0.4]]
    assert [noise_strength(a, None, table) for a in (0.0, 0.0078, 0.02)] == [0.1, 0.1, 0.1]  # bound inclusive
    assert [noise_strength(a, None, table) for a in (0.0201, 0.05, 0.0999, 0.26587, 1.0)] == [0.2, 0.2, 0.3, 0.4, 0.4]
    strengths = [s for _, s in table]
    assert strengths == sorted(strengths) and min(strengths) == 0.1 and max(strengths) == 0.4
    # FaceScore's fixed settings, whatever the area
    assert noise_strength(0.001, 0.4, table) == 0.4 and noise_strength(0.9, 0.1, table) == 0.1
    with pytest.raises(ValueError, match="exceeds every bound"):
        noise_strength(0.5, None, [[0.25, 0.1]])


def test_dilated_box_mask_at_latent_size():
    # box x, y in 8..15; a 16 kernel grows [a, b] to [a - 7, b + 8] = [1, 23]; latent pixel i samples
    # image pixel 8 i: rows / cols 1 (8) and 2 (16) are in, 0 (0) and 3 (24) are not
    m = inpaint_mask([(8, 8, 15, 15)], (64, 64), dilate=16)
    want = np.zeros((1, 8, 8), np.float32)
    want[0, 1:3, 1:3] = 1
    np.testing.assert_array_equal(m, want)
    # undilated, only image pixel 8 (latent 1) is inside
    want0 = np.zeros((1, 8, 8), np.float32)
    want0[0, 1, 1] = 1
    np.testing.assert_array_equal(inpaint_mask([(8, 8, 15, 15)], (64, 64), dilate=0), want0)
    # a 32 kernel grows [8, 15] to [0, 31]: latent 0..3
    want32 = np.zeros((1, 8, 8), np.float32)
    want32[0, 0:4, 0:4] = 1
    np.testing.assert_array_equal(inpaint_mask([(8, 8, 15, 15)], (64, 64), dilate=32), want32)


def test_plan_picks_images_with_the_region_and_their_strength():
    from rewards.base import Detection

    rp = RegionPairsConfig(region="face", dilate=16)
    regions = [
        {"face": [Detection((8, 8, 40, 40), 0.99)]},
        {"hand": [Detection((0, 0, 9, 9), 0.9)]},
        {"face": [Detection((10, 10, 17.9, 13.5), 0.95)]},
    ]
    plan = plan_inpainting(regions, rp, (64, 64))
    assert plan.indices == [0, 2] and plan.strengths == [0.4, 0.1] and plan.masks.shape == (2, 1, 8, 8)
    assert plan_inpainting(regions, rp, (64, 64), choose=np.array([False, True, True])).indices == [2]
    fixed = plan_inpainting(regions, RegionPairsConfig(region="face", strength=0.4), (64, 64))
    assert fixed.strengths == [0.4, 0.4]


def test_pairs_follow_the_reward_and_carry_only_the_region_mask():
    rng = np.random.default_rng(0)
    orig, inp = rng.normal(size=(4, 4, 8, 8)).astype(np.float32), rng.normal(size=(4, 4, 8, 8)).astype(np.float32)
    masks = np.zeros((4, 1, 8, 8), np.float32)
    masks[:, :, 2:5, 2:5] = 1
    v_orig = {"a": [1.0, 2.0, 1.0, None], "b": [0.0, 0.0, 5.0, 0.0]}
    v_inp = {"a": [0.5, 3.0, 1.0, 1.0], "b": [0.0, 0.0, 5.0, 0.0]}
    # pair 0: original wins (1 > 0.5); pair 1: inpainted wins (3 > 2); pair 2: tie; pair 3: unscored
    batch, stats = region_pair_batch(
        orig,
        inp,
        ["p0", "p1", "p2", "p3"],
        v_orig,
        v_inp,
        {"a": 1.0, "b": 2.0},
        masks,
        "face",
        ["global", "face", "hand"],
    )
    assert stats == {
        "region_pairs/count": 2.0,
        "region_pairs/skipped": 2.0,
        "region_pairs/inpainted_won_share": 0.5,
        "region_pairs/mean_margin": pytest.approx(0.75),
    }
    np.testing.assert_array_equal(batch.latents_w, np.stack([orig[0], inp[1]]))
    np.testing.assert_array_equal(batch.latents_l, np.stack([inp[0], orig[1]]))
    assert batch.prompts == ["p0", "p1"] and set(batch.masks_w) == {"face", "hand"}
    np.testing.assert_array_equal(batch.masks_w["face"], masks[:2])
    np.testing.assert_array_equal(batch.masks_l["face"], masks[:2])
    assert not batch.masks_w["hand"].any() and not batch.masks_l["hand"].any()
    both = concat_pairs(batch, batch)
    assert len(both) == 4 and both.masks_w["face"].shape == (4, 1, 8, 8)


def _cfg(**rp):
    return config_from_dict({"learner": {"regions": {"names": ["global", "face"]}}, "data": {"region_pairs": rp}})


def test_config_rules_name_the_key():
    assert _cfg(region="face").data.region_pairs.strength is None
    with pytest.raises(ConfigError, match=r"data.region_pairs.region='hand': must be a local region"):
        _cfg(region="hand")
    with pytest.raises(ConfigError, match=r"strength_table\[0\]\[1\]=0.05 of 10 denoising steps runs no step"):
        _cfg(region="face", strength_table=[[1.0, 0.05]])
    with pytest.raises(ConfigError, match=r"data.region_pairs.strength=1.5: a noise strength must be in"):
        _cfg(region="face", strength=1.5)
    with pytest.raises(ConfigError, match=r"the last max_area_ratio is 0.5"):
        _cfg(region="face", strength_table=[[0.1, 0.1], [0.5, 0.4]])
    with pytest.raises(ConfigError, match=r"needs a DPO loss"):
        config_from_dict(
            {
                "learner": {"loss": "rwr", "regions": {"names": ["global", "face"]}},
                "data": {"region_pairs": {"region": "face"}},
            }
        )


def test_one_pair_per_face_or_one_per_image():
    from rewards.base import Detection

    two = [{"face": [Detection((0, 0, 7, 7), 0.9), Detection((40, 40, 55, 55), 0.8)]}]
    each = plan_inpainting(two, RegionPairsConfig(region="face"), (64, 64))
    # per_region: each (the default): one entry per face, each with its own box's area, strength and mask
    assert each.indices == [0, 0] and each.ratios == pytest.approx([64 / 4096, 256 / 4096])
    assert each.strengths == [0.1, 0.3] and [len(b) for b in each.boxes] == [1, 1]
    np.testing.assert_array_equal(each.masks[0], inpaint_mask([(0, 0, 7, 7)], (64, 64), 16))
    np.testing.assert_array_equal(each.masks[1], inpaint_mask([(40, 40, 55, 55)], (64, 64), 16))
    union = plan_inpainting(two, RegionPairsConfig(region="face", per_region="union"), (64, 64))
    assert union.indices == [0] and union.ratios == pytest.approx([320 / 4096]) and union.strengths == [0.3]
    np.testing.assert_array_equal(union.masks[0], np.maximum(each.masks[0], each.masks[1]))


def test_winner_original_needs_no_score_and_marks_the_pairs_aligned():
    rng = np.random.default_rng(1)
    orig, inp = rng.normal(size=(3, 4, 8, 8)).astype(np.float32), rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    masks = np.ones((3, 1, 8, 8), np.float32)
    # the reward prefers the inpainted copy twice and cannot score the third: FaceScore's rule ignores it
    v_orig, v_inp = {"a": [0.0, 0.0, None]}, {"a": [1.0, 2.0, None]}
    args = (orig, inp, ["p0", "p1", "p2"], v_orig, v_inp, {"a": 1.0}, masks, "face", ["global", "face"])
    batch, stats = region_pair_batch(*args, winner="original")
    np.testing.assert_array_equal(batch.latents_w, orig)
    np.testing.assert_array_equal(batch.latents_l, inp)
    assert stats["region_pairs/count"] == 3 and stats["region_pairs/inpainted_won_share"] == 0.0
    assert batch.aligned_rows().tolist() == [True, True, True]
    by_reward, st = region_pair_batch(*args, winner="reward")
    np.testing.assert_array_equal(by_reward.latents_w, inp[:2])
    assert st["region_pairs/skipped"] == 1 and st["region_pairs/inpainted_won_share"] == 1.0
    # a region pair keeps its mark next to plain pairs (None: not aligned)
    from rlfh.data.batches import PairBatch

    plain = PairBatch(orig[:1], inp[:1], ["q"], {"face": masks[:1]}, {"face": masks[:1]})
    assert concat_pairs(plain, batch).aligned_rows().tolist() == [False, True, True, True]


def test_the_inpainted_face_of_a_logged_pair_is_found_from_its_latents():
    from rlfh.data.region_pairs import inpainted_boxes

    boxes = [(0, 0, 7, 7), (40, 40, 55, 55)]
    orig = np.zeros((4, 8, 8), np.float32)
    inp = orig.copy()
    inp[:, 5:7, 5:7] = 1.0  # inside the second box's dilated mask only
    assert inpainted_boxes(boxes, orig, inp, (64, 64), 16) == [boxes[1]]
    assert inpainted_boxes(boxes, orig, orig, (64, 64), 16) == boxes  # nothing changed: all of them
