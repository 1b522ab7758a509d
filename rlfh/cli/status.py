"""``rlfh status RUN_DIR [--json] [--last N]`` (wired in by ``rlfh.cli.main.build_parser``).

Summarises a live or finished run from its run directory alone (see :mod:`rlfh.run.status`): state,
progress and ETA, config, latest checkpoint, rollout log, reward curves, DPO implicit accuracy, MPD
weights and where the round's time goes. ``--json`` prints the same content as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

BAR_WIDTH = 20


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _config_lines(cfg: dict[str, Any]) -> list[str]:
    loss = f"{cfg['loss']}" + (f" (beta {_num(cfg['beta'])})" if cfg["loss"] and "dpo" in cfg["loss"] else "")
    adapter = f"LoRA rank {cfg['lora_rank']}" if cfg["lora_rank"] else "full UNet"
    regions = cfg["regions"] or []
    region_text = ", ".join(regions) + (f" ({cfg['fairness']})" if len(regions) > 1 and cfg["fairness"] else "")
    rewards = ", ".join(f"{r['name']} x{_num(r['weight'], 3)}" for r in cfg["rewards"]) or "-"
    gpus, ranks = cfg["num_learner_gpus"], cfg.get("num_learner_ranks")
    learner = f"learner on {gpus} GPU(s)" if gpus else "learner on CPU"
    if (ranks or max(gpus or 0, 1)) > 1:
        learner += f", {ranks or gpus} data-parallel ranks"
    where = (
        "one colocated actor (rollout and learner share a device)"
        if cfg.get("colocate")
        else f"{cfg['num_rollout_actors']} rollout actor(s)"
    )
    return [
        f"config     model {cfg['model']} | loss {loss} | {adapter} | regions {region_text}",
        f"           rewards {rewards}",
        f"           {cfg['samples_per_round']} samples/round on {where}; {learner}",
    ]


def _progress_line(st: dict[str, Any]) -> str:
    done, total = st["rounds_done"], st["num_rounds"]
    if total:
        filled = min(round(BAR_WIDTH * done / total), BAR_WIDTH)
        progress = f"{done}/{total} rounds  {'█' * filled}{'░' * (BAR_WIDTH - filled)} {100 * done / total:.0f}%"
    else:
        progress = f"{done} rounds"
    if st["last_round_s"] is not None:
        progress += f"   last round {_duration(st['last_round_s'])}"
    if st["eta_s"] is not None:
        progress += f"   ETA {_duration(st['eta_s'])}"
    return f"progress   {progress}"


def _checkpoint_line(ck: dict[str, Any] | None) -> str:
    if not ck:
        return "checkpoint none yet"
    return (
        f"checkpoint {ck['name']} (round {ck['round']}, policy version {ck['policy_version']}; "
        f"{ck['count']} kept)  {ck['path']}"
    )


def _rollout_lines(ro: dict[str, Any] | None) -> list[str]:
    if not ro:
        return ["rollouts   no rollout log"]
    pv = ro["policy_versions"]
    versions = f", policy versions {pv[0]}..{pv[1]} ({ro['num_policy_versions']})" if pv else ""
    lines = [f"rollouts   {ro['records']} records in {ro['shards']} shard(s){versions}"]
    for name, r in ro["rewards"].items():
        why = f" (mostly: {r['top_reason']})" if r["top_reason"] else ""
        lines.append(f"           {name}: {100 * r['missing_rate']:.1f}% missing{why}")
    return lines


def _curve_lines(title: str, curves: dict[str, Any]) -> list[str]:
    if not curves:
        return []
    width = max(len(n) for n in curves)
    return [f"{title:<10} first -> last, best @ round"] + [
        f"  {n:<{width}}  {_num(c['first'])} -> {_num(c['last'])}, best {_num(c['best'])} "
        f"@ {c['best_round']}  {c['spark']}"
        for n, c in curves.items()
    ]


def _recent_lines(label: str, values: dict[str, Any], n: int) -> list[str]:
    """One line of per-key last values with their mean over the last ``n`` rounds (none when empty)."""
    if not values:
        return []
    return [
        f"{label:<11}"
        + "  ".join(f"{k} {_num(v['last'], 3)} (mean last {n}: {_num(v['mean_recent'], 3)})" for k, v in values.items())
    ]


def _timing_lines(tm: dict[str, Any] | None) -> list[str]:
    if not tm:
        return []
    shares = " | ".join(f"{s} {100 * v['share']:.0f}%" for s, v in tm["stages"].items() if v["share"] is not None)
    lines = [f"time       {_duration(tm['round_mean_s'])}/round over the last {tm['rounds']}: {shares}"]
    if tm["checkpoint_mean_s"] is not None:
        lines.append(
            f"           checkpoint save {_duration(tm['checkpoint_mean_s'])} (mean of {tm['checkpoints_timed']})"
        )
    return lines


def format_status(st: dict[str, Any]) -> str:
    """The human-readable ``rlfh status`` report of a :func:`rlfh.run.status.run_status` dict."""
    lines = [f"run        {st['run_dir']}", f"state      {st['state']}: {st['state_reason']}"]
    lines += _config_lines(st["config"])
    lines.append(_progress_line(st))
    lines.append(_checkpoint_line(st["checkpoint"]))
    lines += _rollout_lines(st["rollouts"])
    lines += _curve_lines("rewards", st["rewards"]) + _curve_lines("losses", st["losses"])
    lines += _recent_lines("dpo acc", st["implicit_acc"], st["last_n"])
    lines += _recent_lines("mpd weight", st["mpd_weights"], st["last_n"])
    lines += _timing_lines(st["timing"])
    lines += [f"warning    {w}" for w in st["warnings"]]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status of ``args.run_dir``; exit 2 with a one-line error for a non-run directory."""
    from rlfh.run.status import run_status
    from rollouts.log import RolloutLogError

    try:
        st = run_status(args.run_dir, last_n=args.last)
    except (ValueError, OSError, RolloutLogError) as e:  # RunDirError is a ValueError
        print(f"rlfh: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=2, ensure_ascii=False, allow_nan=False) if args.json else format_status(st))
    return 0


def add_status_commands(subparsers: Any) -> None:
    """Add ``status`` to the ``rlfh`` subcommand parsers."""
    s = subparsers.add_parser("status", help="summarise a run (live or finished) from its run directory")
    s.add_argument("run_dir", help="the run directory (the run's run_dir: config.yaml, metrics.jsonl, ...)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    s.add_argument(
        "--last",
        type=int,
        default=5,
        metavar="N",
        help="rounds averaged for timings, DPO accuracy, MPD weights and the ETA (default 5)",
    )
    s.set_defaults(fn=cmd_status)
