"""rewards_normalization: weighted_sum (the rewards as scored) vs GDPO (arXiv 2601.05242: each reward
z-scored in its prompt group, weighted, summed, normalized over the round), and the share of prompt
groups without spread. Worked numbers, no model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from rewards.base import RewardResult
from rewards.composite import ScoredBatch, combined_scores
from rlfh.data.batches import ScoredSamples
from rlfh.data.pairs import build_pairs, learner_batch, learner_scores, sample_weights
from rlfh.losses.advantages import gdpo_advantages, no_spread_share
from rlfh.losses.rwr import rwr_weights

# Two rewards on different scales, two prompt groups of three samples.
VALUES = {"face": [1.0, 2.0, 3.0, 5.0, 5.0, 5.0], "overall": [10.0, 10.0, 40.0, 0.0, 30.0, 60.0]}
WEIGHTS = {"face": 1.0, "overall": 0.5}
GROUPS = ["p", "p", "p", "q", "q", "q"]


def test_gdpo_worked_numbers():
    # group p: face   [1, 2, 3]    mean 2,  std sqrt(2/3)      -> z = [-sqrt(1.5), 0, sqrt(1.5)]
    #          overall [10, 10, 40] mean 20, std sqrt(200)      -> z = [-1/sqrt(2), -1/sqrt(2), sqrt(2)]
    # group q: face   [5, 5, 5]    no spread                   -> z = 0
    #          overall [0, 30, 60]  mean 30, std sqrt(600)      -> z = [-sqrt(1.5), 0, sqrt(1.5)]
    # S = z_face + 0.5 z_overall; the group means of S are 0, so the batch mean is 0; A = S / std(S).
    s = [
        -math.sqrt(1.5) - 0.5 / math.sqrt(2),
        -0.5 / math.sqrt(2),
        math.sqrt(1.5) + 0.5 * math.sqrt(2),
        -0.5 * math.sqrt(1.5),
        0.0,
        0.5 * math.sqrt(1.5),
    ]
    sd = math.sqrt(sum(x * x for x in s) / 6)
    expected = [x / sd for x in s]
    assert expected == pytest.approx([-1.451090, -0.325058, 1.776148, -0.563016, 0.0, 0.563016], abs=1e-6)
    got = gdpo_advantages(VALUES, WEIGHTS, GROUPS, eps=1e-12)
    assert got == pytest.approx(expected, abs=1e-10)
    # the default eps = 1e-6 moves them by about eps / std only
    assert gdpo_advantages(VALUES, WEIGHTS, GROUPS) == pytest.approx(expected, abs=1e-5)
    # batch-normalized: mean 0, population std 1
    assert np.mean(got) == pytest.approx(0.0, abs=1e-12) and np.std(got) == pytest.approx(1.0, abs=1e-9)


def test_gdpo_missing_values_and_zero_weights():
    values = {"face": [1.0, None, 3.0, 2.0], "overall": [1.0, 2.0, float("nan"), 4.0], "logged": [None] * 4}
    weights = {"face": 1.0, "overall": 1.0, "logged": 0.0}
    # samples 1 (no face) and 2 (NaN) are unusable; they neither get a score nor move the statistics:
    # group a keeps sample 0 alone (z = 0), group b keeps sample 3 alone (z = 0) -> all 0.
    assert gdpo_advantages(values, weights, ["a", "a", "b", "b"]) == [0.0, None, None, 0.0]
    # the same samples as combined_scores leaves unscored
    assert [v is None for v in combined_scores(values, weights)] == [False, True, True, False]
    assert gdpo_advantages({"x": [1.0, 2.0]}, {"x": 0.0}, ["a", "a"]) == [None, None]
    with pytest.raises(ValueError, match="prompt ids"):
        gdpo_advantages({"x": [1.0, 2.0]}, {"x": 1.0}, ["a"])


def test_weighted_sum_is_todays_score_exactly():
    scores, _ = learner_scores(VALUES, WEIGHTS, GROUPS, "weighted_sum")
    assert scores == [6.0, 7.0, 23.0, 5.0, 20.0, 35.0]  # 1 * face + 0.5 * overall, bit for bit
    batch = ScoredBatch(
        {n: [RewardResult(v) for v in vs] for n, vs in VALUES.items()}, WEIGHTS, {"face": "face", "overall": "global"}
    )
    assert scores == batch.combined() == combined_scores(VALUES, WEIGHTS)
    with pytest.raises(ValueError, match="rewards_normalization"):
        learner_scores(VALUES, WEIGHTS, GROUPS, "sum")


def test_gdpo_changes_the_winner_when_scales_differ():
    # "big" spans 4 units and decides the weighted sum; GDPO gives both rewards one say each
    values = {"big": [100.0, 104.0, 102.0], "small": [0.5, 0.0, 1.0]}
    weights, groups = {"big": 1.0, "small": 1.0}, ["p"] * 3
    ws, _ = learner_scores(values, weights, groups, "weighted_sum")  # [100.5, 104, 103]
    gd, _ = learner_scores(values, weights, groups, "gdpo")
    # z_big = [-sqrt(1.5), sqrt(1.5), 0], z_small = [0, -sqrt(1.5), sqrt(1.5)] -> S = [-sqrt(1.5), 0, sqrt(1.5)]
    assert gd == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], abs=1e-5)
    (p_ws,), (p_gd,) = build_pairs(groups, ws), build_pairs(groups, gd)
    assert (p_ws.winner, p_ws.loser) == (1, 0)
    assert (p_gd.winner, p_gd.loser) == (2, 0)
    # RWR weights follow: sample 1 weighs most under the weighted sum, sample 2 under GDPO
    assert np.argmax(sample_weights(ws, lambda s: rwr_weights(s, 1.0))) == 1
    assert np.argmax(sample_weights(gd, lambda s: rwr_weights(s, 1.0))) == 2


def test_no_spread_shares():
    assert no_spread_share([1, 1, 1, 2, None, 3], ["a", "a", "b", "b", "c", "c"]) == pytest.approx(2 / 3)
    assert no_spread_share([], []) is None
    _, stats = learner_scores(VALUES, WEIGHTS, GROUPS, "gdpo")
    # face does not spread in q; overall spreads in both; the combined GDPO score spreads in both
    assert stats == {
        "pairs/no_spread_share": 0.0,
        "reward/face/no_spread_share": 0.5,
        "reward/overall/no_spread_share": 0.0,
    }
    flat = {"face": [2.0, 2.0, 1.0, 3.0], "overall": [1.0, 1.0, 0.0, 0.0]}
    _, stats = learner_scores(flat, WEIGHTS, ["a", "a", "b", "b"], "weighted_sum")
    assert stats["pairs/no_spread_share"] == 0.5 and stats["reward/overall/no_spread_share"] == 1.0


def test_ddpo_takes_gdpo_advantages_as_they_are():
    cfg = SimpleNamespace(loss="ddpo", regions=SimpleNamespace(names=["global"]))
    n, t = 4, 2
    traj = {
        "latents": np.zeros((n, t + 1, 4, 8, 8), np.float32),
        "log_probs": np.zeros((n, t), np.float32),
        "timesteps": np.arange(t),
    }
    scores = [7.0, -1.0, None, 0.5]  # GDPO scores: the DDPO branch clips them to +-5 and keeps them
    batch, stats = learner_batch(
        cfg, ScoredSamples(None, ["a"] * n, ["a"] * n, scores, [{}] * n, (64, 64), traj), normalization="gdpo"
    )
    assert np.asarray(batch.advantages).tolist() == [5.0, -1.0, 0.5]
    # weighted_sum: the same scores are z-scored per prompt
    batch, _ = learner_batch(cfg, ScoredSamples(None, ["a"] * n, ["a"] * n, scores, [{}] * n, (64, 64), traj))
    assert abs(float(np.mean(batch.advantages))) < 1e-6 and np.asarray(batch.advantages).tolist() != [5.0, -1.0, 0.5]


def test_config_key():
    from rlfh.config.schema import ConfigError, load_config
    from tests.conftest import REPO

    tiny = REPO / "configs" / "tiny.yaml"
    assert load_config(tiny).rewards_normalization == "weighted_sum"
    assert load_config(tiny, ["rewards_normalization=gdpo"]).rewards_normalization == "gdpo"
    with pytest.raises(ConfigError, match="rewards_normalization"):
        load_config(tiny, ["rewards_normalization=zscore"])
    assert load_config(tiny, ["guards.max_face_identity_sim=0.9"]).guards.max_face_identity_sim == 0.9
