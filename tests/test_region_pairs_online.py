"""Region pairs online (data.region_pairs): the rollout actor inpaints the face of its own samples
with the current policy, the reward orders each pair, the pairs train with the face mask, and the
rollout log keeps them so that `rlfh offline-dpo` rebuilds the same pairs."""

import numpy as np
import pytest

from tests.rlfh.test_region_pairs_tiny import FACE, assert_inpainted_only_in_the_mask
from tests.test_end_to_end import rlfh

pytestmark = pytest.mark.slow


def test_online_region_pairs_then_offline(tiny_model_dir, tmp_path):
    from rlfh.run.metrics import read_metrics
    from rollouts.log import RolloutLog, decode_latent

    common = [
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.regions.names=[global, face]",
        f"rewards=[{FACE}]",
    ]
    online = tmp_path / "online"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={online}",
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=3",
        "rollout.sample_batch_size_per_actor=6",
        "learner.epochs_per_round=1",
        "data.region_pairs.region=face",
        "data.region_pairs.fraction=0.5",
        "data.region_pairs.strength=0.4",
        *common,
    )
    rows = read_metrics(online)
    assert len(rows) == 2
    for r in rows:
        # the seeded draw picks about half of the 6 samples; each is a pair unless the scores tie
        assert 1 <= r["region_pairs/candidates"] <= 6
        assert r["region_pairs/count"] + r["region_pairs/skipped"] == r["region_pairs/candidates"]
        assert r["region_pairs/count"] >= 1 and 0.0 <= r["region_pairs/inpainted_won_share"] <= 1.0
        assert r["region_pairs/mean_strength"] == 0.4 and np.isfinite(r["loss/dpo/face"])

    recs = RolloutLog(online / "rollouts").records()
    by_id = {x["rollout_id"]: x for x in recs}
    inp = [x for x in recs if x["region_pair"] is not None]
    assert len(inp) == sum(r["region_pairs/candidates"] for r in rows)
    for x in inp:
        src = by_id[x["region_pair"]["source_id"]]
        assert src["region_pair"] is None and src["round"] == x["round"] and src["prompt"] == x["prompt"]
    # a logged sample is no "original" role record: mark it as one for the shared check
    pairs = [({**by_id[x["region_pair"]["source_id"]], "region_pair": {"role": "original"}}, x) for x in inp]
    assert_inpainted_only_in_the_mask(pairs, decode_latent, 0.4)

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
    # the same pairs as online: inpainted records never join their prompt's group
    assert row["pairs/count"] == sum(r["pairs/count"] for r in rows)
    assert row["region_pairs/count"] == sum(r["region_pairs/count"] for r in rows)
