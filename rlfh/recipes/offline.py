"""Offline Diffusion-DPO from a rollout log the engine wrote: no rollout actors.

    rlfh offline-dpo configs/offline_dpo.yaml rollouts=runs/tiny/rollouts

One learner rank trains in this process, without Ray. With ``resources.num_learner_gpus`` (or
``num_learner_ranks``) > 1 the data-parallel ranks run as Ray actors (rlfh/learner/group.py), on the
cluster ``ray job submit`` names or a local one.

Pairs (or RWR / filtered sample weights) are rebuilt from the logged rewards with the weights of the
config's ``rewards`` section (matched by name; a reward the log does not hold is an error), combined
as online (``rewards_normalization``, :func:`rlfh.data.pairs.learner_scores`: a missing, NaN or inf
value leaves the sample unscored) and grouped by (round, prompt), so the logged samples of one prompt in one round
compete as
they did online. Each round is one ``learner.train(batch, learner.epochs_per_round)`` call: that many
passes over all pairs (or kept samples).

HG-DPO (``data.hgdpo.real_images``) mixes real and SDRecon winners into each round's pairs on its
curriculum by round, as online (rlfh/data/sources/hgdpo.py). With no rollout actors, the learner rank
samples the SDRecon winners (and ``fresh_losers``) itself, with its own UNet, at the log's sampler
settings (colocated mode, rlfh/learner/colocate.py); with ``fresh_losers: false`` each real winner
takes the logged loser of the pair whose prompt is closest to its caption.

The loop is rlfh/recipes/rounds.py's, shared with ``rlfh train``: this file is where an offline
round's batch comes from (:class:`LogFeed`, the same batch every round).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlfh.config.schema import Config
from rlfh.losses.registry import PAIRS, loss_spec
from rlfh.recipes.rounds import Feed, train_rounds

# what an offline batch reads of each record (its image only when a data source needs it)
LOG_COLUMNS = [
    "rollout_id",
    "round",
    "prompt",
    "rewards",
    "regions",
    "latent",
    "latent_shape",
    "sampler",
    "region_pair",
]


def batch_from_log(cfg: Config, sources: list = ()):
    """Rebuild the learner's batch (pairs, or weighted samples) from a rollout log with this config;
    ``sources`` (rlfh/data/sources/) annotate the logged samples first (HcP's pose priors)."""
    from rewards.composite import nonfinite_counts
    from rlfh.data.pairs import learner_batch, logged_regions, logged_scores
    from rlfh.data.region_pairs import with_region_pairs
    from rollouts.log import RolloutLog, decode_latent

    require_log(cfg)
    images = any(s.needs_images for s in sources)
    records = RolloutLog(cfg.rollouts).records(LOG_COLUMNS + (["image"] if images else []))
    # the reward weights, checked against the whole log (it names a reward the log lacks)
    _, _, weights, _, _ = logged_scores(records, cfg.rewards, cfg.rewards_normalization, cfg.rollouts)
    image_hw = one_image_size(records)
    regions = logged_regions(records)
    all_latents = np.stack([decode_latent(r) for r in records])
    region_pairs, rp_stats = region_pairs_of_log(cfg, records, all_latents, regions, weights, image_hw)
    plain = [i for i, r in enumerate(records) if r.get("region_pair") is None]
    skipped = len(records) - len(plain) if region_pairs is None else 0
    records, regions, latents = [records[i] for i in plain], [regions[i] for i in plain], all_latents[plain]
    samples, values, weights, score_stats = scored_samples(cfg, records, regions, latents, image_hw, images)
    for source in sources:
        source.annotate(samples)
    batch, stats = learner_batch(cfg.learner, samples, cfg.rewards_normalization)
    batch = with_region_pairs(cfg, batch, region_pairs)
    stats.update(rp_stats)
    if skipped:
        stats["region_pairs/records_left_out"] = float(skipped)  # not a DPO loss: they make no pairs
    stats.update(nonfinite_counts(values))
    stats.update(score_stats)
    check_enough(cfg, batch, stats, values, weights, len(records))
    return batch, {**stats, "offline/records": float(len(all_latents))}


def one_image_size(records: list[dict]) -> tuple[int, int]:
    """The (height, width) all logged samples share; a log that mixes sizes is an error."""
    sizes = {(r["sampler"]["height"], r["sampler"]["width"]) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"the rollout log mixes image sizes {sorted(sizes)}; train on one size at a time")
    return sizes.pop()


def region_pairs_of_log(cfg: Config, records: list[dict], latents, regions, weights, image_hw):
    """The logged inpainted region pairs and their stats, for a loss that trains on pairs; ``(None, {})``
    otherwise. Their images pair only with each other (rlfh/data/region_pairs.py), never by prompt."""
    from rlfh.data.pairs import mask_regions
    from rlfh.data.region_pairs import pairs_from_records

    if loss_spec(cfg.learner.loss).batch != PAIRS:
        return None, {}
    return pairs_from_records(
        records,
        latents,
        regions,
        weights,
        mask_regions(cfg.learner),
        image_hw,
        cfg.rewards_normalization,
        cfg.data.region_pairs.winner,
    )


def scored_samples(cfg: Config, records: list[dict], regions, latents, image_hw, images: bool):
    """The logged samples with their combined scores, grouped by (round, prompt): ``(samples, values by
    reward, reward weights, score stats)``. ``rewards_normalization`` runs as online; GDPO's last
    normalization then runs over the whole log."""
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import logged_scores
    from rollouts.log import decode_png

    scores, values, weights, groups, score_stats = logged_scores(
        records, cfg.rewards, cfg.rewards_normalization, cfg.rollouts
    )
    samples = ScoredSamples(
        latents,
        [r["prompt"] for r in records],
        groups,
        scores,
        regions,
        image_hw,
        images=np.stack([decode_png(r["image"]) for r in records]) if images else None,
        ids=[r["rollout_id"] for r in records],
    )
    return samples, values, weights, score_stats


def require_log(cfg: Config) -> None:
    if cfg.rollouts is None:
        raise ValueError("offline-dpo needs the rollout log: pass rollouts=RUN_DIR/rollouts")


def check_enough(cfg: Config, batch, stats: dict, values: dict, weights: dict, n_records: int) -> None:
    """A log that yields fewer training items than one optimizer step needs is an error saying why."""
    from rewards.composite import nonfinite_counts

    if len(batch) < cfg.learner.train_batch_size:
        missing = {n: sum(v is None for v in vs) for n, vs in values.items() if weights[n] != 0}
        nonfinite = {n.split("/")[1]: int(c) for n, c in nonfinite_counts(values).items() if c}
        raise ValueError(
            f"the rollout log {cfg.rollouts} yields {len(batch)} training items (pairs or kept samples), fewer than "
            f"learner.train_batch_size={cfg.learner.train_batch_size}: {int(stats['samples/unscored'])} of "
            f"{n_records} records have no combined score (missing values by reward: {missing}; NaN/inf "
            f"values by reward, counted as missing: {nonfinite})"
        )


def logged_settings(cfg: Config):
    """The sampler settings of the log's samples (``rollout.scheduler`` is not logged: the config's), which
    HG-DPO's SDRecon winners and fresh losers are sampled with offline."""
    from rollouts.log import RolloutLog
    from rollouts.types import SamplerSettings

    records = RolloutLog(cfg.rollouts).records(["sampler", "negative_prompt"])
    found = {(tuple(sorted(r["sampler"].items())), r["negative_prompt"]) for r in records}
    if len(found) != 1:
        raise ValueError(
            f"data.hgdpo samples with the log's sampler settings, but the rollout log {cfg.rollouts} "
            f"mixes {len(found)} of them: train on one run's log at a time"
        )
    ((sampler, negative_prompt),) = found
    s = dict(sampler)
    return SamplerSettings(
        int(s["num_inference_steps"]),
        float(s["guidance_scale"]),
        negative_prompt or "",
        int(s["height"]),
        int(s["width"]),
        float(s["eta"] or 0.0),
        cfg.rollout.scheduler,
    )


def train_offline(cfg: Config) -> Path:
    """Train on the pairs of ``cfg.rollouts`` for ``cfg.num_rounds`` rounds; returns the run directory."""
    from rlfh.data.sources import build_sources, close_sources
    from rlfh.run.skeleton import RunSkeleton

    require_log(cfg)
    skel = RunSkeleton(cfg)
    try:
        feed = LogFeed(cfg, skel.path)
        sources = build_sources(cfg, feed.ctx)
        skel.on_close(lambda: close_sources(sources))
        feed.fixed = batch_from_log(cfg, sources)  # a log that cannot train fails before the model loads
        feed.start(skel)
        train_rounds(cfg, skel, feed, sources, "rlfh offline-dpo")
    finally:
        skel.close()
    return skel.path


class LogFeed(Feed):
    """An offline round's batch: the pairs (or weighted samples) of the rollout log, the same every
    round (the data sources vary them by round). The learner is one rank in this process, or
    ``resources.num_learner_gpus`` ranks on Ray. A source that samples with the current policy
    (HG-DPO's SDRecon winners and fresh losers) gets this feed as its sampler, which hands the calls to
    the learner's rank 0 sampling with its own UNet (colocated mode)."""

    def __init__(self, cfg: Config, run_dir):
        from rlfh.data.sources import SOURCES, SourceContext

        self.cfg, self.fixed, self.policy = cfg, None, None  # fixed: (batch, stats) of the log
        wanted = [c for c in SOURCES.values() if c.wanted(cfg, SourceContext(run_dir))]
        why = [w for w in (c.samples_with_policy(cfg) for c in wanted) if w]
        self.colocate = bool(why)
        if self.colocate and cfg.learner_world_size > 1 and cfg.learner.engine.zero_stage == 3:
            raise ValueError(
                f"{'; '.join(why)}: offline that is learner rank 0's UNet, which learner.engine.zero_stage=3 "
                f"partitions over the ranks: use learner.engine.zero_stage <= 2 or one learner rank"
            )
        settings = logged_settings(cfg) if any(c.needs_settings for c in wanted) else None
        self.ctx = SourceContext(run_dir, self if self.colocate else None, settings)

    def start(self, skel) -> None:
        """The learner: one rank in this process, or data-parallel ranks on Ray."""
        from rlfh.learner.actor import LearnerRank
        from rlfh.learner.group import LearnerGroup
        from rlfh.recipes.cluster import setup_ray

        cfg = self.cfg
        if cfg.learner_world_size > 1:
            if setup_ray(cfg):
                import ray

                skel.on_close(ray.shutdown)
            self.learner = LearnerGroup(cfg, max(int(cfg.resources.num_cpus_per_actor), 1), colocate=self.colocate)
            skel.on_close(self.learner.shutdown)
        else:
            self.learner = LearnerRank(num_threads=None)
            self.learner.setup(cfg, colocate=self.colocate)
        self.restart_policy()

    def restart_policy(self) -> None:
        from rlfh.learner.group import LearnerGroup
        from rollouts.actor import RolloutFleet

        if self.colocate:
            group = isinstance(self.learner, LearnerGroup)
            self.policy = RolloutFleet([self.learner.lead], 0) if group else self.learner

    def sample(self, *args, **kwargs):
        """``RolloutFleet.sample`` with the learner's current policy."""
        return self.policy.sample(*args, **kwargs)

    def refine(self, *args, **kwargs):
        """``RolloutFleet.refine`` with the learner's current policy."""
        return self.policy.refine(*args, **kwargs)

    def batch(self, rnd: int, sources: list):
        from rlfh.data.sources import RoundData

        batch, stats = self.fixed
        return batch, dict(stats), RoundData(rnd, self.learner.policy_version())

    def restart_learner(self) -> None:
        self.learner.restart()
        self.restart_policy()
