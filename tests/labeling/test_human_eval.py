"""Human evaluation: blind pairs from an evaluation, labeled win-tie-lose, reported with intervals and kappa."""

import json

import numpy as np
import pytest

from rlfh.labeling.human_eval import SIDES_NAME, fleiss_kappa, human_eval_report, write_human_pairs
from rlfh.labeling.table import LabelsTable
from rollouts.log import RolloutLog


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) style worked example: 10 subjects, 14 raters, 5 categories; kappa 0.210
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(np.array(table)) == pytest.approx(0.20993, abs=1e-5)
    assert fleiss_kappa(np.array([[2, 0, 0], [0, 0, 2]])) == pytest.approx(1.0)  # full agreement
    assert fleiss_kappa(np.array([[1, 0, 0], [0, 1, 0]])) is None  # nobody labeled a pair twice
    assert fleiss_kappa(np.array([[3, 0, 0], [2, 0, 0]])) is None  # one category only: undefined


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tmp_path_factory):
    from tests.rlfh.eval_helpers import tiny_eval

    eval_dir, summary = tiny_eval(tiny_model_dir)
    return write_human_pairs(eval_dir, tmp_path_factory.mktemp("h") / "pairs", seed=3), eval_dir, summary


def test_pairs_log_is_blind_and_maps_back(pairs):
    out, eval_dir, summary = pairs
    sides = json.loads((out / SIDES_NAME).read_text())["sides"]
    records = RolloutLog(out).records(["rollout_id", "round", "prompt", "seed", "model_id", "image"])
    assert len(records) == 2 * len(summary["samples"]) and set(sides) == {r["rollout_id"] for r in records}
    firsts = []
    for s in summary["samples"]:
        group = [r for r in records if r["round"] == s["index"]]
        assert {sides[r["rollout_id"]] for r in group} == {"model", "baseline"}
        assert all(r["prompt"] == s["prompt"] and r["seed"] == s["seed"] and r["model_id"] == "" for r in group)
        for r in group:  # each image is the one its side's model made
            assert r["image"] == (eval_dir / s[sides[r["rollout_id"]]]["image"]).read_bytes()
        firsts.append(sides[group[0]["rollout_id"]])
    assert set(firsts) == {"model", "baseline"}  # the side shown first varies
    with pytest.raises(ValueError, match="not an empty folder"):
        write_human_pairs(eval_dir, out)


def test_report_rates_and_agreement(pairs, tmp_path):
    import shutil

    src, _, _ = pairs
    out = shutil.copytree(src, tmp_path / "pairs")
    from rlfh.labeling.tasks import load_tasks

    sides = json.loads((out / SIDES_NAME).read_text())["sides"]
    tasks = load_tasks(out, "win-tie-lose")
    assert len(tasks) == len(sides) // 2 == 6
    with pytest.raises(ValueError, match="no labels yet"):
        human_eval_report(out)
    table = LabelsTable(out)

    def say(labeler, task, who):
        ids = [it.rollout_id for it in task.items]
        side_of = {sides[i]: i for i in ids}
        win = None if who == "tie" else side_of[who]
        lose = None if who == "tie" else side_of["baseline" if who == "model" else "model"]
        table.append(
            {
                "kind": "label",
                "labeler": labeler,
                "mode": "win-tie-lose",
                "task": task.key,
                "records": ids,
                "winner": win,
                "loser": lose,
                "tie": who == "tie",
            }
        )

    ann = ["model", "model", "model", "tie", "baseline", "model"]
    bob = ["model", "model", "baseline", "tie"]  # bob labels the first four pairs only
    for t, who in zip(tasks, ann):
        say("ann", t, who)
    for t, who in zip(tasks, bob):
        say("bob", t, who)
    rep = human_eval_report(out)
    assert rep["labeled_pairs"] == 6 and rep["labels"] == 10 and rep["labelers"] == {"ann": 6, "bob": 4}
    # per pair shares: (1, 0, 0) x2, (.5, 0, .5), (0, 1, 0), (0, 0, 1), (1, 0, 0)
    assert rep["model_wins"]["rate"] == pytest.approx(3.5 / 6)
    assert rep["ties"]["rate"] == pytest.approx(1 / 6) and rep["model_loses"]["rate"] == pytest.approx(1.5 / 6)
    assert rep["win_rate"]["rate"] == pytest.approx(4 / 6)
    lo, hi = rep["model_wins"]["ci95"]
    assert 0 <= lo < 3.5 / 6 < hi <= 1
    counts = np.array([[2, 0, 0], [2, 0, 0], [1, 0, 1], [0, 2, 0]])
    assert rep["agreement"]["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))
    assert rep["agreement"]["pairs_with_several_labelers"] == 4


def test_eval_cli_refuses_human_pairs_without_a_baseline(tiny_model_dir, tmp_path, capsys):
    from rlfh.cli.main import main
    from tests.conftest import REPO

    cfg = str(REPO / "configs" / "tiny.yaml")
    argv = ["eval", cfg, "--model", tiny_model_dir, "--out", str(tmp_path / "e"), "--human-pairs", str(tmp_path / "p")]
    assert main(argv) == 2
    assert "--human-pairs compares two models" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before sampling


def test_eval_human_cli(pairs, tmp_path, capsys):
    import shutil

    from rlfh.cli.main import main
    from rlfh.labeling.tasks import load_tasks

    out = shutil.copytree(pairs[0], tmp_path / "pairs")
    assert main(["eval-human", str(out)]) == 2 and "no labels yet" in capsys.readouterr().err
    assert main(["eval-human", str(tmp_path)]) == 2 and "no labels yet" in capsys.readouterr().err
    task = load_tasks(out, "win-tie-lose")[0]
    ids = [it.rollout_id for it in task.items]
    rec = {"kind": "label", "labeler": "ann", "mode": "win-tie-lose", "task": task.key, "records": ids}
    LabelsTable(out).append({**rec, "winner": ids[0], "loser": ids[1], "tie": False})
    assert main(["eval-human", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 of 6 pairs labeled, 1 labels by ann" in text and "Fleiss' kappa n/a" in text
    assert "jpeg_compressibility" in text and "brightest_box" in text  # each reward against the label
    assert main(["eval-human", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == 1
