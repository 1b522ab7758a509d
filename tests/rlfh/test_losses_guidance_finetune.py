"""learner.loss=guidance (rlfh/losses/guidance_finetune.py): the guidance loss alone, per region, on the
aligned region pairs of a batch, on worked numbers; the registry entry and its refusal without region pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlfh.losses.guidance import winner_noise
from rlfh.losses.guidance_finetune import guidance_objectives
from rlfh.losses.registry import PAIRS, loss_spec


def test_guidance_objectives_on_worked_numbers():
    # one latent channel, 1 x 2 pixels; pixel 0 is the inpainted face, pixel 1 the untouched outside.
    # abar = 0.5, x_0^w = (1, 0.3), x_0^l = (0, 0.3), eps = (0.2, -0.4)
    # x_t^l = sqrt(.5) x_0^l + sqrt(.5) eps = (0.141421, -0.070711)
    # eps* = (x_t^l - sqrt(.5) x_0^w) / sqrt(.5) = x_0^l + eps - x_0^w = (-0.8, -0.4): outside the face eps* = eps
    a = torch.tensor([0.5, 0.5])
    x0_w = torch.tensor([[[[1.0, 0.3]]], [[[1.0, 0.3]]]])
    x0_l = torch.tensor([[[[0.0, 0.3]]], [[[0.0, 0.3]]]])
    eps = torch.tensor([[[[0.2, -0.4]]], [[[0.2, -0.4]]]])
    x_t = math.sqrt(0.5) * x0_l + math.sqrt(0.5) * eps
    target = winner_noise(x_t, x0_w, a)
    torch.testing.assert_close(target[0], torch.tensor([[[-0.8, -0.4]]]))
    pred = torch.tensor([[[[0.0, 0.0]]], [[[5.0, 5.0]]]], requires_grad=True)
    face = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    # pair 1 is not aligned (two different samples): it adds nothing, whatever its error
    objectives, metrics = guidance_objectives(
        pred, target, {"face": face}, torch.tensor([True, False]), ["global", "face"]
    )
    # face: mean over the 2 elements of (m (pred - eps*))^2 = (0.64 + 0) / 2; global: (0.64 + 0.16) / 2
    assert float(objectives["face"]) == pytest.approx(0.32, rel=1e-6)
    assert float(objectives["global"]) == pytest.approx(0.40, rel=1e-6)
    assert metrics["guidance/aligned_share"] == 0.5 and metrics["loss/guidance/face"] == pytest.approx(0.32)
    objectives["face"].backward()
    assert pred.grad[1].abs().sum() == 0  # the unaligned pair gets no gradient
    # d/dpred_0 of (pred_0 - (-0.8))^2 / 2 = pred_0 + 0.8 = 0.8 at pred_0 = 0
    assert float(pred.grad[0, 0, 0, 0]) == pytest.approx(0.8)
    none, m = guidance_objectives(pred, target, {"face": face}, torch.tensor([False, False]), ["global", "face"])
    assert none == {} and m["guidance/aligned_share"] == 0.0


def test_guidance_is_a_pair_loss_of_aligned_pairs_without_a_reference():
    spec = loss_spec("guidance")
    assert spec.batch == PAIRS and spec.aligned_only and not spec.needs and spec.regions


def test_guidance_loss_is_refused_without_region_pairs():
    from rlfh.config.schema import ConfigError, config_from_dict

    face = {"regions": {"names": ["global", "face"]}}
    with pytest.raises(ConfigError, match=r"learner.loss=guidance needs region pairs"):
        config_from_dict({"learner": {"loss": "guidance", **face}})
    online = config_from_dict({"learner": {"loss": "guidance", **face}, "data": {"region_pairs": {"region": "face"}}})
    offline = config_from_dict({"learner": {"loss": "guidance", **face}, "rollouts": "runs/pairs/rollouts"})
    assert online.learner.loss == offline.learner.loss == "guidance"
    with pytest.raises(ConfigError, match=r"learner.loss=guidance trains the policy alone"):
        config_from_dict({"learner": {"loss": "guidance", **face, "reference": {"kl_coef": 0.1}}, "rollouts": "x"})


def test_an_offline_log_without_region_pairs_is_refused_for_the_guidance_loss():
    from rlfh.config.schema import config_from_dict
    from rlfh.data.batches import PairBatch
    from rlfh.data.region_pairs import with_region_pairs

    cfg = config_from_dict(
        {"learner": {"loss": "guidance", "regions": {"names": ["global", "face"]}}, "rollouts": "runs/x/rollouts"}
    )
    empty = PairBatch(np.zeros((0, 4, 8, 8), np.float32), np.zeros((0, 4, 8, 8), np.float32), [])
    with pytest.raises(
        ValueError, match=r"learner.loss=guidance needs region pairs, and the rollout log runs/x/rollouts"
    ):
        with_region_pairs(cfg, empty, None)
