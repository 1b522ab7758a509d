"""Tests for rlfh/losses/rwr.py (reward-weighted regression; Lee et al. arXiv 2302.12192, DDPO's RWR baseline)."""

import math

import numpy as np
import pytest
import torch

from rlfh.data.pairs import sample_weights
from rlfh.losses.objectives import weighted_objectives
from rlfh.losses.rwr import rwr_weights, weighted_loss


def test_worked_numbers():
    # rewards (0, ln 3), beta = 1: softmax (1/4, 3/4), times N = 2 -> (0.5, 1.5) (mean weight 1).
    w = rwr_weights(np.array([0.0, math.log(3.0)]), beta=1.0)
    np.testing.assert_allclose(w, [0.5, 1.5], rtol=1e-12)
    # per-sample MSEs 1 and 4 (constant diffs 1 and 2) -> (0.5 * 1 + 1.5 * 4) / 2 = 3.25 = 1/4 * 1 + 3/4 * 4
    pred = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    objs, metrics = weighted_objectives(
        "rwr", pred, torch.zeros_like(pred), torch.tensor(w, dtype=torch.float32), {}, ["global"], 5.0
    )
    torch.testing.assert_close(objs["global"], torch.tensor(3.25))
    assert metrics["loss/rwr"] == pytest.approx(3.25)


def test_against_formula_and_limits():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(5) * 100  # large rewards: the softmax must stay finite
    beta = 0.7
    e = np.exp(beta * r - (beta * r).max())
    np.testing.assert_allclose(rwr_weights(r, beta), 5 * e / e.sum(), rtol=1e-12)
    np.testing.assert_array_equal(rwr_weights(r, 0.0), np.ones(5))  # beta = 0: the plain mean MSE
    assert rwr_weights(r, 1e6)[np.argmax(r)] == 5.0  # beta -> inf: only the best sample
    # the learner's weights are these, over the scored samples of the round
    np.testing.assert_array_equal(
        sample_weights([*r[:2], None, *r[2:]], lambda s: rwr_weights(s, beta)), np.insert(rwr_weights(r, beta), 2, 0.0)
    )


def test_weighted_loss_and_gradient():
    gen = torch.Generator().manual_seed(1)
    per = torch.rand(3, generator=gen).requires_grad_(True)
    w = torch.tensor([0.5, 1.0, 1.5], requires_grad=True)
    loss = weighted_loss(per, w)
    torch.testing.assert_close(loss, (0.5 * per[0] + per[1] + 1.5 * per[2]) / 3)
    loss.backward()
    assert w.grad is None and torch.allclose(per.grad, torch.tensor([0.5, 1.0, 1.5]) / 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="finite"):
        rwr_weights(np.array([0.0, math.nan]), 1.0)
    with pytest.raises(ValueError, match="beta"):
        rwr_weights(np.zeros(2), -1.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        weighted_loss(torch.zeros(3), torch.zeros(2))
