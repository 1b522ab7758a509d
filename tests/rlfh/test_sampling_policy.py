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
