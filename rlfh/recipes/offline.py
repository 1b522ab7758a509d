"""Offline Diffusion-DPO from a rollout log the engine wrote: no rollout actors.

    rlfh offline-dpo configs/offline_dpo.yaml rollouts=runs/tiny/rollouts

One learner rank trains in this process, without Ray. With ``resources.num_learner_gpus`` (or
``num_learner_ranks``) > 1 the data-parallel ranks run as Ray actors (rlfh/learner/group.py), on the
cluster ``ray job submit`` names or a local one.

Pairs (or RWR / filtered sample weights) are rebuilt from the logged rewards with the weights of the
config's ``rewards`` section (matched by name; a reward the log does not hold is an error), combined
as online (``rewards_normalization``, :func:`rlfh.data.pairs.learner_scores`: a missing, NaN or inf
value leaves the sample unscored) and grouped by (round, prompt), so the logged samples of one prompt in one round compete as
they did online. Each round is one ``learner.train(batch, learner.epochs_per_round)`` call: that many
passes over all pairs (or kept samples).

HG-DPO (``data.hgdpo.real_images``) mixes real and SDRecon winners into each round's pairs on its
curriculum by round, as online (rlfh/recipes/hgdpo.py). With no rollout actors, the learner rank
samples the SDRecon winners (and ``fresh_losers``) itself, with its own UNet, at the log's sampler
settings (colocated mode, rlfh/learner/colocate.py); with ``fresh_losers: false`` each real winner
takes the logged loser of the pair whose prompt is closest to its caption.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rlfh.config.schema import Config, save_config, to_dict
from rlfh.losses.registry import PAIRS, loss_spec


def batch_from_log(cfg: Config):
    """Rebuild the learner's batch (pairs, or weighted samples) from a rollout log with this config."""
    from rewards.composite import nonfinite_counts
    from rlfh.data.pairs import learner_batch, logged_regions, logged_scores, mask_regions
    from rollouts.log import RolloutLog, decode_latent

    if cfg.rollouts is None:
        raise ValueError("offline-dpo needs the rollout log: pass rollouts=RUN_DIR/rollouts")
    from rlfh.data.region_pairs import concat_pairs, pairs_from_records

    hcp = cfg.model.hcp.enabled and cfg.data.hcp_priors.prior == "samples"
    records = RolloutLog(cfg.rollouts).records(["rollout_id", "round", "prompt", "rewards", "regions", "latent",
                                                "latent_shape", "sampler", "region_pair"] + (["image"] if hcp else []))
    # the reward weights, checked against the whole log (it names a reward the log lacks)
    _, _, weights, _, _ = logged_scores(records, cfg.rewards, cfg.rewards_normalization, cfg.rollouts)
    sizes = {(r["sampler"]["height"], r["sampler"]["width"]) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"the rollout log mixes image sizes {sorted(sizes)}; train on one size at a time")
    image_hw = sizes.pop()
    regions = logged_regions(records)
    all_latents = np.stack([decode_latent(r) for r in records])
    # images of inpainted region pairs pair only with each other (rlfh/data/region_pairs.py), never by prompt
    region_pairs, rp_stats = (pairs_from_records(records, all_latents, regions, weights, mask_regions(cfg.learner), image_hw,
                                                 cfg.rewards_normalization)
                              if loss_spec(cfg.learner.loss).batch == PAIRS else (None, {}))
    plain = [i for i, r in enumerate(records) if r.get("region_pair") is None]
    skipped = len(records) - len(plain) if region_pairs is None else 0
    records, regions, latents = [records[i] for i in plain], [regions[i] for i in plain], all_latents[plain]
    priors = None
    if hcp:  # HcP: pose priors detected on the logged images
        from rlfh.data.pose_prior import PosePriors
        from rollouts.log import decode_png

        detect = PosePriors(cfg.data.hcp_priors.sigma, cfg.data.hcp_priors.min_visibility)
        try:
            priors = detect(np.stack([decode_png(r["image"]) for r in records]))
        finally:
            detect.close()
    elif cfg.model.hcp.enabled:  # prior=real: zeros that HG-DPO's real winners fill with theirs, as online
        priors = np.zeros((len(records), 1, image_hw[0] // 8, image_hw[1] // 8), np.float32)
    # rewards_normalization as online; GDPO's last normalization then runs over the whole log
    scores, values, weights, groups, score_stats = logged_scores(records, cfg.rewards, cfg.rewards_normalization,
                                                                 cfg.rollouts)
    batch, stats = learner_batch(cfg.learner, latents, [r["prompt"] for r in records], groups, scores, regions,
                                 image_hw, normalization=cfg.rewards_normalization, priors=priors)
    if region_pairs is not None:
        batch = concat_pairs(batch, region_pairs)
    stats.update(rp_stats)
    if skipped:
        stats["region_pairs/records_left_out"] = float(skipped)  # not a DPO loss: they make no pairs
    stats.update(nonfinite_counts(values))
    stats.update(score_stats)
    if len(batch) < cfg.learner.train_batch_size:
        missing = {n: sum(v is None for v in vs) for n, vs in values.items() if weights[n] != 0}
        nonfinite = {n.split("/")[1]: int(c) for n, c in nonfinite_counts(values).items() if c}
        raise ValueError(
            f"the rollout log {cfg.rollouts} yields {len(batch)} training items (pairs or kept samples), fewer than "
            f"learner.train_batch_size={cfg.learner.train_batch_size}: {int(stats['samples/unscored'])} of "
            f"{len(records)} records have no combined score (missing values by reward: {missing}; NaN/inf "
            f"values by reward, counted as missing: {nonfinite})"
        )
    return batch, {**stats, "offline/records": float(len(all_latents))}


def logged_settings(cfg: Config):
    """The sampler settings of the log's samples (``rollout.scheduler`` is not logged: the config's), which
    HG-DPO's SDRecon winners and fresh losers are sampled with offline."""
    from rollouts.log import RolloutLog
    from rollouts.types import SamplerSettings

    records = RolloutLog(cfg.rollouts).records(["sampler", "negative_prompt"])
    found = {(tuple(sorted(r["sampler"].items())), r["negative_prompt"]) for r in records}
    if len(found) != 1:
        raise ValueError(f"data.hgdpo samples with the log's sampler settings, but the rollout log {cfg.rollouts} "
                         f"mixes {len(found)} of them: train on one run's log at a time")
    (sampler, negative_prompt), = found
    s = dict(sampler)
    return SamplerSettings(int(s["num_inference_steps"]), float(s["guidance_scale"]), negative_prompt or "",
                           int(s["height"]), int(s["width"]), float(s["eta"] or 0.0), cfg.rollout.scheduler)


def train_offline(cfg: Config) -> Path:
    """Train on the pairs of ``cfg.rollouts`` for ``cfg.num_rounds`` rounds; returns the run directory."""
    from tqdm import tqdm

    from rlfh.run.checkpoints import checkpoint_dir, latest_checkpoint, mark_latest
    from rlfh.learner.actor import LearnerRank
    from rlfh.learner.group import LearnerGroup
    from rlfh.run.metrics import MetricsLogger, rollback_metrics
    from rlfh.recipes.cluster import setup_ray
    from rlfh.recipes.hgdpo import RealWinners, needs_policy_samples
    from rollouts.actor import RolloutFleet

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    batch, stats = batch_from_log(cfg)
    hg = cfg.data.hgdpo
    # HG-DPO's SDRecon winners and fresh losers need the current policy: the learner samples with its own UNet
    sample = needs_policy_samples(hg)
    if sample and cfg.learner_world_size > 1 and cfg.learner.engine.zero_stage == 3:
        raise ValueError("data.hgdpo offline samples its fresh losers and SDRecon winners with learner rank 0's "
                         "UNet, which learner.engine.zero_stage=3 partitions over the ranks: use "
                         "learner.engine.zero_stage <= 2, "
                         "one learner rank, or data.hgdpo.fresh_losers=false without sdrecon_winner_fraction")
    settings = logged_settings(cfg) if hg.real_images is not None else None
    started_ray = False
    real_winners = pose_priors = None
    if cfg.learner_world_size > 1:
        started_ray = setup_ray(cfg)
        learner = LearnerGroup(cfg, max(int(cfg.resources.num_cpus_per_actor), 1), colocate=sample)
        sampler = RolloutFleet([learner.lead], 0) if sample else None
    else:
        learner = LearnerRank(num_threads=None)
        learner.setup(cfg, colocate=sample)
        sampler = learner if sample else None
    logger = None
    try:
        if hg.real_images is not None:
            if cfg.model.hcp.enabled:  # the real winners' pose priors, and the fresh losers'
                from rlfh.data.pose_prior import PosePriors

                pose_priors = PosePriors(cfg.data.hcp_priors.sigma, cfg.data.hcp_priors.min_visibility)
            real_winners = RealWinners(cfg, run_dir, sampler, settings, pose_priors)
        start = 0
        ckpt = latest_checkpoint(run_dir) if cfg.resume else None
        if ckpt is not None:
            start = learner.load_checkpoint(str(ckpt))["round"]
            rollback_metrics(run_dir, start)
        logger = MetricsLogger(run_dir, cfg, to_dict(cfg))
        for rnd in tqdm(range(start, cfg.num_rounds), desc="rlfh offline-dpo", unit="round", disable=not cfg.logging.progress):
            t0 = time.perf_counter()
            train_batch, hg_stats = real_winners.mix(batch, rnd) if real_winners is not None else (batch, {})
            t1 = time.perf_counter()
            metrics = learner.train(train_batch, cfg.learner.epochs_per_round)
            metrics.update({"round": rnd, "policy_version": learner.policy_version(), **stats, **hg_stats,
                            "time/learner_s": time.perf_counter() - t1})
            if real_winners is not None:
                metrics["time/hgdpo_s"] = t1 - t0
            if (rnd + 1) % cfg.logging.checkpoint_every == 0 or rnd + 1 == cfg.num_rounds:
                path = checkpoint_dir(run_dir, rnd + 1)
                learner.save_checkpoint(str(path), {"round": rnd + 1})
                mark_latest(run_dir, path)
            logger.log(metrics, step=rnd)
    finally:
        if logger is not None:
            logger.close()
        if pose_priors is not None:
            pose_priors.close()
        learner.shutdown()
        if started_ray:
            import ray

            ray.shutdown()
    return run_dir
