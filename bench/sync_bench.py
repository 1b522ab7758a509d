"""Full-weight sync, learner -> rollout actor through Ray: one object vs buckets.

    python bench/sync_bench.py                      # SDXL-architecture UNet at half width, bf16 (~1.3 GB)
    python bench/sync_bench.py --width 1.0          # the full SDXL UNet (5.1 GB in bf16; needs ~25 GB RAM)
    python bench/sync_bench.py --smoke              # quarter width, two bucket sizes

Two Ray actors on this machine: a *learner side* holding a seeded SDXL-architecture UNet, which
turns its state dict into buckets with ``rlfh.learner.weight_sync.iter_state_buckets`` and puts each in the
object store (what ``LearnerActor.weight_buckets`` does), and a *rollout side* holding a UNet of the
same architecture with other weights, which streams the buckets into it with ``Sampler.load_full``
(what ``RolloutActor.load_weights`` does). Each side samples its private resident memory every 2 ms
(RSS minus shared pages: object-store pages a process writes or maps count as shared, they are one
copy on the node whatever the number of readers); the figures are the peak above the value before
the sync (what the sync itself costs each process) and the wall time of each side. The object
store holds the whole state dict once while a sync runs, in both modes (``store_bytes``). Every measurement gets two
fresh actors: memory a process freed stays in its
allocator and would hide the next sync's peak. ``bucket_mb = inf`` is one object with the whole state dict, the
pre-bucketing
behaviour. After every sync the rollout side's weights must equal the learner side's (sha256).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402


def build_unet(width: float, dtype: str, seed: int):
    from diffusers import UNet2DConditionModel

    cfg = dict(common.SDXL_UNET_CONFIG)
    cfg["block_out_channels"] = [int(c * width) // 32 * 32 for c in cfg["block_out_channels"]]
    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).to(common.DTYPES[dtype])


def digest(unet) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in unet.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@ray.remote(num_cpus=0.5)
class LearnerSide:
    def __init__(self, width, dtype):
        torch.set_num_threads(1)
        self.unet = build_unet(width, dtype, seed=0)

    def info(self):
        n = sum(p.numel() for p in self.unet.parameters())
        return {
            "params": n,
            "bytes": sum(v.numel() * v.element_size() for v in self.unet.state_dict().values()),
            "sha256": digest(self.unet),
        }

    def buckets(self, bucket_bytes):
        from rlfh.learner.weight_sync import iter_state_buckets

        t0 = time.perf_counter()
        with common.PeakMemory(torch.device("cpu"), private=True) as mem:
            refs = [ray.put(b) for b in iter_state_buckets(self.unet.state_dict(), bucket_bytes)]
        return refs, time.perf_counter() - t0, mem.result()["peak_delta_bytes"]


@ray.remote(num_cpus=0.5)
class RolloutSide:
    def __init__(self, width, dtype):
        from types import SimpleNamespace

        from rollouts.sampler import Sampler

        torch.set_num_threads(1)
        self.sampler = Sampler(SimpleNamespace(unet=build_unet(width, dtype, seed=1)))

    def load(self, refs, version):
        t0 = time.perf_counter()
        with common.PeakMemory(torch.device("cpu"), private=True) as mem:
            self.sampler.load_full((ray.get(r) for r in refs), version)  # as RolloutActor.load_weights
        return time.perf_counter() - t0, mem.result()["peak_delta_bytes"], digest(self.sampler.pipe.unet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.5, help="fraction of SDXL's channel widths (1.0 = the real UNet)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(common.DTYPES))
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[math.inf, 512, 128, 32, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.width, args.bucket_mb, args.repeats = 0.25, [math.inf, 32], 1
    common.quiet()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=int(6e9),
        runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}},
    )
    try:
        info = None
        rows = []
        version = 0
        for rep in range(args.repeats):
            for mb in args.bucket_mb:  # alternate the sizes, so load drift falls on all of them
                learner, rollout = (
                    LearnerSide.remote(args.width, args.dtype),
                    RolloutSide.remote(args.width, args.dtype),
                )
                if info is None:
                    info = ray.get(learner.info.remote())
                    print(
                        f"[sync] UNet: {info['params'] / 1e6:.0f} M params, "
                        f"{info['bytes'] / 2**20:.0f} MiB ({args.dtype})"
                    )
                ray.get([learner.__ray_ready__.remote(), rollout.__ray_ready__.remote()])
                version += 1
                t0 = time.perf_counter()
                refs, put_s, put_mem = ray.get(learner.buckets.remote(int(min(mb, 1e15) * 2**20)))
                load_s, load_mem, sha = ray.get(rollout.load.remote(refs, version))
                total = time.perf_counter() - t0
                n_buckets = len(refs)
                del refs
                ray.kill(learner)
                ray.kill(rollout)
                if sha != info["sha256"]:
                    raise RuntimeError(f"bucket_mb={mb}: the rollout side's weights differ from the learner's")
                rows.append(
                    {
                        "bucket_mb": mb,
                        "repeat": rep,
                        "buckets": n_buckets,
                        "total_s": total,
                        "learner_s": put_s,
                        "rollout_s": load_s,
                        "learner_peak_delta_bytes": put_mem,
                        "rollout_peak_delta_bytes": load_mem,
                        "store_bytes": info["bytes"],
                    }
                )
                print(
                    f"[sync] bucket {mb} MB ({n_buckets} buckets): {total:.2f} s, learner +{put_mem / 2**20:.0f} MiB, "
                    f"rollout +{load_mem / 2**20:.0f} MiB private"
                )
        import statistics

        per_size = {}
        for mb in args.bucket_mb:
            rs = [r for r in rows if r["bucket_mb"] == mb]
            per_size[str(mb)] = {
                k: statistics.median(r[k] for r in rs)
                for k in (
                    "buckets",
                    "total_s",
                    "learner_s",
                    "rollout_s",
                    "learner_peak_delta_bytes",
                    "rollout_peak_delta_bytes",
                )
            }
        one = per_size[str(args.bucket_mb[0])]
        headline = {
            mb: {
                "time_ratio_vs_one_object": v["total_s"] / one["total_s"],
                "rollout_peak_ratio_vs_one_object": v["rollout_peak_delta_bytes"]
                / max(one["rollout_peak_delta_bytes"], 1),
                "learner_peak_ratio_vs_one_object": v["learner_peak_delta_bytes"]
                / max(one["learner_peak_delta_bytes"], 1),
            }
            for mb, v in per_size.items()
        }
        name = "smoke_sync" if args.smoke else f"cpu_sync_w{args.width:g}_{args.dtype}"
        common.write_result(
            name,
            {
                "machine": common.machine(torch.device("cpu")),
                "settings": vars(args) | {"out_dir": None},
                "unet": info,
                "per_bucket_size": per_size,
                "headline": headline,
                "rows": rows,
            },
            args.out_dir,
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
