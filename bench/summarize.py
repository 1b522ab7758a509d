"""Merge the per-benchmark result files of one run into <prefix>summary.json and print the headlines.

    python bench/summarize.py [--dir bench/results] [--prefix cpu_tiny_|gpu_|smoke_]

The summary carries device, date, machine, versions, the four headlines (rollout_ratio, rollout_mfu,
learner_ratio, learner_mfu), the Ray overhead share where measured, and the raw rows of each input,
so one file answers "how fast, on what" without the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=str(common.RESULTS))
    ap.add_argument("--prefix", default=None, help="default: gpu_ if gpu_rollout.json exists, else cpu_tiny_")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    prefix = args.prefix or ("gpu_" if (d / "gpu_rollout.json").is_file() else "cpu_tiny_")
    parts = {k: json.loads((d / f"{prefix}{k}.json").read_text())
             for k in ("rollout", "rollout_compile", "learner", "round") if (d / f"{prefix}{k}.json").is_file()}
    if not parts:
        raise SystemExit(f"no {prefix}*.json results in {d}")
    first = next(iter(parts.values()))
    ro, le, rd = parts.get("rollout", {}), parts.get("learner", {}), parts.get("round", {})
    summary = {
        "device": first["device"], "date": first["date"], "machine": first["machine"], "gpu": first["gpu"],
        "versions": first["versions"],
        "rollout_ratio": ro.get("rollout_ratio"), "rollout_mfu": ro.get("rollout_mfu"),
        "learner_ratio": le.get("learner_ratio"), "learner_mfu": le.get("learner_mfu"),
        "learner_ratio_mode": le.get("learner_ratio_mode"),
        "ray_overhead_share": rd.get("ray_overhead_share"),
        "compile": parts.get("rollout_compile", {}).get("compile"),
        "meaning": {"rollout_ratio": "rlfh Sampler images/s over stock diffusers pipeline images/s (>1: ours faster)",
                    "learner_ratio": "rlfh LearnerEngine pairs/s over the reference DPO loop pairs/s (>1: ours faster)",
                    "*_mfu": "model FLOPs/s (FlopCounterMode) over this machine's measured dense matmul peak",
                    "ray_overhead_share": "(Ray round - in-process round) / Ray round, tiny config"},
        "settings": {k: v.get("settings") for k, v in parts.items()},
        "raw": {"rollout_rows": ro.get("rows"), "learner_rows": le.get("rows"), "round_stages": rd.get("stages"),
                "matmul_peak": (ro or le).get("matmul_peak")},
        "sources": [f"{prefix}{k}.json" for k in parts],
    }
    for k in ("rollout_ratio", "rollout_mfu", "learner_ratio", "learner_mfu", "ray_overhead_share"):
        v = summary[k]
        print(f"[summary] {k:>20}: {v:.4f}" if isinstance(v, float) else f"[summary] {k:>20}: {v}")
    common.write_result(f"{prefix}summary", summary, d)
    return summary


if __name__ == "__main__":
    main()
