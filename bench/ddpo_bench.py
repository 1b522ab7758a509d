"""DDPO items/s with a branched SDE window (learner.ddpo.window, ddpo_branch) vs every step stochastic and trained.

    python bench/ddpo_bench.py             # tiny model, 10 steps, window 2; writes bench/results/cpu_tiny_ddpo.json
    python bench/ddpo_bench.py --smoke     # seconds; writes smoke_ddpo.json

One "round" of a variant is what DDPO pays per item: the rollout actor's recorded sampling
(``Sampler.sample(..., record=window)``), the TrajectoryBatch (``learner_batch``, per-prompt
advantages of a cheap latent reward) and the learner's clipped-ratio steps (``train``, one epoch),
timed together; items/s = samples / seconds. The two variants (``full``: ``ddpo_window=null``, T
stochastic steps recorded and T trained per item; ``window``: W of T, with trajectory branching,
``learner.ddpo.branch``, unless ``--no-branch``) each hold their own learner and
sampler, and run alternately back to back after a warm-up round each, so load drifting on a shared
machine lands on both; the headline ``ddpo_window_speedup`` is the median over pairs of
full seconds / window seconds. One torch thread. The trajectory bytes per item (what travels
from the rollout actors to the learner) are recorded too.

What to expect: the learner runs W instead of T forward+backward passes per item. Without branching
sampling still runs all T UNet steps per item (only the noise differs outside the window), so the gain
is (T * sample_step + T * train_step) / (T * sample_step + W * train_step), ~2.5x on CPU. With
branching the j deterministic steps before the window (j uniform in 0..T - W) and the UNet's eps at
x_j run once per prompt group of G samples, so per item sampling costs (j + 1) / G + T - j - 1 steps
instead of T, and the learner trains the window's first step once per distinct x_j of a micro-batch
(G' <= G copies): (T * sample_step + T * train_step) / (((j + 1) / G + T - j - 1) * sample_step +
(1 / G' + W - 1) * train_step). On the tiny model on CPU a UNet call's fixed cost (Python, small
kernels) dominates, so a call on G rows saves less than G times; at tiny.yaml's G = 8 (the default
here) the pairs run from ~2.9x at j = 0 to ~3.8x at j = 7, at G = 4 from ~2.7x to ~3.6x (bench/NOTES.md).
Decoding, the reward and ``learner_batch`` cost both variants the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402


class Variant:
    """A learner and an on-policy sampler for one DDPO config; :meth:`round` is the timed unit."""

    def __init__(self, model: str, overrides: list[str], items: int, group: int):
        from families import load_pipeline
        from rlfh.config.schema import load_config
        from rlfh.learner.engine import LearnerEngine
        from rollouts.sampler import Sampler
        from rollouts.types import SamplerSettings

        self.cfg = load_config(common.REPO / "configs" / "tiny.yaml", [f"model.path={model}", *overrides])
        self.lrn = LearnerEngine(self.cfg)
        self.sampler = Sampler(load_pipeline(self.cfg.model), scheduler="ddim")
        rc = self.cfg.rollout
        self.sampler.add_lora(self.cfg.model.lora.rank, self.cfg.model.lora.alpha, self.cfg.model.lora.target_modules)
        self.sampler.load_lora(self.lrn.lora_state_dict(), self.lrn.policy_version)
        self.settings = SamplerSettings(
            rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width, rc.eta, rc.scheduler
        )
        self.prompts = [f"a photo of person {i // group}" for i in range(items)]
        self.rounds = 0
        self.last: dict = {}

    def round(self) -> None:
        from rlfh.data.batches import ScoredSamples
        from rlfh.data.pairs import ddpo_branch_seeds, ddpo_window, learner_batch
        from rlfh.learner.steps import train

        r, n = self.rounds, len(self.prompts)
        seeds = [r * n + i for i in range(n)]
        t0 = time.perf_counter()
        b = self.sampler.sample(
            self.prompts,
            seeds,
            self.settings,
            record=ddpo_window(self.cfg, r),
            branch_seeds=ddpo_branch_seeds(self.cfg, self.prompts, seeds),
        )
        rewards = b.latents[:, 0].mean(axis=(1, 2)).tolist()  # stands in for a reward model (not timed apart)
        # the prompt embeddings go with the batch, as in the online loop
        samples = ScoredSamples(
            b.latents,
            self.prompts,
            self.prompts,
            rewards,
            [{}] * n,
            (self.settings.height, self.settings.width),
            b.trajectory,
            self.settings,
            b.conditioning,
        )
        batch, _ = learner_batch(self.cfg.learner, samples)
        t1 = time.perf_counter()
        metrics = train(self.lrn, batch, 1)
        self.last = {
            "sample_s": t1 - t0,
            "train_s": time.perf_counter() - t1,
            "trajectory_bytes_per_item": int(sum(v.nbytes for v in b.trajectory.values()) // n),
            "recorded_steps": int(b.trajectory["log_probs"].shape[1]),
            "window_start": int(b.trajectory["window_start"]),
            "recorded_logprob_max_diff": metrics["ddpo/recorded_logprob_max_diff"],
        }
        self.rounds += 1

    def sync(self) -> None:
        """The learner's weights to the sampler, as after a round (not timed)."""
        self.sampler.load_lora(self.lrn.lora_state_dict(), self.lrn.policy_version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="denoising steps T")
    ap.add_argument("--window", type=int, default=2, help="SDE window W")
    ap.add_argument("--items", type=int, default=8, help="samples per round (= learner.train_batch_size)")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (tiny.yaml's rollout.rollouts_per_prompt)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale (tiny.yaml's 1.0: no CFG)")
    ap.add_argument(
        "--size",
        type=int,
        default=64,
        help="image size in px (tiny.yaml's 64; larger: the UNet's "
        "compute outweighs its fixed per-call cost, as on a GPU)",
    )
    ap.add_argument("--repeats", type=int, default=7, help="pairs (full, window) after the warm-up")
    ap.add_argument(
        "--no-branch", action="store_true", help="window without trajectory branching (learner.ddpo.branch=false)"
    )
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.window, args.items, args.repeats = 4, 1, 4, 1
        args.micro_batch, args.group = min(args.micro_batch, args.items), min(args.group, args.items)
    common.quiet()
    device = common.pick_device("auto")
    common.set_threads(1, device)
    from families import resolve_model_path

    model = resolve_model_path("rlfh:tiny-sdxl")
    base = [
        "learner.loss=ddpo",
        "rollout.scheduler=ddim",
        "rollout.eta=1.0",
        f"rollout.num_inference_steps={args.steps}",
        f"rollout.guidance_scale={args.guidance}",
        f"learner.train_batch_size={args.items}",
        f"learner.micro_batch_size_per_gpu={args.micro_batch}",
        f"rollout.rollouts_per_prompt={args.group}",
        f"rollout.prompts_per_round={max(args.items // args.group, 1)}",
        f"rollout.sample_batch_size_per_actor={args.items}",
        f"rollout.height={args.size}",
        f"rollout.width={args.size}",
    ]  # one sampling call per round, as timed
    variants = {
        "full": Variant(model, [*base, "learner.ddpo.window=null"], args.items, args.group),
        "window": Variant(
            model,
            [*base, f"learner.ddpo.window={args.window}", f"learner.ddpo.branch={str(not args.no_branch).lower()}"],
            args.items,
            args.group,
        ),
    }
    for v in variants.values():  # warm-up round each
        v.round()
        v.sync()
    rows = []
    for i in range(args.repeats):
        row = {"pair": i}
        for name, v in variants.items():  # alternate back to back
            row[f"{name}_s"] = common.timed(v.round, device)
            row[f"{name}_window_start"] = v.last["window_start"]
            row[f"{name}_sample_s"], row[f"{name}_train_s"] = v.last["sample_s"], v.last["train_s"]
            row[f"{name}_recorded_logprob_max_diff"] = v.last["recorded_logprob_max_diff"]
            v.sync()
        row["ratio"] = row["full_s"] / row["window_s"]
        rows.append(row)
        print(
            f"[ddpo] pair {i}: full {row['full_s']:.2f} s, window {row['window_s']:.2f} s "
            f"(start {row['window_window_start']}), ratio {row['ratio']:.2f}",
            flush=True,
        )
    ratio = common.paired_ratio([r["full_s"] for r in rows], [r["window_s"] for r in rows])
    items_per_s = {k: args.items / statistics.median(r[f"{k}_s"] for r in rows) for k in variants}
    out = {
        **common.machine(device),
        "settings": {
            "model": "rlfh:tiny-sdxl",
            "px": args.size,
            "steps": args.steps,
            "window": args.window,
            "window_branch": not args.no_branch,
            "items_per_round": args.items,
            "samples_per_prompt": args.group,
            "micro_batch": args.micro_batch,
            "guidance_scale": args.guidance,
            "epochs": 1,
            "repeats": args.repeats,
            "threads": 1,
            "timed": "record-sampling + learner_batch + train (one epoch), per round",
        },
        "rows": rows,
        "items_per_s_median": items_per_s,
        "trajectory_bytes_per_item": {k: v.last["trajectory_bytes_per_item"] for k, v in variants.items()},
        "recorded_steps": {k: v.last["recorded_steps"] for k, v in variants.items()},
        "ddpo_window_speedup": ratio["paired_median"],
        "median_s_by_phase": {
            f"{k}_{ph}": statistics.median(r[f"{k}_{ph}_s"] for r in rows)
            for k in variants
            for ph in ("sample", "train")
        },
        "ddpo_window_speedup_detail": ratio,
    }
    print(
        f"[ddpo] items/s full {items_per_s['full']:.2f}, window {items_per_s['window']:.2f}; "
        f"ddpo_window_speedup (median paired) {ratio['paired_median']:.2f}x; trajectory bytes/item "
        f"{out['trajectory_bytes_per_item']}"
    )
    common.write_result(common.result_name("ddpo", device, model, model, args.smoke), out, args.out_dir)


if __name__ == "__main__":
    main()
