"""FairHuman's per-region objectives balanced by MPD, end to end: online through Ray and offline
from the rollout log it wrote (regions logged with every sample)."""

import numpy as np
import pytest

from tests.test_end_to_end import rlfh

pytestmark = pytest.mark.slow


def test_mpd_online_then_offline(tiny_model_dir, tmp_path):
    from rlfh.run.metrics import read_metrics

    common = [f"model.path={tiny_model_dir}", "logging.wandb=false", "logging.progress=false",
              "learner.regions=[global, face]", "learner.fairness.rule=mpd",
              "rewards=[jpeg_compressibility, {target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}]"]
    online = tmp_path / "online"
    rlfh("train", "configs/tiny.yaml", f"run_dir={online}", "num_rounds=2", "rollout.prompts_per_round=2", *common)
    rows = read_metrics(online)
    for r in rows:
        assert r["regions/face/present"] == 1.0 and np.isfinite(r["loss/dpo/face"])
        assert r["mpd/weight/global"] > 0 and r["mpd/weight/face"] > 0
        assert np.isfinite(r["reward/compressible_face/mean"])

    offline = tmp_path / "offline"
    rlfh("offline-dpo", "configs/offline_dpo.yaml", f"rollouts={online / 'rollouts'}", f"run_dir={offline}",
         "num_rounds=1", *common)
    (row,) = read_metrics(offline)
    assert row["mpd/weight/face"] > 0 and np.isfinite(row["loss/dpo/face"])
