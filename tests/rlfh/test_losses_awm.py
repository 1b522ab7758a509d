"""Tests for rlfh/losses/awm.py (Advantage Weighted Matching, arXiv 2509.25050)."""

import math

import pytest
import torch

from rlfh.losses.awm import awm_loss
from rlfh.losses.rwr import weighted_loss


def test_worked_numbers():
    # rho = exp(old_error - error) = 1.5 and 0.5; A = (1, -1), clip 0.2:
    # max(-1.5, -1.2) = -1.2, max(0.5, 0.8) = 0.8 -> L = -0.2; both ratios outside [0.8, 1.2]
    error = torch.tensor([0.5, 0.3], dtype=torch.float64)
    old = error + torch.tensor([math.log(1.5), math.log(0.5)], dtype=torch.float64)
    out = awm_loss(error, torch.tensor([1.0, -1.0], dtype=torch.float64), old, clip_range=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(-0.2, dtype=torch.float64))
    assert float(out.clipfrac) == 1.0 and float(out.ratio_mean) == pytest.approx(1.0)


def test_on_policy_gradient_is_the_advantage_weighted_denoising_loss():
    """At rho = 1 AWM's gradient is RWR's weighted_loss gradient with the advantages as weights."""
    adv = torch.tensor([1.5, -0.5, 0.0, -1.0])
    e1 = torch.rand(4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = awm_loss(e1, adv)  # on-policy: old = sg(error)
    torch.testing.assert_close(out.loss, -adv.mean())
    out.loss.backward()
    e2 = e1.detach().clone().requires_grad_(True)
    weighted_loss(e2, adv).backward()
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(e1.grad, adv / 4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        awm_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="clip_range"):
        awm_loss(torch.zeros(2), torch.zeros(2), clip_range=0.0)
    with pytest.raises(ValueError, match="finite"):
        awm_loss(torch.zeros(1), torch.tensor([math.inf]))


def test_per_region_objectives_match_the_loss():
    from rlfh.losses.objectives import advantage_objectives
    from rlfh.losses.region_mse import per_sample_mse

    g = torch.Generator().manual_seed(4)
    pred, old, eps = (torch.randn(4, 4, 4, 4, generator=g) for _ in range(3))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    objs, m = advantage_objectives("awm", pred, old, eps, adv, {}, ["global"], 5.0, clip_range=0.2)
    expected = awm_loss(per_sample_mse(pred, eps), adv, per_sample_mse(old, eps), 0.2)
    torch.testing.assert_close(objs["global"], expected.loss)
    assert m["awm/clipfrac"] == pytest.approx(float(expected.clipfrac))
    on_policy, _ = advantage_objectives("awm", pred, None, eps, adv, {}, ["global"], 5.0)
    torch.testing.assert_close(on_policy["global"], -adv.mean())


def test_ghuber_error_worked_numbers():
    """The reference configs' weighting (scxue/advantage_weighted_matching, compute_log_prob_awm, "ghuber") in
    eps space: abar 0.64 -> a 0.8, b 0.6, sigma = 0.6 / 1.4 = 3/7, k = b / a = 0.75, k / sigma = 1.75."""
    from rlfh.losses.awm import GHuber, ghuber_error

    g = GHuber(0.5, torch.tensor([0.75, 0.75]), torch.tensor([3 / 7, 3 / 7]))
    # e 0.16 -> e_v = 0.16 * 1.75^2 = 0.49; ((0.49 + 1e-10)^0.5 - 1e-5) * (3/7) / 0.5 = (0.7 - 1e-5) * 6/7
    got = ghuber_error(torch.tensor([0.16, 0.0], dtype=torch.float64), g)
    torch.testing.assert_close(got, torch.tensor([(0.7 - 1e-5) * 6 / 7, 0.0], dtype=torch.float64))


def test_ghuber_objectives_and_the_learners_flow_time():
    from families.schedule import DDPMSchedule
    from rlfh.losses.awm import GHuber, ghuber_error
    from rlfh.losses.objectives import advantage_objectives
    from rlfh.losses.region_mse import per_sample_mse

    g = torch.Generator().manual_seed(4)
    pred, old, eps = (torch.randn(4, 4, 4, 4, generator=g) for _ in range(3))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    gh = GHuber(0.25, torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0.2, 0.4, 0.6, 0.8]))
    objs, _ = advantage_objectives("awm", pred, old, eps, adv, {}, ["global"], 5.0, clip_range=0.2, ghuber=gh)
    want = awm_loss(ghuber_error(per_sample_mse(pred, eps), gh), adv, ghuber_error(per_sample_mse(old, eps), gh), 0.2)
    torch.testing.assert_close(objs["global"], want.loss)
    uniform, _ = advantage_objectives("awm", pred, old, eps, adv, {}, ["global"], 5.0, clip_range=0.2)
    assert not torch.allclose(uniform["global"], objs["global"])

    # the learner's inputs (LearnerEngine.ghuber), eps prediction: sigma = b / (a + b); k / sigma = 1 / (1 - sigma)
    from types import SimpleNamespace

    from rlfh.learner.engine import LearnerEngine

    sched = DDPMSchedule(torch.tensor([0.64, 0.25]), "epsilon")
    cpu = torch.device("cpu")
    cfg = SimpleNamespace(learner=SimpleNamespace(awm=SimpleNamespace(ghuber_power=0.25)))
    lrn = SimpleNamespace(schedule=sched, device=cpu, cfg=cfg, x0_scale=lambda t: sched.x0_scale(t, cpu))
    got = LearnerEngine.ghuber(lrn, torch.tensor([0, 1]))
    b1 = 0.75**0.5
    torch.testing.assert_close(got.flow_time, torch.tensor([3 / 7, b1 / (0.5 + b1)]))
    torch.testing.assert_close(got.x0_scale / got.flow_time, 1 / (1 - got.flow_time))
    assert got.power == 0.25


def test_learner_awm_weighting_ghuber_reaches_the_loss(tiny_model_dir):
    """learner.awm.weighting=ghuber: the first training step's loss is the clipped surrogate of the ghuber log p,
    which at ratio 1 is -mean A (both weightings); the first step's gradient, and so the weights after it, differ."""
    import numpy as np

    from rlfh.config.schema import load_config
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.conftest import REPO

    lat = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    prompts, scores = ["a", "a", "b", "b"], [0.1, 0.9, 0.3, 0.5]
    after = {}
    for weighting in ("uniform", "ghuber"):
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            [
                f"model.path={tiny_model_dir}",
                "learner.loss=awm",
                f"learner.awm.weighting={weighting}",
                "learner.train_batch_size=4",
                "learner.micro_batch_size_per_gpu=4",
                "learner.lr=1e-2",
            ],
        )
        batch, _ = learner_batch(cfg.learner, ScoredSamples(lat, prompts, prompts, scores, [{}] * 4, (64, 64)))
        lrn = LearnerEngine(cfg)
        train(lrn, batch, epochs=1)
        after[weighting] = lrn.lora_state_dict()
    assert any(not torch.allclose(after["uniform"][k], after["ghuber"][k]) for k in after["uniform"])
