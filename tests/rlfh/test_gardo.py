"""GARDO (rlfh/losses/gardo.py) on worked numbers: the uncertainty and its gate, the gated KL, the diversity-aware
advantage (and its rwr / filtered weights), the reference refresh rule, the per-region held-out gap stop, and the
config's errors naming their keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlfh.config.schema import ConfigError, load_config
from rlfh.data.batches import ScoredSamples
from rlfh.data.pairs import learner_batch
from rlfh.losses.gardo import (
    AdaptiveGate,
    ReferenceRefresh,
    augment,
    diversity_factors,
    gated_kl,
    kl_gate,
    per_image_embeddings,
    reward_uncertainty,
    shaped_advantages,
    shaped_weights,
    win_rates,
)
from tests.conftest import REPO


def test_win_rates_count_ties_half():
    assert win_rates(np.array([1.0, 3.0, 3.0, 0.0])) == pytest.approx([1 / 3, 5 / 6, 5 / 6, 0.0])
    assert win_rates(np.array([2.0])) == pytest.approx([0.5])


def test_uncertainty_is_the_trained_scores_win_rate_over_the_auxiliary_rewards():
    # score ranks 0 < 1 < 2 < 3 (win rates 0, 1/3, 2/3, 1); aux a ranks them 3 > 2 > 1 > 0 reversed except
    # sample 0; aux b agrees with the score; sample 4 has no aux value (NaN, left out of the ranking)
    score = [0.0, 1.0, 2.0, 3.0, 9.0]
    aux = {"a": [0.5, 3.0, 2.0, 1.0, None], "b": [0.0, 1.0, 2.0, 3.0, 1.0]}
    u = reward_uncertainty(score, aux)
    # w_a = [0, 1, 2/3, 1/3]; w_b = w_score = [0, 1/3, 2/3, 1]; u = w_s - (w_a + w_b) / 2
    assert u[:4] == pytest.approx([0.0, -1 / 3, 0.0, 1 / 3])
    assert math.isnan(u[4])
    with pytest.raises(ValueError, match="uncertainty_rewards"):
        reward_uncertainty(score, {})


def test_gate_takes_the_most_over_rated_fraction_and_only_positive_uncertainty():
    u = np.array([0.5, -0.2, 0.1, np.nan, 0.3])
    assert kl_gate(u, 0.5).tolist() == [True, False, False, False, True]  # ceil(0.5 * 4) = 2 of the 4 finite
    assert kl_gate(u, 1.0).tolist() == [True, False, True, False, True]  # u <= 0 is never gated
    assert kl_gate(u, 0.1).tolist() == [True, False, False, False, False]  # ceil(0.4) = 1
    with pytest.raises(ValueError):
        kl_gate(u, 0.0)


def test_gated_kl_is_the_mean_over_the_gated_rows_and_its_gradient_reaches_them_only():
    kl = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    term = gated_kl(kl, torch.tensor([True, False, True, False]), coef=0.5)
    assert float(term.detach()) == pytest.approx(0.5 * (1 + 4) / 2)
    term.backward()
    assert kl.grad.tolist() == [0.25, 0.0, 0.25, 0.0]
    none = gated_kl(kl, torch.zeros(4, dtype=torch.bool), coef=0.5)
    assert float(none) == 0.0 and none.requires_grad


def test_adaptive_gate_moves_the_fraction_on_new_highs_and_lows_of_the_uncertainty():
    """The reference's RiskCompensator: the mean of the round's u >= 0 against the last 20 rounds' means."""
    gate = AdaptiveGate(0.1, 0.02, 0.2)
    means = []
    for m in (0.2, 0.3, 0.25, 0.1):  # u >= 0 with mean m, plus negative and NaN entries that do not count
        means.append(gate.update(np.array([m - 0.05, m + 0.05, -0.4, np.nan])))
    assert means == pytest.approx([0.1, 0.11, 0.11, 0.099])  # first round, a new high, inside, a new low
    assert gate.update(np.array([-0.1, np.nan])) == pytest.approx(0.099)  # nothing >= 0: unchanged
    for _ in range(30):  # keeps rising: clipped at the top of the range
        gate.update(np.array([10.0 + len(gate.history) + _]))
    assert gate.fraction == 0.2 and len(gate.history) == 20
    with pytest.raises(ValueError):
        AdaptiveGate(0.3, 0.02, 0.2)


def test_augmentations_are_deterministic_copies_of_the_same_shape():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    assert np.array_equal(augment(x, "hflip"), x[:, :, ::-1])
    for name in ("crop", "jpeg"):
        a = augment(x, name)
        assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(a, augment(x, name))
        assert not np.array_equal(a, x)
    flat = np.full((1, 32, 48, 3), 100, np.uint8)  # a flat image is its own crop
    assert np.array_equal(augment(flat, "crop"), flat)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(x, "rotate")


def test_the_source_gates_by_the_trained_score_under_augmentation():
    """gardo.uncertainty_augmentations: the run's scorer scores the mirrored images; a reward that reads only the
    left half ranks sample 0 first, and its mirror (the right half) last: the most over-rated sample is gated."""
    from rlfh.data.sources import SourceContext, build_sources

    class LeftHalf:  # the trained reward, as the scorer's ScoredBatch gives it
        def score(self, images, prompts):
            self.images = images
            left = [float(im[:, : im.shape[1] // 2].mean()) for im in images]
            return type("Scored", (), {"values": lambda _: {"left": left}, "weights": {"left": 1.0}})()

    cfg = tiny(
        "learner.loss=nft",
        "learner.reference.kl_coef=0.1",
        "gardo.kl_gate_fraction=0.25",
        "gardo.uncertainty_augmentations=[hflip]",
        "gardo.kl_gate_range=[0.02,0.5]",
    )
    scorer = LeftHalf()
    (source,) = build_sources(cfg, SourceContext(REPO, scorer=scorer))
    left, right = [40, 30, 20, 10], [0, 25, 35, 15]
    images = np.stack([np.concatenate([np.full((8, 4, 3), a), np.full((8, 4, 3), b)], 1) for a, b in zip(left, right)])
    s = ScoredSamples(
        np.zeros((4, 4, 8, 8), np.float32),
        ["a"] * 4,
        ["a"] * 4,
        [float(v) for v in left],
        [{}] * 4,
        (8, 8),
        images=images.astype(np.uint8),
        values={"left": [float(v) for v in left]},
    )
    source.annotate(s)
    # w_score = [1, 2/3, 1/3, 0], w_hflip (right halves) = [0, 2/3, 1, 1/3]: u = [1, 0, -2/3, -1/3]; ceil(1) gated
    assert s.kl_gate.tolist() == [True, False, False, False]
    assert np.array_equal(scorer.images, images[:, :, ::-1])
    assert source.extend("batch", None) == ("batch", {"gardo/kl_gate_fraction": 0.25})
    # the adaptive gate goes into the checkpoint (rlfh/recipes/rounds.py: source_states) and comes back
    source.gate.fraction, source.gate.history = 0.3, [0.1, 0.2]
    (resumed,) = build_sources(cfg, SourceContext(REPO, scorer=scorer))
    resumed.load_state(source.state())
    assert (resumed.gate.fraction, resumed.gate.history) == (0.3, [0.1, 0.2])
    resumed.load_state({})
    assert (resumed.gate.fraction, resumed.gate.history) == (0.25, [])
    with pytest.raises(ValueError, match="gardo.uncertainty_augmentations .* online"):
        build_sources(cfg, SourceContext(REPO))


def test_ddpo_carries_the_gate_and_its_exact_step_kl_covers_the_gated_rows_only():
    """DDPO with the gated KL on worked numbers: the trajectory batch keeps the gate with its rows, and the step KL
    kl_coef * mean_{b in G} w_t mean (eps_theta - eps_ref)^2 (rlfh/learner/loop.py: kl_term, as train_trajectories
    calls it) has value and gradient from the gated rows only."""
    from types import SimpleNamespace

    from rlfh.learner.loop import kl_term

    cfg = tiny("learner.loss=ddpo", "rollout.scheduler=ddim", "rollout.eta=1.0", "rollout.num_inference_steps=2")
    n = 5
    trajectory = {
        "latents": np.zeros((n, 3, 4, 2, 2), np.float32),
        "log_probs": np.zeros((n, 2), np.float32),
        "timesteps": np.array([501, 1]),
    }
    s = ScoredSamples(
        np.zeros((n, 4, 2, 2), np.float32),
        ["a"] * 3 + ["b"] * 2,
        ["a"] * 3 + ["b"] * 2,
        [0.0, 1.0, 2.0, 0.0, None],
        [{}] * n,
        (16, 16),
        trajectory,
    )
    s.kl_gate = np.array([True, False, False, True, True])
    batch, _ = learner_batch(cfg.learner, s)
    assert batch.kl_gate.tolist() == [True, False, False, True]  # sample 4 (no score) left out with its gate
    lrn = SimpleNamespace(
        cfg=SimpleNamespace(learner=SimpleNamespace(reference=SimpleNamespace(kl_coef=0.5))), refresh=None
    )
    gap = torch.tensor([1.0, 2.0, 3.0, 4.0])  # eps_theta - eps_ref, the same in every latent element
    pred = (gap.view(4, 1, 1, 1) * torch.ones(4, 4, 2, 2)).requires_grad_(True)
    w_t = torch.full((4,), 2.0)  # the step's k^2 / (2 sigma^2)
    m = {}
    term = kl_term(lrn, pred, torch.zeros(4, 4, 2, 2), m, w_t, torch.from_numpy(batch.kl_gate))
    # per-sample w gap^2 = [2, 8, 18, 32]; gated rows 0, 3: 0.5 * (2 + 32) / 2
    assert float(term) == pytest.approx(8.5) and m["gardo/kl"] == pytest.approx(17.0)
    assert m["gardo/kl_gated_share"] == 0.5
    term.backward()
    # d/d pred = 0.5 * (1/2) * 2 * 2 gap / 16 per element: 0.0625 gap on rows 0 and 3, nothing elsewhere
    assert pred.grad[:, 0, 0, 0].tolist() == pytest.approx([0.0625, 0.0, 0.0, 0.25])


def test_diversity_factor_rewards_the_sample_unlike_its_group():
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [np.nan, np.nan]])
    groups = ["p", "p", "p", "q", "q"]
    f = diversity_factors(e, groups)
    # group p: d = [0, 0, 1] (two copies, one apart), mean 1/3 -> [0, 0, 3]; q: one embedded sample -> 1
    assert f == pytest.approx([0.0, 0.0, 3.0, 1.0, 1.0])
    # cosine 0.6 between the two in a group of two: equal distances, factors 1
    assert diversity_factors(np.array([[1.0, 0.0], [0.6, 0.8]]), ["g", "g"]) == pytest.approx([1.0, 1.0])
    # the advantage is shaped where it is positive only, then clipped
    assert shaped_advantages(np.array([1.0, -1.0, 2.0]), np.array([3.0, 3.0, 0.5]), 2.5) == pytest.approx(
        [2.5, -1.0, 1.0]
    )
    # rwr / filtered: the samples above their group's mean score are the ones reweighted
    w = shaped_weights(np.array([1.0, 1.0, 2.0, 1.0]), [0.0, 1.0, 3.0, None], ["p", "p", "p", "q"], np.full(4, 2.0))
    assert w == pytest.approx([1.0, 1.0, 4.0, 1.0])  # group p mean 4/3: only 3.0 is above it


def test_identity_embeddings_are_per_image_means_of_unit_faces():
    embedded = {"embeddings": np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]]), "owners": [0, 0, 2]}
    e = per_image_embeddings(embedded, 3)
    assert e[0] == pytest.approx([0.5, 0.5]) and np.isnan(e[1]).all() and e[2] == pytest.approx([0.0, 1.0])
    assert per_image_embeddings({"embeddings": None, "reason": "no face"}, 3) is None


def tiny(*overrides):
    return load_config(REPO / "configs" / "tiny.yaml", ["learner.train_batch_size=4", *overrides])


def test_the_batches_carry_the_shaped_advantages_and_the_gate():
    """advantage_batch (nft, awm) and trajectory-free weighted batches: per-prompt z-scores (+-1 for a pair), the
    positive one times its diversity factor; the gate goes with the kept rows."""
    cfg = tiny("learner.loss=awm", "gardo.diversity=pixels")
    lat = np.zeros((6, 4, 8, 8), np.float32)
    prompts = ["a", "a", "a", "b", "b", "b"]
    scores = [0.0, 1.0, 2.0, 0.0, 3.0, None]
    # group a: samples 1 and 2 are copies, sample 0 apart; group b: two samples, equal distances
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = ScoredSamples(lat, prompts, prompts, scores, [{}] * 6, (64, 64))
    s.embeddings, s.kl_gate = emb, np.array([True, False, False, True, False, True])
    batch, _ = learner_batch(cfg.learner, s)
    z = math.sqrt(1.5)  # z-score of 2 in [0, 1, 2] (population std sqrt(2/3))
    # a: d = [1, 0, 0], mean 1/3 -> factors [3, 0, 0]: A = [-z, 0, z * 0]; b: [-1, 1 * 1]
    assert batch.advantages == pytest.approx([-z, 0.0, 0.0, -1.0, 1.0], abs=1e-5)
    assert batch.kl_gate.tolist() == [True, False, False, True, False]  # sample 5 (no score) left out
    rwr = tiny("learner.loss=rwr", "learner.rwr.beta=0", "gardo.diversity=pixels")
    batch, _ = learner_batch(rwr.learner, s)
    # beta 0: unit weights; a's above-mean sample 2 gets factor 0 (dropped), b's sample 4 factor 1
    assert batch.weights.tolist() == [1.0, 1.0, 1.0, 1.0] and batch.prompts == ["a", "a", "b", "b"]
    assert batch.kl_gate.tolist() == [True, False, True, False]


def test_the_source_gates_and_embeds_faces_per_image():
    """rlfh/data/sources/gardo.py online: the gate from the round's reward values, identity embeddings from the
    scorer's face embeddings of the detected faces (one per image, NaN without a face)."""
    from rewards.base import Detection
    from rlfh.data.sources import SourceContext, build_sources

    class Scorer:
        def face_embeddings(self, images, faces):
            self.faces = faces
            return {"embeddings": np.array([[3.0, 0.0], [0.0, 1.0]]), "owners": [0, 2]}

    cfg = tiny(
        "learner.loss=nft",
        "learner.reference.kl_coef=0.1",
        "gardo.kl_gate_fraction=0.25",
        "gardo.uncertainty_rewards=[aux]",
        "gardo.diversity=identity",
        "rewards=[jpeg_compressibility, {target: jpeg_compressibility, name: aux, weight: 0}]",
    )
    scorer = Scorer()
    (source,) = build_sources(cfg, SourceContext(REPO, scorer=scorer))
    face = Detection((0.0, 0.0, 8.0, 8.0), 0.9, "face")
    s = ScoredSamples(
        np.zeros((4, 4, 8, 8), np.float32),
        ["a"] * 4,
        ["a"] * 4,
        [4.0, 3.0, 2.0, 1.0],
        [{"face": [face]}, {"face": []}, {"face": [face]}, {}],
        (64, 64),
        images=np.zeros((4, 64, 64, 3), np.uint8),
        values={"aux": [1.0, 2.0, 3.0, 4.0], "jpeg_compressibility": [4.0, 3.0, 2.0, 1.0]},
    )
    source.annotate(s)
    # u = w_score - w_aux = (1, 1/3, -1/3, -1) ... ceil(0.25 * 4) = 1 gated: the most over-rated, sample 0
    assert s.kl_gate.tolist() == [True, False, False, False]
    assert scorer.faces == [[face], [], [face], []]
    assert s.embeddings[0] == pytest.approx([1.0, 0.0]) and s.embeddings[2] == pytest.approx([0.0, 1.0])
    assert np.isnan(s.embeddings[1]).all() and np.isnan(s.embeddings[3]).all()


def test_reference_refresh_rule():
    r = ReferenceRefresh(refresh_kl=0.1, refresh_rounds=3)
    r.observe(0.05)
    assert not r.take()
    r.observe(0.2)  # over the threshold: the next round starts from the policy
    assert r.take() and r.count == 1 and not r.take()
    for kl in (0.0, 0.0):
        r.observe(kl)
    assert not r.take()
    r.observe(None)  # third round since the last refresh
    assert r.take() and r.count == 2
    never = ReferenceRefresh(refresh_kl=None, refresh_rounds=None)
    for _ in range(5):
        never.observe(1e9)
    assert not never.take()


def refresh_rounds(rule: ReferenceRefresh, kls: list, start: int = 0) -> list[int]:
    """The rounds (from ``start``) at whose beginning ``rule`` refreshes, observing ``kls`` after each."""
    out = []
    for rnd, kl in enumerate(kls, start):
        if rule.take():
            out.append(rnd)
        rule.observe(kl)
    return out


def test_a_resumed_refresh_rule_refreshes_at_the_same_rounds():
    """The counters go into the checkpoint (LearnerEngine.save_checkpoint: gardo_refresh): a run stopped after
    round 4, with a refresh due, and resumed from its state refreshes where the uninterrupted one does; a rule
    started afresh would count again from 0."""
    kls = [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    whole = refresh_rounds(ReferenceRefresh(0.1, 3), kls)
    first = ReferenceRefresh(0.1, 3)
    head = refresh_rounds(first, kls[:5])
    resumed = ReferenceRefresh(0.1, 3)
    resumed.load(first.state())
    assert whole == [3, 6] and head + refresh_rounds(resumed, kls[5:], 5) == whole and resumed.count == 2
    assert head + refresh_rounds(ReferenceRefresh(0.1, 3), kls[5:], 5) != whole


@pytest.mark.slow  # a LearnerEngine and one round: about a minute on 2 busy cores
def test_reference_becomes_the_policy_after_a_round_over_the_kl(tiny_model_dir, tmp_path):
    """The learner's refresh: after a round whose gardo/kl exceeds refresh_kl the next round's reference
    predicts as the policy does (and before it, as the base model)."""
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.rlfh.test_online_rl import samples

    cfg = tiny(
        f"model.path={tiny_model_dir}",
        "learner.micro_batch_size_per_gpu=4",
        "learner.loss=awm",
        "learner.lr=1e-2",
        "learner.reference.kl_coef=0.1",
        "gardo.refresh_kl=1e-12",
    )
    lrn = LearnerEngine(cfg)
    lat, prompts, rewards = samples()
    scored = ScoredSamples(lat, prompts, prompts, rewards, [{}] * 8, (64, 64))
    scored.kl_gate = np.array([True, False] * 4)  # the learner takes the KL on the gated rows only
    batch, _ = learner_batch(cfg.learner, scored)
    m = train(lrn, batch)
    assert m["gardo/kl"] >= 0 and m["gardo/refresh_due"] == 1.0 and m["gardo/reference_refreshes"] == 0.0
    assert m["gardo/kl_gated_share"] == pytest.approx(0.5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    enc, added = lrn.condition(["a"], 64, 64)
    with torch.no_grad():
        base, policy = lrn.reference(x, t, enc, added), lrn.policy(x, t, enc, added)
        assert (base - policy).abs().max() > 1e-6  # trained away from the base
        lrn.begin_round()
        assert torch.allclose(lrn.reference(x, t, enc, added), policy, atol=1e-6)
    assert lrn.refresh.count == 1
    ckpt = lrn.save_checkpoint(tmp_path / "ckpt")
    resumed = LearnerEngine(cfg)
    resumed.load_checkpoint(ckpt)
    assert resumed.refresh.state() == lrn.refresh.state() == {"since": 0, "pending": False, "count": 1}


def test_region_gap_stops_on_the_region_that_fails_to_generalize():
    from rewards.base import RewardResult
    from rewards.composite import ScoredBatch
    from rlfh.eval.guards import Guards

    def batch(face, glob):
        res = {"f": [RewardResult(v) for v in face], "g": [RewardResult(v) for v in glob]}
        return ScoredBatch(res, {"f": 1.0, "g": 2.0}, {"f": "face", "g": "global"})

    guards = Guards.__new__(Guards)
    guards.gc = tiny("guards.every=1", "guards.heldout_prompts=[x]", "guards.max_region_reward_gap={face: 0.5}").guards
    metrics: dict = {}
    stop = guards.region_gaps(batch([1.0, 2.0], [1.0, 1.0]), batch([0.5, 0.5], [1.0, 2.0]), metrics)
    # face: 1.5 - 0.5 = 1.0 > 0.5; global (weight 2): 2.0 - 3.0 = -1.0
    assert metrics == {"heldout/reward_gap/face": pytest.approx(1.0), "heldout/reward_gap/global": pytest.approx(-1.0)}
    assert "guards.max_region_reward_gap.face=0.5" in stop
    assert guards.region_gaps(None, None, metrics) is None


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["gardo.kl_gate_fraction=1.5"], "gardo.kl_gate_fraction=1.5"),
        (["learner.loss=nft", "gardo.kl_gate_fraction=0.5"], "gardo.uncertainty_rewards"),
        (["learner.loss=nft", "gardo.refresh_rounds=0"], "gardo.refresh_rounds=0"),
        (["learner.loss=nft", "gardo.refresh_kl=1e-4"], "learner.reference.kl_coef > 0"),
        (["gardo.diversity=identity"], "learner.loss=dpo trains on pairs"),
        (
            [
                "learner.loss=nft",
                "learner.reference.kl_coef=0.1",
                "gardo.kl_gate_fraction=0.2",
                "gardo.uncertainty_rewards=[aesthetic]",
            ],
            "gardo.uncertainty_rewards ['aesthetic'] are not in rewards",
        ),
        (["guards.max_region_reward_gap={face: -1}"], "guards.max_region_reward_gap.face=-1"),
        (
            [
                "learner.loss=nft",
                "learner.reference.kl_coef=0.1",
                "gardo.kl_gate_fraction=0.2",
                "gardo.uncertainty_augmentations=[rotate]",
            ],
            "gardo.uncertainty_augmentations ['rotate']: unknown",
        ),
        (
            [
                "learner.loss=nft",
                "learner.reference.kl_coef=0.1",
                "gardo.kl_gate_fraction=0.2",
                "gardo.uncertainty_augmentations=[hflip]",
                "gardo.kl_gate_range=[0.3,0.5]",
            ],
            "gardo.kl_gate_range=[0.3, 0.5]",
        ),
        (["learner.loss=nft", "gardo.uncertainty_augmentations=[hflip]"], "gardo.uncertainty_augmentations is read"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    assert key in str(e.value)


def test_a_valid_gardo_config_loads():
    cfg = tiny(
        "learner.loss=ddpo",
        "rollout.scheduler=ddim",
        "rollout.eta=1.0",
        "learner.reference.kl_coef=0.04",
        "gardo.kl_gate_fraction=0.1",
        "gardo.uncertainty_rewards=[jpeg_compressibility]",
        "gardo.refresh_kl=3e-4",
        "gardo.refresh_rounds=15",
        "gardo.diversity=identity",
    )
    assert cfg.gardo.enabled and cfg.gardo.refreshes
