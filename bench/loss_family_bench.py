"""Learner throughput and peak memory per loss and per fairness rule (rlfh's LearnerEngine).

    python bench/loss_family_bench.py            # tiny model on CPU (or the device found)
    python bench/loss_family_bench.py --smoke    # seconds

Each variant builds a LearnerEngine from configs/tiny.yaml with the variant's overrides and times
``--steps`` optimizer steps after one warm-up step, on random latents (64 px, 8x8 latents) with a
"face" mask on half the items and a "hand" mask on a quarter, so per-region objectives and the
fairness solve (K = 3 where all regions are present) do real work. Items/s counts pairs for the DPO
losses, samples for RWR / filtered, trajectories for DDPO. Baseline of the ratios: the plain
global-only sigmoid DPO step measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

REGIONS = ["learner.regions.names=[global, face, hand]"]
VARIANTS = {
    "dpo": [],
    "dpo_hinge": ["learner.loss=dpo_hinge"],
    "dpo_ipo": ["learner.loss=dpo_ipo"],
    "rwr": ["learner.loss=rwr"],
    "filtered": ["learner.loss=filtered"],
    "ddpo": ["learner.loss=ddpo", "rollout.scheduler=ddim", "rollout.eta=1.0", "rollout.num_inference_steps=4"],
    "regions_sum": REGIONS + ["learner.regions.fairness.rule=sum"],
    "regions_equal": REGIONS + ["learner.regions.fairness.rule=equal"],
    "regions_mpd": REGIONS + ["learner.regions.fairness.rule=mpd"],
    "regions_mgda": REGIONS + ["learner.regions.fairness.rule=mgda"],
}


def make_batch(lrn, n: int, seed: int = 0):
    from rewards.base import Detection
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.losses.registry import TRAJECTORIES, loss_spec
    from rollouts.types import SamplerSettings

    rng = np.random.default_rng(seed)
    lc, rc = lrn.cfg.learner, lrn.cfg.rollout
    m = 2 * n  # two samples per prompt group -> n pairs
    latents = rng.standard_normal((m, 4, 8, 8)).astype(np.float32)
    prompts = [f"a photo of person {i // 2}" for i in range(m)]
    scores = [float(s) for s in rng.standard_normal(m)]
    regions = [
        {
            **({"face": [Detection((8, 8, 30, 30), 0.99)]} if i % 2 == 0 else {}),
            **({"hand": [Detection((34, 34, 60, 60), 0.9)]} if i % 4 == 0 else {}),
        }
        for i in range(m)
    ]
    traj = None
    settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, "", 64, 64, rc.eta, rc.scheduler)
    if loss_spec(lc.loss).batch == TRAJECTORIES:
        t = rc.num_inference_steps
        traj = {
            "latents": rng.standard_normal((m, t + 1, 4, 8, 8)).astype(np.float32),
            "log_probs": rng.standard_normal((m, t)).astype(np.float32),
            "timesteps": lrn.stochastic.timesteps.cpu().numpy().astype(np.int64),
        }  # the sampler's real steps
    batch, _ = learner_batch(lc, ScoredSamples(latents, prompts, prompts, scores, regions, (64, 64), traj, settings))
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="items per optimizer step")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.steps = 1
    common.quiet()
    device = common.pick_device("auto")
    common.set_threads(1, device)
    from families import resolve_model_path
    from rlfh.config.schema import load_config
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from rlfh.losses.registry import PAIRS, loss_spec

    model = resolve_model_path("rlfh:tiny-sdxl")
    results = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(
            common.REPO / "configs" / "tiny.yaml",
            [
                f"model.path={model}",
                f"learner.train_batch_size={args.batch}",
                f"learner.micro_batch_size_per_gpu={args.batch}",
                *overrides,
            ],
        )
        lrn = LearnerEngine(cfg)
        pairs = loss_spec(cfg.learner.loss).batch == PAIRS  # a pair takes two samples
        batch = make_batch(lrn, args.batch * (args.steps + 1) if pairs else args.batch * (args.steps + 1) // 2)
        warm = make_batch(lrn, args.batch, seed=1)
        train(lrn, warm, 1)  # warm-up step
        with common.PeakMemory(device) as mem:
            t0 = time.perf_counter()
            metrics = train(lrn, batch, 1)
            common.sync(device)
            dt = time.perf_counter() - t0
        steps = int(metrics["learner/steps"]) - 1
        items = steps * args.batch
        results[name] = {
            "overrides": overrides,
            "steps": steps,
            "seconds": dt,
            "items_per_s": items / dt,
            "memory": mem.result(),
            "mpd_weights": {k: v for k, v in metrics.items() if k.startswith("mpd/weight/")},
        }
        print(f"[bench] {name:14s} {items / dt:8.2f} items/s  peak +{mem.result()['peak_delta_bytes'] / 2**20:.0f} MiB")
        del lrn
    base = results["dpo"]["items_per_s"]
    for r in results.values():
        r["speed_vs_dpo_global"] = r["items_per_s"] / base
    out = {
        **common.machine(device),
        "settings": {"model": "rlfh:tiny-sdxl", "px": 64, "batch": args.batch, "steps": args.steps, "threads": 1},
        "variants": results,
    }
    common.write_result(
        "smoke_loss_family" if args.smoke else f"{'gpu' if device.type == 'cuda' else 'cpu'}_tiny_loss_family",
        out,
        args.out_dir,
    )


if __name__ == "__main__":
    main()
