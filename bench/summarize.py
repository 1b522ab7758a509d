"""Merge the per-benchmark result files of one run into <prefix>summary.json and print the headlines.

    python bench/summarize.py [--dir bench/results] [--prefix cpu_tiny_|gpu_|smoke_]
    python bench/summarize.py --cpu-sh DIR --out OUT_DIR/cpu_summary.json   # bench/cpu.sh's summary
    python bench/summarize.py --cpu-sh DIR --family sd15 --out OUT_DIR/cpu_summary_sd15.json   # one family's
    python bench/summarize.py --gpu-sh DIR --out bench/results/gpu_summary.json   # bench/gpu.sh's summary

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


def _load_first(d: Path, names: list[str]) -> tuple[str | None, dict]:
    """(path, contents) of the first of ``names`` in ``d``; the path relative to the repository when inside it
    (a committed summary names its sources wherever the checkout is)."""
    for n in names:
        if (d / n).is_file():
            path = (d / n).resolve()
            shown = path.relative_to(common.REPO) if path.is_relative_to(common.REPO) else path
            return str(shown), json.loads(path.read_text())
    return None, {}


def _stage_times(d: Path, name: str = "stage_times.tsv") -> dict:
    out = {}
    f = d / name
    if f.is_file():
        for line in f.read_text().splitlines():
            name, secs, rc = line.split("\t")
            out[name] = {"wall_s": int(secs), "exit_code": int(rc)}
    return out


# What bench/cpu.sh requires of each family beside SDXL (issue 23).
FAMILY_TARGETS = {"rollout_lora_ratio": 0.97, "learner_ratio": 1.0}


def family_summary(d: Path, family: str) -> dict | None:
    """The headlines of one family's stages of bench/cpu.sh (rollout_<family>, learner_<family>): its
    Sampler with the merged LoRA and cached prompts against its stock pipeline without a LoRA, and its
    learner against the reference DPO loop of its diffusers script; None when neither ran."""
    src = {
        "rollout": _load_first(d, [f"cpu_tiny_{family}_rollout.json", f"smoke_{family}_rollout.json"]),
        "learner": _load_first(d, [f"cpu_tiny_{family}_learner.json", f"smoke_{family}_learner.json"]),
    }
    (_, ro), (_, le) = src["rollout"], src["learner"]
    if not (ro or le):
        return None
    first = ro or le
    heads = {
        "rollout_lora_ratio": ro.get("rollout_lora_ratio"),
        "rollout_lora_ratio_before": ro.get("rollout_lora_ratio_before"),
        "rollout_ratio": ro.get("rollout_ratio"),
        "learner_ratio": le.get("learner_ratio"),
        "learner_ratio_eager": le.get("learner_ratio_eager"),
        "learner_compiled": le.get("learner_compiled"),
    }
    met = {k: heads[k] >= v if isinstance(heads[k], float) else None for k, v in FAMILY_TARGETS.items()}
    return {
        "family": family,
        "device": first.get("device"),
        "date": first.get("date"),
        "machine": first.get("machine"),
        "versions": first.get("versions"),
        "smoke": any(p and "smoke_" in p for p, _ in src.values()),
        **heads,
        "targets": FAMILY_TARGETS,
        "targets_met": met,
        "meaning": {
            "rollout_lora_ratio": "the family's stock diffusers pipeline (no LoRA) seconds / rlfh Sampler with "
            "the merged LoRA and cached prompts seconds, batch 16, median of paired calls (>1: rlfh faster)",
            "learner_ratio": "rlfh learner pairs/s over the reference DPO loop of the family's diffusers script, "
            "lora8, 64 px, median of paired steps; rlfh compiled when learner_compiled (_eager: not)",
        },
        "settings": {k: v.get("settings") for k, (_, v) in src.items()},
        "dates": {k: v.get("date") for k, (_, v) in src.items()},
        "load_avg": {
            k: [(v.get("machine") or {}).get("load_avg_1_5_15_at_start"), v.get("machine_load_avg_at_end")]
            for k, (_, v) in src.items()
        },
        "stage_times": _stage_times(d, f"stage_times_{family}.tsv"),
        "sources": {k: p for k, (p, _) in src.items()},
        "raw": {"rollout_rows": ro.get("rows"), "learner_rows": le.get("rows")},
    }


def write_family_summary(d: Path, family: str, out: Path) -> dict:
    summary = family_summary(d, family)
    if summary is None:
        raise SystemExit(f"no {family} results (cpu_tiny_{family}_*.json, smoke_{family}_*.json) in {d}")
    print_family(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[summary] wrote {out}")
    return summary


def print_family(s: dict) -> None:
    for k in ("rollout_lora_ratio", "learner_ratio", "learner_ratio_eager"):
        v, name = s[k], f"{s['family']} {k}"
        target = f" (target >= {FAMILY_TARGETS[k]})" if k in FAMILY_TARGETS else ""
        print(f"[summary] {name:>27}: {v:.4f}{target}" if isinstance(v, float) else f"[summary] {name:>27}: {v}")


def cpu_sh_summary(d: Path, out: Path) -> dict:
    """bench/cpu.sh's summary: the five CPU headlines of one run, with machine, date and raw rows."""
    src = {
        "rollout": _load_first(d, ["cpu_tiny_rollout.json", "smoke_rollout.json"]),
        "learner": _load_first(d, ["cpu_tiny_learner.json", "smoke_learner.json"]),
        "ddpo": _load_first(d, ["cpu_tiny_ddpo.json", "smoke_ddpo.json"]),
        "reward": _load_first(d, ["cpu_reward_overhead.json", "smoke_reward_overhead.json"]),
    }
    ro, le, dd, rw = (src[k][1] for k in ("rollout", "learner", "ddpo", "reward"))
    first = next((v for _, v in src.values() if v), {})
    summary = {
        "benchmark": "cpu.sh",
        "device": first.get("device"),
        "date": first.get("date"),
        "machine": first.get("machine"),
        "versions": first.get("versions"),
        "smoke": any(p and "smoke_" in p for p, _ in src.values()),
        "rollout_lora_ratio": ro.get("rollout_lora_ratio"),
        "rollout_lora_ratio_before": ro.get("rollout_lora_ratio_before"),
        "rollout_ratio": ro.get("rollout_ratio"),
        "learner_ratio": le.get("learner_ratio"),
        "learner_ratio_large": le.get("learner_ratio_large"),
        "learner_ratio_eager": le.get("learner_ratio_eager"),
        "learner_ratio_large_eager": le.get("learner_ratio_large_eager"),
        "learner_compiled": le.get("learner_compiled"),
        "ddpo_window_speedup": dd.get("ddpo_window_speedup"),
        "reward_http_overhead_share": rw.get("reward_http_overhead_share"),
        "reward_handle_overhead_share": rw.get("reward_handle_overhead_share"),
        "meaning": {
            "rollout_lora_ratio": "stock diffusers pipeline (no LoRA) seconds / rlfh Sampler "
            "with the merged LoRA seconds, "
            "largest batch, median of paired calls (>1: rlfh faster); _before: unmerged, uncached",
            "learner_ratio": "rlfh learner pairs/s over the reference DPO loop pairs/s, lora8, 64 px, median of paired "
            "steps; rlfh with learner.engine.compile=true when learner_compiled (the loop stays eager)",
            "learner_ratio_large": "the same at the compute-bound size (settings.large_size px)",
            "learner_ratio_eager": "learner_ratio with rlfh eager (learner.engine.compile=false), same run",
            "learner_ratio_large_eager": "learner_ratio_large with rlfh eager, same run",
            "ddpo_window_speedup": "DDPO all-steps seconds / SDE-window seconds per round, median of pairs",
            "reward_http_overhead_share": "(HTTP - in-process) / in-process seconds for one batch through the reward "
            "server, FaceScore-size model, median of rounds (target < 0.10)",
        },
        "settings": {k: v.get("settings") for k, (_, v) in src.items()},
        "dates": {k: v.get("date") for k, (_, v) in src.items()},
        "load_avg": {
            k: [(v.get("machine") or {}).get("load_avg_1_5_15_at_start"), v.get("machine_load_avg_at_end")]
            for k, (_, v) in src.items()
        },
        "stage_times": _stage_times(d),
        "families": {f: s for f in common.BENCH_FAMILIES if f != "sdxl" and (s := family_summary(d, f))},
        "sources": {k: p for k, (p, _) in src.items()},
        "raw": {
            "rollout_rows": ro.get("rows"),
            "learner_rows": le.get("rows"),
            "learner_row_large": le.get("row_large"),
            "ddpo_rows": dd.get("rows"),
            "ddpo_median_s_by_phase": dd.get("median_s_by_phase"),
            "reward_rows": rw.get("rows"),
            "reward_setup_s": rw.get("setup_s"),
            "reward_ms_per_request_median": rw.get("ms_per_request_median"),
        },
    }
    for k in (
        "rollout_lora_ratio",
        "learner_ratio",
        "learner_ratio_eager",
        "learner_ratio_large",
        "learner_ratio_large_eager",
        "ddpo_window_speedup",
        "reward_http_overhead_share",
    ):
        v = summary[k]
        print(f"[summary] {k:>27}: {v:.4f}" if isinstance(v, float) else f"[summary] {k:>27}: {v}")
    for fam in summary["families"].values():
        print_family(fam)
    for k, v in summary["stage_times"].items():
        print(f"[summary] {k:>27}: {v['wall_s']} s (exit {v['exit_code']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[summary] wrote {out}")
    return summary


def gpu_sh_summary(d: Path, out: Path, family: str = "sdxl") -> dict:
    """bench/gpu.sh's summary: device, GPU name, date, rollout/learner ratios and MFU, and the raw rows; of
    ``family``'s files (gpu_*.json for SDXL, gpu_<family>_*.json beside it)."""
    prefix = "gpu_" if family == "sdxl" else f"gpu_{family}_"
    names = [f"{prefix}{k}.json" for k in ("rollout", "rollout_compile", "learner")]
    ro, co, le = (_load_first(d, [n])[1] for n in names)
    first = ro or le or co
    if not first:
        raise SystemExit(f"no gpu_*.json results in {d}")
    summary = {
        "benchmark": "gpu.sh",
        "family": family,
        "device": first.get("device"),
        "gpu": (first.get("gpu") or {}).get("name"),
        "gpu_detail": first.get("gpu"),
        "date": first.get("date"),
        "machine": first.get("machine"),
        "versions": first.get("versions"),
        "rollout_ratio": ro.get("rollout_ratio"),
        "rollout_lora_ratio": ro.get("rollout_lora_ratio"),
        "rollout_lora_ratio_before": ro.get("rollout_lora_ratio_before"),
        "rollout_mfu": ro.get("rollout_mfu"),
        "merged_vs_unmerged": ro.get("merged_vs_unmerged"),
        "compiled": co.get("compile") or ro.get("compile"),
        "learner_ratio": le.get("learner_ratio"),
        "learner_ratio_mode": le.get("learner_ratio_mode"),
        "learner_mfu": le.get("learner_mfu"),
        "meaning": {
            "rollout_ratio": "stock diffusers seconds / rlfh Sampler seconds (eager), paired median (>1: rlfh faster)",
            "rollout_lora_ratio": "stock (no LoRA) / rlfh Sampler with the merged LoRA",
            "compiled": "rlfh Sampler compiled (merged LoRA) vs eager: compile time, speedup, images vs eager",
            "learner_ratio": "rlfh learner pairs/s over the reference DPO loop, paired median",
            "*_mfu": "FlopCounterMode FLOPs/s over the measured bf16 matmul peak",
        },
        "settings": {"rollout": ro.get("settings"), "compile": co.get("settings"), "learner": le.get("settings")},
        "stage_times": _stage_times(d, f"{prefix[len('gpu_') :]}stage_times.tsv"),
        "raw": {
            "rollout_rows": ro.get("rows"),
            "learner_rows": le.get("rows"),
            "matmul_peak": (ro or le).get("matmul_peak"),
        },
        "sources": [n for n in names if (d / n).is_file()],
    }
    for k in ("gpu", "rollout_ratio", "rollout_lora_ratio", "rollout_mfu", "learner_ratio", "learner_mfu"):
        print(f"[summary] {k:>20}: {summary[k]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[summary] wrote {out}")
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=str(common.RESULTS))
    ap.add_argument("--prefix", default=None, help="default: gpu_ if gpu_rollout.json exists, else cpu_tiny_")
    ap.add_argument("--cpu-sh", default=None, metavar="DIR", help="bench/cpu.sh's per-bench results: write --out")
    ap.add_argument("--gpu-sh", default=None, metavar="DIR", help="bench/gpu.sh's per-bench results: write --out")
    ap.add_argument("--out", default=None, help="summary path for --cpu-sh / --gpu-sh")
    ap.add_argument(
        "--family", default=None, help="with --cpu-sh: that family's stages only (not sdxl); with --gpu-sh: its files"
    )
    args = ap.parse_args(argv)
    if args.cpu_sh and args.family and args.family != "sdxl":
        out = Path(args.out or Path(args.cpu_sh).parent / f"cpu_summary_{args.family}.json")
        return write_family_summary(Path(args.cpu_sh), args.family, out)
    if args.cpu_sh:
        return cpu_sh_summary(Path(args.cpu_sh), Path(args.out or Path(args.cpu_sh).parent / "cpu_summary.json"))
    if args.gpu_sh:
        fam = args.family or "sdxl"
        default = "gpu_summary.json" if fam == "sdxl" else f"gpu_{fam}_summary.json"
        return gpu_sh_summary(Path(args.gpu_sh), Path(args.out or common.RESULTS / default), fam)
    d = Path(args.dir)
    prefix = args.prefix or ("gpu_" if (d / "gpu_rollout.json").is_file() else "cpu_tiny_")
    parts = {
        k: json.loads((d / f"{prefix}{k}.json").read_text())
        for k in ("rollout", "rollout_compile", "learner", "round")
        if (d / f"{prefix}{k}.json").is_file()
    }
    if not parts:
        raise SystemExit(f"no {prefix}*.json results in {d}")
    first = next(iter(parts.values()))
    ro, le, rd = parts.get("rollout", {}), parts.get("learner", {}), parts.get("round", {})
    summary = {
        "device": first["device"],
        "date": first["date"],
        "machine": first["machine"],
        "gpu": first["gpu"],
        "versions": first["versions"],
        "rollout_ratio": ro.get("rollout_ratio"),
        "rollout_mfu": ro.get("rollout_mfu"),
        "learner_ratio": le.get("learner_ratio"),
        "learner_mfu": le.get("learner_mfu"),
        "learner_ratio_mode": le.get("learner_ratio_mode"),
        "ray_overhead_share": rd.get("ray_overhead_share"),
        "compile": parts.get("rollout_compile", {}).get("compile"),
        "meaning": {
            "rollout_ratio": "rlfh Sampler images/s over stock diffusers pipeline images/s (>1: ours faster)",
            "learner_ratio": "rlfh LearnerEngine pairs/s over the reference DPO loop pairs/s (>1: ours faster)",
            "*_mfu": "model FLOPs/s (FlopCounterMode) over this machine's measured dense matmul peak",
            "ray_overhead_share": "(Ray round - in-process round) / Ray round, tiny config",
        },
        "settings": {k: v.get("settings") for k, v in parts.items()},
        "raw": {
            "rollout_rows": ro.get("rows"),
            "learner_rows": le.get("rows"),
            "round_stages": rd.get("stages"),
            "matmul_peak": (ro or le).get("matmul_peak"),
        },
        "sources": [f"{prefix}{k}.json" for k in parts],
    }
    for k in ("rollout_ratio", "rollout_mfu", "learner_ratio", "learner_mfu", "ray_overhead_share"):
        v = summary[k]
        print(f"[summary] {k:>20}: {v:.4f}" if isinstance(v, float) else f"[summary] {k:>20}: {v}")
    common.write_result(f"{prefix}summary", summary, d)
    return summary


if __name__ == "__main__":
    main()
