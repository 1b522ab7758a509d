"""Tests for rlfh/losses/nft.py (DiffusionNFT, arXiv 2509.16117; NVlabs/DiffusionNFT)."""

import pytest
import torch

from rlfh.losses.nft import implicit_predictions, nft_loss, nft_loss_from_errors, nft_reward_weight


def col(*v):
    return torch.tensor(v, dtype=torch.float64).reshape(-1, 1, 1, 1)


def test_worked_numbers():
    # beta = 0.5; sample 0: eps_old 1, eps_theta 3, eps 0, r 1; sample 1: eps_old 0, eps_theta 2, eps 1, r 1/4
    # sample 0: eps_+ = 0.5*1 + 0.5*3 = 2, eps_- = 1.5*1 - 0.5*3 = 0; r l_+ / beta = 4 / 0.5 = 8
    # sample 1: eps_+ = 1, eps_- = -1; (1/4 * 0 + 3/4 * (-1 - 1)^2) / 0.5 = 6;  L = (8 + 6) / 2 = 7
    pos, neg = implicit_predictions(col(3.0, 2.0), col(1.0, 0.0), 0.5)
    torch.testing.assert_close(pos, col(2.0, 1.0))
    torch.testing.assert_close(neg, col(0.0, -1.0))
    out = nft_loss(col(3.0, 2.0), col(1.0, 0.0), col(0.0, 1.0), torch.tensor([1.0, 0.25], dtype=torch.float64), 0.5)
    torch.testing.assert_close(out.loss, torch.tensor(7.0, dtype=torch.float64))
    torch.testing.assert_close(out.positive, torch.tensor(4.0, dtype=torch.float64))  # (8 + 0) / 2
    torch.testing.assert_close(out.negative, torch.tensor(3.0, dtype=torch.float64))  # (0 + 6) / 2


def test_reward_weight_is_the_references_normalization():
    # r = clip(A / c / 2 + 0.5, 0, 1), c = 5 (train_nft_sd3.py: adv_clip_max)
    r = nft_reward_weight(torch.tensor([-7.0, -5.0, 0.0, 2.5, 10.0]), clip=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_gradient_at_the_old_policy_is_advantage_weighted_denoising():
    # at eps_theta = eps_old: dL/d eps_theta = 2 (2r - 1)(eps_old - eps) / (D B)
    g = torch.Generator().manual_seed(0)
    old, eps = (
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
    )
    r = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
    pred = old.clone().requires_grad_(True)
    nft_loss(pred, old, eps, r, beta=0.3).loss.backward()
    expected = 2 * (2 * r - 1).reshape(-1, 1, 1, 1) * (old - eps) / (16 * 3)
    torch.testing.assert_close(pred.grad, expected)
    assert float(pred.grad[1].abs().max()) < 1e-15  # r = 1/2 (A = 0): no push (up to rounding)


def test_eps_form_equals_the_papers_velocity_form_up_to_the_time_weight():
    """Rectified flow x_t = (1-t) x0 + t eps, v = eps - x0 (the paper); eps_hat = x_t + (1-t) v_hat.

    The velocity-space loss of the paper (and of the reference's non-adaptive variant) is the eps-space
    loss times 1 / (1 - t)^2 per sample; the reference's adaptive x0-space loss equals ours with
    x0_scale = t / (1 - t) exactly."""
    g = torch.Generator().manual_seed(1)
    b, beta = 4, 0.7
    x0, eps = (
        torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64).reshape(-1, 1, 1, 1)
    xt = (1 - t) * x0 + t * eps
    v_old, v_theta = (
        torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64),
    )
    r = torch.tensor([0.1, 0.5, 0.8, 1.0], dtype=torch.float64)
    to_eps = lambda v: xt + (1 - t) * v  # noqa: E731
    # velocity form, per sample, as in the paper
    v_pos, v_neg = beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta
    v = eps - x0
    lv_pos, lv_neg = (v_pos - v).pow(2).flatten(1).mean(1), (v_neg - v).pow(2).flatten(1).mean(1)
    e_pos, e_neg = implicit_predictions(to_eps(v_theta), to_eps(v_old), beta)
    torch.testing.assert_close(e_pos, to_eps(v_pos))  # the implicit policies are the same policies
    torch.testing.assert_close(e_neg, to_eps(v_neg))
    w = (1 - t.flatten()) ** 2
    ours = nft_loss_from_errors(lv_pos * w, lv_neg * w, r, beta).loss
    torch.testing.assert_close(ours, nft_loss(to_eps(v_theta), to_eps(v_old), eps, r, beta).loss)
    # the reference's adaptive weighting (train_nft_sd3.py), in x0 space
    ref_terms = []
    for vp in (v_pos, v_neg):
        x0p = xt - t * vp
        wf = (x0p - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        ref_terms.append(((x0p - x0) ** 2 / wf).mean(dim=(1, 2, 3)))
    ref = (r * ref_terms[0] / beta + (1 - r) * ref_terms[1] / beta).mean()
    ours = nft_loss(to_eps(v_theta), to_eps(v_old), eps, r, beta, adaptive=True, x0_scale=(t / (1 - t)).flatten())
    torch.testing.assert_close(ours.loss, ref)


def test_old_prediction_gets_no_gradient_and_bad_inputs_raise():
    pred, old = torch.ones(2, 1, 2, 2, requires_grad=True), torch.zeros(2, 1, 2, 2, requires_grad=True)
    nft_loss(pred, old, torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 0.0]), 1.0).loss.backward()
    assert old.grad is None and pred.grad is not None
    with pytest.raises(ValueError, match="beta"):
        implicit_predictions(pred, old, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nft_loss_from_errors(torch.ones(2), torch.ones(2), torch.tensor([1.5, 0.0]), 1.0)
    with pytest.raises(ValueError, match="x0_scale"):
        nft_loss(pred, old, torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 0.0]), 1.0, adaptive=True)
    with pytest.raises(ValueError, match="finite"):
        nft_reward_weight(torch.tensor([float("nan")]))


def test_per_region_objectives():
    """objectives.advantage_objectives: global = nft_loss; a region = the masked errors of eps_+ / eps_-
    over the samples that have it (FairHuman's s = 5)."""
    from rlfh.losses.objectives import advantage_objectives
    from rlfh.losses.region_mse import per_sample_region_mse

    g = torch.Generator().manual_seed(3)
    pred, old, eps = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    r = torch.tensor([0.2, 0.5, 1.0])
    face = torch.zeros(3, 1, 4, 4)
    face[0, :, :2, :2] = 1  # only sample 0 has a face
    objs, m = advantage_objectives("nft", pred, old, eps, r, {"face": face}, ["global", "face"], 5.0, nft_beta=0.5)
    torch.testing.assert_close(objs["global"], nft_loss(pred, old, eps, r, 0.5).loss)
    pos, neg = implicit_predictions(pred, old, 0.5)
    e = lambda p: per_sample_region_mse(p[:1], eps[:1], face[:1], 5.0)  # noqa: E731
    torch.testing.assert_close(objs["face"], (0.2 * e(pos) + 0.8 * e(neg)).mean() / 0.5)
    assert m["loss/nft/face"] == pytest.approx(float(objs["face"])) and "nft/old_eps_mse" in m


def test_scale_c_makes_the_first_gradient_the_awm_one():
    """With the reference's factor c the gradient at eps_old is 2 clip(A, -c, c)(eps_old - eps) / (D B):
    AWM's at ratio 1 (rlfh/losses/awm.py), for any c."""
    from rlfh.losses.awm import awm_loss
    from rlfh.losses.region_mse import per_sample_mse

    g = torch.Generator().manual_seed(5)
    old, eps = (
        torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64),
    )
    adv = torch.tensor([-7.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    c = 5.0
    p1 = old.clone().requires_grad_(True)
    nft_loss(p1, old, eps, nft_reward_weight(adv, c), beta=0.4, scale=c).loss.backward()
    p2 = old.clone().requires_grad_(True)
    awm_loss(per_sample_mse(p2, eps), adv.clamp(-c, c)).loss.backward()
    torch.testing.assert_close(p1.grad, p2.grad)


def test_adaptive_errors_worked_numbers():
    """adaptive_errors: d = k (eps_hat - eps), mean d^2 / sg(max(mean |d|, 1e-5)) per sample."""
    from rlfh.losses.nft import adaptive_errors

    diff = torch.tensor(
        [[1.0, -1.0, 3.0, -3.0], [2.0, 2.0, 2.0, 2.0], [1e-7, 0.0, 0.0, 0.0]], dtype=torch.float64
    ).reshape(3, 1, 2, 2)
    k = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    # sample 0: d = (2, -2, 6, -6): mean d^2 = 80 / 4 = 20, mean |d| = 4 -> 5
    # sample 1: d = (1, 1, 1, 1): 1 / 1 = 1;  sample 2: d^2 mean 2.5e-15, mean |d| 2.5e-8 < 1e-5 -> 2.5e-10
    torch.testing.assert_close(adaptive_errors(diff, k), torch.tensor([5.0, 1.0, 2.5e-10], dtype=torch.float64))
    # the weight is a constant: d/d diff of mean d^2 / w is 2 k^2 diff / (D w), w = 4 for sample 0
    x = diff.clone().requires_grad_(True)
    adaptive_errors(x, k)[0].backward()
    torch.testing.assert_close(x.grad[0], 2 * 4.0 * diff[0] / (4 * 4.0))
    with pytest.raises(ValueError, match="x0_scale"):
        adaptive_errors(diff, k[:2])


def test_adaptive_first_gradient_is_awm_reweighted_by_k_over_mean_abs_error():
    """At eps_theta = eps_old: dL/d eps_theta = 2 clip(A, -c, c) k e / (mean |e| D B), e = eps_old - eps
    (docs/online_rl.md), whatever beta."""
    g = torch.Generator().manual_seed(7)
    old, eps = (
        torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64),
    )
    adv, c = torch.tensor([-2.0, 1.0, 6.0], dtype=torch.float64), 5.0
    k = torch.tensor([0.1, 1.0, 14.0], dtype=torch.float64)
    pred = old.clone().requires_grad_(True)
    nft_loss(pred, old, eps, nft_reward_weight(adv, c), beta=0.3, adaptive=True, x0_scale=k, scale=c).loss.backward()
    e = old - eps
    mean_abs = e.abs().flatten(1).mean(1)
    expected = 2 * (adv.clamp(-c, c) * k / mean_abs).reshape(-1, 1, 1, 1) * e / (8 * 3)
    torch.testing.assert_close(pred.grad, expected)


def test_per_region_objectives_adaptive():
    """With x0_scale each region's error is the adaptive one of its masked difference s 1[M > 0] e."""
    from rlfh.losses.objectives import advantage_objectives

    g = torch.Generator().manual_seed(4)
    pred, old, eps = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    r, k = torch.tensor([0.3, 0.9], dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)
    face = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    face[:, :, 1:3, 1:3] = 1
    objs, _ = advantage_objectives(
        "nft", pred, old, eps, r, {"face": face}, ["global", "face"], 5.0, nft_beta=0.5, x0_scale=k
    )
    torch.testing.assert_close(objs["global"], nft_loss(pred, old, eps, r, 0.5, adaptive=True, x0_scale=k).loss)
    pos, neg = implicit_predictions(pred, old, 0.5)

    def err(p):  # written out: d = k * 5 * 1[M > 0] * (p - eps), mean d^2 / mean |d| per sample
        d = k.reshape(-1, 1, 1, 1) * 5.0 * face * (p - eps)
        return d.pow(2).flatten(1).mean(1) / d.abs().flatten(1).mean(1)

    torch.testing.assert_close(objs["face"], (r * err(pos) + (1 - r) * err(neg)).mean() / 0.5)
