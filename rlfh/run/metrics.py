"""Per-round metrics to ``RUN_DIR/metrics.jsonl`` (one JSON object per line) and wandb."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any


class MetricsFileError(ValueError):
    """``metrics.jsonl`` has a damaged line that is not the last (a crash tears only the last one)."""


def read_metrics_lines(path: Path, warn: bool = True) -> tuple[list[str], list[dict[str, Any]], str | None]:
    """The good lines of a metrics file, their rows, and its torn last line (None when there is none).

    A crash in the middle of :meth:`MetricsLogger.log` leaves a partial LAST line: that line is
    dropped with a warning naming the file. A bad line anywhere else is corruption, and an error
    naming the file and line, since silently skipping rows there would hide lost rounds.
    """
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    good: list[str] = []
    rows: list[dict[str, Any]] = []
    torn = None
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            if i == len(lines):
                torn = ln
                continue
            raise MetricsFileError(
                f"{path}:{i}: not a JSON object ({e}); the metrics file is corrupted "
                f"(only its last line can be torn by a crash). Fix or delete that line"
            ) from None
        good.append(ln)
        rows.append(row)
    if torn is not None and warn:  # an observer of a live run (rlfh status) sees a line being written
        warnings.warn(
            f"{path}: dropping the torn last line {torn[:60]!r}{'...' if len(torn) > 60 else ''} "
            f"(a write interrupted by a crash); the rows before it are kept"
        )
    return good, rows, torn


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def wandb_mode(cfg) -> str:
    """The one rule for the wandb mode: ``logging.wandb_mode`` when the config sets it, else
    ``$WANDB_MODE``, which rlfh sets to ``offline`` unless the user did (:mod:`rlfh.env`). So
    ``WANDB_MODE=online rlfh train ...`` syncs, and a config that says ``offline`` stays offline."""
    return cfg.logging.wandb_mode or os.environ.get("WANDB_MODE") or "offline"


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg, config_dict: dict[str, Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            good, _, torn = read_metrics_lines(self.path)
            if torn is not None:  # appending after a torn line would glue the next row onto it
                _rewrite(self.path, good)
        self._file = open(self.path, "a")
        self._wandb = None
        mode = wandb_mode(cfg)
        if cfg.logging.wandb and mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.logging.wandb_project,
                dir=str(run_dir),
                mode=mode,
                config=config_dict,
                name=Path(run_dir).name,
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """An image file (already in the run directory) to wandb as well."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def rollback(self, from_round: int) -> int:
        """:func:`rollback_metrics` while open (a learner restarted inside the run redoes those rounds):
        the file is closed first, since the rollback replaces it, and appended to again after."""
        self._file.close()
        try:
            return rollback_metrics(self.path.parent, from_round)
        finally:
            self._file = open(self.path, "a")

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def rollback_metrics(run_dir: str | Path, from_round: int) -> int:
    """Drop rows of rounds >= ``from_round`` from metrics.jsonl (kept in metrics.rolled_back.jsonl).

    A resumed run redoes those rounds; without this its metrics would hold them twice.
    Returns the number of rows moved.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines, rows, torn = read_metrics_lines(path)
    keep, drop = [], []
    for ln, row in zip(lines, rows):
        (drop if row.get("round", -1) >= from_round else keep).append(ln)
    if drop:
        with open(path.with_name("metrics.rolled_back.jsonl"), "a") as f:
            f.write("\n".join(drop) + "\n")
    if drop or torn is not None:
        _rewrite(path, keep)
    return len(drop)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``RUN_DIR/metrics.jsonl``.

    A torn last line is dropped with a warning (see :func:`read_metrics_lines`)."""
    return read_metrics_lines(Path(run_dir) / "metrics.jsonl")[1]
