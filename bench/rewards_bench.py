"""Reward throughput on CPU and the reward server's overhead; writes bench/results/rewards_cpu.json.

    python bench/rewards_bench.py [--out bench/results/rewards_cpu.json] [--batch 8] [--size 512]

Part 1, per reward: images per second on one batch of real photos (skimage's astronaut, coffee and
chelsea, insightface's group photo t1.jpg; each resized to SIZE x SIZE), scored as one batch and
one image at a time (median over repeats, after a warm-up call). FaceScore and ImageReward run on
TINY random-weight models of their architecture (2-layer ViT width 64, 2-layer text encoder, built
as tests/rewards/tiny_blip.py does): those numbers measure the pipeline (detector, crops,
preprocessing, a small forward pass), NOT the cost of the published ViT-L models.

Part 2, the server: the same batch scored by the jpeg rewards (cheap, so transport dominates)
in-process, through a Serve DeploymentHandle, and over HTTP (PNG and raw-array bodies), on a local
Ray cluster; reported in ms per request and as ratios to the in-process time of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.rewards.tiny_blip when run as a script


def machine() -> dict[str, Any]:
    import PIL
    import ray
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }
    try:
        import mediapipe

        versions["mediapipe"] = mediapipe.__version__
    except ImportError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }


def photos(size: int, batch: int) -> tuple[np.ndarray, list[str]]:
    """(batch, size, size, 3) uint8 real photos, cycling through the available ones."""
    import importlib.util

    import skimage.data
    from PIL import Image

    named = [
        ("astronaut", skimage.data.astronaut()),
        ("coffee", skimage.data.coffee()),
        ("chelsea", skimage.data.chelsea()),
    ]
    spec = importlib.util.find_spec("insightface")
    if spec and spec.origin:
        t1 = Path(spec.origin).parent / "data" / "images" / "t1.jpg"
        if t1.is_file():
            named.insert(1, ("insightface_t1_group", np.asarray(Image.open(t1).convert("RGB"))))
    resized = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for _, im in named]
    idx = [k % len(named) for k in range(batch)]
    return np.stack([resized[k] for k in idx]), [named[k][0] for k in idx]


def timed(fn: Callable[[], Any], repeats: int, min_total_s: float = 1.0, max_calls: int = 200) -> float:
    """Median seconds of ``fn()`` after one warm-up call.

    At least ``repeats`` calls, and more (up to ``max_calls``) until ``min_total_s`` is spent, so
    cheap calls get enough samples for a stable median on a shared, noisy machine.
    """
    fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_rewards(tmp: Path) -> dict[str, tuple[Any, str]]:
    """name -> (reward, note). Rewards whose models are unavailable are skipped with the reason."""
    from rewards.registry import build_reward

    out: dict[str, tuple[Any, str]] = {
        "jpeg_compressibility": (build_reward("jpeg_compressibility"), "real reward"),
        "jpeg_incompressibility": (build_reward("jpeg_incompressibility"), "real reward"),
    }
    from rewards.detectors import get_models

    mdir = get_models.models_dir()
    if get_models.missing_models(mdir):
        print(
            f"[bench] MediaPipe models missing in {mdir}: run python -m rewards.detectors.get_models", file=sys.stderr
        )
    else:
        opts = {"detector_options": {"models_dir": str(mdir)}}
        out["hand_confidence"] = (build_reward("hand_confidence", opts), "real MediaPipe HandLandmarker models")
        out["face_detection_confidence"] = (
            build_reward("face_detection_confidence", opts),
            "real MediaPipe BlazeFace short-range model",
        )
    from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

    tiny = (
        "TINY random-weight architecture (ViT width 64, depth 2; 2-layer text encoder): not the published model's cost"
    )
    fs_dir = save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=0), TINY_MED_CONFIG, tmp / "fs", "FS_model.pt"
    )
    ir_dir = save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=2), TINY_MED_CONFIG, tmp / "ir", "ImageReward.pt"
    )
    if "face_detection_confidence" in out:
        # MediaPipe faces instead of insightface (whose model packs are not on a registry); threshold
        # 0.5 so the photos' faces are scored and the model actually runs.
        out["facescore_tiny"] = (
            build_reward(
                "facescore",
                {
                    "model": str(fs_dir),
                    "vision_heads": 2,
                    "detector": "mediapipe_face",
                    "threshold": 0.5,
                    "detector_options": {"models_dir": str(mdir)},
                },
            ),
            tiny + "; faces from MediaPipe BlazeFace",
        )
    out["imagereward_tiny"] = (build_reward("imagereward", {"model": str(ir_dir), "vision_heads": 2}), tiny)
    return out


def bench_rewards(images: np.ndarray, prompts: list[str], repeats: int, tmp: Path) -> dict[str, Any]:
    results = {}
    for name, (reward, note) in build_rewards(tmp).items():
        batched = timed(lambda: reward(images, prompts), repeats)
        single = timed(
            lambda: [reward(images[i : i + 1], prompts[i : i + 1]) for i in range(len(images))], max(1, repeats // 2)
        )
        n = len(images)
        results[name] = {
            "batched_images_per_s": round(n / batched, 2),
            "one_by_one_images_per_s": round(n / single, 2),
            "batched_speedup": round(single / batched, 3),
            "note": note,
        }
        print(f"[bench] {name:28s} batched {n / batched:8.1f} img/s   one-by-one {n / single:8.1f} img/s", flush=True)
        detector = getattr(reward, "detector", None)
        if hasattr(detector, "close"):
            detector.close()
    return results


def bench_server(images: np.ndarray, prompts: list[str], repeats: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from rewards.client import RewardClient
    from rewards.composite import RewardSet
    from rewards.server import ServerConfig, build_app
    from rewards.wire import encode_array, encode_png

    entries = [{"target": "jpeg_compressibility"}, {"target": "jpeg_incompressibility"}]
    in_process = RewardSet.from_config([SimpleNamespace(name=None, weight=1.0, options={}, **e) for e in entries])
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(port=port)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.host, "port": port})
        handle = serve.run(build_app(entries, cfg), name="bench", route_prefix="/")
        png = RewardClient(cfg.url, timeout=60, encoding="png")
        raw = RewardClient(cfg.url, timeout=60, encoding="raw")
        expected = in_process(images, prompts)
        # Same numbers on every path before any timing counts.
        if not (
            handle.score.remote(images, prompts).result()
            == png.score(images, prompts)
            == raw.score(images, prompts)
            == expected
        ):
            raise RuntimeError("server results differ from in-process results")
        ms = {
            "in_process": timed(lambda: in_process(images, prompts), repeats) * 1e3,
            "handle": timed(lambda: handle.score.remote(images, prompts).result(), repeats) * 1e3,
            "http_png": timed(lambda: png.score_json(images, prompts), repeats) * 1e3,
            "http_raw": timed(lambda: raw.score_json(images, prompts), repeats) * 1e3,
            # client-side share of the HTTP times: building the JSON body
            "client_encode_png": timed(lambda: json.dumps({"images": [encode_png(im) for im in images]}), repeats)
            * 1e3,
            "client_encode_raw": timed(lambda: json.dumps({"arrays": [encode_array(im) for im in images]}), repeats)
            * 1e3,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    base = ms["in_process"]
    out = {
        "rewards": [e["target"] for e in entries],
        "images_per_request": len(images),
        "server_config": {
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "num_replicas": cfg.num_replicas,
        },
        "ms_per_request": {k: round(v, 2) for k, v in ms.items()},
        "ratio_to_in_process": {k: round(v / base, 3) for k, v in ms.items() if not k.startswith("client_")},
        "note": (
            "sequential requests, so each one also waits batch_wait_timeout_s for companions; "
            "http_* include client-side encoding (PNG or base64) and JSON parsing"
        ),
    }
    print(f"[bench] server ms/request {out['ms_per_request']}  ratios {out['ratio_to_in_process']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rewards_cpu.json"))
    p.add_argument("--batch", type=int, default=8, help="images per batch / request")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--skip-server", action="store_true", help="only part 1 (no Ray)")
    args = p.parse_args(argv)
    from rlfh.env import apply_env_defaults

    apply_env_defaults()
    t0 = time.perf_counter()
    images, names = photos(args.size, args.batch)
    prompts = [f"a photo ({n})" for n in names]
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "batch": args.batch,
            "image_size": [args.size, args.size],
            "photos": names,
            "repeats": args.repeats,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["rewards"] = bench_rewards(images, prompts, args.repeats, Path(tmp))
    if not args.skip_server:
        report["server"] = bench_server(images, prompts, args.repeats * 2)
    report["runtime_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {args.out} in {report['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
