"""The reward server's overhead against a FaceScore-size model; writes OUT_DIR/cpu_reward_overhead.json.

    python bench/reward_overhead_bench.py [--out-dir bench/results] [--batch 8] [--rounds 9]
    python bench/reward_overhead_bench.py --quick     # 5 rounds (bench/cpu.sh)
    python bench/reward_overhead_bench.py --smoke     # tiny model, 2 rounds, temp dir: seconds

The model: FaceScore's published architecture with random weights (seed 0, tests/rewards/tiny_blip.py's
``random_model``): BLIP ViT-L/16 vision tower (24 layers, width 1024, 16 heads, MLP 4096, 224 px) and
ImageReward's med_config BERT (12 layers, width 768, cross-attention), saved in FS_model.pt's
published layout and loaded by ``rewards.facescore.FaceScore`` like the real checkpoint. Build, save
and load times are reported (``setup_s``).

Faces: one fixed box per image (the centre half of each side, confidence 1.0, ``CenterFaces`` below,
passed to FaceScore as a ``module:callable`` detector so the Serve replica builds the same one), so
every image costs exactly one ViT-L + BERT forward and no detector time enters either side.

Compared, on the same (batch, 512, 512, 3) real photos and prompts, the same RewardSet config:
(a) in-process ``RewardSet(images, prompts)``; (b) through a Serve ``DeploymentHandle``; (c) over HTTP
with ``rewards.client.RewardClient`` (raw arrays, the client's default; PNG with ``--png``), the server
started as ``rewards.server.start_reward_server`` does, on 127.0.0.1. Rounds time a, b, c back to back
(the order rotates per round) after a warm-up call each; the headline
``reward_http_overhead_share`` = median over rounds of (t_http - t_in_process) / t_in_process, and the
same for the handle. Both sides run ``--threads`` torch threads (the replica: OMP_NUM_THREADS and its
num_cpus). Requests are sequential, so each also waits the server's batch_wait_timeout_s for companions
(batch < max_batch_size): that wait is part of the measured overhead.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class CenterFaces:
    """Face detector stand-in: one box per image, the centre ``fraction`` of each side, confidence 1."""

    region = "face"

    def __init__(self, fraction: float = 0.5):
        self.fraction = float(fraction)

    def detect(self, images: np.ndarray) -> list[list[Any]]:
        from rewards.base import Detection

        out = []
        for im in images:
            h, w = im.shape[:2]
            dy, dx = h * (1 - self.fraction) / 2, w * (1 - self.fraction) / 2
            out.append([Detection(box=(dx, dy, w - dx, h - dy), confidence=1.0)])
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--out", default=None, help="result name (default cpu_reward_overhead, smoke_reward_overhead)")
    p.add_argument("--batch", type=int, default=8, help="images per request")
    p.add_argument("--size", type=int, default=512, help="image side in px (faces are cropped and resized to 224)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (a, b, c each) after the warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process and in the replica")
    p.add_argument("--png", action="store_true", help="also time HTTP with PNG bodies")
    p.add_argument("--quick", action="store_true", help="5 rounds (for bench/cpu.sh)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds, results in a temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 5)
    if args.smoke:
        args.rounds = 2
        if args.out_dir == str(REPO / "bench" / "results"):
            args.out_dir = tempfile.mkdtemp(prefix="rlfh-reward-overhead-")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO))
    from rlfh.env import apply_env_defaults, worker_runtime_env

    apply_env_defaults()
    import ray
    import torch

    from bench import common
    from bench.rewards_bench import photos
    from rewards.client import RewardClient
    from rewards.composite import RewardSet
    from rewards.server import start_reward_server
    from rewards.wire import ServerConfig
    from tests.rewards.tiny_blip import (
        FULL_MED_CONFIG,
        TINY_MED_CONFIG,
        TINY_VISION,
        VIT_L,
        random_model,
        save_published,
    )

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "reward_overhead", **common.machine(torch.device("cpu"))}
    vision, med = (TINY_VISION, TINY_MED_CONFIG) if args.smoke else (VIT_L, FULL_MED_CONFIG)
    images, names = photos(args.size, args.batch)
    prompts = [f"a photo ({n})" for n in names]
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = random_model(vision, med, seed=0)
        setup["build_random_weights_s"] = time.perf_counter() - t0
        n_vision = sum(p.numel() for n, p in model.named_parameters() if "visual_encoder" in n)
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        fs_dir = save_published(model, med, Path(tmp) / "fs", "FS_model.pt")
        setup["save_s"] = time.perf_counter() - t0
        del model
        options = {
            "model": str(fs_dir),
            "detector": "bench.reward_overhead_bench:CenterFaces",
            "detector_options": {"fraction": 0.5},
            "batch_size": args.batch,
        }
        if args.smoke:
            options["vision_heads"] = TINY_VISION.heads
        entries = [{"target": "facescore", "name": None, "weight": 1.0, "options": options}]
        t0 = time.perf_counter()
        in_process = RewardSet.from_config([SimpleNamespace(**e) for e in entries])
        setup["load_in_process_s"] = time.perf_counter() - t0
        print(
            f"[bench] FaceScore-size model: {n_params / 1e6:.1f} M parameters ({n_vision / 1e6:.1f} M vision); "
            + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()),
            flush=True,
        )

        cfg = ServerConfig(port=free_port(), num_cpus_per_replica=float(args.threads))
        env = worker_runtime_env()
        env.setdefault("env_vars", {}).update(
            {
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
                ),
                "OMP_NUM_THREADS": str(args.threads),
            }
        )
        ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False, runtime_env=env)
        try:
            t0 = time.perf_counter()
            handle = start_reward_server(entries, cfg, name="bench_overhead", runtime_env=env)
            setup["server_start_and_load_s"] = time.perf_counter() - t0
            clients = {"http": RewardClient(cfg.url, timeout=600, encoding="raw")}
            if args.png:
                clients["http_png"] = RewardClient(cfg.url, timeout=600, encoding="png")
            fns = {
                "in_process": lambda: in_process(images, prompts),
                "handle": lambda: handle.score.remote(images, prompts).result(),
            }
            fns.update({k: (lambda c=c: c.score(images, prompts)) for k, c in clients.items()})
            # warm-up, and the same scores on every path before any timing counts
            outs = {k: fn() for k, fn in fns.items()}
            ref = np.array(outs["in_process"].values()["facescore"], dtype=float)
            diffs = {
                k: float(np.max(np.abs(np.array(o.values()["facescore"], dtype=float) - ref)))
                for k, o in outs.items()
                if k != "in_process"
            }
            if not np.all(np.isfinite(ref)) or max(diffs.values()) > 1e-4:
                raise RuntimeError(f"server scores differ from in-process scores: {diffs}, in-process {ref.tolist()}")
            order = list(fns)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(args.rounds):
                rot = order[r % len(order) :] + order[: r % len(order)]
                for k in rot:
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
                print(f"[bench] round {r}: " + "  ".join(f"{k} {times[k][-1] * 1e3:.0f} ms" for k in order), flush=True)
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    base = times["in_process"]
    shares = {k: [(t - b) / b for t, b in zip(times[k], base)] for k in times if k != "in_process"}
    report.update(
        {
            "settings": {
                "model": "FaceScore architecture, random weights"
                + (
                    " (TINY: smoke)"
                    if args.smoke
                    else " (BLIP ViT-L/16: 24 layers, width 1024; med_config BERT 12 layers)"
                ),
                "vision": vars(vision) if hasattr(vision, "__dict__") else str(vision),
                "parameters": n_params,
                "vision_parameters": n_vision,
                "batch": args.batch,
                "image_size": args.size,
                "faces": "one centre box per image (half of each side), confidence 1.0",
                "photos": names,
                "rounds": args.rounds,
                "threads": args.threads,
                "quick": args.quick,
                "smoke": args.smoke,
                "order": "in_process, handle, http[, http_png] rotated per round, after 1 warm-up each",
                "server_config": {
                    "max_batch_size": cfg.max_batch_size,
                    "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                    "num_replicas": cfg.num_replicas,
                    "num_cpus_per_replica": cfg.num_cpus_per_replica,
                    "http_encoding": "raw",
                },
            },
            "setup_s": {k: round(v, 2) for k, v in setup.items()},
            "scores_max_abs_diff_vs_in_process": diffs,
            "reward_http_overhead_share": statistics.median(shares["http"]),
            "reward_handle_overhead_share": statistics.median(shares["handle"]),
            "overhead_share_by_path": {
                k: {"paired_median": statistics.median(v), "pairs": v} for k, v in shares.items()
            },
            "ms_per_request_median": {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()},
            "in_process_ms_per_image": round(statistics.median(base) * 1e3 / args.batch, 1),
            "overhead_ms_per_request_median": {
                k: round(statistics.median([t - b for t, b in zip(times[k], base)]) * 1e3, 1) for k in shares
            },
            "rows": [{"round": r, **{f"{k}_s": times[k][r] for k in times}} for r in range(args.rounds)],
            "target": "reward_http_overhead_share < 0.10",
            "runtime_s": round(time.perf_counter() - t_start, 1),
        }
    )
    print(
        f"[bench] in-process {report['ms_per_request_median']['in_process']:.0f} ms per batch of {args.batch} "
        f"({report['in_process_ms_per_image']} ms/image); reward_http_overhead_share "
        f"{report['reward_http_overhead_share']:.4f}, handle {report['reward_handle_overhead_share']:.4f}",
        flush=True,
    )
    common.write_result(
        args.out or ("smoke_reward_overhead" if args.smoke else "cpu_reward_overhead"), report, Path(args.out_dir)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
