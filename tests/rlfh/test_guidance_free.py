"""guidance-free training on the tiny model: the teacher term moves the policy's conditional eps toward
the reference's guided eps, which is what lets the trained model sample at guidance 1."""

import numpy as np
import pytest
import torch

from rlfh.config.schema import ConfigError, load_config
from rlfh.data.batches import SampleBatch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from rlfh.losses.guidance_free import guided_teacher
from tests.conftest import REPO

CFG = [
    "learner.loss=rwr",
    "learner.guidance_free.scale=5.0",
    "learner.guidance_free.coef=10.0",
    "learner.lr=3e-3",
    "learner.train_batch_size=4",
    "learner.micro_batch_size_per_gpu=4",
    "rollout.guidance_scale=1.0",
]


def guided_gap(lrn, x, t, prompts) -> float:
    """mean (eps_theta(x, c) - eps_T)^2 on fixed probes: the quantity the term targets."""
    with torch.no_grad():
        enc, added = lrn.condition(prompts, 64, 64)
        neg_enc, neg_added = lrn.condition([""] * len(prompts), 64, 64)
        teacher = guided_teacher(lrn.reference(x, t, enc, added), lrn.reference(x, t, neg_enc, neg_added), 5.0)
        return float(
            (lrn.denoiser(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample - teacher).pow(2).mean()
        )


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
def test_guidance_free_training_moves_the_policy_toward_the_guided_reference(tiny_model_dir):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *CFG])
    lrn = LearnerEngine(cfg)
    rng = np.random.default_rng(0)
    prompts = ["a photo of a person", "a portrait of a woman"] * 4
    batch = SampleBatch(rng.standard_normal((8, 4, 8, 8)).astype(np.float32), prompts, np.ones(8, np.float32))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 400, 700, 900])
    before = guided_gap(lrn, x, t, prompts[:4])
    metrics = [train(lrn, batch, 2) for _ in range(5)]
    after = guided_gap(lrn, x, t, prompts[:4])
    assert all(np.isfinite(m["loss/guidance_free"]) for m in metrics)
    assert metrics[-1]["loss/guidance_free"] < metrics[0]["loss/guidance_free"]
    assert after < 0.7 * before, (before, after)  # on probes the training never saw


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.guidance_scale=5.0", "rollout.guidance_scale=1"),
        ("learner.guidance_free.scale=1.0", "must be finite and > 1"),
    ],
)
def test_guidance_free_training_config_rules(tiny_model_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *CFG, override])
