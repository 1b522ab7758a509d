"""Human evaluation: model A against model B as people judge them, blind.

``rlfh eval CONFIG --model A --baseline-model/--baseline-lora B --human-pairs DIR`` samples both
models on the same (prompt, seed) pairs (:func:`rlfh.eval.evaluate.evaluate`) and then
:func:`write_human_pairs` writes them to DIR as a rollout log, one group of two images per
(prompt, seed), in a random order per pair under random rollout ids; which image came from which
model is kept in ``DIR/sides.json``, a file the labeling page never reads. People label it with
``rlfh label DIR --mode win-tie-lose``; :func:`human_eval_report` (``rlfh eval-human DIR``) then
reads the labels through the mapping. On any other labeled log ``rlfh eval-human`` reports the
labelers' agreement and each reward's (:func:`labels_report`, rlfh/labeling/agreement.py).

Rates: each pair weighs the same whatever the number of labelers who judged it: per pair, the
shares of its labels that say the model won, tied or lost; a rate is their mean over the labeled
pairs, with a percentile-bootstrap 95% interval over pairs (:func:`rlfh.eval.evaluate.bootstrap_ci`),
so the labels of one pair, which are not independent, move together. ``win_rate`` counts a tie as
half a win, as the automatic win rates do.

Agreement: Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many raters") over
the pairs judged by two or more labelers, categories model / tie / baseline:

    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)),   p_j = sum_i n_ij / sum_i n_i,
    kappa = (mean_i P_i - sum_j p_j^2) / (1 - sum_j p_j^2)

with n_ij the labelers who put pair i in category j and n_i = sum_j n_ij. With the same number of
labelers per pair this is Fleiss' own statistic; with unequal numbers each pair's agreement P_i is
still its share of agreeing labeler pairs.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlfh.labeling.agreement import format_agreement, reward_agreement

SIDES_NAME = "sides.json"
SIDES_FORMAT = "rlfh-human-pairs"
CATEGORIES = ("model", "tie", "baseline")  # who the label says is better


def check_pairs_dir(pairs_dir: str | Path) -> Path:
    """The folder ``--human-pairs`` writes to: new or empty (checked before the slow sampling)."""
    path = Path(pairs_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"--human-pairs {path}: exists and is not an empty folder; pick a new one")
    return path


def _record(rid: str, index: int, sample: dict, side: dict, image: bytes, settings: dict) -> dict[str, Any]:
    import time

    return {
        "rollout_id": rid,
        "round": index,  # one group per (prompt, seed)
        "policy_version": 0,
        "staleness": None,
        "model_id": "",  # blind: the log does not say which model made the image
        "prompt": sample["prompt"],
        "negative_prompt": settings.get("negative_prompt") or "",
        "seed": int(sample["seed"]),
        "sampler": {k: settings[k] for k in ("num_inference_steps", "guidance_scale", "height", "width", "eta")},
        "latent": None,  # evaluation keeps images only; these pairs are for people, not for DPO
        "latent_shape": None,
        "image": image,
        "rewards": [
            {"name": n, "value": v, "reason": (side.get("reasons") or {}).get(n)} for n, v in side["scores"].items()
        ],
        "regions": [
            {"region": region, "x1": d["box"][0], "y1": d["box"][1], "x2": d["box"][2], "y2": d["box"][3],
             "confidence": d.get("confidence"), "label": d.get("label")}
            for region, dets in (side.get("regions") or {}).items()
            for d in dets
        ],
        "created_at": time.time(),
    }  # fmt: skip


def write_human_pairs(eval_dir: str | Path, pairs_dir: str | Path, seed: int | None = None) -> Path:
    """The model-vs-baseline pairs of an evaluation (``eval_dir/eval.json``) as a blind rollout log in
    ``pairs_dir`` plus its hidden ``sides.json``; returns ``pairs_dir``. ``seed`` fixes the sides' order
    (None: fresh randomness, so nobody can work the order out from the seed)."""
    from rollouts.fileio import atomic_write_bytes
    from rollouts.log import RolloutLog

    eval_dir, out = Path(eval_dir), check_pairs_dir(pairs_dir)
    summary = json.loads((eval_dir / "eval.json").read_text())
    if "baseline" not in summary.get("models", {}):
        raise ValueError("--human-pairs compares two models: give --baseline-model and/or --baseline-lora")
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(64))
    records, sides = [], {}
    for sample in summary["samples"]:
        order = ["model", "baseline"] if rng.random() < 0.5 else ["baseline", "model"]
        for side in order:
            rid = secrets.token_hex(8) if seed is None else f"{rng.integers(1 << 62):016x}"
            sides[rid] = side
            image = (eval_dir / sample[side]["image"]).read_bytes()
            records.append(_record(rid, sample["index"], sample, sample[side], image, summary["settings"]))
    out.mkdir(parents=True, exist_ok=True)
    RolloutLog(out).append(records)
    mapping = {"format": SIDES_FORMAT, "version": 1, "models": summary["models"], "sides": sides}
    atomic_write_bytes(out / SIDES_NAME, json.dumps(mapping, indent=1).encode())
    return out


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of a (pairs, categories) table of label counts (module docstring); pairs with fewer
    than two labels are left out. None when no pair has two labels or every label is in one category."""
    n = np.asarray(counts, dtype=np.float64)
    n = n[n.sum(axis=1) >= 2]
    if not len(n):
        return None
    n_i = n.sum(axis=1)
    p_i = ((n**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_j = n.sum(axis=0) / n_i.sum()
    p_e = float((p_j**2).sum())
    if p_e >= 1.0:
        return None
    return float((p_i.mean() - p_e) / (1.0 - p_e))


def _rate(values: Sequence[float]) -> dict[str, Any]:
    from rlfh.stats import bootstrap_ci

    ci = bootstrap_ci(values)
    return {"rate": float(np.mean(values)), "ci95": None if ci is None else list(ci)}


def _outcomes(pairs_dir: Path) -> tuple[dict, dict[str, dict[str, str]]]:
    """(sides.json, {pair's task key: {labeler: category}}), each labeler's last label of a pair."""
    from rlfh.labeling.table import LabelsTable

    path = pairs_dir / SIDES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a human-evaluation folder (write one with rlfh eval --human-pairs)")
    mapping = json.loads(path.read_text())
    if mapping.get("format") != SIDES_FORMAT:
        raise ValueError(f"{path}: format {mapping.get('format')!r}, expected {SIDES_FORMAT!r}")
    sides = mapping["sides"]
    by_pair: dict[str, dict[str, str]] = {}
    for lab in LabelsTable(pairs_dir).labels():
        if not all(r in sides for r in lab.records):
            raise ValueError(f"{pairs_dir}: label {lab.id} names records that {path} does not map")
        by_pair.setdefault(lab.task, {})[lab.labeler] = "tie" if lab.tie else sides[lab.winner]
    return mapping, by_pair


def human_eval_report(pairs_dir: str | Path) -> dict[str, Any]:
    """Win / tie / lose rates of the model against the baseline, their intervals, and the agreement."""
    pairs_dir = Path(pairs_dir)
    mapping, by_pair = _outcomes(pairs_dir)
    n_pairs = len(mapping["sides"]) // 2
    if not by_pair:
        raise ValueError(f"{pairs_dir}: no labels yet; label it with rlfh label {pairs_dir} --mode win-tie-lose")
    counts = np.array([[list(v.values()).count(c) for c in CATEGORIES] for v in by_pair.values()], np.float64)
    shares = counts / counts.sum(axis=1, keepdims=True)
    multi = counts[counts.sum(axis=1) >= 2]
    labelers = sorted({name for v in by_pair.values() for name in v})
    return {
        "models": mapping["models"],
        "pairs": n_pairs,
        "labeled_pairs": len(by_pair),
        "labels": int(counts.sum()),
        "labelers": {name: sum(name in v for v in by_pair.values()) for name in labelers},
        "model_wins": _rate(shares[:, 0]),
        "ties": _rate(shares[:, 1]),
        "model_loses": _rate(shares[:, 2]),
        "win_rate": _rate(shares[:, 0] + 0.5 * shares[:, 1]),
        "agreement": {
            "fleiss_kappa": fleiss_kappa(counts),
            "pairs_with_several_labelers": len(multi),
            "reason": None if len(multi) else "no pair was labeled by two or more labelers",
        },
        "rewards": reward_agreement(pairs_dir),
        "ci_method": "percentile bootstrap over pairs, 95%",
    }


def labels_report(log_dir: str | Path) -> dict[str, Any]:
    """A labeled rollout log that is not a human evaluation: who labeled what, the labelers' agreement on
    the two-image tasks (Fleiss' kappa, categories: first shown / tie / second shown) and each reward's."""
    from rlfh.labeling.agreement import latest_labels
    from rlfh.labeling.table import LabelsTable

    labels = latest_labels(LabelsTable(log_dir))
    if not labels:
        raise ValueError(f"{log_dir}: no labels yet; label it with rlfh label {log_dir}")
    by_task: dict[str, list[str]] = {}
    for lab in labels:
        if len(lab.records) == 2:
            by_task.setdefault(lab.task, []).append(
                "tie" if lab.tie else ("first" if lab.winner == lab.records[0] else "second")
            )
    counts = np.array([[v.count(c) for c in ("first", "tie", "second")] for v in by_task.values()], np.float64)
    several = int((counts.sum(axis=1) >= 2).sum()) if len(counts) else 0
    return {
        "labels": len(labels),
        "ties": sum(lab.tie for lab in labels),
        "labelers": {n: sum(lab.labeler == n for lab in labels) for n in sorted({lab.labeler for lab in labels})},
        "agreement": {
            "fleiss_kappa": fleiss_kappa(counts) if len(counts) else None,
            "pairs_with_several_labelers": several,
            "reason": None if several else "no two-image task was labeled by two or more labelers",
        },
        "rewards": reward_agreement(log_dir),
    }


def format_report(report: dict[str, Any]) -> str:
    def line(name: str, r: dict) -> str:
        ci = "" if r["ci95"] is None else f"  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        return f"  {name:<12} {r['rate']:.3f}{ci}"

    models = report["models"]
    return "\n".join(
        [
            f"model {models['model']['label']} vs baseline {models['baseline']['label']}: "
            f"{report['labeled_pairs']} of {report['pairs']} pairs labeled, {report['labels']} labels by "
            + ", ".join(f"{k} ({v})" for k, v in report["labelers"].items()),
            line("model wins", report["model_wins"]),
            line("ties", report["ties"]),
            line("model loses", report["model_loses"]),
            line("win rate", report["win_rate"]) + "  (ties count half)",
            _kappa_line(report),
            *format_agreement(report["rewards"]),
        ]
    )


def _kappa_line(report: dict[str, Any]) -> str:
    ag = report["agreement"]
    kappa = "n/a" if ag["fleiss_kappa"] is None else f"{ag['fleiss_kappa']:.3f}"
    return f"  Fleiss' kappa {kappa} over {ag['pairs_with_several_labelers']} pairs with several labelers" + (
        f" ({ag['reason']})" if ag["reason"] else ""
    )


def format_labels_report(report: dict[str, Any]) -> str:
    who = ", ".join(f"{k} ({v})" for k, v in report["labelers"].items())
    return "\n".join(
        [f"{report['labels']} labels ({report['ties']} ties) by {who}", _kappa_line(report),
         *format_agreement(report["rewards"])]
    )  # fmt: skip
