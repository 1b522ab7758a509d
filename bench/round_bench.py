"""Where an online round's time goes, and what Ray costs: the tiny loop, through Ray and in-process.

    python bench/round_bench.py                 # configs/tiny.yaml, 10 rounds through `rlfh train`
    python bench/round_bench.py --rounds 8 --config configs/tiny.yaml
    python bench/round_bench.py --smoke         # 2 rounds, 2 steps, 4 samples

1. ``rlfh train CONFIG`` runs in a subprocess in a temporary run_dir (wandb and periodic checkpoints
   off); its metrics.jsonl gives, per round, the driver-side stage times time/sample_s, reward_s,
   log_s, learner_s, sync_s and round_s. Those include Ray's cost (task submission, pickling images
   and latents through the object store, ray.get waits) because the driver measures them around
   ``ray.get``; the in-actor compute is not in metrics.jsonl.
2. So the same stages run again in THIS process with the same classes and calls (Sampler.sample in
   chunks of sample_batch_size_per_actor, RewardSet, RolloutLog.append, learner_batch,
   rlfh.learner.steps.train, lora_state_dict + Sampler.load_lora), with torch threads set as the
   actors set them, on the same prompts and seeds.
Ray overhead per stage = median(driver time) - median(in-process time); the headline is the
overhead's share of the median round. Round 0 (warm-up: lazy init, first allocations) is dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

STAGES = ["sample", "reward", "log", "learner", "sync"]


def ray_rounds(config: Path, overrides: list[str], run_dir: Path) -> tuple[list[dict], float]:
    """Run `rlfh train` in a subprocess; returns its metrics.jsonl rows and the wall time."""
    cmd = [sys.executable, "-m", "rlfh.cli.main", "train", str(config), f"run_dir={run_dir}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return rows, wall


def inprocess_rounds(cfg, n_rounds: int, run_dir: Path) -> list[dict]:
    """The loop of rlfh.recipes.online.train with the Ray calls replaced by direct calls."""
    from families import load_pipeline
    from rewards.composite import RewardSet
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.data.prompts import PromptSchedule, load_prompts
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from rollouts.log import RolloutLog, make_records
    from rollouts.sampler import Sampler
    from rollouts.types import RolloutBatch, SamplerSettings

    # the actors each call torch.set_num_threads(max(int(num_cpus_per_actor), 1)); match their compute
    torch.set_num_threads(max(int(cfg.resources.num_cpus_per_actor), 1))
    rc, lc = cfg.rollout, cfg.learner
    sampler = Sampler(load_pipeline(cfg.model, "cpu"), model_id=cfg.model.path)
    if cfg.model.lora.enabled:
        sampler.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    rewards = RewardSet.from_config(cfg.rewards)
    learner = LearnerEngine(cfg, device="cpu")
    log = RolloutLog(run_dir / "rollouts")
    schedule = PromptSchedule(load_prompts(rc), rc.prompts_per_round, rc.rollouts_per_prompt, cfg.seed)
    settings = SamplerSettings(
        rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width, rc.eta
    )
    bs = rc.sample_batch_size_per_actor
    rows = []
    for rnd in range(n_rounds):
        t = [time.perf_counter()]
        prompts, seeds = schedule.round(rnd)
        batch = RolloutBatch.concat(
            [sampler.sample(prompts[i : i + bs], seeds[i : i + bs], settings) for i in range(0, len(prompts), bs)]
        )
        batch.rollout_ids = [f"{rnd}-{i}" for i in range(len(batch))]
        t.append(time.perf_counter())
        scored = rewards(batch.images, batch.prompts)
        t.append(time.perf_counter())
        log.append(make_records(batch, scored, rnd))
        train_batch, _ = learner_batch(
            lc,
            ScoredSamples(
                batch.latents,
                batch.prompts,
                batch.prompts,
                scored.combined(),
                [scored.regions(i) for i in range(len(batch))],
                (rc.height, rc.width),
            ),
        )
        t.append(time.perf_counter())
        train(learner, train_batch, lc.epochs_per_round)
        t.append(time.perf_counter())
        if cfg.model.lora.enabled:
            sampler.load_lora(learner.lora_state_dict(), learner.policy_version)
        t.append(time.perf_counter())
        row = {f"{s}_s": t[i + 1] - t[i] for i, s in enumerate(STAGES)}
        row["round_s"] = t[-1] - t[0]
        rows.append(row)
    return rows


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(common.REPO / "configs" / "tiny.yaml"))
    ap.add_argument("--rounds", type=int, default=None, help="rounds per side (round 0 is dropped)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--in-process-nice",
        type=int,
        default=int(os.environ.get("RAY_worker_niceness", 15)),
        help="niceness of the in-process side (default: Ray's worker niceness, 15)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for both sides")
    args = ap.parse_args(argv)
    common.quiet()
    from rlfh.config.schema import load_config

    rounds = args.rounds or (2 if args.smoke else 10)
    ov = [f"num_rounds={rounds}", "logging.wandb=false", "logging.progress=false", f"logging.checkpoint_every={10**6}"]
    if args.smoke:
        ov += [
            "rollout.num_inference_steps=2",
            "rollout.prompts_per_round=2",
            "rollout.rollouts_per_prompt=2",
            "rollout.sample_batch_size_per_actor=4",
            "learner.epochs_per_round=1",
        ]
    ov += args.overrides
    cfg = load_config(args.config, ov)
    record = common.machine(torch.device("cpu"))
    print(f"[round] {record['device']}; {args.config} + {ov}")
    with tempfile.TemporaryDirectory(prefix="rlfh-round-bench-") as tmp:
        env_note = os.environ.get("RLFH_CACHE", "~/.cache/rlfh")
        ray_rows, ray_wall = ray_rounds(Path(args.config), ov, Path(tmp) / "ray")
        print(f"[round] ray: {len(ray_rows)} rounds in {ray_wall:.1f} s wall (incl. start-up and final checkpoint)")
        # Ray starts its workers at niceness 15 (RAY_worker_niceness); on a shared machine that alone
        # slows the actors whenever other processes want the cores. Same niceness here, so the
        # difference left is Ray's mechanics (submission, object store, ray.get), not scheduling.
        os.nice(args.in_process_nice - os.nice(0))
        local_rows = inprocess_rounds(cfg, rounds, Path(tmp) / "local")
    keep = slice(1, None) if rounds > 1 else slice(0, None)  # drop warm-up round 0
    ray_k, loc_k = ray_rows[keep], local_rows[keep]
    stages = {}
    for s in STAGES:
        r, l = med(ray_k, f"time/{s}_s"), med(loc_k, f"{s}_s")
        stages[s] = {"ray_driver_s": r, "in_process_s": l, "overhead_s": r - l}
    ray_round, loc_round = med(ray_k, "time/round_s"), med(loc_k, "round_s")
    overhead = ray_round - loc_round
    result = {
        "benchmark": "round",
        **record,
        "settings": {
            "config": args.config,
            "overrides": ov,
            "rounds_per_side": rounds,
            "dropped_rounds": [0],
            "torch_threads_in_process": max(int(cfg.resources.num_cpus_per_actor), 1),
            "in_process_niceness": args.in_process_nice,
            "ray_worker_niceness": "15 (Ray default)",
            "samples_per_round": cfg.rollout.samples_per_round,
            "model_cache": env_note,
            "smoke": args.smoke,
        },
        "ray_overhead_share": overhead / ray_round,
        "ray_overhead_s": overhead,
        "round_s": {"ray_median": ray_round, "in_process_median": loc_round},
        "stages": stages,
        "stage_share_of_ray_round": {s: v["ray_driver_s"] / ray_round for s, v in stages.items()},
        "ray_wall_s_total": ray_wall,
        "raw": {
            "ray_metrics": [{k: v for k, v in r.items() if k.startswith("time/") or k == "round"} for r in ray_rows],
            "in_process": local_rows,
        },
    }
    for s, v in stages.items():
        print(
            f"[round] {s:>7}: ray {v['ray_driver_s']:.3f} s, in-process {v['in_process_s']:.3f} s, "
            f"overhead {v['overhead_s']:+.3f} s"
        )
    print(
        f"[round] round: ray {ray_round:.3f} s, in-process {loc_round:.3f} s; Ray overhead share "
        f"{result['ray_overhead_share']:.3f}"
    )
    common.write_result(args.out or ("smoke_round" if args.smoke else "cpu_tiny_round"), result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
