"""Multi-aspect training (``rollout.resolutions``): validated buckets, a prompt group at one bucket, each
bucket sampled at its size and trained as its own batch with SDXL's time ids carrying that size."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from rlfh.data.buckets import BucketBatches, assign_buckets, bucket_of, merge_stats
from tests.conftest import REPO

BUCKETS = [[64, 64], [64, 128]]


def test_resolutions_are_validated_naming_the_key():
    from rlfh.config.schema import ConfigError, load_config

    cfg = load_config(None, ["rollout.resolutions=[[1024, 1024], [1152, 896], [896, 1152]]"])
    assert cfg.rollout.resolutions == [[1024, 1024], [1152, 896], [896, 1152]]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.resolutions=[[64, 64], [64, 100], [64], [0, 64], [64, 64]]"])
    text = str(e.value)
    assert "rollout.resolutions[1]=[64, 100]: the width 100 must be a multiple of 64" in text
    assert "rollout.resolutions[2]=[64]: a bucket is [height, width]" in text
    assert "rollout.resolutions[3]=[0, 64]: the height 0" in text
    assert "rollout.resolutions: the bucket [64, 64] is given twice" in text
    with pytest.raises(ConfigError, match=r"rollout.resolutions\[0\]=\[8192, 64\]"):
        load_config(None, ["rollout.resolutions=[[8192, 64]]"])


def test_data_sources_that_extend_a_round_of_one_size_are_refused_with_buckets_naming_their_keys(tmp_path):
    """Only the sources that annotate each bucket's samples (GARDO, HcP's priors) run with several buckets; `rlfh
    train` refuses the ones that extend a round's batch of one size before anything starts, naming both keys."""
    from rlfh.config.schema import ConfigError, load_config
    from rlfh.data.sources import bucket_problems
    from rlfh.recipes.online import train

    two = [f"rollout.resolutions={BUCKETS}", f"run_dir={tmp_path / 'run'}"]
    for key, overrides in (
        ("data.hgdpo.real_images", ["data.hgdpo.real_images=/photos"]),
        (
            "data.region_pairs.region",
            ["data.region_pairs.region=face", "rewards.0.target=facescore", "learner.regions.names=[global, face]"],
        ),
        ("data.human_labels.log", ["data.human_labels.log=/labels"]),
    ):
        with pytest.raises(ConfigError) as e:
            train(load_config(REPO / "configs" / "tiny.yaml", [*two, *overrides]))
        assert f"rollout.resolutions: 2 buckets with {key} (the " in str(e.value), str(e.value)
        one = load_config(REPO / "configs" / "tiny.yaml", ["rollout.resolutions=[[64, 128]]", *overrides])
        assert bucket_problems(one) == []  # one bucket is one size
    assert not (tmp_path / "run").exists()  # refused before the run started
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*two, "learner.loss=nft", "learner.reference.kl_coef=0.1", "gardo.diversity=pixels", "model.hcp.enabled=true"],
    )
    assert bucket_problems(cfg) == []


def test_a_prompt_group_is_at_one_bucket_chosen_from_prompt_and_seed():
    from rlfh.data.prompts import PromptSchedule

    schedule = PromptSchedule([f"prompt {i}" for i in range(40)], 20, 3, seed=0)
    prompts, seeds = schedule.round(0)
    buckets = assign_buckets(prompts, seeds, BUCKETS, (64, 64))
    assert buckets == assign_buckets(prompts, seeds, BUCKETS, (64, 64))  # a pure function: resumes repeat it
    assert [(b.height, b.width) for b in buckets] == [(64, 64), (64, 128)]
    assert sorted(i for b in buckets for i in b.index) == list(range(len(prompts)))
    for b in buckets:
        assert list(b.index) == sorted(b.index)
        group_first_seed = {p: next(s for q, s in zip(prompts, seeds) if q == p) for p in prompts}
        for i in b.index:  # the whole group of prompts[i] is here, at the bucket its first seed names
            assert all(j in b.index for j, q in enumerate(prompts) if q == prompts[i])
            assert BUCKETS[bucket_of(prompts[i], group_first_seed[prompts[i]], 2)] == [b.height, b.width]
    shares = [len(b.index) / len(prompts) for b in buckets]
    assert min(shares) > 0.25, shares  # 20 groups: a hash that put nearly all in one bucket would fail
    one = assign_buckets(prompts, seeds, [], (64, 96))
    assert len(one) == 1 and (one[0].height, one[0].width) == (64, 96) and len(one[0].index) == len(prompts)


def test_merge_stats_sums_counts_and_weights_means():
    merged = merge_stats([(2, {"pairs/count": 1.0, "pairs/mean_margin": 0.5}), (6, {"pairs/count": 3.0})])
    assert merged == {"pairs/count": 4.0, "pairs/mean_margin": 0.5}
    merged = merge_stats([(2, {"samples/kept": 2.0, "x": 1.0}), (6, {"samples/kept": 5.0, "x": 3.0})])
    assert merged == {"samples/kept": 7.0, "x": 2.5}


class LocalFleet:
    """The rollout fleet's submit / collect over one in-process sampler (no Ray)."""

    restarts = 0

    def __init__(self, sampler):
        self.sampler, self.sizes = sampler, []

    def submit(self, prompts, seeds, settings, batch_size, record=False, branch_seeds=None):
        self.sizes.append((settings.height, settings.width, len(prompts)))
        return prompts, seeds, settings, batch_size, record, branch_seeds

    def collect(self, jobs):
        from rollouts.actor import sample_in_batches

        return sample_in_batches(self.sampler, *jobs)


@pytest.fixture(scope="module")
def bucketed_round(tiny_model_dir, tmp_path_factory):
    """One online round of the tiny model at two buckets, through the online feed's own code (sampling,
    scoring, logging, building), with an in-process sampler and rewards in place of the Ray actors."""
    from families import load_pipeline
    from rewards.composite import RewardSet
    from rlfh.config.schema import load_config
    from rlfh.data.prompts import PromptSchedule, load_prompts
    from rlfh.recipes.online import OnlineFeed
    from rollouts.log import RolloutLog
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    run = tmp_path_factory.mktemp("buckets")
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"run_dir={run}",
            "rollout.rollouts_per_prompt=2",
            "rollout.num_inference_steps=2",
            f"rollout.resolutions={BUCKETS}",
            "learner.epochs_per_round=1",
            "learner.train_batch_size=1",
            "learner.micro_batch_size_per_gpu=1",
        ],
    )
    rc = cfg.rollout
    feed = OnlineFeed(cfg, types.SimpleNamespace(path=run))
    feed.schedule = PromptSchedule(load_prompts(rc), rc.prompts_per_round, rc.rollouts_per_prompt, cfg.seed)
    feed.settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, 64, 64, rc.eta)
    feed.record, feed.version = False, 0
    feed.fleet = LocalFleet(Sampler(load_pipeline(cfg.model)))
    feed.scorer = types.SimpleNamespace(score=RewardSet.from_config(cfg.rewards))
    feed.log = RolloutLog(run / "rollouts", "png", None)
    batch, metrics, data = feed.batch(0, [])
    return cfg, feed, batch, metrics, data


def test_each_bucket_is_sampled_logged_and_built_at_its_size(bucketed_round):
    cfg, feed, batch, metrics, data = bucketed_round
    assert [(h, w) for h, w, _ in feed.fleet.sizes] == [(64, 64), (64, 128)]
    assert isinstance(batch, BucketBatches) and len(batch.parts) == 2
    assert [p.latents_w.shape[-2:] for p in batch.parts] == [(8, 8), (8, 16)]  # no cross-bucket stacking
    for part, (h, w, n) in zip(data.samples, feed.fleet.sizes):
        assert part.images.shape[1:3] == (h, w) and len(part) == n and n % cfg.rollout.rollouts_per_prompt == 0
        assert (
            len(set(part.prompts) & set(p for other in data.samples if other is not part for p in other.prompts)) == 0
        )
    assert metrics["rollout/samples"] == cfg.rollout.samples_per_round == len(data.scored)
    assert metrics["pairs/count"] == len(batch) == sum(len(p) for p in batch.parts)
    records = feed.log.records(["latent_shape", "sampler", "prompt"])
    shapes = {(r["sampler"]["height"], r["sampler"]["width"]): tuple(r["latent_shape"]) for r in records}
    assert shapes == {(64, 64): (4, 8, 8), (64, 128): (4, 8, 16)}
    assert feed.log.summary()["sizes"] == [[h, w, n] for h, w, n in feed.fleet.sizes]  # `rlfh rollouts inspect`


def test_per_bucket_sources_annotate_each_buckets_samples_at_its_size(bucketed_round, tmp_path):
    """The feed's builder calls the per-bucket sources once per bucket: GARDO's pixel embeddings and gate of that
    bucket's samples, HcP's priors at its latent size, carried by that bucket's batch."""
    import dataclasses

    from rlfh.data.sources import SourceContext
    from rlfh.data.sources.gardo import Gardo
    from rlfh.data.sources.hcp_priors import HcpPriors
    from rlfh.losses.gardo import GardoConfig

    cfg, feed, _, _, data = bucketed_round
    values = data.scored.values()
    gcfg = dataclasses.replace(cfg, gardo=GardoConfig(0.5, [next(iter(values))], diversity="pixels"))
    hcfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, hcp_priors=dataclasses.replace(cfg.data.hcp_priors, prior="real"))
    )
    seen = []

    class Seen(Gardo):
        def annotate(self, samples):
            super().annotate(samples)
            seen.append((samples.image_hw, len(samples), samples.embeddings.shape, samples.kl_gate.shape))

    ctx = SourceContext(tmp_path)
    sources = [HcpPriors(hcfg, ctx), Seen(gcfg, ctx)]
    buckets = [types.SimpleNamespace(height=p.images.shape[1], width=p.images.shape[2]) for p in data.samples]
    scored_parts = [feed.scorer.score(p.images, p.prompts) for p in data.samples]
    batch, _ = feed.build(list(zip(buckets, data.samples)), scored_parts, data.scored, sources)
    assert [(hw, n, e, g) for hw, n, e, g in seen] == [
        ((b.height, b.width), len(p), (len(p), 3 * 64 * 64), (len(p),)) for b, p in zip(buckets, data.samples)
    ]
    assert [p.priors_w.shape[-2:] for p in batch.parts] == [(8, 8), (8, 16)]


@pytest.mark.slow  # two pipeline loads and samplings: 9 s on a quiet machine, 39 s beside other workers
def test_eval_samples_every_bucket_at_its_size(tiny_model_dir, tmp_path):
    """`rlfh eval` with rollout.resolutions: one evaluation per bucket, at its size, in out/<h>x<w>."""
    import json

    from rlfh.cli.eval import main

    out = tmp_path / "eval"
    argv = ["eval", str(REPO / "configs" / "tiny.yaml"), "--model", tiny_model_dir, "--prompts", str(tmp_path / "p")]
    (tmp_path / "p").write_text("a face\n")
    rc = main(
        [
            *argv,
            "--seeds",
            "1",
            "--out",
            str(out),
            "--no-report",
            "--no-progress",
            f"rollout.resolutions={BUCKETS}",
            "rollout.num_inference_steps=2",
        ]
    )
    assert rc == 0
    for h, w in BUCKETS:
        summary = json.loads((out / f"{h}x{w}" / "eval.json").read_text())
        assert (summary["settings"]["height"], summary["settings"]["width"]) == (h, w)
        from PIL import Image

        assert Image.open(out / f"{h}x{w}" / "images" / "model" / "0000.png").size == (w, h)


@pytest.mark.slow  # a DeepSpeed learner on the tiny model: ~10 s on 2 idle cores
def test_the_learner_trains_each_bucket_with_its_size_conditioning(bucketed_round):
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train

    cfg, _, batch, _, _ = bucketed_round
    lrn = LearnerEngine(cfg)
    seen = []
    condition = lrn.condition

    def spy(prompts, height, width, negative_prompt=None):
        enc, added = condition(prompts, height, width, negative_prompt)
        seen.append((height, width, added["time_ids"][:, :2].tolist(), added["time_ids"][:, 4:].tolist()))
        return enc, added

    lrn.condition = spy
    before = [p.detach().clone() for p in lrn.trainable_parameters()]
    metrics = train(lrn, batch, 1)
    assert lrn.policy_version == 1  # one round, one policy version, however many buckets
    assert metrics["learner/buckets"] == 2 and metrics["learner/items"] == len(batch)
    assert {(h, w) for h, w, _, _ in seen} == {(64, 64), (64, 128)}
    for h, w, original, target in seen:  # SDXL's time ids: original size and target size are the bucket's
        assert all(row == [h, w] for row in original) and all(row == [h, w] for row in target)
    assert np.isfinite(metrics["loss/dpo"])
    assert any(not torch.equal(a, b) for a, b in zip(before, lrn.trainable_parameters()))
