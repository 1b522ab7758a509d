import math

import pytest
import torch

from rlfh.losses.dpo import dpo_loss_from_mse
from rlfh.losses.objectives import pairwise_objectives, weighted_objectives


def tensors(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(b, 4, 8, 8, generator=g)
    preds = [eps + 0.5 * torch.randn(b, 4, 8, 8, generator=g) for _ in range(4)]
    return preds, eps


def face_masks(b, which):
    m = torch.zeros(b, 1, 8, 8)
    for i in which:
        m[i, :, 2:5, 2:5] = 1.0
    return m


def test_global_region_is_plain_dpo():
    (mw, ml, rw, rl), eps = tensors()
    objs, metrics = pairwise_objectives("dpo", 100.0, mw, ml, rw, rl, eps, {}, {}, ["global"], 5.0)

    def mse(p):
        return (p - eps).pow(2).flatten(1).mean(1)

    expected = dpo_loss_from_mse(mse(mw), mse(ml), mse(rw), mse(rl), 100.0).loss
    assert torch.allclose(objs["global"], expected)
    assert "loss/dpo" in metrics and "dpo/implicit_acc" in metrics


def test_face_region_uses_masked_scaled_error_on_pairs_with_faces():
    (mw, ml, rw, rl), eps = tensors()
    mask_w, mask_l = face_masks(4, [0, 2]), face_masks(4, [2])
    objs, metrics = pairwise_objectives(
        "dpo", 100.0, mw, ml, rw, rl, eps, {"face": mask_w}, {"face": mask_l}, ["global", "face"], 5.0
    )
    valid = [0, 2]  # pairs 1 and 3 have no face on either side: they do not enter the face objective

    def err(p, m):  # not normalised by mask area
        return (5.0 * m * (p - eps)).pow(2).flatten(1).mean(1)

    expected = dpo_loss_from_mse(
        err(mw, mask_w)[valid], err(ml, mask_l)[valid], err(rw, mask_w)[valid], err(rl, mask_l)[valid], 100.0
    ).loss
    assert torch.allclose(objs["face"], expected)
    assert set(objs) == {"global", "face"} and "dpo/face/implicit_acc" in metrics


def test_absent_region_drops_out():
    (mw, ml, rw, rl), eps = tensors()
    empty = {"hand": torch.zeros(4, 1, 8, 8)}
    objs, _ = pairwise_objectives("dpo_hinge", 10.0, mw, ml, rw, rl, eps, empty, empty, ["global", "hand"], 5.0)
    assert set(objs) == {"global"}


def test_ipo_variant_dispatch():
    (mw, ml, rw, rl), eps = tensors()
    objs, metrics = pairwise_objectives("dpo_ipo", 10.0, mw, ml, rw, rl, eps, {}, {}, ["global"], 5.0)

    def mse(p):
        return (p - eps).pow(2).flatten(1).mean(1)

    logits = -0.5 * ((mse(mw) - mse(ml)) - (mse(rw) - mse(rl)))
    assert torch.allclose(objs["global"], ((logits - 1 / (2 * 10.0)) ** 2).mean())
    assert "loss/dpo_ipo" in metrics


def test_weighted_objective_formula():
    (p, _, _, _), eps = tensors()
    w = torch.tensor([2.0, 0.0, 1.0, 1.0])
    mask = {"face": face_masks(4, [0, 1])}
    objs, _ = weighted_objectives("rwr", p, eps, w, mask, ["global", "face"], 5.0)
    e = (p - eps).pow(2).flatten(1).mean(1)
    assert torch.allclose(objs["global"], (w[[0, 2, 3]] * e[[0, 2, 3]]).sum() / 3)
    ef = (5.0 * mask["face"] * (p - eps)).pow(2).flatten(1).mean(1)
    assert torch.allclose(objs["face"], w[0] * ef[0] / 1)  # sample 1 has a face but weight 0
    assert math.isfinite(float(objs["face"]))


def test_missing_mask_is_an_error():
    (mw, ml, rw, rl), eps = tensors()
    with pytest.raises(ValueError, match="no mask for region 'face'"):
        pairwise_objectives("dpo", 1.0, mw, ml, rw, rl, eps, {}, {}, ["face"], 5.0)
