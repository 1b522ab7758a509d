"""Training on people's labels: offline DPO's batch and train-reward's pairs follow the labels, not the rewards."""

import numpy as np
import pytest

from rlfh.labeling.table import LabelsTable
from rollouts.log import RolloutLog, decode_latent


def label(table, winner, loser, labeler="ann", tie=False, task=None):
    return table.append(
        {
            "kind": "label",
            "labeler": labeler,
            "mode": "pairwise",
            "task": task or f"{winner}+{loser}",
            "records": [winner, loser],
            "winner": None if tie else winner,
            "loser": None if tie else loser,
            "tie": tie,
        }
    )


@pytest.fixture()
def labeled(tiny_model_dir, tmp_path):
    """The HG-DPO offline test's log (4 prompts x 2 samples), labeled against its rewards: each group's
    lower-reward sample wins; one tie and one undone label that must not count."""
    from rlfh.config.schema import load_config
    from tests.conftest import REPO
    from tests.rlfh.test_hgdpo_offline import write_log

    log = write_log(tmp_path / "rollouts")
    records = RolloutLog(log).records(["rollout_id", "prompt", "rewards", "latent", "latent_shape"])
    table = LabelsTable(log)
    expected = []
    by_prompt: dict[str, list] = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)
    for k, (a, b) in enumerate(by_prompt.values()):
        lo, hi = sorted((a, b), key=lambda r: r["rewards"][0]["value"])
        if k == 3:
            label(table, lo["rollout_id"], hi["rollout_id"], tie=True)
            continue
        if k == 2:  # labeled the other way first, then undone and relabeled
            label(table, hi["rollout_id"], lo["rollout_id"])
            table.append({"kind": "undo", "labeler": "ann", "target": table.last_undoable("ann")["id"]})
        label(table, lo["rollout_id"], hi["rollout_id"])
        expected.append((decode_latent(lo), decode_latent(hi), lo["prompt"]))

    def make(*overrides):
        return load_config(
            REPO / "configs" / "offline_dpo.yaml",
            [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", f"rollouts={log}", *overrides],
        )

    return make, expected


def test_offline_pairs_are_the_labels(labeled, tmp_path):
    from rlfh.data.sources import SOURCES, SourceContext, build_sources
    from rlfh.recipes.offline import batch_from_log

    make, expected = labeled
    by_rewards, _ = batch_from_log(make())
    cfg = make("labels=human", "learner.regions.names=[global, face]")
    sources = build_sources(cfg, SourceContext(tmp_path))
    assert [s.name for s in sources] == ["human_labels"] and "human_labels" in SOURCES
    batch, stats = batch_from_log(cfg, sources)
    assert len(batch) == len(expected) == 3 and stats["pairs/count"] == 3
    for j, (w, l, prompt) in enumerate(expected):
        assert np.array_equal(batch.latents_w[j], w) and np.array_equal(batch.latents_l[j], l)
        assert batch.prompts[j] == prompt
    assert set(batch.masks_w) == {"face"}  # the region options still apply to the labeled pairs
    # the rewards would have paired them the other way round
    assert any(np.array_equal(by_rewards.latents_w[j], expected[0][1]) for j in range(len(by_rewards)))
    _, extra = sources[0].extend(batch, None)
    assert extra == {"labels/count": 4.0, "labels/ties": 1.0, "labels/not_in_batch": 0.0, "labels/labelers": 1.0}


def test_human_labels_need_labels_and_a_pair_loss(labeled, tmp_path):
    from rlfh.data.sources import SourceContext, build_sources
    from rlfh.labeling.table import TABLE_NAME
    from rlfh.recipes.offline import batch_from_log

    make, _ = labeled
    with pytest.raises(ValueError, match="learner.loss=rwr trains no pairs"):
        build_sources(make("labels=human", "learner.loss=rwr"), SourceContext(tmp_path))
    cfg = make("labels=human")
    (tmp_path / "rollouts" / TABLE_NAME).unlink()
    with pytest.raises(ValueError, match="no labels in .*rlfh label"):
        batch_from_log(cfg, build_sources(cfg, SourceContext(tmp_path)))


def test_train_reward_pairs_follow_the_labels(tmp_path):
    from rlfh.config.schema import load_config
    from rlfh.recipes.train_reward import region_pairs
    from tests.conftest import REPO
    from tests.rlfh.region_pair_logs import write_pair_log

    log = write_pair_log(tmp_path / "log", n_groups=3, seed=0)
    records = RolloutLog(log).records(["rollout_id", "round", "rewards"])
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "rewards=[{target: jpeg_compressibility, name: quality}]",
            f"reward_training.pairs={log}",
            "labels=human",
        ],
    )
    table = LabelsTable(log)
    want = []
    for g in range(3):
        a, b = sorted((r for r in records if r["round"] == g), key=lambda r: r["rewards"][0]["value"])
        label(table, a["rollout_id"], b["rollout_id"])  # people prefer the flat box the reward ranks lower
        want.append((a["rollout_id"], b["rollout_id"]))
    pairs, _ = region_pairs(cfg)
    assert [p.rollout_ids for p in pairs] == want
