"""Each reward's agreement with people's labels, and the labelers' own agreement on a plain labeled log."""

import numpy as np
import pytest

from rlfh.labeling.agreement import average_ranks, reward_agreement, spearman
from rlfh.labeling.human_eval import fleiss_kappa, labels_report
from rlfh.labeling.table import LabelsTable
from rlfh.labeling.tasks import load_tasks
from rollouts.log import RolloutLog
from tests.labeling.logs import write_label_log


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = rng.choice([-1.0, 0.0, 1.0], size=40)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert list(average_ranks(np.array([3.0, 1.0, 3.0, 2.0]))) == [2.5, 0.0, 2.5, 1.0]
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 2, 3], [0, 0, 0]) is None


def test_reward_accuracy_and_labeler_agreement(tmp_path):
    log = write_label_log(tmp_path / "log", n_groups=3, per_group=3)
    quality = {r["rollout_id"]: r["rewards"][0]["value"] for r in RolloutLog(log).records(["rollout_id", "rewards"])}
    tasks = load_tasks(log, "pairwise")[:5]
    table = LabelsTable(log)

    def say(labeler, task, choice):
        a, b = (it.rollout_id for it in task.items)
        hi, lo = (a, b) if quality[a] > quality[b] else (b, a)
        win, lose = {"agree": (hi, lo), "disagree": (lo, hi), "tie": (None, None)}[choice]
        table.append({"kind": "label", "labeler": labeler, "mode": "pairwise", "task": task.key,
                      "records": [a, b], "winner": win, "loser": lose, "tie": choice == "tie"})  # fmt: skip
        return a, b, choice

    said = [say("ann", tasks[0], "disagree")]  # then changed: only the last label of a task counts
    said = [say("ann", t, c) for t, c in zip(tasks, ["agree", "agree", "agree", "disagree", "tie"])]
    say("bob", tasks[0], "agree")
    say("bob", tasks[1], "disagree")
    acc = reward_agreement(log)["quality"]
    assert acc["pairs"] == 6 and acc["missing"] == 0 and acc["accuracy"] == pytest.approx(4 / 6)
    assert acc["ci95"][0] <= 4 / 6 <= acc["ci95"][1]
    diffs, prefs = [], []
    for labeler_said in (said, [said[0][:2] + ("agree",), said[1][:2] + ("disagree",)]):
        for a, b, c in labeler_said:
            diffs.append(quality[a] - quality[b])
            sign = np.sign(quality[a] - quality[b])
            prefs.append({"agree": sign, "disagree": -sign, "tie": 0.0}[c])
    assert acc["spearman_n"] == 7 and acc["spearman"] == pytest.approx(spearman(diffs, prefs))
    rep = labels_report(log)
    assert rep["labels"] == 7 and rep["ties"] == 1 and rep["labelers"] == {"ann": 5, "bob": 2}
    # tasks 0 and 1 have two labelers: one agreeing pair of labels, one split
    first = lambda a, b, c: "first" if (c == "agree") == (quality[a] > quality[b]) else "second"  # noqa: E731
    k0 = [first(*said[0]), first(said[0][0], said[0][1], "agree")]
    k1 = [first(*said[1]), first(said[1][0], said[1][1], "disagree")]
    counts = np.array([[k.count("first"), 0, k.count("second")] for k in (k0, k1)] + [[1, 0, 0]] * 3)
    assert rep["agreement"]["pairs_with_several_labelers"] == 2
    assert rep["agreement"]["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))
