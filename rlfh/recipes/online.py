"""Online preference training on Ray: the whole loop, written out.

    rlfh train configs/tiny.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- rlfh train configs/tiny.yaml

Each round:
  1. rollout actors sample ``prompts_per_round x rollouts_per_prompt`` images with the current policy;
  2. the reward actor scores them (every configured reward, plus the regions it detected);
  3. the samples, their rewards and regions go to the rollout log (RUN_DIR/rollouts);
  4. pairs are built per prompt (best vs worst; or weights for RWR), with region masks from the
     detections, the data sources add theirs (rlfh/data/sources/: HcP's pose priors of the images,
     HG-DPO's real winners, FaceScore's pairs of a sample and its face or hand inpainted by the
     policy), and the learner steps on them (per-region losses, MPD fairness);
  5. the new weights go to the rollout actors (policy_version + 1): the LoRA adapter, or the whole
     UNet in buckets of ``resources.sync_bucket_mb`` (rlfh/learner/weight_sync.py);
  6. metrics go to RUN_DIR/metrics.jsonl and wandb; every ``checkpoint_every`` rounds a checkpoint.

With ``rollout.max_staleness: 1`` the rollouts of round k+1 are sampled while the learner trains on
round k (one policy version stale, recorded per round as ``rollout/staleness``); 0 keeps the loop
on-policy. A rollout or reward actor that dies is restarted and its work re-issued with the same
seeds (rollouts/actor.py, rewards/actor.py); a learner rank that dies is restarted and the rounds
since the last checkpoint replayed (rlfh/recipes/rounds.py); a killed driver resumes from its last
checkpoint when the same command (or ``ray job submit``) runs again.

The loop itself is rlfh/recipes/rounds.py's, shared with ``rlfh offline-dpo``: this file is where an
online round's batch comes from (:class:`OnlineFeed`).

The learner is ``resources.num_learner_gpus`` data-parallel DeepSpeed ranks (rlfh/learner/group.py).
With ``resources.colocate`` one actor is both learner and rollout actor on one device, sampling with
the learner's own UNet (rlfh/learner/colocate.py).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from rlfh.config.schema import Config
from rlfh.losses.registry import SAMPLER_LOGPROB, loss_spec
from rlfh.recipes.capacity import check_cluster_fits
from rlfh.recipes.cluster import release_actors, setup_ray, start_rollout_actors
from rlfh.recipes.rounds import Feed, train_rounds


def train(cfg: Config) -> Path:
    """Run online training; returns the run directory."""
    from rlfh.config.schema import ConfigError
    from rlfh.data.sources import bucket_problems, build_sources, close_sources
    from rlfh.run.skeleton import RunSkeleton

    hc = cfg.model.hcp
    if hc.enabled and hc.mode == "residual" and not cfg.resources.colocate:
        raise ConfigError(
            [
                "model.hcp.mode=residual changes the UNet's output, and the rollout actors load only the LoRA: "
                "use resources.colocate (the learner's UNet samples), model.hcp.mode=observe, or offline training"
            ]
        )
    if bucket_problems(cfg):  # before anything starts
        raise ConfigError(bucket_problems(cfg))
    skel = RunSkeleton(cfg)
    started_ray = setup_ray(cfg)
    feed = OnlineFeed(cfg, skel)
    skel.on_close(lambda: feed.close(started_ray))
    try:
        check_cluster_fits(cfg)  # refuse what Ray could never place, before any actor waits for it
        feed.start()
        sources = build_sources(cfg, feed.ctx)
        skel.on_close(lambda: close_sources(sources))  # with buckets: per-bucket ones only (bucket_problems)
        train_rounds(cfg, skel, feed, sources, "rlfh train")
    finally:
        skel.close()
    return skel.path


class OnlineFeed(Feed):
    """An online round's batch: the policy's samples (rollout actors, or the colocated learner rank),
    scored by the reward actor (or server), logged, and built into pairs, weighted samples or
    trajectories. Holds the actors and scorers, the learner, the prompt schedule and the rollout log
    between rounds; started by :meth:`start`, released by :meth:`close`."""

    def __init__(self, cfg: Config, skel):
        self.cfg, self.skel, self.run_dir = cfg, skel, skel.path
        self.owned: list = []  # actors this run started: killed at the end, whatever happens
        self.pgs: list = []  # placement groups this run reserved
        self.learner = None
        self.jobs = None  # the next round's sampling, started while this one trains (rollout.max_staleness)

    def start(self) -> None:
        from rewards.actor import RewardScorer
        from rlfh.data.prompts import PromptSchedule, load_prompts
        from rlfh.data.sources import SourceContext
        from rlfh.eval.guards import Guards
        from rlfh.learner.group import LearnerGroup
        from rollouts.actor import RolloutFleet
        from rollouts.log import RolloutLog
        from rollouts.types import SamplerSettings

        cfg, res, rc = self.cfg, self.cfg.resources, self.cfg.rollout
        self.threads = max(int(res.num_cpus_per_actor), 1)
        # an unreachable reward server fails the run here, before anything is sampled or trained
        scorer = (
            RewardScorer(url=cfg.reward_server.remote_url, retries=res.max_actor_restarts)
            if cfg.reward_server.remote_url
            else None
        )
        if res.colocate:  # the learner's one rank samples too: no rollout actors, no second UNet
            self.learner = LearnerGroup(cfg, self.threads, colocate=True)
            actors = [self.learner.lead]
        else:
            actors = start_rollout_actors(cfg, self.threads, self.pgs)
            self.owned.extend(actors)
        self.scorer = scorer or RewardScorer(actor=self.reward_actor(cfg.rewards), retries=res.max_actor_restarts)
        if self.learner is None:
            self.learner = LearnerGroup(cfg, self.threads)
        heldout = None
        if cfg.guards.every and cfg.guards.heldout_rewards:
            heldout = RewardScorer(actor=self.reward_actor(cfg.guards.heldout_rewards), retries=res.max_actor_restarts)
        self.schedule = PromptSchedule(load_prompts(rc), rc.prompts_per_round, rc.rollouts_per_prompt, cfg.seed)
        self.settings = SamplerSettings(
            rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width, rc.eta, rc.scheduler
        )
        self.record = SAMPLER_LOGPROB in loss_spec(cfg.learner.loss).needs  # policy gradients train on them
        self.fleet = RolloutFleet(actors, 0 if res.colocate else res.max_actor_restarts)
        self.log = RolloutLog(self.run_dir / "rollouts", cfg.logging.log_images, cfg.logging.keep_image_rounds)
        self.ctx = SourceContext(self.run_dir, self.fleet, self.settings, self.scorer, self.log)
        self.guards = Guards(cfg, self.fleet, self.settings, self.scorer, heldout)

    def reward_actor(self, entries):
        from rewards.actor import RewardActor

        res = self.cfg.resources
        actor = RewardActor.options(
            num_cpus=res.num_cpus_per_actor,
            num_gpus=res.gpus_per_reward_actor,
            resources=dict(res.reward_resources),
            max_restarts=res.max_actor_restarts,
        ).remote(entries, self.threads)
        self.owned.append(actor)
        return actor

    def begin(self, start: int) -> None:
        self.jobs = None  # sampling started for a round that is now replayed comes from stale weights
        self.sync()

    def restart_learner(self) -> None:
        self.learner.restart()
        if self.cfg.resources.colocate:  # the learner's rank was the run's sampler
            self.fleet.actors[:] = [self.learner.lead]

    def submit(self, rnd: int):
        """Start round ``rnd``'s sampling, one share per bucket (``rollout.resolutions``; one bucket without),
        each at its size; returns [(bucket, jobs)] for :meth:`batch`."""
        from dataclasses import replace

        from rlfh.data.buckets import assign_buckets
        from rlfh.data.pairs import ddpo_branch_seeds, ddpo_window

        rc = self.cfg.rollout
        prompts, seeds = self.schedule.round(rnd)
        # DDPO: the round's SDE window (learner.ddpo.window; all steps without one), shared by its samples,
        # and with learner.ddpo.branch each prompt group's shared x_T
        record = ddpo_window(self.cfg, rnd) if self.record else False
        branch = ddpo_branch_seeds(self.cfg, prompts, seeds)
        jobs = []
        for b in assign_buckets(prompts, seeds, rc.resolutions, (rc.height, rc.width)):
            pick = [prompts[i] for i in b.index], [seeds[i] for i in b.index]
            settings = replace(self.settings, height=b.height, width=b.width)
            sub = None if branch is None else [branch[i] for i in b.index]
            jobs.append((b, self.fleet.submit(*pick, settings, rc.sample_batch_size_per_actor, record, sub)))
        return jobs

    def batch(self, rnd: int, sources: list):
        """Sample (the next round starts sampling with the current weights while this one trains, with
        ``rollout.max_staleness: 1``), score, log, build the batch; bucket by bucket (rlfh/data/buckets.py)."""
        from rlfh.data.buckets import concat_scored
        from rlfh.data.sources import RoundData
        from rollouts.log import make_records

        cfg, rc = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        parts = [
            (b, self.fleet.collect(jobs)) for b, jobs in (self.jobs if self.jobs is not None else self.submit(rnd))
        ]
        self.jobs = self.submit(rnd + 1) if rc.max_staleness > 0 and rnd + 1 < cfg.num_rounds else None
        for _, part in parts:
            part.rollout_ids = [uuid.uuid4().hex for _ in range(len(part))]
        policy_version = min(part.policy_version for _, part in parts)
        staleness = self.version - policy_version
        if staleness > rc.max_staleness:
            raise RuntimeError(f"round {rnd}: samples are {staleness} policy versions stale (> {rc.max_staleness})")
        t1 = time.perf_counter()
        # every reward, and the face / hand regions
        scored_parts = [self.scorer.score(part.images, part.prompts) for _, part in parts]
        t2 = time.perf_counter()
        for (_, part), scored in zip(parts, scored_parts):
            self.log.append(make_records(part, scored, rnd, staleness))
        t3 = time.perf_counter()
        scored = concat_scored(scored_parts)
        train_batch, stats = self.build(parts, scored_parts, scored, sources)
        metrics = {
            "rollout/samples": sum(len(part) for _, part in parts),
            "rollout/sampled_policy_version": policy_version,
            "rollout/staleness": staleness,
            "rollout/actor_restarts": self.fleet.restarts,
            **scored.means(),
            **stats,
            "time/sample_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "time/log_s": t3 - t2,
            "time/pairs_s": time.perf_counter() - t3,
        }
        samples = parts[0][1] if len(parts) == 1 else [part for _, part in parts]
        return train_batch, metrics, RoundData(rnd, self.version, samples, scored)

    def build(self, parts: list, scored_parts: list, scored, sources: list):
        """Pairs (or weights, or trajectories) with region masks, and the sources' per-sample fields, per
        bucket; the learner's scores normalized over the whole round (``scored``: every bucket's)."""
        from rlfh.data.batches import ScoredSamples
        from rlfh.data.buckets import merge_stats, round_batch
        from rlfh.data.pairs import learner_batch, learner_scores

        cfg = self.cfg
        prompts = [p for _, part in parts for p in part.prompts]
        scores, score_stats = learner_scores(scored.values(), scored.weights, prompts, cfg.rewards_normalization)
        built, start = [], 0
        for (bucket, part), part_scored in zip(parts, scored_parts):
            samples = ScoredSamples(
                part.latents,
                part.prompts,
                part.prompts,
                scores[start : start + len(part)],
                [part_scored.regions(i) for i in range(len(part))],
                (bucket.height, bucket.width),
                part.trajectory,
                part.settings,
                part.conditioning,
                images=part.images,
                values=part_scored.values(),
            )
            start += len(part)
            for source in sources:
                source.annotate(samples)
            built.append((len(part), learner_batch(cfg.learner, samples, cfg.rewards_normalization)))
        stats = merge_stats([(n, st) for n, (_, st) in built])
        return round_batch([b for _, (b, _) in built]), {**stats, **score_stats}

    def after_train(self, rnd: int) -> dict:
        t0 = time.perf_counter()
        self.sync()
        return {"time/sync_s": time.perf_counter() - t0}

    def finish(self, rnd: int, metrics: dict, data) -> str | None:
        """Guards (held-out reward, reference drift, collapse) and the sample grid."""
        from rlfh.run.samples import write_grid

        stop = self.guards.check(rnd, metrics, data.scored)
        metrics["guards/stopped"] = float(stop is not None)
        every = self.cfg.logging.sample_grid_every
        if every and rnd % every == 0:
            grid = write_grid(
                self.run_dir / "samples" / f"round-{rnd:06d}.png",
                [
                    im
                    for part in (data.samples if isinstance(data.samples, list) else [data.samples])
                    for im in part.images
                ],
                ["-" if v is None else f"{v:.3g}" for v in data.scored.combined()],
            )
            self.skel.logger.log_image("samples", grid, step=rnd)
        return stop

    def sync(self) -> None:
        """The learner's policy to the rollout actors: object-store refs to weight buckets, each read
        by every actor (rlfh/learner/weight_sync.py); nothing to send when colocated."""
        self.version = self.learner.policy_version()
        buckets = (
            None
            if self.cfg.resources.colocate
            else self.learner.weight_buckets(int(self.cfg.resources.sync_bucket_mb * 2**20))
        )
        self.fleet.sync(buckets, self.version, self.cfg.model.lora.enabled)

    def close(self, started_ray: bool) -> None:
        import ray

        release_actors(self.owned)  # the reward actors close their detectors first
        if self.learner is not None:
            self.learner.shutdown()
        for pg in self.pgs:
            ray.util.remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
