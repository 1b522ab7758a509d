"""What a run is doing, from its run directory alone: ``rlfh status RUN_DIR [--json]``.

Reads only ``RUN_DIR`` (design seam 6): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the
rollout log's manifest and small columns. It works on a live run (the writer appends a line per
round and renames shards and checkpoints into place, so everything read is complete, except
possibly a last metrics line caught mid-write, which is skipped) and on a finished or stopped one.

The state is inferred, since no process writes "I am alive":

* ``finished``: a checkpoint for round ``num_rounds`` exists (it is saved before the last round's
  metrics line), or ``num_rounds`` rounds are logged;
* ``running``: ``metrics.jsonl`` changed within ``max(3 x last round's duration, 60 s)`` (before
  the first round: ``config.yaml`` written within 10 minutes, time enough to load models);
* ``stopped``: otherwise (crashed, killed or preempted; ``rlfh train RUN_DIR/config.yaml`` resumes
  from the latest checkpoint).

Rollout shards are not re-hashed here (a status must stay quick on a 100 GB log);
``rlfh rollouts inspect DIR`` verifies every checksum.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

STAGES = ("sample", "reward", "log", "pairs", "learner", "sync")
STALE_FACTOR = 3.0  # a round this many times slower than the last one means the run stopped
MIN_STALE_S = 60.0  # ... but never call a run stopped sooner (checkpoints, eval, a slow filesystem)
STARTUP_GRACE_S = 600.0  # before the first round: Ray start, model loads, DeepSpeed init
SPARK_CHARS = "▁▂▃▄▅▆▇█"
REWARD_KEY = re.compile(r"^reward/(.+)/mean$")
LOSS_KEY = re.compile(r"^loss/(.+)$")
ACC_KEY = re.compile(r"^dpo(?:/(.+))?/implicit_acc$")
MPD_KEY = re.compile(r"^mpd/weight/(.+)$")


class RunDirError(ValueError):
    """``RUN_DIR`` is missing, is not an rlfh run directory, or holds unreadable run files."""


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sparkline(values: list[float], width: int = 24) -> str:
    """Unicode sparkline of ``values``, averaged into at most ``width`` buckets; "" for no values."""
    if not values:
        return ""
    if len(values) > width:  # bucket i covers values[i*n/width : (i+1)*n/width]
        n = len(values)
        values = [_mean(values[i * n // width : (i + 1) * n // width]) for i in range(width)]
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1.0):
        return SPARK_CHARS[len(SPARK_CHARS) // 2] * len(values)
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[round((v - lo) / (hi - lo) * top)] for v in values)


def read_metrics_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``metrics.jsonl`` and warnings; a torn last line (live writer) is skipped, not an error.

    Raises:
        RunDirError: a line other than the last is not a JSON object.
    """
    from rlfh.run.metrics import MetricsFileError, read_metrics_lines

    try:
        _, rows, torn = read_metrics_lines(path, warn=False)
    except MetricsFileError as e:
        raise RunDirError(str(e)) from None
    notes = [f"{path.name}: last line is incomplete (being written?); skipped"] if torn is not None else []
    return rows, notes


def per_round(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round, the last logged winning: a resumed run re-logs rounds after its checkpoint."""
    by_round: dict[int, dict[str, Any]] = {}
    for row in rows:
        r = row.get("round", row.get("step"))
        if isinstance(r, int):
            by_round[r] = row
    return [by_round[r] for r in sorted(by_round)]


def config_summary(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The fields a reader judges a run by, from ``config.yaml``; an outdated schema still summarises."""
    import yaml

    from rlfh.config.schema import MOVED_KEYS, ConfigError, config_from_dict, to_dict

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunDirError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a mapping, got {type(data).__name__}")
    notes: list[str] = []
    try:
        data = to_dict(config_from_dict(data, str(path)))
    except ConfigError as e:  # written by another rlfh version: show what is there rather than fail
        notes.append(
            f"config.yaml does not validate with this rlfh version ({len(e.problems)} problem(s)); "
            f"showing its raw values"
        )

    def lookup(dotted: str) -> Any:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def get(dotted: str) -> Any:
        if lookup(dotted) is not None:
            return lookup(dotted)
        for old, new in MOVED_KEYS.items():  # a config.yaml from before the config was grouped by role
            if dotted == new or dotted.startswith(new + "."):
                return lookup(old + dotted[len(new) :])
        return None

    rewards = [
        {"name": e.get("name") or e.get("target"), "target": e.get("target"), "weight": e.get("weight", 1.0)}
        if isinstance(e, dict)
        else {"name": str(e), "target": str(e), "weight": 1.0}
        for e in (get("rewards") or [])
    ]
    ppr, rpp = get("rollout.prompts_per_round"), get("rollout.rollouts_per_prompt")
    return {
        "model": get("model.path"),
        "loss": get("learner.loss"),
        "beta": get("learner.dpo.beta"),
        "lora_rank": get("model.lora.rank") if get("model.lora.enabled") else None,
        "rewards": rewards,
        "regions": get("learner.regions.names"),
        "fairness": get("learner.regions.fairness.rule"),
        "num_rounds": get("num_rounds"),
        "samples_per_round": ppr * rpp if isinstance(ppr, int) and isinstance(rpp, int) else None,
        "num_rollout_actors": get("resources.num_rollout_actors"),
        "num_learner_gpus": get("resources.num_learner_gpus"),
        "num_learner_ranks": get("resources.num_learner_ranks"),
        "colocate": get("resources.colocate"),
    }, notes


def checkpoint_summary(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The latest complete checkpoint (path, round, policy version) and how many complete ones exist.

    ``checkpoints/latest`` names it; if that one is not complete, the newest complete one is shown.
    Files are not re-hashed (a full-UNet checkpoint is many GB); resuming verifies them.
    """
    from rlfh.run.checkpoints import checkpoints_root, is_complete

    root = checkpoints_root(run_dir)
    complete = sorted(p for p in root.glob("round-*") if p.is_dir() and is_complete(p)) if root.is_dir() else []
    notes: list[str] = []
    path = complete[-1] if complete else None
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in complete:
            path = named
        else:
            notes.append(f"{pointer} names {named.name}, which is not a complete checkpoint")
    if path is None:
        return None, notes
    state: dict[str, Any] = {}
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path / 'trainer_state.json'}: unreadable ({e})")
    rnd = state.get("round")
    if not isinstance(rnd, int):
        m = re.fullmatch(r"round-(\d+)", path.name)
        rnd = int(m.group(1)) if m else None
    return {
        "path": str(path),
        "name": path.name,
        "round": rnd,
        "policy_version": state.get("policy_version"),
        "count": len(complete),
    }, notes


def rollout_summary(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Record and shard counts, policy versions and per-reward missing rates of the rollout log."""
    import pyarrow.parquet as pq

    from rollouts.log import RolloutLog, RolloutLogError

    log = RolloutLog(run_dir / "rollouts")
    if not log.dir.is_dir():
        return None, []
    try:
        shards = log.manifest()["shards"]
    except RolloutLogError as e:
        return None, [str(e)]
    notes: list[str] = []
    versions: set[int] = set()
    rewards: dict[str, dict[str, Any]] = {}
    for entry in shards:
        try:  # two small columns; images and latents stay on disk
            table = pq.read_table(log.dir / entry["name"], columns=["policy_version", "rewards"])
        except Exception as e:  # pyarrow raises several types for missing or bad files
            notes.append(f"rollouts/{entry['name']}: unreadable ({e}); `rlfh rollouts inspect` checks the log")
            continue
        versions.update(table.column("policy_version").to_pylist())
        for rec in table.column("rewards").to_pylist():
            for rw in rec:
                d = rewards.setdefault(rw["name"], {"count": 0, "missing": 0, "reasons": {}})
                d["count"] += 1
                if rw["value"] is None:
                    d["missing"] += 1
                    d["reasons"][rw["reason"]] = d["reasons"].get(rw["reason"], 0) + 1
    return {
        "shards": len(shards),
        "records": sum(int(e["num_records"]) for e in shards),
        "policy_versions": [min(versions), max(versions)] if versions else None,
        "num_policy_versions": len(versions),
        "rewards": {
            n: {
                "missing_rate": d["missing"] / d["count"],
                "missing": d["missing"],
                "count": d["count"],
                "top_reason": max(d["reasons"], key=d["reasons"].get) if d["reasons"] else None,
            }
            for n, d in sorted(rewards.items())
        },
    }, notes


def curve(rows: list[dict[str, Any]], key: str, lower_is_better: bool = False) -> dict[str, Any] | None:
    """First, last and best value of ``key`` over the rounds, with the best round and a sparkline."""
    points = [(row.get("round"), _finite(row.get(key))) for row in rows]
    points = [(r, v) for r, v in points if v is not None]
    if not points:
        return None
    best_round, best = (min if lower_is_better else max)(points, key=lambda p: p[1])
    return {
        "first": points[0][1],
        "last": points[-1][1],
        "best": best,
        "best_round": best_round,
        "spark": sparkline([v for _, v in points]),
    }


def recent(rows: list[dict[str, Any]], key: str, last_n: int) -> dict[str, Any] | None:
    """Last value of ``key`` and its mean over the last ``last_n`` rounds that have it."""
    vals = [v for v in (_finite(row.get(key)) for row in rows) if v is not None]
    return {"last": vals[-1], "mean_recent": _mean(vals[-last_n:])} if vals else None


def timing_summary(rows: list[dict[str, Any]], last_n: int) -> dict[str, Any] | None:
    """Mean seconds of each stage over the last ``last_n`` rounds and its share of the round."""
    tail = rows[-last_n:]
    round_s = _mean([v for v in (_finite(r.get("time/round_s")) for r in tail) if v is not None])
    if round_s is None:
        return None
    stages = {}
    for stage in STAGES:
        mean = _mean([v for v in (_finite(r.get(f"time/{stage}_s")) for r in tail) if v is not None])
        if mean is not None:
            stages[stage] = {"mean_s": mean, "share": mean / round_s if round_s > 0 else None}
    ckpt = [v for v in (_finite(r.get("time/checkpoint_s")) for r in rows) if v is not None]
    return {
        "rounds": len(tail),
        "round_mean_s": round_s,
        "stages": stages,
        "checkpoint_mean_s": _mean(ckpt),
        "checkpoints_timed": len(ckpt),
    }


def _round_cost(row: dict[str, Any]) -> float | None:
    """Wall time a round took, including its checkpoint save (which happens after ``time/round_s``)."""
    r = _finite(row.get("time/round_s"))
    return None if r is None else r + (_finite(row.get("time/checkpoint_s")) or 0.0)


def infer_state(
    rounds_done: int, num_rounds: int | None, ckpt_round: int | None, rows: list[dict[str, Any]], age_s: float
) -> tuple[str, str]:
    """(state, reason): ``finished`` / ``running`` / ``stopped``; see the module docstring for the rule."""
    if num_rounds is not None and ((ckpt_round is not None and ckpt_round >= num_rounds) or rounds_done >= num_rounds):
        return "finished", f"all {num_rounds} rounds done"
    if not rows:
        if age_s <= STARTUP_GRACE_S:
            return "running", f"starting (config.yaml written {age_s:.0f}s ago, no round finished yet)"
        return "stopped", f"no round finished in the {age_s:.0f}s since config.yaml was written"
    cost = _round_cost(rows[-1]) or 0.0
    stale_after = max(STALE_FACTOR * cost, MIN_STALE_S)
    if age_s <= stale_after:
        return "running", f"last round logged {age_s:.0f}s ago (rounds take ~{cost:.1f}s)"
    return "stopped", f"no round logged for {age_s:.0f}s, over {stale_after:.0f}s (last round took {cost:.1f}s)"


def run_status(run_dir: str | Path, last_n: int = 5, now: float | None = None) -> dict[str, Any]:
    """Everything ``rlfh status`` shows, as a JSON-ready dict (floats finite or None).

    Args:
        run_dir: a directory written by ``rlfh train`` / ``rlfh offline-dpo``.
        last_n: rounds averaged for timings, DPO accuracy, MPD weights and the ETA.
        now: the current time (seconds since the epoch); tests pass it to pin ages.

    Raises:
        RunDirError: ``run_dir`` does not exist, has no ``config.yaml``, or its files are corrupted.
    """
    if last_n < 1:
        raise ValueError(f"last_n={last_n}: must be >= 1")
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory {run} does not exist")
    cfg_path, metrics_path = run / "config.yaml", run / "metrics.jsonl"
    if not cfg_path.is_file():
        raise RunDirError(
            f"{run} is not an rlfh run directory: no config.yaml (`rlfh train` writes it first); "
            f"give the directory named by the run's run_dir"
        )
    now = time.time() if now is None else now
    cfg, notes = config_summary(run)
    rows: list[dict[str, Any]] = []
    if metrics_path.is_file():
        rows, more = read_metrics_rows(metrics_path)
        notes += more
    rounds = per_round(rows)
    ckpt, more = checkpoint_summary(run)
    notes += more
    rollouts, more = rollout_summary(run)
    notes += more

    num_rounds = cfg["num_rounds"] if isinstance(cfg["num_rounds"], int) else None
    rounds_done = rounds[-1]["round"] + 1 if rounds else 0
    age_s = now - (metrics_path if metrics_path.is_file() else cfg_path).stat().st_mtime
    state, reason = infer_state(rounds_done, num_rounds, ckpt["round"] if ckpt else None, rounds, age_s)
    if state == "stopped":
        reason += f"; `rlfh train {cfg_path}` resumes from " + (f"round {ckpt['round']}" if ckpt else "scratch")
    costs = [c for c in (_round_cost(r) for r in rounds[-last_n:]) if c is not None]
    remaining = max(num_rounds - rounds_done, 0) if num_rounds is not None else None
    eta_s = remaining * _mean(costs) if state == "running" and costs and remaining is not None else None

    keys = sorted({k for r in rounds for k in r})
    return {
        "run_dir": str(run.resolve()),
        "state": state,
        "state_reason": reason,
        "config": cfg,
        "rounds_done": rounds_done,
        "num_rounds": num_rounds,
        "last_round_s": _round_cost(rounds[-1]) if rounds else None,
        "last_update_age_s": age_s,
        "eta_s": eta_s,
        "checkpoint": ckpt,
        "rollouts": rollouts,
        "rewards": {m.group(1): c for k in keys if (m := REWARD_KEY.match(k)) and (c := curve(rounds, k))},
        "losses": {m.group(1): c for k in keys if (m := LOSS_KEY.match(k)) and (c := curve(rounds, k, True))},
        "implicit_acc": {
            m.group(1) or "global": a for k in keys if (m := ACC_KEY.match(k)) and (a := recent(rounds, k, last_n))
        },
        "mpd_weights": {m.group(1): w for k in keys if (m := MPD_KEY.match(k)) and (w := recent(rounds, k, last_n))},
        "timing": timing_summary(rounds, last_n),
        "last_n": last_n,
        "warnings": notes,
    }
