"""Boxes -> latent masks (FairHuman, arXiv 2507.02714): worked examples, then parity with the reference ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.base import Detection, RewardError
from rewards.regions import latent_hw_of, pixel_mask, region_mask, region_masks


def test_worked_example_pixel_mask():
    # Box (40, 24)-(50, 31): PIL fills x 40..50, y 24..31; the 16x16 kernel with cv2's anchor (8, 8)
    # grows it by 7 before and 8 after: x 33..58, y 17..39.
    m = pixel_mask([(40, 24, 50, 31)], (64, 96))
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (33, 58, 17, 39)
    assert m.sum() == (58 - 33 + 1) * (39 - 17 + 1)


def test_worked_example_fractional_and_clipped():
    # Corners truncate like PIL (10.9 -> 10, 20.6 -> 20); growth is clipped at the border.
    m = pixel_mask([Detection((10.9, 0.2, 20.6, 5.5), 0.9)], (32, 32))
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (3, 28, 0, 13)
    # Entirely outside: nothing.
    assert not pixel_mask([(-30, -30, -1, -1), (40, 0, 50, 10)], (32, 32)).any()


def test_worked_example_latent():
    # 64x96 image -> 8x12 latent; pixel x 33..58 -> latent columns whose sample 8*j lies inside:
    # j = 5 (40), 6 (48), 7 (56); y 17..39 -> rows 3 (24), 4 (32).
    lat = region_mask([(40, 24, 50, 31)], (64, 96))
    assert lat.shape == (8, 12) and lat.dtype == torch.float32
    expected = torch.zeros(8, 12)
    expected[3:5, 5:8] = 1
    assert torch.equal(lat, expected)


def test_no_dilation_option():
    m = pixel_mask([(4, 4, 7, 7)], (16, 16), dilate=0)
    assert m.sum() == 16 and m[4:8, 4:8].all()


def test_batch_masks_and_empty_regions():
    regions = [
        {"face": [Detection((40, 24, 50, 31), 0.99)], "hand": []},
        {},
        {"hand": [(0, 0, 3, 3)], "face": []},
    ]
    out = region_masks(regions, ["face", "hand"], (64, 96))
    assert out.shape == (3, 2, 8, 12)
    assert out[0, 0].sum() == 6 and out[0, 1].sum() == 0
    assert out[1].sum() == 0
    # Hand (0..3) dilated to 0..11 -> latent rows/cols 0 (0) and 1 (8).
    assert out[2, 0].sum() == 0
    assert torch.equal(out[2, 1][:2, :2], torch.ones(2, 2)) and out[2, 1].sum() == 4
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_errors():
    with pytest.raises(RewardError, match="multiple of the VAE factor"):
        latent_hw_of((100, 64))
    with pytest.raises(RewardError, match="x2 < x1"):
        pixel_mask([(10, 10, 5, 20)], (32, 32))
    with pytest.raises(RewardError, match="4 numbers"):
        pixel_mask([(1, 2, 3)], (32, 32))
    with pytest.raises(RewardError, match="at least one region"):
        region_masks([{}], [], (32, 32))
    assert region_mask([], (100, 64), latent_hw=(13, 8)).shape == (13, 8)


def test_parity_with_reference_ops():
    """Same masks as FairHuman's ops: PIL rectangle fill, cv2.dilate(MORPH_RECT 16x16), ToTensor +
    Normalize(0.5, 0.5), F.interpolate (nearest) to latent size, > 0."""
    cv2 = pytest.importorskip("cv2", reason="needs opencv (the 'detect' extra) for the reference dilation")
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = 8 * int(rng.integers(4, 20)), 8 * int(rng.integers(4, 20))
        boxes = []
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(-20, w + 5), rng.uniform(-20, h + 5)
            boxes.append((x1, y1, x1 + rng.uniform(0, 60), y1 + rng.uniform(0, 60)))
        canvas = Image.new("L", (w, h), "black")
        draw = ImageDraw.Draw(canvas)
        for b in boxes:
            draw.rectangle(b, fill="white")
        ref = cv2.dilate(np.array(canvas), cv2.getStructuringElement(cv2.MORPH_RECT, (16, 16)))
        assert np.array_equal(pixel_mask(boxes, (h, w)), ref > 0), boxes
        normed = (torch.from_numpy(ref).float() / 255 - 0.5) / 0.5
        ref_lat = torch.nn.functional.interpolate(normed[None, None], size=(h // 8, w // 8))[0, 0] > 0
        assert torch.equal(region_mask(boxes, (h, w)), ref_lat.float()), boxes
