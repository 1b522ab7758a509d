"""DDPO end to end without Ray: the stochastic DDIM sampler records per-step log-probs, and the
learner recomputes them at train time (equal before any update), then takes clipped-ratio steps."""

import numpy as np
import pytest
import torch

from rlfh.config.schema import load_config
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from rlfh.data.batches import TrajectoryBatch
from rollouts.models import load_pipeline
from rlfh.data.pairs import learner_batch
from rollouts.sampler import Sampler
from rollouts.types import SamplerSettings
from tests.conftest import REPO

DDPO = ["learner.loss=ddpo", "rollout.scheduler=ddim", "rollout.eta=1.0", "rollout.num_inference_steps=4",
        "rollout.guidance_scale=3.0", "learner.train_batch_size=4", "learner.micro_batch_size_per_gpu=4",
        "learner.lr=1e-3"]


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *DDPO])


def settings_of(cfg):
    rc = cfg.rollout
    return SamplerSettings(rc.num_inference_steps, rc.guidance_scale, "", rc.height, rc.width, rc.eta, rc.scheduler)


def test_recording_does_not_change_samples(cfg):
    s = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    st = settings_of(cfg)
    plain = s.sample(["a", "b"], [1, 2], st)
    rec = s.sample(["a", "b"], [1, 2], st, record=True)
    np.testing.assert_allclose(rec.latents, plain.latents, atol=1e-5)
    tr = rec.trajectory
    assert tr["latents"].shape == (2, 5, 4, 8, 8) and tr["log_probs"].shape == (2, 4) and tr["timesteps"].shape == (4,)
    np.testing.assert_array_equal(tr["latents"][:, -1], rec.latents)
    assert np.isfinite(tr["log_probs"]).all()
    with pytest.raises(ValueError, match="DDIM scheduler with eta > 0"):
        Sampler(load_pipeline(cfg.model)).sample(["a"], [1], SamplerSettings(4, 1.0, "", 64, 64), record=True)


def test_ddpo_config_rules(tiny_model_dir):
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError, match="rollout.scheduler=ddim"):
        load_config(REPO / "configs" / "tiny.yaml", ["learner.loss=ddpo"])


def test_learner_recomputes_recorded_logprobs_then_learns(cfg):
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    lc = cfg.learner.lora
    s.add_lora(lc.rank, lc.alpha, lc.target_modules)
    s.load_lora(lrn.lora_state_dict(), lrn.policy_version)  # the learner's (seeded) adapter, as after a sync
    st = settings_of(cfg)
    prompts = ["p", "p", "q", "q"]
    b = s.sample(prompts, [0, 1, 2, 3], st, record=True)
    batch, stats = learner_batch(cfg.learner, b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64),
                                 b.trajectory, st)
    assert isinstance(batch, TrajectoryBatch)
    np.testing.assert_allclose(batch.advantages, [1, -1, -1, 1], atol=1e-4)  # per-prompt z-scores
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    # before any update the learner's policy is the sampler's: recomputed log-probs equal the recorded ones
    assert m["ddpo/recorded_logprob_max_diff"] < 1e-5
    assert np.isfinite(m["loss/ddpo"]) and lrn.global_step == 1
    after = lrn.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
