"""Training curves from run directories: ``rlfh plot RUN_DIR`` and ``rlfh compare RUN_A RUN_B``.

Both read only ``RUN_DIR/metrics.jsonl`` (one JSON object per round, see :mod:`rlfh.run.metrics`) and
plot every curve a user judges a run by: each ``reward/<name>/mean``, each ``loss/*`` and
``dpo/implicit_acc``. ``compare`` overlays two runs per plot and writes a summary (final and best
value of each curve, side by side) as ``summary.md`` and ``index.html``.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from rlfh.eval.report import slug

CURVE_PATTERNS = (r"^reward/.+/mean$", r"^loss/.+$", r"^dpo/implicit_acc$")
COLORS = ("#1f77b4", "#d62728")


def is_curve(key: str) -> bool:
    return any(re.match(p, key) for p in CURVE_PATTERNS)


def lower_is_better(key: str) -> bool:
    """Losses go down; rewards and accuracies go up. Decides what "best" means in the summary."""
    return key.startswith("loss/")


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics rows of a run.

    Raises:
        FileNotFoundError: no such run directory, or no ``metrics.jsonl`` in it.
        ValueError: ``metrics.jsonl`` holds no rows, or a line is not JSON.
    """
    import json

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} an rlfh run directory (written by `rlfh train`)?")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
    if not rows:
        raise ValueError(f"{path} is empty: the run logged no rounds yet")
    return rows


def curves(rows: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (steps, values)} for every curve key; rounds where a value is missing or NaN are skipped."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", row.get("round", i))
        for k, v in row.items():
            if is_curve(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(float(step))
                ys.append(float(v))
    return dict(sorted(out.items()))


def plot_curves(runs: dict[str, dict[str, tuple[list[float], list[float]]]], out_dir: Path) -> dict[str, str]:
    """One PNG per curve key with every run that has it; returns {key: relative path}."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    keys = sorted({k for c in runs.values() for k in c})
    paths = {}
    for key in keys:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        for (label, c), color in zip(runs.items(), COLORS * len(runs)):
            if key in c:
                xs, ys = c[key]
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, color=color, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        rel = f"plots/{slug(key)}.png"
        fig.savefig(out_dir / rel)
        plt.close(fig)
        paths[key] = rel
    return paths


def summarise(runs: dict[str, dict[str, tuple[list[float], list[float]]]]) -> list[dict[str, Any]]:
    """Per curve key: each run's final and best value (best = min for losses, max otherwise)."""
    table = []
    for key in sorted({k for c in runs.values() for k in c}):
        row: dict[str, Any] = {"key": key, "best_is": "min" if lower_is_better(key) else "max"}
        for label, c in runs.items():
            ys = c.get(key, ([], []))[1]
            best = (min if lower_is_better(key) else max)(ys) if ys else None
            row[label] = {"final": ys[-1] if ys else None, "best": best, "points": len(ys)}
        table.append(row)
    return table


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def write_summary(
    table: list[dict[str, Any]], labels: list[str], plots: dict[str, str], out_dir: Path, title: str
) -> None:
    """``summary.md`` and ``index.html`` (relative links, no external resources)."""
    head = ["curve", "best is"] + [f"{lb} {w}" for lb in labels for w in ("final", "best")]
    md = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows_html = []
    for r in table:
        cells = [r["key"], r["best_is"]] + [_f(r[lb][w]) for lb in labels for w in ("final", "best")]
        md.append("| " + " | ".join(cells) + " |")
        rows_html.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    md += ["", *[f"![{k}]({p})" for k, p in plots.items()], ""]
    (out_dir / "summary.md").write_text("\n".join(md))
    e = html.escape
    page = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;margin:24px}}table{{border-collapse:collapse}}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f0f0f0}img{width:460px;margin:4px}"
        "</style></head><body>",
        f"<h1>{e(title)}</h1><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
        *rows_html,
        "</table><h2>Curves</h2>",
        *[f"<img src='{p}' alt='{e(k)}'>" for k, p in plots.items()],
        "</body></html>",
    ]
    (out_dir / "index.html").write_text("\n".join(page))


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) < len(names):  # two runs called "run": fall back to full paths
        names = [str(p) for p in run_dirs]
    return names


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path) -> Path:
    """Overlay two runs' curves and summarise final/best values; returns ``out_dir/index.html``."""
    dirs = [Path(run_a), Path(run_b)]
    labels = _labels(dirs)
    runs = {lb: curves(load_run(d)) for lb, d in zip(labels, dirs)}
    if not any(runs.values()):
        raise ValueError(f"no reward/*/mean, loss/* or dpo/implicit_acc values in {run_a} or {run_b}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(runs, out)
    write_summary(summarise(runs), labels, plots, out, f"{labels[0]} vs {labels[1]}")
    return out / "index.html"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Plot one run's curves into ``out_dir`` (default ``RUN_DIR/curves``); returns its ``index.html``."""
    run = Path(run_dir)
    label = _labels([run])[0]
    runs = {label: curves(load_run(run))}
    if not runs[label]:
        raise ValueError(f"no reward/*/mean, loss/* or dpo/implicit_acc values in {run}/metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run / "curves"
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(runs, out)
    write_summary(summarise(runs), [label], plots, out, label)
    return out / "index.html"
