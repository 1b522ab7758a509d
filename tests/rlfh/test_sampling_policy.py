"""learner.ema.sampling_policy=ema: the rollout actors sample with the EMA of the trained LoRA (DiffusionNFT's
off-policy sampler), and the loss compares with exactly those weights."""

import numpy as np
import pytest
import torch

from rlfh.config.schema import ConfigError, load_config
from rlfh.data.batches import ScoredSamples
from rlfh.data.pairs import learner_batch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from tests.conftest import REPO

EMA = [
    "learner.loss=nft",
    "learner.ema.decay=0.5",
    "learner.ema.sampling_policy=ema",
    "learner.train_batch_size=4",
    "learner.micro_batch_size_per_gpu=4",
    "learner.lr=1e-2",
]


def synced(lrn):
    """What a weight sync sends: the merged buckets as one state dict."""
    out = {}
    for bucket in lrn.policy_weight_buckets(2**30):
        out.update(bucket)
    return out


def test_rollouts_get_the_ema_and_the_loss_compares_with_it(tiny_model_dir):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *EMA])
    lrn = LearnerEngine(cfg)
    trained0 = lrn.lora_state_dict()
    first = synced(lrn)
    assert all(torch.equal(first[k], trained0[k]) for k in trained0)  # the EMA starts at the policy
    lat = np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32)
    prompts = ["a"] * 4 + ["b"] * 4
    batch, _ = learner_batch(
        cfg.learner, ScoredSamples(lat, prompts, prompts, lat[:, 0].mean(axis=(1, 2)).tolist(), [{}] * 8, (64, 64))
    )
    train(lrn, batch, epochs=2)
    sent, trained = synced(lrn), lrn.lora_state_dict()
    ema = lrn.lora_state_dict([s.detach() for s in lrn.ema.shadow_params])
    assert sent.keys() == trained.keys()
    assert all(torch.equal(sent[k], ema[k]) for k in sent)  # the EMA, not the trained weights
    assert any(not torch.equal(sent[k], trained[k]) for k in sent)

    # the EMA lags behind the trained weights: overall it has moved less from where the round started
    def dist(a):
        return sum(float((a[k] - trained0[k]).pow(2).sum()) for k in a) ** 0.5

    assert 0 < dist(sent) < dist(trained)
    # the next round's "old" policy (the loss's sampling policy) is what was sent
    train(lrn, batch, epochs=1)
    old = lrn.lora_state_dict(lrn.old_weights)
    assert all(torch.equal(old[k], sent[k]) for k in sent)


@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.ema.decay=null", "needs learner.ema.decay"),
        ("model.lora.enabled=false", "needs model.lora.enabled"),
    ],
)
def test_sampling_policy_rules(tiny_model_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *EMA, override])


def test_round_ramp_decay_is_the_references_return_decay():
    """NVlabs/DiffusionNFT ``return_decay(step, decay_type)``: min(max(0, (step - flat) * uprate), uphold)."""
    from rlfh.config.schema import EMAConfig

    type1 = EMAConfig(schedule="round_ramp")  # decay_type=1: flat 0, uprate 0.001, uphold 0.5
    assert [type1.round_decay(s) for s in (0, 100, 499, 600)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    type2 = EMAConfig(schedule="round_ramp", ramp_start=75, ramp_rate=0.0075, ramp_max=0.999)
    assert [type2.round_decay(s) for s in (50, 75, 175, 300)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def test_round_ramp_moves_the_ema_once_per_round(tiny_model_dir):
    ramp = ["learner.ema.decay=null", "learner.ema.schedule=round_ramp", "learner.ema.ramp_rate=0.25"]
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *EMA, *ramp, "learner.ema.ramp_max=0.6"]
    )
    lrn = LearnerEngine(cfg)
    start = [p.detach().clone() for p in lrn.weights.trainable]
    lat = np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32)
    prompts = ["a"] * 4 + ["b"] * 4
    batch, _ = learner_batch(
        cfg.learner, ScoredSamples(lat, prompts, prompts, lat[:, 0].mean(axis=(1, 2)).tolist(), [{}] * 8, (64, 64))
    )
    train(lrn, batch, epochs=2)
    assert lrn.global_step == 4  # decay min(4 * 0.25, 0.6) = 0.6, applied once after the round
    # one blend of the round's start (the EMA began as a copy) with the trained weights; a per-step EMA differs
    for s, p0, p in zip(lrn.ema.shadow_params, start, lrn.weights.trainable):
        torch.testing.assert_close(s, 0.6 * p0 + 0.4 * p.detach(), rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(s, p) for s, p in zip(lrn.ema.shadow_params, lrn.weights.trainable))
    sent = synced(lrn)
    ema = lrn.lora_state_dict([s.detach() for s in lrn.ema.shadow_params])
    assert all(torch.equal(sent[k], ema[k]) for k in sent)  # the rollouts sample with it
    with pytest.raises(ConfigError, match="leave learner.ema.decay unset"):
        load_config(
            REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *EMA, "learner.ema.schedule=round_ramp"]
        )
