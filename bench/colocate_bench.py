"""One device for rollout and learner: colocated (one UNet, device handover) vs separate (two UNets).

    python bench/colocate_bench.py --smoke                  # tiny model, CPU or GPU, seconds
    python bench/colocate_bench.py --model sdxl-arch --model-dir /tmp/sdxl-arch   # GPU: SDXL-arch, 1024 px

Each mode runs in its own subprocess (so memory peaks do not mix), without Ray, with the classes the
actors use:

* ``separate``: a rollout ``Sampler`` on its own pipeline plus a ``LearnerEngine``, both on the device
  (what a rollout actor and a learner actor sharing one GPU would hold); after each round the LoRA
  weights go to the sampler as the rollout actors load them.
* ``colocated``: ``resources.colocate`` as ``LearnerRank`` runs it: one ``LearnerEngine`` (VAE kept),
  a ``Sampler`` on the learner's own pipeline, and ``rlfh.learner.colocate.Handover`` between the phases.

A round: sample ``prompts x rollouts`` images, score them (JPEG compressibility, cheap and
model-free), build DPO pairs, train one pass, sync. Reported per mode: median stage times over
the rounds after the first, the handover's share of a round, and the peak device memory
(``torch.cuda.max_memory_allocated``; on CPU, peak RSS, which says little at tiny size). The
headline is colocated / separate for the peak memory and for the round time.

``--model sdxl-arch`` writes the published SDXL architecture with seeded random weights
(``bench.common.build_sdxl_arch_random``, bf16) to ``--model-dir`` once, as a diffusers folder the
config loads like a download of stabilityai/stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

STAGES = ["to_sampling", "sample", "reward", "pairs", "to_training", "learner", "sync"]


def overrides(args, model_path: str) -> list[str]:
    gpu = torch.cuda.is_available()
    return [
        f"model.path={model_path}",
        f"model.dtype={'bfloat16' if gpu else 'float32'}",
        f"rollout.height={args.size}",
        f"rollout.width={args.size}",
        f"rollout.num_inference_steps={args.steps}",
        f"rollout.prompts_per_round={args.prompts}",
        f"rollout.rollouts_per_prompt={args.rollouts}",
        f"rollout.sample_batch_size_per_actor={args.sample_batch}",
        f"learner.train_batch_size={args.prompts}",
        "learner.micro_batch_size_per_gpu=1",
        "learner.epochs_per_round=1",
        "learner.engine.zero_stage=2",
        f"learner.engine.gradient_checkpointing={str(gpu).lower()}",
        "logging.wandb=false",
    ]


def run_mode(mode: str, cfg, rounds: int) -> dict:
    """The loop, in this process, on the default device."""
    from families import load_pipeline
    from rewards.composite import RewardSet
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.data.prompts import PromptSchedule, load_prompts
    from rlfh.learner.colocate import Handover
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from rollouts.actor import sample_in_batches
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rc, lc = cfg.rollout, cfg.learner
    with common.PeakMemory(device) as mem:
        if mode == "colocated":
            learner = LearnerEngine(cfg, keep_vae=True)
            sampler = Sampler(learner.pipe, model_id=cfg.model.path)
            handover = Handover(learner)
        else:
            learner = LearnerEngine(cfg)
            sampler = Sampler(load_pipeline(cfg.model, device), model_id=cfg.model.path)
            sampler.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
            sampler.load_lora(learner.lora_state_dict(), 0)
            handover = None
        rewards = RewardSet.from_config(cfg.rewards)
        schedule = PromptSchedule(load_prompts(rc), rc.prompts_per_round, rc.rollouts_per_prompt, cfg.seed)
        settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width)
        rows = []
        for rnd in range(rounds):
            t = {}

            def stamp(name, fn):
                common.sync(device)
                t0 = time.perf_counter()
                out = fn()
                common.sync(device)
                t[name] = time.perf_counter() - t0
                return out

            prompts, seeds = schedule.round(rnd)
            stamp("to_sampling", handover.to_sampling if handover else (lambda: None))
            batch = stamp(
                "sample", lambda: sample_in_batches(sampler, prompts, seeds, settings, rc.sample_batch_size_per_actor)
            )
            scored = stamp("reward", lambda: rewards(batch.images, batch.prompts))
            pairs, _ = stamp(
                "pairs",
                lambda: learner_batch(
                    lc,
                    ScoredSamples(
                        batch.latents,
                        batch.prompts,
                        batch.prompts,
                        scored.combined(),
                        [scored.regions(i) for i in range(len(batch))],
                        (rc.height, rc.width),
                    ),
                ),
            )
            stamp("to_training", handover.to_training if handover else (lambda: None))
            stamp("learner", lambda: train(learner, pairs, lc.epochs_per_round))
            if handover:  # colocated: the sampler already holds the trained weights
                stamp("sync", lambda: setattr(sampler, "policy_version", learner.policy_version))
            else:
                stamp("sync", lambda: sampler.load_lora(learner.lora_state_dict(), learner.policy_version))
            t["round"] = sum(t.values())
            rows.append(t)
            print(f"[colocate] {mode} round {rnd}: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), flush=True)
    keep = rows[1:] if len(rows) > 1 else rows
    med = {k: statistics.median(r[k] for r in keep) for k in rows[0]}
    return {
        "mode": mode,
        "median_s": med,
        "handover_share": (med["to_sampling"] + med["to_training"]) / med["round"],
        "memory": mem.result(),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "sdxl-arch"])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rlfh-sdxl-arch"))
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024 sdxl-arch, 64 tiny)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--modes", default="separate,colocated")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = ap.parse_args()
    common.quiet()
    if args.smoke:
        args.model, args.steps, args.rollouts, args.rounds = "tiny", 2, 2, 2
    args.size = args.size or (1024 if args.model == "sdxl-arch" else 64)
    from rlfh.config.schema import load_config

    if args.model == "sdxl-arch":
        if not (args.model_dir / "model_index.json").is_file():
            print(f"[colocate] writing the SDXL-arch random pipeline to {args.model_dir}", flush=True)
            common.build_sdxl_arch_random(torch.device("cpu"), torch.bfloat16).save_pretrained(args.model_dir)
        model_path = str(args.model_dir)
    else:
        model_path = "rlfh:tiny-sdxl"
    cfg = load_config(common.REPO / "configs" / "tiny.yaml", overrides(args, model_path))
    if args.child:
        print("RESULT " + json.dumps(run_mode(args.child, cfg, args.rounds)), flush=True)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--model",
            args.model,
            "--model-dir",
            str(args.model_dir),
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--prompts",
            str(args.prompts),
            "--rollouts",
            str(args.rollouts),
            "--sample-batch",
            str(args.sample_batch),
            "--rounds",
            str(args.rounds),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if ln.startswith("[colocate]")))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[mode] = {"mode": mode, "error": proc.stderr[-3000:]}
            print(f"[colocate] {mode} failed:\n{proc.stderr[-2000:]}")
            continue
        results[mode] = json.loads(line[len("RESULT ") :])
    headline = {}
    sep, col = results.get("separate", {}), results.get("colocated", {})
    if "memory" in sep and "memory" in col:
        headline = {
            "peak_memory_ratio_colocated_vs_separate": col["memory"]["peak_bytes"] / sep["memory"]["peak_bytes"],
            "round_time_ratio_colocated_vs_separate": col["median_s"]["round"] / sep["median_s"]["round"],
            "handover_share_of_colocated_round": col["handover_share"],
        }
        print(f"[colocate] headline: {headline}")
    name = "smoke_colocate" if args.smoke else f"{device.type}_{args.model}_colocate"
    common.write_result(
        name,
        {
            "machine": common.machine(device),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "config_overrides": overrides(args, model_path),
            "headline": headline,
            "modes": results,
        },
        args.out_dir,
    )


if __name__ == "__main__":
    main()
