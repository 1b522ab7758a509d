"""FairHuman's per-region objectives balanced by MPD, end to end: online through Ray and offline
from the rollout log it wrote (regions logged with every sample)."""

import numpy as np
import pytest

from tests.test_end_to_end import rlfh

pytestmark = pytest.mark.slow


def test_mpd_online_then_offline(tiny_model_dir, tmp_path):
    from rlfh.run.metrics import read_metrics

    common = [
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.regions.names=[global, face]",
        "learner.regions.fairness.rule=mpd",
        "rewards=[jpeg_compressibility, {target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}]",
    ]
    online = tmp_path / "online"
    # 2 prompts -> 2 pairs -> one optimizer step of one micro-batch per round: the logged MPD
    # weights and gradient norms are those of one solve, so they can be held against its equation
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={online}",
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "learner.epochs_per_round=1",
        *common,
    )
    rows = read_metrics(online)
    for r in rows:
        assert r["regions/face/present"] == 1.0 and np.isfinite(r["loss/dpo/face"])
        assert np.isfinite(r["reward/compressible_face/mean"])
        assert_mpd_equation(r)

    offline = tmp_path / "offline"
    rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={online / 'rollouts'}",
        f"run_dir={offline}",
        "num_rounds=1",
        *common,
    )
    (row,) = read_metrics(offline)
    assert row["mpd/weight/face"] > 0 and np.isfinite(row["loss/dpo/face"])


def assert_mpd_equation(r, alpha=2.0):
    """FairGrad / MPD: (M w)_i = w_i^(-1/alpha) with M the Gram matrix of the two regions' gradients.
    The log has w and diag(M) = ||g_i||^2; each equation then gives the off-diagonal g_1 . g_2, and
    the two values must agree (and obey Cauchy-Schwarz) for w to solve the system."""
    w1, w2 = r["mpd/weight/global"], r["mpd/weight/face"]
    n1, n2 = r["mpd/grad_norm/global"], r["mpd/grad_norm/face"]
    assert w1 > 0 and w2 > 0 and n1 > 0 and n2 > 0
    c_from_1 = (w1 ** (-1 / alpha) - n1**2 * w1) / w2
    c_from_2 = (w2 ** (-1 / alpha) - n2**2 * w2) / w1
    assert c_from_1 == pytest.approx(c_from_2, rel=1e-4, abs=1e-6 * n1 * n2)
    assert abs(c_from_1) <= n1 * n2 * (1 + 1e-6)
    assert r["fairness/coef/global"] == pytest.approx(2 * w1) and r["fairness/coef/face"] == pytest.approx(2 * w2)


def test_guidance_term_online_then_offline(tiny_model_dir, tmp_path):
    """learner.dpo.guidance.coef through `rlfh train` and `rlfh offline-dpo`: online the round's region pairs
    (data.region_pairs) carry the term, offline the region pairs of the log that run wrote; the best/worst
    pairs of different samples beside them do not (a share of the pairs below 1)."""
    from rlfh.run.metrics import read_metrics

    common = [
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.dpo.guidance.coef=0.5",
        "learner.dpo.guidance.region=face",
        "learner.regions.names=[global, face]",
        "data.region_pairs.winner=original",  # the logged copies are not scored: offline pairs them the same way
        "data.region_pairs.strength=0.5",  # 2 of the 4 online steps
        "learner.epochs_per_round=1",
        "rewards=[{target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}]",
    ]
    online = tmp_path / "online"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={online}",
        "num_rounds=1",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=2",
        "rollout.sample_batch_size_per_actor=4",
        "rollout.num_inference_steps=4",
        "data.region_pairs.region=face",
        *common,
    )
    offline = tmp_path / "offline"
    rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={online / 'rollouts'}",
        f"run_dir={offline}",
        "num_rounds=1",
        *common,
    )
    for (row,) in (read_metrics(online), read_metrics(offline)):
        assert 0 < row["guidance/region_present"] <= 1 and row["loss/guidance"] > 0
        assert row["region_pairs/count"] > 0 and np.isfinite(row["loss/dpo/face"])


def test_guidance_alone_online(tiny_model_dir, tmp_path):
    """learner.loss=guidance through `rlfh train`: the round trains on its region pairs alone (the samples'
    own best/worst pairs are not made), per region."""
    from rlfh.run.metrics import read_metrics

    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={tmp_path}",
        "num_rounds=1",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=2",
        "rollout.sample_batch_size_per_actor=4",
        "rollout.num_inference_steps=4",
        "data.region_pairs.region=face",
        "data.region_pairs.winner=original",
        "data.region_pairs.strength=0.5",
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.loss=guidance",
        "learner.regions.names=[global, face]",
        "learner.epochs_per_round=1",
        "rewards=[{target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}]",
    )
    (row,) = read_metrics(tmp_path)
    assert row["pairs/count"] == 0 and row["region_pairs/count"] == 4 and row["learner/items"] == 4
    assert row["guidance/aligned_share"] == 1.0 and row["loss/guidance/face"] > 0 and row["loss/guidance/global"] > 0
