"""Online preference training on Ray: the whole loop, written out.

    rlfh train configs/tiny.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- rlfh train configs/tiny.yaml

Each round:
  1. rollout actors sample ``prompts_per_round x rollouts_per_prompt`` images with the current policy;
  2. the reward actor scores them (every configured reward, plus the regions it detected);
  3. the samples, their rewards and regions go to the rollout log (RUN_DIR/rollouts);
  4. pairs are built per prompt (best vs worst; or weights for RWR), with region masks from the
     detections (plus, with ``learner.region_pairs``, FaceScore's pairs of a sample and its
     face or hand inpainted by the policy: :class:`InpaintedRegions`; with ``learner.hcp``,
     MediaPipe Pose priors of the images), and the learner steps on them (per-region losses,
     MPD fairness);
  5. the new weights go to the rollout actors (policy_version + 1): the LoRA adapter, or the whole
     UNet in buckets of ``resources.sync_bucket_mb`` (rlfh/learner/weight_sync.py);
  6. metrics go to RUN_DIR/metrics.jsonl and wandb; every ``checkpoint_every`` rounds a checkpoint.

With ``rollout.max_staleness: 1`` the rollouts of round k+1 are sampled while the learner trains on
round k (one policy version stale, recorded per round as ``rollout/staleness``); 0 keeps the loop
on-policy. A rollout or reward actor that dies is restarted and its work re-issued with the same
seeds (rollouts/actor.py, rewards/actor.py); a killed driver resumes from its last checkpoint when
the same command (or ``ray job submit``) runs again.

The learner is ``resources.num_learner_gpus`` data-parallel DeepSpeed ranks (rlfh/learner/group.py).
With ``resources.colocate`` one actor is both learner and rollout actor on one device, sampling with
the learner's own UNet (rlfh/learner/colocate.py).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from rlfh.config.schema import Config, save_config, to_dict
from rlfh.recipes.cluster import setup_ray, start_rollout_actors


def train(cfg: Config) -> Path:
    """Run online training; returns the run directory."""
    from tqdm import tqdm

    from rlfh.data.pairs import learner_batch, learner_scores
    from rlfh.run.samples import write_grid
    from rollouts.log import make_records

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    started_ray = setup_ray(cfg)
    run = Run(cfg, run_dir)
    try:
        run.start()
        rc, lc = cfg.rollout, cfg.learner
        jobs = None
        bar = run.bar = tqdm(range(run.start_round, cfg.num_rounds), desc="rlfh train", unit="round",
                             disable=not cfg.logging.progress)
        for rnd in bar:
            t0 = time.perf_counter()
            # 1. sample (async: the next round samples with the current weights while this one trains)
            batch = run.fleet.collect(jobs if jobs is not None else run.submit(rnd))
            jobs = run.submit(rnd + 1) if rc.max_staleness > 0 and rnd + 1 < cfg.num_rounds else None
            batch.rollout_ids = [uuid.uuid4().hex for _ in range(len(batch))]
            staleness = run.version - batch.policy_version
            if staleness > rc.max_staleness:
                raise RuntimeError(f"round {rnd}: samples are {staleness} policy versions stale (> {rc.max_staleness})")
            t1 = time.perf_counter()
            # 2. score (every reward, and the face / hand regions found)
            scored = run.scorer.score(batch.images, batch.prompts)
            t2 = time.perf_counter()
            # 3. log the samples, rewards and regions
            run.log.append(make_records(batch, scored, rnd, staleness))
            t3 = time.perf_counter()
            # 4. pairs (or weights, or trajectories) with region masks; HG-DPO's real winners; train
            scores, score_stats = learner_scores(scored.values(), scored.weights, batch.prompts, cfg.rewards_normalization)
            train_batch, batch_stats = learner_batch(
                lc, batch.latents, batch.prompts, batch.prompts, scores,
                [scored.regions(i) for i in range(len(batch))], (rc.height, rc.width), batch.trajectory, run.settings,
                batch.conditioning, normalization=cfg.rewards_normalization, priors=run.hcp_priors(batch.images))
            batch_stats.update(score_stats)
            if run.real_winners is not None:
                train_batch, hg_stats = run.real_winners.mix(train_batch, rnd)
                batch_stats.update(hg_stats)
            if run.region_pairs is not None:  # FaceScore's pairs: the policy inpaints a region of its samples
                train_batch, rp_stats = run.region_pairs.add(train_batch, batch, scored, rnd, run.version)
                batch_stats.update(rp_stats)
            t4 = time.perf_counter()
            try:
                learner_metrics = run.learner.train(train_batch, lc.epochs_per_round)
            except Exception as e:
                raise RuntimeError(f"round {rnd}: training failed: {e}") from e
            t5 = time.perf_counter()
            # 5. the new weights to the rollout actors
            run.sync()
            t6 = time.perf_counter()
            # 6. metrics, checkpoint, guards
            metrics = {
                "round": rnd, "policy_version": run.version, "rollout/samples": len(batch),
                "rollout/sampled_policy_version": batch.policy_version, "rollout/staleness": staleness,
                "rollout/actor_restarts": run.fleet.restarts, **scored.means(), **batch_stats, **learner_metrics,
                "time/sample_s": t1 - t0, "time/reward_s": t2 - t1, "time/log_s": t3 - t2, "time/pairs_s": t4 - t3,
                "time/learner_s": t5 - t4, "time/sync_s": t6 - t5, "time/round_s": t6 - t0,
            }
            if (rnd + 1) % cfg.logging.checkpoint_every == 0 or rnd + 1 == cfg.num_rounds:
                run.checkpoint(rnd + 1)
                metrics["time/checkpoint_s"] = time.perf_counter() - t6
            stop = run.guards.check(rnd, metrics)
            if stop is not None and "time/checkpoint_s" not in metrics:
                run.checkpoint(rnd + 1)
            metrics["guards/stopped"] = float(stop is not None)
            if cfg.logging.sample_grid_every and rnd % cfg.logging.sample_grid_every == 0:
                grid = write_grid(run_dir / "samples" / f"round-{rnd:06d}.png", batch.images,
                                  ["-" if v is None else f"{v:.3g}" for v in scored.combined()])
                run.logger.log_image("samples", grid, step=rnd)
            run.logger.log(metrics, step=rnd)
            bar.set_postfix(reward=f"{metrics.get('reward/combined/mean', float('nan')):.4g}",
                            acc=f"{learner_metrics.get('dpo/implicit_acc', float('nan')):.2f}")
            if stop is not None:
                print(f"[rlfh] early stop after round {rnd}: {stop}")
                break
    finally:
        run.close(started_ray)
    return run_dir


class Run:
    """What an online run holds between rounds: the actors and scorers, the learner, the prompt
    schedule, the rollout log, the metrics logger; started by :meth:`start`, released by :meth:`close`."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.owned: list = []  # actors this run started: killed at the end, whatever happens
        self.pgs: list = []  # placement groups this run reserved
        self.logger = self.bar = self.learner = None
        self.real_winners = self.region_pairs = None
        self.pose_priors = None  # learner.hcp: MediaPipe Pose heatmaps (rlfh/data/pose_prior.py)
        self.start_round = 0

    def start(self) -> None:
        from rewards.actor import RewardScorer
        from rlfh.data.prompts import PromptSchedule, load_prompts
        from rlfh.learner.group import LearnerGroup
        from rlfh.eval.guards import Guards
        from rlfh.run.metrics import MetricsLogger
        from rollouts.actor import RolloutFleet
        from rollouts.log import RolloutLog
        from rollouts.types import SamplerSettings

        cfg, res, rc = self.cfg, self.cfg.resources, self.cfg.rollout
        threads = max(int(res.num_cpus_per_actor), 1)
        # an unreachable reward server fails the run here, before anything is sampled or trained
        scorer = RewardScorer(url=cfg.reward_server.remote_url, retries=res.max_actor_restarts) \
            if cfg.reward_server.remote_url else None
        self.colocate = res.colocate
        if self.colocate:  # the learner's one rank samples too: no rollout actors, no second UNet
            self.learner = LearnerGroup(cfg, threads, colocate=True)
            actors = [self.learner.lead]
        else:
            actors = start_rollout_actors(cfg, threads, self.pgs)
            self.owned.extend(actors)
        self.scorer = scorer or RewardScorer(actor=self._reward_actor(cfg.rewards, threads), retries=res.max_actor_restarts)
        if self.learner is None:
            self.learner = LearnerGroup(cfg, threads)
        heldout = None
        if cfg.guards.every and cfg.guards.heldout_rewards:
            heldout = RewardScorer(actor=self._reward_actor(cfg.guards.heldout_rewards, threads),
                                   retries=res.max_actor_restarts)
        self.schedule = PromptSchedule(load_prompts(rc), rc.prompts_per_round, rc.rollouts_per_prompt, cfg.seed)
        self.settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height,
                                        rc.width, rc.eta, rc.scheduler)
        self.record = cfg.learner.loss == "ddpo"  # policy-gradient losses need the trajectories
        self.fleet = RolloutFleet(actors, 0 if self.colocate else res.max_actor_restarts)
        if cfg.learner.hcp.enabled:
            from rlfh.data.pose_prior import PosePriors

            self.pose_priors = PosePriors(cfg.learner.hcp.sigma, cfg.learner.hcp.min_visibility)
        if cfg.learner.hgdpo.real_images:
            from rlfh.recipes.hgdpo import RealWinners

            self.real_winners = RealWinners(cfg, self.run_dir, self.fleet, self.settings, self.pose_priors)
        self.log = RolloutLog(self.run_dir / "rollouts")
        if cfg.learner.region_pairs.region is not None:
            self.region_pairs = InpaintedRegions(cfg, self.fleet, self.scorer, self.log, self.settings)
        self.start_round = self._resume()
        self.version = self.learner.policy_version()
        self.sync()
        self.guards = Guards(cfg, self.fleet, self.settings, self.scorer, heldout)
        self.logger = MetricsLogger(self.run_dir, cfg, to_dict(cfg))

    def _reward_actor(self, entries, threads: int):
        from rewards.actor import RewardActor

        res = self.cfg.resources
        actor = RewardActor.options(num_cpus=res.num_cpus_per_actor, num_gpus=res.gpus_per_reward_actor,
                                    resources=dict(res.reward_resources),
                                    max_restarts=res.max_actor_restarts).remote(entries, threads)
        self.owned.append(actor)
        return actor

    def hcp_priors(self, images):
        """The round's HcP pose priors (N, 1, h, w): detected on the samples (``learner.hcp.prior=samples``),
        or zeros that HG-DPO's real winners fill with theirs (``prior=real``); None without HcP."""
        import numpy as np

        hc = self.cfg.learner.hcp
        if not hc.enabled:
            return None
        if hc.prior == "samples":
            return self.pose_priors(images)
        n, h, w = images.shape[:3]
        return np.zeros((n, 1, h // 8, w // 8), np.float32)

    def _resume(self) -> int:
        """The round to start from: the latest checkpoint's (rolling back the log and metrics of
        later rounds), or 0 (setting aside what a run killed before its first checkpoint left)."""
        from rlfh.run.checkpoints import latest_checkpoint
        from rlfh.run.metrics import rollback_metrics

        ckpt = latest_checkpoint(self.run_dir) if self.cfg.resume else None
        if ckpt is None:
            if self.log.manifest_path.exists():
                self.log.rollback(0)
            rollback_metrics(self.run_dir, 0)
            return 0
        state = self.learner.load_checkpoint(str(ckpt))
        start_round = state["round"]
        dropped = self.log.rollback(start_round) if self.log.manifest_path.exists() else 0
        rollback_metrics(self.run_dir, start_round)
        print(f"[rlfh] resuming from {ckpt} (round {start_round}, policy version {state['policy_version']}); "
              f"{dropped} logged rollouts of later rounds moved to rollouts/rolled_back/")
        return start_round

    def submit(self, rnd: int):
        from rlfh.data.pairs import ddpo_branch_seeds, ddpo_window

        prompts, seeds = self.schedule.round(rnd)
        # DDPO: the round's SDE window (learner.ddpo_window; all steps without one), shared by its samples,
        # and with learner.ddpo_branch each prompt group's shared x_T
        record = ddpo_window(self.cfg, rnd) if self.record else False
        return self.fleet.submit(prompts, seeds, self.settings, self.cfg.rollout.sample_batch_size_per_actor, record,
                                 ddpo_branch_seeds(self.cfg, prompts, seeds))

    def sync(self) -> None:
        """The learner's policy to the rollout actors: object-store refs to weight buckets, each read
        by every actor (rlfh/learner/weight_sync.py); nothing to send when colocated."""
        self.version = self.learner.policy_version()
        buckets = None if self.colocate else self.learner.weight_buckets(int(self.cfg.resources.sync_bucket_mb * 2**20))
        self.fleet.sync(buckets, self.version, self.cfg.learner.lora.enabled)

    def checkpoint(self, rounds_done: int) -> None:
        from rlfh.run.checkpoints import checkpoint_dir, mark_latest

        path = checkpoint_dir(self.run_dir, rounds_done)
        self.learner.save_checkpoint(str(path), {"round": rounds_done})
        mark_latest(self.run_dir, path)

    def close(self, started_ray: bool) -> None:
        import ray

        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
        if self.pose_priors is not None:
            self.pose_priors.close()
        for a in self.owned:
            ray.kill(a)
        if self.learner is not None:
            self.learner.shutdown()
        for pg in self.pgs:
            ray.util.remove_placement_group(pg)
        if started_ray:
            ray.shutdown()


class InpaintedRegions:
    """FaceScore's region pairs online (``learner.region_pairs``, rlfh/data/region_pairs.py): a seeded
    ``fraction`` of the round's samples with the region detected get it inpainted by the current
    policy (``RolloutFleet.refine``, one call per strength), are scored by the same scorer and logged
    (``region_pair`` marks them), and each (sample, inpainted) pair the reward orders joins the round's
    pairs with the region's mask."""

    def __init__(self, cfg: Config, fleet, scorer, log, settings):
        import dataclasses

        rp = cfg.learner.region_pairs
        self.cfg, self.fleet, self.scorer, self.log = cfg, fleet, scorer, log
        self.settings = dataclasses.replace(settings, num_inference_steps=rp.num_inference_steps or settings.num_inference_steps)

    def add(self, train_batch, batch, scored, rnd: int, version: int):
        import numpy as np

        from rlfh.data.pairs import mask_regions
        from rlfh.data.region_pairs import concat_pairs, log_marks, plan_inpainting, region_pair_batch, strength_groups
        from rollouts.log import make_records
        from rollouts.types import RolloutBatch

        cfg, rp, rc = self.cfg, self.cfg.learner.region_pairs, self.cfg.rollout
        rng = np.random.default_rng([cfg.seed, rnd, 0x5250])  # 0x5250 "RP": a stream of its own
        choose = rng.random(len(batch)) < rp.fraction
        seeds = rng.integers(0, 2**31 - 1, len(batch))
        plan = plan_inpainting([scored.regions(i) for i in range(len(batch))], rp, (rc.height, rc.width), choose)
        stats = {"region_pairs/candidates": float(len(plan.indices))}
        if not plan.indices:
            return train_batch, {**stats, "region_pairs/count": 0.0}
        parts, order = [], []
        for strength, ks in strength_groups(plan.strengths).items():
            idx = [plan.indices[k] for k in ks]
            parts.append(self.fleet.refine(batch.latents[idx], [batch.prompts[i] for i in idx],
                                           [int(seeds[i]) for i in idx], self.settings, strength, plan.masks[ks]))
            order.extend(ks)
        inp = RolloutBatch.concat(parts)
        idx = [plan.indices[k] for k in order]
        strengths = [plan.strengths[k] for k in order]
        inp.rollout_ids = [uuid.uuid4().hex for _ in range(len(inp))]
        scored_inp = self.scorer.score(inp.images, inp.prompts)
        marks = log_marks("inpainted", [batch.rollout_ids[i] for i in idx], rp.region, strengths, rp.dilate)
        self.log.append(make_records(inp, scored_inp, rnd, version - inp.policy_version, marks))
        values = scored.values()
        pairs, pair_stats = region_pair_batch(
            batch.latents[idx], inp.latents, inp.prompts, {n: [v[i] for i in idx] for n, v in values.items()},
            scored_inp.values(), scored.weights, plan.masks[order], rp.region, mask_regions(cfg.learner),
            cfg.rewards_normalization, inp.conditioning)
        stats.update(pair_stats)
        stats.update({"region_pairs/mean_strength": float(np.mean(strengths)),
                      "region_pairs/mean_area_ratio": float(np.mean(plan.ratios))})
        return concat_pairs(train_batch, pairs), stats
