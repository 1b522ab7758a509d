"""Tests for rlfh/losses/filtered.py (filtered fine-tuning; Lee et al. arXiv 2302.12192, RAFT arXiv 2304.06767)."""

import math

import numpy as np
import pytest
import torch

from rlfh.data.pairs import sample_weights
from rlfh.losses.filtered import filter_weights
from rlfh.losses.objectives import weighted_objectives


def test_worked_numbers():
    # Per-sample MSEs 1, 4, 9; rewards 0.2, 0.5, 0.9; C = 0.5 keeps samples 1 and 2 -> (4 + 9) / 2.
    k = filter_weights(np.array([0.2, 0.5, 0.9]), threshold=0.5, top_fraction=0.5)
    assert k.tolist() == [0.0, 1.0, 1.0]
    pred = torch.stack([v * torch.ones(2, 2, 2) for v in (1.0, 2.0, 3.0)])
    objs, _ = weighted_objectives(
        "filtered", pred, torch.zeros_like(pred), torch.tensor(k, dtype=torch.float32), {}, ["global"], 5.0
    )
    torch.testing.assert_close(objs["global"], torch.tensor(6.5))


def test_top_fraction_quantile():
    # no threshold: C = quantile(r, 1 - 0.25) with linear interpolation = 7.75 on 1..10 -> keeps 8, 9, 10
    r = np.arange(1.0, 11.0)
    assert np.flatnonzero(filter_weights(r, None, 0.25)).tolist() == [7, 8, 9]
    assert filter_weights(r, None, 1.0).tolist() == [1.0] * 10
    assert sample_weights([None, *r], lambda s: filter_weights(s, None, 0.25)).tolist() == [
        0.0,
        *filter_weights(r, None, 0.25),
    ]


def test_region_loss_over_kept_samples_with_the_region():
    gen = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    mask = torch.zeros(6, 1, 8, 8)
    mask[[0, 1, 4], :, 2:6, 2:6] = 1.0
    r = np.array([0.3, -1.0, 0.9, 0.1, 2.0, -0.5])
    k = filter_weights(r, None, 0.5)  # C = median = 0.2 keeps 0, 2, 4
    assert np.flatnonzero(k).tolist() == [0, 2, 4]
    objs, _ = weighted_objectives(
        "filtered", pred, eps, torch.tensor(k, dtype=torch.float32), {"face": mask}, ["global", "face"], 5.0
    )
    per = ((5.0 * mask * (pred - eps)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(objs["face"], (per[0] + per[4]) / 2)  # kept AND with a face
    torch.testing.assert_close(objs["global"], ((pred - eps) ** 2).mean(dim=(1, 2, 3))[[0, 2, 4]].mean())


def test_none_kept_gives_no_objective():
    pred = torch.randn(3, 4, 4, 4)
    k = filter_weights(np.array([0.0, 0.1, 0.2]), threshold=1.0, top_fraction=0.5)
    objs, metrics = weighted_objectives("filtered", pred, torch.zeros_like(pred), torch.tensor(k), {}, ["global"], 5.0)
    assert objs == {} and metrics == {}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="finite"):
        filter_weights(np.array([math.inf, 0.0]), 0.0, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        filter_weights(np.zeros(2), math.nan, 0.5)
    with pytest.raises(ValueError, match="top_fraction"):
        filter_weights(np.zeros(2), None, 0.0)
