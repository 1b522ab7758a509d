"""Per-round metrics to ``RUN_DIR/metrics.jsonl`` (one JSON object per line) and wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg, config_dict: dict[str, Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.logging.wandb_project,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
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
    import os

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, drop = [], []
    for ln in path.read_text().splitlines():
        if ln.strip():
            (drop if json.loads(ln).get("round", -1) >= from_round else keep).append(ln)
    if drop:
        with open(path.with_name("metrics.rolled_back.jsonl"), "a") as f:
            f.write("\n".join(drop) + "\n")
        tmp = path.with_name(f".metrics.jsonl.tmp{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return len(drop)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
