"""The online loop with rewards_normalization=gdpo and the guards' collapse metrics, end to end on
Ray: the reward actor embeds the held-out faces with FaceScore's (tiny, seeded) BLIP encoder, and
guards.max_face_identity_sim stops the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published
from tests.test_end_to_end import rlfh

pytestmark = pytest.mark.slow


def test_gdpo_round_logs_no_spread_and_guards_stop_on_one_face(tiny_model_dir, tmp_path):
    fs = save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=0), TINY_MED_CONFIG, tmp_path / "fs", "FS_model.pt"
    )
    run_dir = tmp_path / "run"
    # compressible_face reports a fixed face box in every image; facescore (weight 0: the tiny samples
    # hold no face its detector accepts) only lends its BLIP encoder to embed those boxes
    rewards = (
        "rewards=[jpeg_compressibility, {target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}, "
        f"{{target: facescore, weight: 0, options: {{model: {fs}, vision_heads: 2}}}}]"
    )
    r = rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=3",
        "rollout.prompts_per_round=2",
        "logging.wandb=false",
        "logging.progress=false",
        "rewards_normalization=gdpo",
        rewards,
        "guards.every=1",
        "guards.heldout_prompts=[a dancer mid-jump, a chef cooking]",
        "guards.max_face_identity_sim=0.5",
    )
    (row,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["pairs/count"] == 2.0 and row["pairs/no_spread_share"] == 0.0
    assert row["reward/jpeg_compressibility/no_spread_share"] == 0.0
    assert row["reward/facescore/no_spread_share"] == 1.0  # no face it scores: no value, no spread
    sim = row["collapse/face_identity_sim"]
    assert 0.5 < sim <= 1.0 and row["guards/stopped"] == 1.0
    assert "early stop after round 0" in r.stdout and "guards.max_face_identity_sim" in r.stdout
    assert 0.0 < row["collapse/image_diversity"] < 1.0
    assert np.isfinite(row["heldout/reward_gap"])
    assert row["heldout/reward_gap"] == pytest.approx(row["reward/combined/mean"] - row["heldout/combined/mean"])
    # per region: jpeg_compressibility is global, compressible_face the face's (facescore, weight 0, is not trained)
    assert np.isfinite(row["heldout/reward_gap/global"]) and np.isfinite(row["heldout/reward_gap/face"])
