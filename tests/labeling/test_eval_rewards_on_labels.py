"""`rlfh eval-rewards CONFIG LABELED_LOG`: people's labels of a rollout log as the comparisons a reward is
measured against (each labeler's last word on a task; winner first, loser last, ties equal)."""

import json

import numpy as np
import pytest
from PIL import Image

from rlfh.eval.labeled_comparisons import comparisons_from_labels, ranks_of
from rlfh.labeling.table import LabelsTable
from rlfh.labeling.tasks import load_tasks
from rollouts.log import RolloutLog, decode_png
from tests.conftest import REPO
from tests.labeling.logs import write_label_log


def test_ranks_put_the_winner_first_the_loser_last_and_ties_equal():
    assert ranks_of(("a", "b"), "b", "a") == (3, 1)
    assert ranks_of(("a", "b", "c"), "c", "a") == (3, 2, 1)
    assert ranks_of(("a", "b"), None, None) == (1, 1)


@pytest.fixture()
def labeled_log(tmp_path):
    log = write_label_log(tmp_path / "log", n_groups=3, per_group=2)
    table = LabelsTable(log)
    for i, task in enumerate(load_tasks(log, "pairwise")[:3]):
        a, b = (it.rollout_id for it in task.items)
        win, lose = [(a, b), (b, a), (None, None)][i]
        table.append({"kind": "label", "labeler": "ann", "mode": "pairwise", "task": task.key,
                      "records": [a, b], "winner": win, "loser": lose, "tie": win is None})  # fmt: skip
    return log


def test_comparisons_are_the_labels_on_the_logged_images(labeled_log, tmp_path):
    comps = comparisons_from_labels(labeled_log, tmp_path / "images")
    logged = {r["rollout_id"]: r for r in RolloutLog(labeled_log).records(["rollout_id", "prompt", "image"])}
    assert [c.ranks for c in comps] == [(1, 3), (3, 1), (1, 1)]
    for c in comps:
        for path in c.images:
            rec = logged[path.stem]
            assert c.prompt == rec["prompt"]
            np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), decode_png(rec["image"]))
    with pytest.raises(ValueError, match="no labels yet"):
        comparisons_from_labels(write_label_log(tmp_path / "unlabeled"), tmp_path / "x")


def test_eval_rewards_cli_scores_the_labeled_log(labeled_log, tmp_path, capsys):
    from rewards.composite import RewardSet
    from rlfh.cli.main import main
    from rlfh.config.schema import load_config

    overrides = ["rewards=[{target: jpeg_compressibility}]"]
    out = tmp_path / "agreement.json"
    assert main(["eval-rewards", str(REPO / "configs/tiny.yaml"), str(labeled_log), *overrides, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_comparisons"] == 3 and report["labels_file"] == str(labeled_log)
    got = report["rewards"]["jpeg_compressibility"]
    # by hand: the two decided labels, each right when the reward puts the people's winner above the loser
    comps = comparisons_from_labels(labeled_log, tmp_path / "again")
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    with RewardSet.from_config(cfg.rewards) as rs:
        hits = []
        for c in comps[:2]:
            images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in c.images])
            v = [r.value for r in rs(images, [c.prompt] * 2).results["jpeg_compressibility"]]
            w, lose = (0, 1) if c.ranks[0] < c.ranks[1] else (1, 0)
            hits.append(1.0 if v[w] > v[lose] else 0.5 if v[w] == v[lose] else 0.0)
    assert got["n_pairs"] == 2 and got["human_ties"] == 1
    assert got["pair_accuracy"] == pytest.approx(np.mean(hits))
