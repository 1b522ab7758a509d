"""FaceScore's ranking loss (arXiv 2406.17100 eq. 3) on worked numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlfh.losses.ranking import ranking_accuracy, ranking_loss


def test_worked_numbers():
    # d = s_w - s_l = [1, -1, 0, -100]
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(-1) = log(1 + e) = 1.3132617,
    # -log sigmoid(0) = log 2 = 0.6931472, -log sigmoid(-100) = 100 + log(1 + e^-100) = 100.0
    # mean = 102.3196706 / 4 = 25.5799176 ; accuracy: only the first pair (the tie is not a win) = 0.25
    s_w = torch.tensor([2.0, 0.5, 1.0, -3.0], requires_grad=True)
    s_l = torch.tensor([1.0, 1.5, 1.0, 97.0], requires_grad=True)
    loss = ranking_loss(s_w, s_l)
    assert float(loss) == pytest.approx(25.5799176, abs=1e-5)
    assert float(ranking_accuracy(s_w, s_l)) == 0.25
    # dL/ds_w_i = -(1 - sigmoid(d_i)) / B and dL/ds_l_i = -dL/ds_w_i
    loss.backward()
    expected = [-(1 - 1 / (1 + math.exp(-d))) / 4 for d in (1.0, -1.0, 0.0, -100.0)]
    assert s_w.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert s_l.grad.tolist() == pytest.approx([-e for e in expected], abs=1e-6)
    assert s_w.grad[2] == pytest.approx(-0.125)


def test_equals_imagereward_cross_entropy_form():
    # ImageReward's train.py: cross_entropy over [r_better, r_worse] with target 0, i.e. -log softmax_0
    g = torch.Generator().manual_seed(0)
    s_w, s_l = 3 * torch.randn(64, generator=g), 3 * torch.randn(64, generator=g)
    ce = F.cross_entropy(torch.stack([s_w, s_l], dim=1), torch.zeros(64, dtype=torch.long))
    assert float(ranking_loss(s_w, s_l)) == pytest.approx(float(ce), rel=1e-6)


def test_equal_scores_give_log2():
    s = torch.randn(5)
    assert float(ranking_loss(s, s.clone())) == pytest.approx(math.log(2), abs=1e-7)
    assert float(ranking_accuracy(s, s.clone())) == 0.0


@pytest.mark.parametrize("shapes", [((3,), (4,)), ((0,), (0,)), ((2, 1), (2, 1))])
def test_bad_shapes_are_refused(shapes):
    with pytest.raises(ValueError, match="one score per pair"):
        ranking_loss(torch.zeros(shapes[0]), torch.zeros(shapes[1]))
