"""Online preference training on Ray: the whole loop, written out.

    rlfh train configs/tiny.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- rlfh train configs/tiny.yaml

Each round:
  1. rollout actors sample ``prompts_per_round x rollouts_per_prompt`` images with the current policy;
  2. the reward actor scores them (every configured reward, plus the regions it detected);
  3. the samples, their rewards and regions go to the rollout log (RUN_DIR/rollouts);
  4. pairs are built per prompt (best vs worst; or weights for RWR), with region masks from the
     detections, and the learner steps on them (per-region losses, MPD fairness);
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
    import dataclasses

    import numpy as np
    import ray
    import torch
    from tqdm import tqdm

    from rewards.actor import RewardActor, RewardScorer
    from rlfh.run.checkpoints import checkpoint_dir, latest_checkpoint, mark_latest
    from rlfh.learner.group import LearnerGroup
    from rlfh.run.metrics import MetricsLogger, rollback_metrics
    from rlfh.data.pairs import learner_batch
    from rlfh.data.prompts import PromptSchedule, load_prompts
    from rlfh.run.samples import write_grid
    from rollouts.actor import RolloutFleet
    from rollouts.log import RolloutLog, make_records
    from rollouts.types import SamplerSettings

    # ---------------------------------------------------------------- setup
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    started_ray = setup_ray(cfg)
    owned: list = []  # actors this run started: killed at the end, whatever happens
    pgs: list = []  # placement groups this run reserved
    logger = bar = learner = None
    try:
        res, rc = cfg.resources, cfg.rollout
        threads = max(int(res.num_cpus_per_actor), 1)
        # an unreachable reward server fails the run here, before anything is sampled or trained
        scorer = RewardScorer(url=cfg.reward_server.remote_url, retries=res.max_actor_restarts) \
            if cfg.reward_server.remote_url else None
        colocate = res.colocate
        if colocate:  # the learner's one rank samples too: no rollout actors, no second UNet
            learner = LearnerGroup(cfg, threads, colocate=True)
            actors = [learner.lead]
        else:
            actors = start_rollout_actors(cfg, threads, pgs)
            owned.extend(actors)
        if scorer is None:
            reward_actor = RewardActor.options(num_cpus=res.num_cpus_per_actor, num_gpus=res.gpus_per_reward_actor,
                                               resources=dict(res.reward_resources),
                                               max_restarts=res.max_actor_restarts).remote(cfg.rewards, threads)
            owned.append(reward_actor)
            scorer = RewardScorer(actor=reward_actor, retries=res.max_actor_restarts)
        if learner is None:
            learner = LearnerGroup(cfg, threads)
        gc = cfg.guards
        heldout_scorer = None
        if gc.every and gc.heldout_rewards:
            heldout_actor = RewardActor.options(num_cpus=res.num_cpus_per_actor, num_gpus=res.gpus_per_reward_actor,
                                                resources=dict(res.reward_resources),
                                                max_restarts=res.max_actor_restarts).remote(gc.heldout_rewards, threads)
            owned.append(heldout_actor)
            heldout_scorer = RewardScorer(actor=heldout_actor, retries=res.max_actor_restarts)
        heldout_prompts = [p for p in gc.heldout_prompts for _ in range(gc.seeds_per_prompt)]
        heldout_seeds = list(range(10**9, 10**9 + len(heldout_prompts)))  # the same seeds at every evaluation
        heldout_first = None
        schedule = PromptSchedule(load_prompts(rc), rc.prompts_per_round, rc.rollouts_per_prompt, cfg.seed)
        settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width, rc.eta,
                                   rc.scheduler)
        record = cfg.learner.loss == "ddpo"  # policy-gradient losses need the trajectories
        hg, real_source = cfg.learner.hgdpo, None
        if hg.real_images:
            from rlfh.data.hgdpo import Curriculum, mix_real_winners, prompts_for_losers
            from rlfh.data.real_images import RealImageSource, load_vae

            curriculum = Curriculum([dataclasses.asdict(s) for s in hg.stages], hg.interpolate)
            real_source = RealImageSource(hg.real_images, rc.height, rc.width, cache_dir=run_dir,
                                          encode_batch_size=hg.encode_batch_size, latent_mode=hg.latent_mode, seed=cfg.seed)
            real_source.encode(load_vae(cfg.model, "cuda" if torch.cuda.is_available() else "cpu"))  # cached across resumes
        log = RolloutLog(run_dir / "rollouts")
        start_round = 0
        ckpt = latest_checkpoint(run_dir) if cfg.resume else None
        if ckpt is not None:
            state = learner.load_checkpoint(str(ckpt))
            start_round = state["round"]
            dropped = log.rollback(start_round) if log.manifest_path.exists() else 0
            rollback_metrics(run_dir, start_round)
            print(f"[rlfh] resuming from {ckpt} (round {start_round}, policy version {state['policy_version']}); "
                  f"{dropped} logged rollouts of later rounds moved to rollouts/rolled_back/")
        else:
            # a fresh start in a used run_dir (killed before its first checkpoint, or resume=false):
            # set the earlier rounds aside, keep them on disk
            if log.manifest_path.exists():
                log.rollback(0)
            rollback_metrics(run_dir, 0)
        version = learner.policy_version()
        lora = cfg.learner.lora.enabled
        bucket_bytes = int(res.sync_bucket_mb * 2**20)

        def sync():
            # refs to buckets in the object store, each read by every rollout actor; nothing to send when colocated
            fleet.sync(None if colocate else learner.weight_buckets(bucket_bytes), version, lora)

        fleet = RolloutFleet(actors, 0 if colocate else res.max_actor_restarts)
        sync()
        logger = MetricsLogger(run_dir, cfg, to_dict(cfg))

        def submit(rnd: int):
            prompts, seeds = schedule.round(rnd)
            return fleet.submit(prompts, seeds, settings, rc.sample_batch_size_per_actor, record)

        jobs = None

        # ---------------------------------------------------------------- loop
        bar = tqdm(range(start_round, cfg.num_rounds), desc="rlfh train", unit="round", disable=not cfg.logging.progress)
        for rnd in bar:
            t0 = time.perf_counter()
            batch = fleet.collect(jobs if jobs is not None else submit(rnd))
            # async: the next round samples with the current weights while this one scores and trains
            jobs = submit(rnd + 1) if rc.max_staleness > 0 and rnd + 1 < cfg.num_rounds else None
            batch.rollout_ids = [uuid.uuid4().hex for _ in range(len(batch))]
            staleness = version - batch.policy_version
            if staleness > rc.max_staleness:
                raise RuntimeError(f"round {rnd}: samples are {staleness} policy versions stale (> {rc.max_staleness})")
            t1 = time.perf_counter()
            scored = scorer.score(batch.images, batch.prompts)
            t2 = time.perf_counter()
            log.append(make_records(batch, scored, rnd, staleness))
            train_batch, batch_stats = learner_batch(
                cfg.learner, batch.latents, batch.prompts, batch.prompts, scored.combined(),
                [scored.regions(i) for i in range(len(batch))], (rc.height, rc.width), batch.trajectory, settings,
            )
            if real_source is not None:  # HG-DPO: real images replace winners on the curriculum
                frac, losers = curriculum.fraction(rnd), None
                caps = prompts_for_losers(real_source, frac, len(train_batch), rnd, cfg.seed) if hg.fresh_losers else []
                if caps:
                    loser_seeds = np.random.default_rng([cfg.seed, rnd, 0x4C]).integers(0, 2**31 - 1, len(caps)).tolist()
                    losers = fleet.collect(fleet.submit(caps, loser_seeds, settings, rc.sample_batch_size_per_actor)).latents
                train_batch, hg_stats = mix_real_winners(train_batch, real_source, frac, rnd, cfg.seed, losers_latents=losers)
                batch_stats.update(hg_stats)
            t3 = time.perf_counter()
            learner_metrics = learner.train(train_batch, cfg.learner.epochs_per_round)
            t4 = time.perf_counter()
            version = learner.policy_version()
            sync()
            t5 = time.perf_counter()
            metrics = {
                "round": rnd,
                "policy_version": version,
                "rollout/samples": len(batch),
                "rollout/sampled_policy_version": batch.policy_version,
                "rollout/staleness": staleness,
                "rollout/actor_restarts": fleet.restarts,
                **scored.means(),
                **batch_stats,
                **learner_metrics,
                "time/sample_s": t1 - t0,
                "time/reward_s": t2 - t1,
                "time/log_s": t3 - t2,
                "time/learner_s": t4 - t3,
                "time/sync_s": t5 - t4,
                "time/round_s": t5 - t0,
            }
            if (rnd + 1) % cfg.logging.checkpoint_every == 0 or rnd + 1 == cfg.num_rounds:
                path = checkpoint_dir(run_dir, rnd + 1)
                learner.save_checkpoint(str(path), {"round": rnd + 1})
                mark_latest(run_dir, path)
                metrics["time/checkpoint_s"] = time.perf_counter() - t5
            stop = None
            if gc.every and (rnd + 1) % gc.every == 0:  # held-out prompts, fixed seeds, current policy
                hb = fleet.collect(fleet.submit(heldout_prompts, heldout_seeds, settings, rc.sample_batch_size_per_actor))
                hs = (heldout_scorer or scorer).score(hb.images, hb.prompts)
                metrics.update({f"heldout/{k.removeprefix('reward/')}": v for k, v in hs.means().items()})
                value = metrics.get("heldout/combined/mean")
                if value is not None:
                    heldout_first = value if heldout_first is None else heldout_first
                    if gc.max_heldout_drop is not None and heldout_first - value > gc.max_heldout_drop:
                        stop = f"held-out reward fell from {heldout_first:.4g} to {value:.4g} (> guards.max_heldout_drop)"
            ref_mse = learner_metrics.get("ref/eps_mse")
            if gc.max_reference_mse is not None and ref_mse is not None and ref_mse > gc.max_reference_mse:
                stop = f"policy-reference eps MSE {ref_mse:.4g} > guards.max_reference_mse={gc.max_reference_mse}"
            if stop is not None and "time/checkpoint_s" not in metrics:
                path = checkpoint_dir(run_dir, rnd + 1)
                learner.save_checkpoint(str(path), {"round": rnd + 1})
                mark_latest(run_dir, path)
            metrics["guards/stopped"] = float(stop is not None)
            if cfg.logging.sample_grid_every and rnd % cfg.logging.sample_grid_every == 0:
                combined = scored.combined()
                grid = write_grid(run_dir / "samples" / f"round-{rnd:06d}.png", batch.images,
                                  ["-" if v is None else f"{v:.3g}" for v in combined])
                logger.log_image("samples", grid, step=rnd)
            logger.log(metrics, step=rnd)
            bar.set_postfix(reward=f"{metrics.get('reward/combined/mean', float('nan')):.4g}",
                            acc=f"{learner_metrics.get('dpo/implicit_acc', float('nan')):.2f}")
            if stop is not None:
                print(f"[rlfh] early stop after round {rnd}: {stop}")
                break
    # ---------------------------------------------------------------- cleanup
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        for a in owned:
            ray.kill(a)
        if learner is not None:
            learner.shutdown()
        for pg in pgs:
            ray.util.remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
    return run_dir
