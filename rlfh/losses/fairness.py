"""Combining per-objective gradients: FairGrad / MPD (FairHuman), sum, equal, MGDA.

Papers: FairHuman, arXiv 2507.02714 (reference: PRIS-CV/FairHuman, class FairGrad in
weighting_strategy/weight_methods.py, used by train_text_to_image_lora_sdxl_mpd_fair.py); FairGrad,
Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024; MGDA, Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018. Used by the learner through
:func:`combine_objectives`.

MPD / FairGrad. With g_i the flattened gradient of objective i and M = G^T G (M_ij = g_i . g_j),
find w >= 0 with

    (M w)_i = w_i^(-1/alpha)        for every active i           (alpha = 2: minimum potential delay)
    d = K * sum_i w_i g_i            (K = number of objectives trained, present or not)

then the update is clipped to norm ``learner.max_grad_norm`` (FairHuman: 1.0; DeepSpeed's
``gradient_clipping`` does it) and the optimizer steps. The reference solves the
equation with scipy.optimize.least_squares (bounds (0, inf), start 1/K). Here it is solved as the
optimality condition of the strictly convex problem (alpha > 0, M PSD)

    minimize_{w > 0}  F(w) = 0.5 w^T M w - sum_i f(w_i),   f(w) = w^(1 - 1/alpha) / (1 - 1/alpha)  (log w if alpha = 1)

by damped Newton with a fraction-to-the-boundary rule and Armijo backtracking, in float64 on the K x K
matrix only. M is first scaled to unit mean diagonal (c = trace(M) / K); the solution for M is
c^(-alpha / (alpha + 1)) times the one for M / c. Orthogonal gradients give the closed form
w_i = ||g_i||^(-2 alpha / (alpha + 1)).
Conventions: objectives with a zero gradient (||g_i||^2 <= zero_tol * max_j ||g_j||^2, or marked
inactive by the caller) are dropped from the solve: weight 0. K stays the number of objectives the run
trains (``num_objectives``; the reference's ``newgrad * self.n_tasks`` in ``overwrite_grad``, n_tasks
fixed at 3 for global, face and hand), not the number present in the batch: a micro-batch without a
hand keeps the step scale of the others. When the scaled M is singular or
ill-conditioned in direction (lambda_min <= cond_tol * lambda_max of the correlation matrix
D^-1/2 M D^-1/2, D = diag(M): parallel or exactly opposed gradients), M + rho * diag(M) is solved
instead (rho = 1e-8), which always has a unique solution; the result reports rho. Exactly opposed gradients then get
large equal weights and d = 0.

Other rules (``method``): "sum": coefficients = the given weights; "equal": 1/K_all each (the gradient
of the mean loss); "mgda": K * lambda with lambda the min-norm point of the convex hull of the active
g_i (min lambda^T M lambda on the simplex), scaled by the same K as MPD, like the reference's MGDA
(``sol * self.n_tasks``).

Notation (code name -> paper symbol): gram -> G^T G; weights -> w; alpha -> alpha;
coefficients -> the c_i of d = sum_i c_i g_i (K * w_i for MPD).
Shapes: gram (K, K); weights, coefficients, active (K,); grads[i][p] a tensor shaped like parameter p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "FairnessWeights",
    "solve_mpd_weights",
    "min_norm_weights",
    "combine_weights",
    "gram_matrix",
    "objective_gradients",
    "needs_region_gradients",
    "combine_objectives",
]

METHODS = ("mpd", "sum", "equal", "mgda")


@dataclass(frozen=True)
class FairnessWeights:
    """Result of a weighting rule.

    Attributes:
        coefficients: c, (K,) float64; the combined update is d = sum_i c_i g_i.
        weights: the rule's raw weights, (K,) float64 (w for "mpd", lambda for "mgda").
        active: (K,) bool, objectives that took part (False: dropped, zero gradient).
        num_active: number of active objectives.
        ridge: ridge added to the scaled Gram matrix (0.0 when none was needed).
        iterations: solver iterations (0 for closed-form rules).
        residual: max_i |(M' w)_i - w_i^(-1/alpha)| / w_i^(-1/alpha) over active i, M' the solved
            matrix (ridge included) ("mpd"; 0.0 otherwise).
        converged: whether the residual is within the acceptance tolerance.
    """

    coefficients: Tensor
    weights: Tensor
    active: Tensor
    num_active: int
    ridge: float = 0.0
    iterations: int = 0
    residual: float = 0.0
    converged: bool = True


def _check_gram(gram: Tensor) -> Tensor:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square (K, K) matrix, got shape {tuple(gram.shape)}")
    m = gram.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"gram has non-finite entries: {m.tolist()}")
    if bool((torch.diagonal(m) < 0).any()):
        raise ValueError(f"gram must be PSD (a Gram matrix), but has negative diagonal entries: {m.tolist()}")
    return 0.5 * (m + m.T)


def _active_mask(m: Tensor, active: Optional[Tensor], zero_tol: float) -> Tensor:
    diag = torch.diagonal(m)
    act = diag > zero_tol * float(diag.max()) if float(diag.max()) > 0 else torch.zeros_like(diag, dtype=torch.bool)
    if active is not None:
        active = torch.as_tensor(active, dtype=torch.bool).cpu()
        if active.shape != diag.shape:
            raise ValueError(f"active must have shape {tuple(diag.shape)}, got {tuple(active.shape)}")
        act = act & active
    return act


def _ridge_if_needed(m: Tensor, cond_tol: float, ridge: float) -> tuple[Tensor, float]:
    """Add ridge * diag(m) when the correlation matrix of the gradients is (near) singular."""
    d = torch.diagonal(m).sqrt()
    corr = m / (d[:, None] * d[None, :])  # unit diagonal; insensitive to the gradients' norms
    eig = torch.linalg.eigvalsh(corr)
    if float(eig[0]) <= cond_tol * float(eig[-1]):
        return m + ridge * torch.diag(torch.diagonal(m)), ridge
    return m, 0.0


def _mpd_newton(m: Tensor, alpha: float, tol: float, max_iter: int) -> tuple[Tensor, int, float]:
    """Damped Newton on F(w) = 0.5 w^T m w - sum f(w_i) for a PSD m with a positive diagonal."""
    p = 1.0 / alpha

    def terms(w: Tensor) -> tuple[float, float]:
        """F(w) and the size of its rounding error (the magnitude of its two parts)."""
        f = torch.log(w) if alpha == 1.0 else w.pow(1.0 - p) / (1.0 - p)
        quad, lin = float(0.5 * w @ m @ w), float(f.sum())
        return quad - lin, abs(quad) + float(f.abs().sum())

    def residual(w: Tensor) -> float:
        target = w.pow(-p)
        return float(((m @ w - target).abs() / target).max())

    w = torch.diagonal(m).pow(-alpha / (alpha + 1.0))  # exact when m is diagonal
    res, it = residual(w), 0
    while res > tol and it < max_iter:
        it += 1
        grad = m @ w - w.pow(-p)
        hess = m + torch.diag(p * w.pow(-p - 1.0))  # PD for w > 0
        jac = torch.diagonal(hess).rsqrt()  # Jacobi scaling of the Newton system
        step = -jac * torch.linalg.solve(jac[:, None] * hess * jac[None, :], jac * grad)
        neg = step < 0
        s = 1.0
        if bool(neg.any()):
            s = min(1.0, 0.99 * float((-w[neg] / step[neg]).min()))  # stay inside w > 0
        f0, f_scale = terms(w)
        decrement = -float(grad @ step)  # Newton decrement^2, >= 0
        if decrement > 1e-9 * f_scale:  # F resolves the decrease: Armijo backtracking on F
            while s > 1e-12 and terms(w + s * step)[0] > f0 - 1e-4 * s * decrement:
                s *= 0.5
            ok = s > 1e-12
        else:  # quadratic-convergence region, F is below rounding: backtrack on the residual
            while s > 1e-6 and residual(w + s * step) >= res:
                s *= 0.5
            ok = s > 1e-6
        w_new = w + s * step
        if not ok or bool((w_new <= 0).any()) or torch.equal(w_new, w):
            break  # no further progress possible in float64
        w = w_new
        res = residual(w)
    return w, it, res


def solve_mpd_weights(
    gram: Tensor,
    alpha: float = 2.0,
    active: Optional[Tensor] = None,
    zero_tol: float = 1e-12,
    cond_tol: float = 1e-10,
    ridge: float = 1e-8,
    tol: float = 1e-12,
    accept_tol: float = 1e-6,
    max_iter: int = 100,
    num_objectives: Optional[int] = None,
) -> FairnessWeights:
    """Solve (M w)_i = w_i^(-1/alpha), w >= 0, over the active objectives; coefficients K * w.

    Args:
        gram: M = G^T G, shape (K, K), PSD.
        alpha: fairness exponent, > 0 (2 in FairHuman: minimum potential delay).
        active: optional (K,) bool; False drops an objective (e.g. its loss is exactly 0).
        zero_tol: relative squared-norm threshold (vs the largest) below which a gradient counts as zero.
        cond_tol: the ridge is added when lambda_min <= cond_tol * lambda_max of the gradients'
            correlation matrix D^-1/2 M D^-1/2 (parallel or opposed gradients).
        ridge: rho; the solved matrix is then M + rho * diag(M) (scale-free diagonal loading).
        tol: Newton stops when the relative residual reaches this.
        accept_tol: ``converged`` is True when the final relative residual is at most this.
        max_iter: Newton iteration cap.
        num_objectives: K of the coefficients K * w, the objectives the run trains (default: the K of
            ``gram``), at least the gram's size.

    Returns:
        FairnessWeights; dropped objectives get weight 0. No active objective: all zeros.

    Raises:
        ValueError: on a non-square, non-finite or non-PSD gram, or a bad alpha.
    """
    alpha = float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    m = _check_gram(gram)
    k = m.shape[0]
    scale = _step_scale(k, num_objectives)
    act = _active_mask(m, active, zero_tol)
    idx = torch.nonzero(act).flatten()
    w_full = torch.zeros(k, dtype=torch.float64)
    if idx.numel() == 0:
        return FairnessWeights(w_full.clone(), w_full, act, 0)
    ma = m[idx][:, idx]
    c = float(torch.diagonal(ma).mean())  # scale: unit mean diagonal
    ms, used_ridge = _ridge_if_needed(ma / c, cond_tol, ridge)
    u, iters, res = _mpd_newton(ms, alpha, tol, max_iter)
    w = u * c ** (-alpha / (alpha + 1.0))  # the residual is invariant under this rescaling
    w_full[idx] = w
    num_active = int(idx.numel())
    return FairnessWeights(
        coefficients=scale * w_full,
        weights=w_full,
        active=act,
        num_active=num_active,
        ridge=used_ridge,
        iterations=iters,
        residual=res,
        converged=res <= accept_tol,
    )


def _step_scale(k: int, num_objectives: Optional[int]) -> int:
    """K of MPD's and MGDA's coefficients K * w: the objectives trained (FairGrad's n_tasks)."""
    if num_objectives is None:
        return k
    if int(num_objectives) != num_objectives or num_objectives < k:
        raise ValueError(f"num_objectives={num_objectives} must be an integer >= the {k} objectives given")
    return int(num_objectives)


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    ks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / ks > 0).flatten()[-1])
    return (v - css[rho] / (rho + 1)).clamp(min=0.0)


def min_norm_weights(gram: Tensor, max_iter: int = 5000, tol: float = 1e-14) -> tuple[Tensor, int]:
    """lambda = argmin_{lambda in simplex} lambda^T M lambda (MGDA min-norm point).

    Accelerated projected gradient (FISTA) followed by an exact polish on the support via its KKT
    system; K is small, so both are cheap.

    Args:
        gram: M, (K, K) PSD, float64 on the CPU.
        max_iter: iteration cap for the projected-gradient phase.
        tol: stop when the iterate moves less than this (max-abs).

    Returns:
        (lambda of shape (K,), iterations).
    """
    k = gram.shape[0]
    lip = 2.0 * float(torch.linalg.eigvalsh(gram)[-1])
    x = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if lip <= 0:
        return x, 0
    y, t, it = x.clone(), 1.0, 0
    for it in range(1, max_iter + 1):
        x_new = _project_simplex(y - (2.0 * gram @ y) / lip)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        done = float((x_new - x).abs().max()) <= tol
        x, t = x_new, t_new
        if done:
            break
    support = torch.nonzero(x > 1e-10).flatten()
    s = support.numel()
    kkt = torch.zeros(s + 1, s + 1, dtype=torch.float64)
    kkt[:s, :s] = 2.0 * gram[support][:, support]
    kkt[:s, s] = 1.0
    kkt[s, :s] = 1.0
    rhs = torch.zeros(s + 1, dtype=torch.float64)
    rhs[s] = 1.0
    sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution.flatten()[:s]
    if bool((sol >= 0).all()) and abs(float(sol.sum()) - 1.0) < 1e-9:
        cand = torch.zeros_like(x)
        cand[support] = sol
        if float(cand @ gram @ cand) <= float(x @ gram @ x):
            x = cand
    return x, it


def combine_weights(
    gram: Tensor,
    method: str = "mpd",
    alpha: float = 2.0,
    weights: Optional[Sequence[float]] = None,
    active: Optional[Tensor] = None,
    num_objectives: Optional[int] = None,
    **solver_kwargs,
) -> FairnessWeights:
    """Coefficients c of the combined update d = sum_i c_i g_i under a named rule.

    Args:
        gram: M = G^T G, shape (K, K).
        method: "mpd" (FairGrad, c = N * w), "sum" (c = ``weights``), "equal" (c = 1/K),
            "mgda" (c = N * lambda, lambda the min-norm convex combination).
        alpha: fairness exponent for "mpd".
        weights: the K fixed weights for "sum" (default all ones).
        active: optional (K,) bool mask of objectives to keep ("mpd", "mgda").
        num_objectives: N, the objectives the run trains ("mpd", "mgda"; default K).
        **solver_kwargs: extra keyword arguments for :func:`solve_mpd_weights`.

    Returns:
        FairnessWeights.

    Raises:
        ValueError: for an unknown method or bad arguments.
    """
    if method == "mpd":
        return solve_mpd_weights(gram, alpha=alpha, active=active, num_objectives=num_objectives, **solver_kwargs)
    m = _check_gram(gram)
    k = m.shape[0]
    if method in ("sum", "equal"):
        return fixed_weights(method, k, weights)
    if method == "mgda":
        act = _active_mask(m, active, solver_kwargs.get("zero_tol", 1e-12))
        idx = torch.nonzero(act).flatten()
        w_full = torch.zeros(k, dtype=torch.float64)
        if idx.numel() == 0:
            return FairnessWeights(w_full.clone(), w_full, act, 0)
        lam, iters = min_norm_weights(m[idx][:, idx])
        w_full[idx] = lam
        scale = _step_scale(k, num_objectives)
        return FairnessWeights(scale * w_full, w_full, act, int(idx.numel()), iterations=iters)
    raise ValueError(f"unknown gradient-combination method {method!r}; expected one of {METHODS}")


def gram_matrix(grads: Sequence[Sequence[Optional[Tensor]]]) -> Tensor:
    """M_ij = sum_p <g_i^p, g_j^p>, without concatenating parameters into one vector.

    Args:
        grads: grads[i][p] is objective i's gradient for parameter p (None means zero); every
            objective lists the same parameters in the same order.

    Returns:
        (K, K) float64 tensor on the CPU. Each per-parameter dot product runs on the gradients'
        device in float32 (float64 for float64 gradients) and is accumulated in float64.

    Raises:
        ValueError: on ragged lists or mismatched gradient shapes.
    """
    k = len(grads)
    if k == 0:
        raise ValueError("grads must hold at least one objective")
    num_params = len(grads[0])
    if any(len(g) != num_params for g in grads):
        raise ValueError(f"every objective must list the same parameters, got lengths {[len(g) for g in grads]}")
    acc: List[List[Optional[Tensor]]] = [[None] * k for _ in range(k)]
    for p in range(num_params):
        flat = []
        for i in range(k):
            g = grads[i][p]
            if g is not None:
                if g.shape != next(x[p] for x in grads if x[p] is not None).shape:
                    raise ValueError(f"parameter {p}: gradient shapes differ across objectives")
                g = g.detach().reshape(-1)
                g = g if g.dtype == torch.float64 else g.float()
            flat.append(g)
        for i in range(k):
            for j in range(i, k):
                if flat[i] is None or flat[j] is None:
                    continue
                dot = torch.dot(flat[i], flat[j]).double()
                acc[i][j] = dot if acc[i][j] is None else acc[i][j] + dot
    out = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            if acc[i][j] is not None:
                out[i, j] = out[j, i] = float(acc[i][j])
    return out


def objective_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> List[List[Optional[Tensor]]]:
    """Per-objective gradients grads[i][p] = dL_i/dtheta_p by separate backward passes.

    A loss that does not require grad (e.g. a constant 0: no face in the batch) gives all None.

    Args:
        losses: K scalar losses sharing one graph.
        params: the trainable parameters.

    Returns:
        grads[i][p], None where parameter p does not influence loss i.
    """
    params = list(params)
    out: List[List[Optional[Tensor]]] = []
    for i, loss in enumerate(losses):
        if loss.ndim != 0:
            raise ValueError(f"loss {i} must be a scalar, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            out.append([None] * len(params))
            continue
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out.append(list(g))
    return out


def fixed_weights(method: str, k: int, weights: Optional[Sequence[float]] = None) -> FairnessWeights:
    """The rules that need no gradients: "sum" (c = ``weights``, default all ones), "equal" (c = 1/K)."""
    if method == "sum":
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be {k} finite numbers for method 'sum', got {weights}")
        return FairnessWeights(w.clone(), w, torch.ones(k, dtype=torch.bool), k)
    if method == "equal":
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        return FairnessWeights(w.clone(), w, torch.ones(k, dtype=torch.bool), k)
    raise ValueError(f"{method!r} needs the objectives' gradients; fixed rules are 'sum' and 'equal'")


def needs_region_gradients(method: str, num_regions: int) -> bool:
    """Whether the rule needs each objective's gradient (one extra backward per region)."""
    return num_regions > 1 and method in ("mpd", "mgda")


def combine_objectives(
    objectives: dict[str, Tensor],
    method: str,
    num_regions: int,
    params: Sequence[Tensor],
    weights: Optional[dict[str, float]] = None,
    alpha: float = 2.0,
) -> tuple[Optional[Tensor], dict[str, float]]:
    """The loss sum_r c_r L_r whose gradient is the combined update d = sum_r c_r g_r.

    The learner back-propagates it through its engine, so ZeRO partitioning, accumulation and
    clipping stay DeepSpeed's. c comes from the rule: fixed for "sum" / "equal", from the
    objectives' gradients (``objective_gradients`` + ``gram_matrix``) for "mpd" / "mgda".

    Args:
        objectives: {region: scalar loss} of the regions present in the micro-batch.
        method: the rule (``learner.regions.fairness.rule``).
        num_regions: how many regions the config trains (one: the loss as is, no rule).
        params: the trainable parameters (gradients for "mpd" / "mgda").
        weights: {region: weight} for "sum" (default 1 each).
        alpha: the MPD exponent.

    Returns:
        (loss, metrics); loss is None when no objective is present.
    """
    names = list(objectives)
    if not names:
        return None, {}
    if num_regions == 1:
        return objectives[names[0]], {}
    metrics: dict[str, float] = {}
    if needs_region_gradients(method, num_regions):
        gram = gram_matrix(objective_gradients([objectives[n] for n in names], params))
        # K of the step: every region the run trains, present in this micro-batch or not (FairGrad's n_tasks)
        fw = combine_weights(gram, method, alpha=alpha, num_objectives=num_regions)
        # named by the rule that solved them: mpd/weight/face, mgda/weight/face, ...
        metrics.update({f"{method}/weight/{n}": float(w) for n, w in zip(names, fw.weights)})
        metrics[f"{method}/ridge"] = float(fw.ridge)
        metrics.update({f"{method}/grad_norm/{n}": math.sqrt(max(float(gram[i, i]), 0.0)) for i, n in enumerate(names)})
    else:
        fw = fixed_weights(method, len(names), [float((weights or {}).get(n, 1.0)) for n in names])
    coefs = [float(c) for c in fw.coefficients]
    metrics.update({f"fairness/coef/{n}": c for n, c in zip(names, coefs)})  # every rule's c_r
    return sum(c * objectives[n] for c, n in zip(coefs, names)), metrics
