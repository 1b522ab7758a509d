"""A NaN or inf reward counts as missing everywhere: it never picks a pair, never weights a sample,
and each place that drops it says how many, by reward name."""

import math
from pathlib import Path

import numpy as np
import pytest

from rewards.base import Reward, RewardError, RewardResult
from rewards.composite import RewardSet, ScoredBatch, WeightedReward, combined_scores
from rlfh.config.schema import load_config
from rlfh.data.batches import ScoredSamples
from rlfh.data.pairs import Pair, build_pairs, learner_batch, sample_weights
from rlfh.losses.filtered import filter_weights
from rlfh.losses.rwr import rwr_weights

REPO = Path(__file__).resolve().parents[2]
NAN, INF = math.nan, math.inf


def config(loss: str, **over):
    extra = [f"learner.{k}={v}" for k, v in over.items()]
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "rollouts=/logged/rollouts",
            f"learner.loss={loss}",
            "learner.train_batch_size=2",
            "rewards=[{target: jpeg_compressibility, name: jpeg}, {target: facescore, name: face, weight: 0.5}]",
            *extra,
        ],
    )


def test_nan_first_in_group_does_not_drop_the_group():
    # NaN compares false with everything: as the first member it used to be both best and worst
    pairs = build_pairs(["a"] * 3 + ["b"] * 2, [NAN, 1.0, 3.0, 0.0, 2.0])
    assert sorted(pairs, key=lambda p: p.winner) == [Pair(2, 1, 2.0), Pair(4, 3, 2.0)]


@pytest.mark.parametrize("bad", [INF, -INF])
def test_inf_is_never_a_winner_nor_a_loser(bad):
    pairs = build_pairs(["a"] * 4, [1.0, bad, 3.0, 2.0])
    assert pairs == [Pair(2, 0, 2.0)]


@pytest.mark.parametrize("loss", ["rwr", "filtered"])
def test_one_nan_in_960_rows_weights_the_other_959(loss):
    rng = np.random.default_rng(0)
    scores = [float(x) for x in rng.standard_normal(960)]
    scores[17] = NAN
    weigh = {"rwr": lambda r: rwr_weights(r, 1.0), "filtered": lambda r: filter_weights(r, None, 0.5)}[loss]
    w = sample_weights(scores, weigh)
    assert np.isfinite(w).all() and w[17] == 0.0
    kept = np.count_nonzero(w)
    assert kept == (959 if loss == "rwr" else 480)  # rwr: every finite sample; filtered: the top half of 959
    if loss == "rwr":
        assert w.sum() == pytest.approx(959.0)  # mean weight 1 over the scored samples
    cfg = config(loss)
    latents = np.zeros((960, 4, 8, 8), np.float32)
    batch, stats = learner_batch(
        cfg.learner, ScoredSamples(latents, ["p"] * 960, ["p"] * 960, scores, [{}] * 960, (64, 64))
    )
    assert len(batch) == kept and stats["samples/kept"] == kept and stats["samples/unscored"] == 1.0


def test_combined_score_treats_nonfinite_as_missing():
    values = {"jpeg": [1.0, NAN, 2.0, INF, 1.0], "face": [0.5, 0.5, None, 0.5, NAN]}
    assert combined_scores(values, {"jpeg": 1.0, "face": 2.0}) == [2.0, None, None, None, None]
    # a zero-weight reward's NaN does not cost the image its score
    assert combined_scores(values, {"jpeg": 1.0, "face": 0.0}) == [1.0, None, 2.0, None, 1.0]
    # the sum itself overflowing is no score either
    assert combined_scores({"a": [1e308], "b": [1e308]}, {"a": 1.0, "b": 1.0}) == [None]


def test_scored_batch_reports_nonfinite_by_reward():
    class Loose:  # a result from a reward that skipped RewardResult's own check
        def __init__(self, value):
            self.value, self.regions = value, {}

    scored = ScoredBatch(
        {
            "jpeg": [RewardResult(1.0), Loose(NAN), RewardResult(3.0)],
            "face": [RewardResult(0.5), RewardResult(0.5), RewardResult.missing("no face")],
        },
        {"jpeg": 1.0, "face": 1.0},
        {"jpeg": "global", "face": "face"},
    )
    assert scored.combined() == [1.5, None, None]
    m = scored.means()
    assert m["reward/jpeg/nonfinite"] == 1.0 and m["reward/face/nonfinite"] == 0.0
    assert m["reward/jpeg/mean"] == 2.0 and m["reward/jpeg/missing_frac"] == pytest.approx(1 / 3)


def logged(values: dict[str, list], rounds: list[int] | None = None) -> list[dict]:
    n = len(next(iter(values.values())))
    return [
        {
            "rollout_id": f"r{i}",
            "round": (rounds or [0] * n)[i],
            "prompt": f"p{i // 4}",
            "rewards": [{"name": k, "value": v[i]} for k, v in values.items()],
            "regions": [],
            "latent": np.full((4, 8, 8), i, np.float32).tobytes(),
            "latent_shape": [4, 8, 8],
            "sampler": {"height": 64, "width": 64},
        }
        for i in range(n)
    ]


@pytest.fixture()
def fake_log(monkeypatch):
    """Offline training reads records from a log that may hold NaN/inf (written by another tool)."""
    import rollouts.log

    holder = {}

    class FakeLog:
        def __init__(self, directory):
            pass

        def records(self, columns=None):
            return holder["records"]

    monkeypatch.setattr(rollouts.log, "RolloutLog", FakeLog)
    return holder


def test_offline_dpo_pairs_around_nan_and_inf(fake_log):
    from rlfh.recipes.offline import batch_from_log

    # group p0: NaN first, then 1, 3, 2; group p1: inf first, then 0, 5, 4
    fake_log["records"] = logged({"jpeg": [NAN, 1.0, 3.0, 2.0, INF, 0.0, 5.0, 4.0], "face": [0.0] * 8})
    batch, stats = batch_from_log(config("dpo"))
    assert stats["pairs/count"] == 2.0 and stats["samples/unscored"] == 2.0
    assert stats["reward/jpeg/nonfinite"] == 2.0 and stats["reward/face/nonfinite"] == 0.0
    assert [float(x[0, 0, 0]) for x in batch.latents_w] == [2.0, 6.0]  # winners: 3.0 and 5.0, never inf
    assert [float(x[0, 0, 0]) for x in batch.latents_l] == [1.0, 5.0]


def test_offline_error_says_why_nothing_is_left(fake_log):
    from rlfh.recipes.offline import batch_from_log

    fake_log["records"] = logged({"jpeg": [NAN, 1.0, None, 2.0], "face": [0.5, INF, 0.5, 0.5]})
    with pytest.raises(
        ValueError,
        match=r"(?s)3 of 4 records have no combined score.*'jpeg': 1.*"
        r"NaN/inf values by reward, counted as missing: \{'jpeg': 1, 'face': 1\}",
    ):
        batch_from_log(config("rwr", train_batch_size=2))


class NaNOnPrompt(Reward):
    """Scores 1.0, except NaN for the prompt "bad" (RewardResult refuses it and raises)."""

    def score(self, images, prompts):
        return [RewardResult(NAN if p == "bad" else 1.0) for p in prompts]


def test_reward_error_names_the_reward_and_the_image():
    reward = NaNOnPrompt()
    reward.name = "flaky"
    rewards = RewardSet([WeightedReward(reward, 1.0)])
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(RewardError, match=r"reward 'flaky' failed on image 2 \(prompt 'bad'\) of 4: .*not finite"):
        rewards(images, ["ok", "ok", "bad", "ok"])
    assert rewards(images, ["ok"] * 4).combined() == [1.0] * 4
