"""Tests for rlfh/losses/fairness.py: FairHuman's MPD (FairGrad) rule (arXiv 2507.02714) and its alternatives."""

import math

import numpy as np
import pytest
import torch

from rlfh.losses.fairness import (
    combine_objectives,
    combine_weights,
    gram_matrix,
    objective_gradients,
    solve_mpd_weights,
)


def _rel_residual(m, w, alpha):
    target = w.pow(-1.0 / alpha)
    return float(((m @ w - target).abs() / target).max())


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_mpd_solves_equation_on_random_gram(k, alpha):
    gen = torch.Generator().manual_seed(100 * k + int(10 * alpha))
    g = torch.randn(k, 64, generator=gen, dtype=torch.float64)
    g = g * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]  # norms over two decades
    m = g @ g.T
    res = solve_mpd_weights(m, alpha=alpha)
    assert res.converged and res.ridge == 0.0 and res.num_active == k
    assert bool((res.weights > 0).all())
    assert _rel_residual(m, res.weights, alpha) < 1e-6
    torch.testing.assert_close(res.coefficients, k * res.weights)


def test_mpd_worked_example_orthogonal():
    # g1 = (3, 0), g2 = (0, 4): M = diag(9, 16); 9 w1 = w1^(-1/2) -> w1 = 3^(-4/3), w2 = 4^(-4/3).
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    res = solve_mpd_weights(g @ g.T, alpha=2.0)
    torch.testing.assert_close(
        res.weights, torch.tensor([0.23112042478354491, 0.15749013123685915], dtype=torch.float64)
    )
    d = (res.coefficients[:, None] * g).sum(0)  # d = K * sum_i w_i g_i
    torch.testing.assert_close(d, torch.tensor([1.3867225487012695, 1.2599210498948732], dtype=torch.float64))
    # Utilities u_i = g_i . d = K * w_i^(-1/alpha).
    torch.testing.assert_close(g @ d, 2 * res.weights.pow(-0.5))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_mpd_orthogonal_closed_form(alpha):
    # Orthogonal gradients: ||g_i||^2 w_i = w_i^(-1/alpha)  =>  w_i = ||g_i||^(-2 alpha / (alpha + 1)).
    norms = torch.tensor([0.01, 0.5, 2.0, 30.0], dtype=torch.float64)
    g = (
        torch.diag(norms)
        @ torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    )
    res = solve_mpd_weights(g @ g.T, alpha=alpha)
    torch.testing.assert_close(res.weights, norms.pow(-2 * alpha / (alpha + 1)), rtol=1e-9, atol=0)


def test_mpd_drops_zero_gradient():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    res = solve_mpd_weights(g @ g.T)
    assert res.active.tolist() == [True, False, True] and res.num_active == 2
    assert res.weights[1] == 0.0 and res.coefficients[1] == 0.0
    sub = solve_mpd_weights((g[[0, 2]] @ g[[0, 2]].T))
    torch.testing.assert_close(res.weights[[0, 2]], sub.weights)
    # K counts the objectives given, dropped ones included (FairGrad's fixed n_tasks)
    torch.testing.assert_close(res.coefficients[[0, 2]], 3 * sub.weights)
    # Caller-marked inactive objective is dropped as well.
    res2 = solve_mpd_weights(g @ g.T, active=torch.tensor([True, True, False]))
    assert res2.num_active == 1 and res2.weights[2] == 0.0
    # Everything zero: all-zero coefficients, no NaN.
    res3 = solve_mpd_weights(torch.zeros(3, 3))
    assert res3.num_active == 0 and res3.coefficients.abs().sum() == 0


def test_mpd_parallel_and_opposed_gradients():
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    # Parallel, same direction: w2 = w1 / 4 exactly for alpha = 2 (from 2 * w1^(-1/2) = w2^(-1/2)).
    gp = torch.stack([g, 2 * g])
    res = solve_mpd_weights(gp @ gp.T, alpha=2.0)
    assert res.ridge > 0 and res.converged and torch.isfinite(res.weights).all()
    torch.testing.assert_close(res.weights[1], res.weights[0] / 4, rtol=1e-6, atol=0)
    # Exactly opposed: no solution without the ridge; with it, finite equal weights and d = 0.
    go = torch.stack([g, -g])
    res = solve_mpd_weights(go @ go.T, alpha=2.0)
    assert res.ridge > 0 and torch.isfinite(res.weights).all() and res.converged
    torch.testing.assert_close(res.weights[0], res.weights[1])
    assert float((res.coefficients[:, None] * go).sum(0).norm()) < 1e-6 * float(res.coefficients.max())


def test_mpd_k1():
    res = solve_mpd_weights(torch.tensor([[4.0]]), alpha=2.0)
    torch.testing.assert_close(res.weights, torch.tensor([4.0 ** (-2.0 / 3.0)], dtype=torch.float64))
    assert res.num_active == 1


def test_mpd_matches_scipy_least_squares():
    least_squares = pytest.importorskip("scipy.optimize").least_squares
    gen = torch.Generator().manual_seed(7)
    for k, alpha in [(2, 2.0), (3, 2.0), (3, 1.0), (4, 3.0)]:
        g = torch.randn(k, 32, generator=gen, dtype=torch.float64)
        m = g @ g.T
        a = m.numpy()

        def objfn(x):
            return a @ x - np.power(1.0 / x, 1.0 / alpha)

        x0 = np.ones(k) / k
        ref = least_squares(objfn, x0, bounds=(0, np.inf))  # as the reference calls it
        ref_tight = least_squares(objfn, x0, bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15)
        ours = solve_mpd_weights(m, alpha=alpha).weights.numpy()
        np.testing.assert_allclose(ours, ref.x, rtol=1e-4)
        np.testing.assert_allclose(ours, ref_tight.x, rtol=1e-8)


def test_gram_and_combine_per_parameter():
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    k = 3
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(k)]
    grads[1][1] = None  # objective 1 does not touch parameter 1
    flat = torch.stack(
        [torch.cat([(g if g is not None else torch.zeros(s)).reshape(-1) for g, s in zip(gi, shapes)]) for gi in grads]
    ).double()
    torch.testing.assert_close(gram_matrix(grads), flat @ flat.T)

    # the loss training back-propagates, sum_i c_i L_i, has gradient K * sum_i w_i g_i
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    probes = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(k)]
    objectives = {f"r{i}": sum((p * q).sum() for p, q in zip(params, probes[i])) for i in range(k)}  # grad = probes[i]
    loss, metrics = combine_objectives(objectives, "mpd", k, params)
    grads = objective_gradients(list(objectives.values()), params)
    res = combine_weights(gram_matrix(grads), "mpd", alpha=2.0)
    d = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gi]) for gi in probes]).double()
    torch.testing.assert_close(d, (k * res.weights[:, None] * flat).sum(0), rtol=1e-6, atol=1e-6)
    assert [metrics[f"mpd/weight/r{i}"] for i in range(k)] == pytest.approx(res.weights.tolist())
    norms = flat.norm(dim=1).tolist()
    assert [metrics[f"mpd/grad_norm/r{i}"] for i in range(k)] == pytest.approx(norms)


def test_combine_objectives_drops_a_region_without_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    out = model(torch.randn(8, 4))
    objectives = {
        "global": out[:, 0].pow(2).mean() * 100,
        "face": out[:, 1].abs().mean(),
        "hand": (out[:, 2] * 0).sum().detach(),
    }
    loss, metrics = combine_objectives(objectives, "mpd", 3, list(model.parameters()))
    assert metrics["mpd/weight/hand"] == 0 and metrics["fairness/coef/hand"] == 0
    assert metrics["mpd/weight/global"] > 0 and metrics["mpd/weight/face"] > 0
    # the larger gradient gets the smaller weight (orthogonal closed form: w_i ~ ||g_i||^(-4/3))
    assert metrics["mpd/grad_norm/global"] > metrics["mpd/grad_norm/face"]
    assert metrics["mpd/weight/global"] < metrics["mpd/weight/face"]
    loss.backward()  # one backward of the combined loss: what the engine runs


def test_combine_objectives_fixed_rules_and_one_region():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    loss, m = combine_objectives({"global": a, "face": b}, "sum", 2, [a, b], weights={"face": 0.25})
    assert float(loss) == 2.0 + 0.75 and m == {"fairness/coef/global": 1.0, "fairness/coef/face": 0.25}
    loss, m = combine_objectives({"global": a, "face": b}, "equal", 3, [a, b])
    assert float(loss) == 2.5 and m["fairness/coef/face"] == 0.5
    loss, m = combine_objectives({"global": a}, "mpd", 1, [a])  # one configured region: the loss as is
    assert loss is a and m == {}
    assert combine_objectives({}, "mpd", 2, [a]) == (None, {})


def test_other_methods():
    g = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    m = g @ g.T
    torch.testing.assert_close(combine_weights(m, "equal").coefficients, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        combine_weights(m, "sum", weights=[1.0, 0.25]).coefficients, torch.tensor([1.0, 0.25], dtype=torch.float64)
    )
    # MGDA, two objectives: lambda_1 = clip((g2 - g1) . g2 / ||g1 - g2||^2, 0, 1) = 4 / 4 = 1.
    res = combine_weights(m, "mgda")
    torch.testing.assert_close(res.weights, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(res.coefficients, torch.tensor([2.0, 0.0], dtype=torch.float64))
    g2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # interior: lambda = (1/2, 1/2)
    torch.testing.assert_close(
        combine_weights(g2 @ g2.T, "mgda").weights, torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    # MGDA KKT on a random 4-objective problem: (M lambda)_i >= lambda^T M lambda, equality on the support.
    gr = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mr = gr @ gr.T
    lam = combine_weights(mr, "mgda").weights
    assert abs(float(lam.sum()) - 1) < 1e-12 and bool((lam >= 0).all())
    val = float(lam @ mr @ lam)
    grad = mr @ lam
    assert bool((grad >= val - 1e-9).all())
    assert bool(((grad - val).abs()[lam > 1e-9] < 1e-8).all())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown"):
        combine_weights(torch.eye(2), "pcgrad")
    with pytest.raises(ValueError, match="alpha"):
        solve_mpd_weights(torch.eye(2), alpha=0.0)
    with pytest.raises(ValueError, match="square"):
        solve_mpd_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        solve_mpd_weights(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))
    with pytest.raises(ValueError, match="weights"):
        combine_weights(torch.eye(2), "sum", weights=[1.0])


def test_mpd_step_scale_counts_the_objectives_trained_not_those_present():
    """FairGrad's update is n_tasks * sum_i w_i g_i with n_tasks fixed (PRIS-CV/FairHuman, weight_methods.py,
    ``overwrite_grad``): a micro-batch without a hand keeps the scale 3 of a run training global, face and hand."""
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    res = solve_mpd_weights(g @ g.T, alpha=2.0, num_objectives=3)
    # orthogonal gradients: w_i = ||g_i||^(-4/3) -> 2^(-4/3), 1; coefficients 3 w (2 w before)
    w = torch.tensor([2.0 ** (-4.0 / 3.0), 1.0], dtype=torch.float64)
    torch.testing.assert_close(res.weights, w)
    torch.testing.assert_close(res.coefficients, 3 * w)
    assert res.num_active == 2
    # a dropped zero-gradient objective does not lower K either (default K = the gram's size)
    g3 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(solve_mpd_weights(g3 @ g3.T).coefficients[:2], 3 * w)
    with pytest.raises(ValueError, match="num_objectives"):
        solve_mpd_weights(g @ g.T, num_objectives=1)

    a, b = torch.tensor(0.0, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    objectives = {"global": 2.0 * a, "face": 1.0 * b}  # gradients (2, 0) and (0, 1); no hand in this batch
    loss, metrics = combine_objectives(objectives, "mpd", 3, [a, b])
    assert metrics["fairness/coef/global"] == pytest.approx(3 * 2.0 ** (-4.0 / 3.0))
    assert metrics["fairness/coef/face"] == pytest.approx(3.0)
    _, metrics = combine_objectives(objectives, "mgda", 3, [a, b])
    # MGDA: lambda = (1/5, 4/5) for g1 = (2, 0), g2 = (0, 1); scaled by the 3 objectives trained
    assert metrics["fairness/coef/global"] == pytest.approx(3 * 0.2) and metrics["fairness/coef/face"] == pytest.approx(
        3 * 0.8
    )
