import math

import pytest
import torch

from rlfh.losses.dpo import dpo_loss_from_mse, implicit_accuracy
from rlfh.losses.objectives import pairwise_objectives
from rlfh.losses.region_mse import per_sample_mse


def dpo_from_predictions(mw, ml, rw, rl, eps, beta):
    """What the learner computes for the global region: per-sample MSEs into the sigmoid loss."""
    return dpo_loss_from_mse(*(per_sample_mse(p, eps) for p in (mw, ml, rw, rl)), beta)


def reference_formula(mw, ml, rw, rl, eps, beta):
    """Diffusion-DPO (arXiv 2311.12908 eq. 14, as in the DiffusionDPO reference train.py).

    Element by element in float64."""
    losses, inside_all = [], []
    for i in range(mw.shape[0]):

        def mse(a, i=i):
            return float(((a[i].double() - eps[i].double()) ** 2).mean())

        model_diff = mse(mw) - mse(ml)
        ref_diff = mse(rw) - mse(rl)
        inside = -0.5 * beta * (model_diff - ref_diff)
        losses.append(-math.log(1.0 / (1.0 + math.exp(-inside))))
        inside_all.append(inside)
    return sum(losses) / len(losses), inside_all


@pytest.mark.parametrize("beta", [1.0, 500.0, 5000.0])
def test_matches_formula_on_random_tensors(beta):
    g = torch.Generator().manual_seed(0)
    shape = (6, 4, 8, 8)
    eps = torch.randn(shape, generator=g)
    mw, ml = eps + 0.3 * torch.randn(shape, generator=g), eps + 0.3 * torch.randn(shape, generator=g)
    rw, rl = eps + 0.3 * torch.randn(shape, generator=g), eps + 0.3 * torch.randn(shape, generator=g)
    out = dpo_from_predictions(mw, ml, rw, rl, eps, beta)
    ref_loss, ref_inside = reference_formula(mw, ml, rw, rl, eps, beta)
    assert float(out.loss) == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert out.inside.tolist() == pytest.approx(ref_inside, rel=1e-4, abs=1e-4)
    acc = sum(i > 0 for i in ref_inside) / len(ref_inside)
    assert out.metrics()["dpo/implicit_acc"] == pytest.approx(acc)
    # the learner's path from predictions gives the same loss
    objs, metrics = pairwise_objectives("dpo", beta, mw, ml, rw, rl, eps, {}, {}, ["global"], 5.0)
    assert float(objs["global"]) == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert metrics["dpo/implicit_acc"] == pytest.approx(acc)


def test_worked_numbers():
    # mse_theta_w=0.10, mse_theta_l=0.30, mse_ref_w=0.20, mse_ref_l=0.20, beta=10:
    # inside = -0.5*10*((0.10-0.30) - 0) = 1.0 ; loss = -log(sigmoid(1)) = 0.3132617
    out = dpo_loss_from_mse(
        torch.tensor([0.10]), torch.tensor([0.30]), torch.tensor([0.20]), torch.tensor([0.20]), 10.0
    )
    assert float(out.inside[0]) == pytest.approx(1.0)
    assert float(out.loss) == pytest.approx(0.3132617, abs=1e-6)


def test_implicit_accuracy_counts_ties_half():
    assert float(implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0]))) == pytest.approx(0.625)


def test_policy_equal_to_reference_gives_log2_and_half_accuracy():
    x = torch.randn(3, 4, 4, 4)
    eps = torch.randn(3, 4, 4, 4)
    out = dpo_from_predictions(x, x + 1, x, x + 1, eps, 5000.0)
    assert float(out.loss) == pytest.approx(math.log(2.0), abs=1e-6)
    assert out.metrics()["dpo/implicit_acc"] == 0.5  # ties count half


def test_gradient_lowers_winner_error():
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(2, 4, 4, 4, generator=g)
    mw = (eps + torch.randn(2, 4, 4, 4, generator=g)).requires_grad_()
    ml = (eps + torch.randn(2, 4, 4, 4, generator=g)).requires_grad_()
    out = dpo_from_predictions(mw, ml, mw.detach(), ml.detach(), eps, 100.0)
    out.loss.backward()
    with torch.no_grad():
        stepped_w, stepped_l = mw - 0.01 * mw.grad, ml - 0.01 * ml.grad
    assert (per_sample_mse(stepped_w, eps) < per_sample_mse(mw, eps)).all()
    assert (per_sample_mse(stepped_l, eps) > per_sample_mse(ml, eps)).all()


def test_shape_mismatch_and_bad_beta():
    with pytest.raises(ValueError, match="shape"):
        per_sample_mse(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 5))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss_from_mse(*(torch.zeros(1),) * 4, beta=0.0)
