"""Evaluate a model (and optionally compare it with a baseline) on a fixed, seeded prompt set.

    summary = evaluate(cfg, ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", lora="runs/x"),
                       baseline=ModelSpec("stabilityai/stable-diffusion-xl-base-1.0"),
                       prompts=load_prompt_set("human"), seeds=[0, 1, 2, 3], out_dir="runs/x/eval")

Every (prompt, seed) pair is sampled by both models with the SAME seed and the config's rollout
settings, and scored by the config's ``rewards:``. Per reward the summary gives the mean with a 95%
percentile-bootstrap confidence interval, the rate of "not computable" images with their reasons
(no face, no hand, ...), per-region "no detection" rates, and, with a baseline, the win rate of the
model over the baseline on the same (prompt, seed): ties count half, and pairs where either image
has no value are excluded from the rate and counted by cause. Rewards are "higher is better" (the
learner maximises them), so a win is a strictly higher value.

Collapse and hacking metrics per model (``collapse``, :mod:`rlfh.eval.diversity`): the face
identity similarity across seeds and prompts, the image diversity within a prompt, and the
held-out reward gap (training prompts minus the evaluated prompts, when ``train_prompts`` are given).

Outputs in ``out_dir``: ``eval.json`` (the summary, including every sample's scores and regions),
``images/<side>/NNNN.png`` and, unless disabled, the HTML report of :mod:`rlfh.eval.report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlfh.eval.prompt_sets import PROMPT_SETS, PromptSet, load_prompt_set, load_prompt_table  # noqa: F401 (API)
from rlfh.run.checkpoints import load_lora_into, resolve_lora
from rlfh.stats import CI_LEVEL, N_BOOTSTRAP, bootstrap_ci  # noqa: F401 (bootstrap_ci: API)

CI_METHOD = f"percentile bootstrap over images, {N_BOOTSTRAP} resamples, seed 0, {int(CI_LEVEL * 100)}% level"
COMBINED = "combined"  # key of the weighted sum of all rewards (ScoredBatch.combined)


@dataclass(frozen=True)
class ModelSpec:
    """One model under evaluation: a pipeline path or hub id, plus an optional LoRA.

    Attributes:
        path: anything ``model.path`` accepts (folder, hub id, single file, ``rlfh:tiny-sdxl``).
        lora: a diffusers-format LoRA: a checkpoint folder, its ``.safetensors`` file, or a run
            directory / ``checkpoints`` folder (its ``latest`` checkpoint is used).
        negative_prompt: this model's own negative prompt in place of ``rollout.negative_prompt``
            (FaceScore's "SDXL-Neg" baseline: the base model with a negative prompt); it acts only
            under classifier-free guidance (``rollout.guidance_scale > 1``).
    """

    path: str
    lora: str | None = None
    negative_prompt: str | None = None

    @property
    def label(self) -> str:
        label = f"{self.path} + LoRA {self.lora}" if self.lora else self.path
        return label if self.negative_prompt is None else f"{label}, negative prompt {self.negative_prompt!r}"


# ------------------------------------------------------------------------------------------
# Prompt sets: rlfh.eval.prompt_sets
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Statistics (pure numpy; the unit tests call these directly)
# ------------------------------------------------------------------------------------------


def value_stats(values: Sequence[float | None], reasons: Sequence[str | None]) -> dict[str, Any]:
    """Mean, 95% CI, std and not-computable rate with reasons for one reward on one model."""
    valid = [float(v) for v in values if v is not None]
    ci = bootstrap_ci(valid)
    n = len(values)
    missing = Counter(r or "no reason given" for v, r in zip(values, reasons) if v is None)
    return {
        "n": n,
        "n_valid": len(valid),
        "mean": float(np.mean(valid)) if valid else None,
        "std": float(np.std(valid, ddof=1)) if len(valid) > 1 else None,
        "ci_low": ci[0] if ci else None,
        "ci_high": ci[1] if ci else None,
        "not_computable_rate": (n - len(valid)) / n if n else None,
        "not_computable": dict(missing.most_common()),
    }


def win_rate(model: Sequence[float | None], baseline: Sequence[float | None]) -> dict[str, Any]:
    """Win rate of ``model`` over ``baseline`` on paired images; ties half, missing pairs excluded."""
    if len(model) != len(baseline):
        raise ValueError(f"win rate needs paired values, got {len(model)} and {len(baseline)}")
    outcomes: list[float] = []
    excluded = Counter()
    for a, b in zip(model, baseline):
        if a is None or b is None:
            excluded[
                "both_missing" if a is None and b is None else "model_missing" if a is None else "baseline_missing"
            ] += 1
            continue
        outcomes.append(1.0 if a > b else 0.5 if a == b else 0.0)
    ci = bootstrap_ci(outcomes)
    return {
        "n_pairs": len(model),
        "n_compared": len(outcomes),
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
        "win_rate": float(np.mean(outcomes)) if outcomes else None,
        "ci_low": ci[0] if ci else None,
        "ci_high": ci[1] if ci else None,
        "excluded": sum(excluded.values()),
        "excluded_by_cause": {k: excluded[k] for k in ("model_missing", "baseline_missing", "both_missing")},
    }


def region_rates(regions: Sequence[dict[str, list]]) -> dict[str, dict[str, Any]]:
    """Per region name: images where a reward looked for it, and the rate where none was found."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({k for r in regions for k in r}):
        checked = [r[name] for r in regions if name in r]
        none = sum(1 for dets in checked if not dets)
        out[name] = {"checked": len(checked), "no_detection": none, "no_detection_rate": none / len(checked)}
    return out


# ------------------------------------------------------------------------------------------
# Sampling and scoring
# ------------------------------------------------------------------------------------------


def sample_images(
    cfg,
    spec: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "sampling",
    guidance=None,
) -> np.ndarray:
    """Sample one image per (prompt, seed) with ``cfg.rollout``'s settings; uint8 (N, H, W, 3). ``guidance``: a
    :class:`rollouts.guidance.ScoreGuidance` guiding every step (:func:`score_guidance`), or None."""
    import gc

    import torch
    from tqdm import tqdm

    from families import load_pipeline
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    lora = resolve_lora(spec.lora) if spec.lora else None  # fail before the (slow) model load
    # the config's model.family names its model.path's family; a model compared with it may be another's
    family = cfg.model.family if spec.path == cfg.model.path else None
    pipe = load_pipeline(dataclasses.replace(cfg.model, path=spec.path, family=family), device=device)
    if lora is not None:
        load_lora_into(pipe, lora)
        if cfg.model.hcp.enabled and cfg.model.hcp.mode == "residual":  # the layer is part of the trained model
            from rlfh.learner.hcp import load_hcp_into

            load_hcp_into(pipe, lora, cfg.model.hcp)
    rc = cfg.rollout
    negative = rc.negative_prompt if spec.negative_prompt is None else spec.negative_prompt
    settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, negative, rc.height, rc.width, rc.eta)
    sampler = Sampler(pipe, model_id=spec.label)
    chunks = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = sampler.sample(prompts[i : i + batch_size], seeds[i : i + batch_size], settings, guidance=guidance)
        chunks.append(batch.images)
    del sampler, pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return np.concatenate(chunks)


def score_guidance(cfg, reward_set):
    """``rollout.score_guidance`` as a :class:`rollouts.guidance.ScoreGuidance` on the named FaceScore reward of
    ``reward_set`` (FaceScore's sampling guidance), or None when it is off."""
    sg = cfg.rollout.score_guidance
    if not sg.enabled:
        return None
    from rollouts.guidance import ScoreGuidance

    reward = next(r.reward for r in reward_set.rewards if r.name == sg.reward)
    return ScoreGuidance(reward.guide(), sg.mu, sg.clamp)


def score_images(
    reward_set,
    images: np.ndarray,
    prompts: Sequence[str],
    batch_size: int,
    progress: bool = True,
    desc: str = "scoring",
):
    """Score in batches with every configured reward; returns one :class:`ScoredBatch` for all images."""
    from tqdm import tqdm

    from rewards.composite import ScoredBatch

    results: dict[str, list] = {n: [] for n in reward_set.names}
    scored = None
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
        scored = reward_set(images[i : i + batch_size], list(prompts[i : i + batch_size]))
        for n, res in scored.results.items():
            results[n].extend(res)
    return ScoredBatch(results=results, weights=scored.weights, regions_of=scored.regions_of)


def _side_record(scored, index: int) -> dict[str, Any]:
    regions = scored.regions(index)
    return {
        "scores": {n: res[index].value for n, res in scored.results.items()},
        "reasons": {n: res[index].reason for n, res in scored.results.items() if res[index].value is None},
        "combined": scored.combined()[index],
        "regions": {k: [d.to_json() for d in v] for k, v in regions.items()},
    }


def _side_stats(scored) -> dict[str, Any]:
    stats = {n: value_stats([r.value for r in res], [r.reason for r in res]) for n, res in scored.results.items()}
    comb = scored.combined()
    stats[COMBINED] = value_stats(
        comb, [None if v is not None else "a weighted reward is not computable" for v in comb]
    )
    return stats


def collapse_stats(reward_set, images: np.ndarray, prompts: Sequence[str], scored, train_scored=None) -> dict[str, Any]:
    """Collapse and hacking metrics of one model's images (:mod:`rlfh.eval.diversity`):
    ``face_identity_sim`` (faces across seeds and prompts, embedded by a configured reward's model),
    ``image_diversity`` (within a prompt, across seeds) and ``reward_gap`` (combined reward on the
    training prompts ``train_scored`` minus on these prompts; None with the reason without them)."""
    from rlfh.eval.diversity import face_lists, face_similarity_from, image_diversity, reward_gap

    faces = face_lists([scored.regions(i) for i in range(len(scored))])
    gap = (
        reward_gap(train_scored.combined(), scored.combined())
        if train_scored is not None
        else {"value": None, "reason": "no training prompts were sampled (rlfh eval --train-prompts K)"}
    )
    return {
        "face_identity_sim": face_similarity_from(reward_set.face_embeddings(images, faces)),
        "image_diversity": image_diversity(images, prompts),
        "reward_gap": gap,
    }


def _sample_and_score(ctx: "_EvalRun", side: str, spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """One model: sample the evaluation pairs (and the training prompts), save the images, score;
    returns its :class:`ScoredBatch` and its collapse metrics."""
    from PIL import Image

    images = ctx.sample(spec, ctx.prompts, ctx.seeds, f"sampling {side}")
    (ctx.out / "images" / side).mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(ctx.out / "images" / side / f"{i:04d}.png")
    scored = ctx.score(images, ctx.prompts, f"scoring {side}")
    train_scored = None
    if ctx.train_prompts:  # the same seeds on the training prompts: the held-out reward gap
        train_images = ctx.sample(spec, ctx.train_prompts, ctx.train_seeds, f"sampling {side} (training prompts)")
        train_scored = ctx.score(train_images, ctx.train_prompts, f"scoring {side} (training prompts)")
    return scored, collapse_stats(ctx.reward_set, images, ctx.prompts, scored, train_scored)


@dataclass
class _EvalRun:
    """What every side of one evaluation shares: the flattened (prompt, seed) pairs and the settings."""

    cfg: Any
    reward_set: Any
    out: Path
    prompts: list[str]
    seeds: list[int]
    train_prompts: list[str]
    train_seeds: list[int]
    batch_size: int
    device: str
    progress: bool
    guidance: Any = None  # rollout.score_guidance on this run's FaceScore reward, the same for every side

    def sample(self, spec: ModelSpec, prompts: Sequence[str], seeds: Sequence[int], desc: str) -> np.ndarray:
        return sample_images(
            self.cfg,
            spec,
            prompts,
            seeds,
            self.batch_size,
            self.device,
            self.progress,
            desc=desc,
            guidance=self.guidance,
        )

    def score(self, images: np.ndarray, prompts: Sequence[str], desc: str):
        return score_images(self.reward_set, images, prompts, self.batch_size, self.progress, desc=desc)


def _values(scored, name: str) -> list[float | None]:
    return scored.combined() if name == COMBINED else [r.value for r in scored.results[name]]


def reward_entries(names: Sequence[str], scored_by_side: dict[str, Any]) -> dict[str, Any]:
    """Per reward (and ``combined``): region, weight, per-side statistics (with FairHuman's
    detection-weighted mean for region rewards) and, with a baseline, the win rate."""
    from rlfh.eval.region_metrics import detection_weighted_mean

    first = scored_by_side["model"]
    stats = {side: _side_stats(sc) for side, sc in scored_by_side.items()}
    rewards: dict[str, Any] = {}
    for name in [*names, COMBINED]:
        region = first.regions_of.get(name, "all")
        entry: dict[str, Any] = {"region": region, "weight": first.weights.get(name)}
        for side, sc in scored_by_side.items():
            entry[side] = stats[side][name]
            if region not in ("global", "all"):
                entry[side]["detection_weighted"] = detection_weighted_mean(sc.results[name], region)
        if "baseline" in scored_by_side:
            entry["win_rate"] = win_rate(_values(first, name), _values(scored_by_side["baseline"], name))
        rewards[name] = entry
    return rewards


def _style_summary(styles: Sequence[str], names: Sequence[str], scored_by_side: dict[str, Any]) -> dict[str, Any]:
    from rlfh.eval.region_metrics import by_style

    values = {side: {n: _values(sc, n) for n in [*names, COMBINED]} for side, sc in scored_by_side.items()}
    return by_style(
        styles, values, lambda v: value_stats(v, ["not computable" if x is None else None for x in v]), win_rate
    )


def _size_drift(scored_by_side: dict[str, Any], image_hw: tuple[int, int]) -> dict[str, Any]:
    from rlfh.eval.region_metrics import region_sources, size_drift, source_regions

    sources: dict[str, str] = {}
    for sc in scored_by_side.values():  # a region seen only in the baseline's images still has a source
        for region, name in region_sources(sc).items():
            sources.setdefault(region, name)
    regions = {side: [source_regions(sc, i, sources) for i in range(len(sc))] for side, sc in scored_by_side.items()}
    drift = size_drift(regions, image_hw)
    return {region: {"source": sources[region], **entry} for region, entry in drift.items()}


def build_summary(
    ctx: _EvalRun,
    sides: dict[str, ModelSpec],
    scored_by_side: dict[str, Any],
    collapse: dict[str, Any],
    meta: dict[str, Any],
    styles: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``eval.json`` summary of sampled and scored sides; ``meta`` holds the prompt-set fields,
    ``styles`` one style per image (None: the prompt set has none)."""
    names = ctx.reward_set.names
    samples = []
    for i, (p, s) in enumerate(zip(ctx.prompts, ctx.seeds)):
        rec: dict[str, Any] = {"index": i, "prompt": p, "seed": s}
        if styles:
            rec["style"] = styles[i]
        for side, sc in scored_by_side.items():
            rec[side] = {"image": f"images/{side}/{i:04d}.png", **_side_record(sc, i)}
        samples.append(rec)
    rc = ctx.cfg.rollout
    settings = {k: getattr(rc, k) for k in ("num_inference_steps", "guidance_scale", "negative_prompt")}
    settings.update(height=rc.height, width=rc.width, eta=rc.eta)
    settings["score_guidance"] = dataclasses.asdict(rc.score_guidance) if rc.score_guidance.enabled else None
    return {  # the key order is the reading order of eval.json
        **meta,
        "num_images_per_model": len(ctx.prompts),
        "settings": settings,
        "ci_method": CI_METHOD,
        "win_rule": "model wins when its value is strictly higher; ties count 0.5; pairs with a missing value excluded",
        "models": {
            side: {"path": spec.path, "lora": spec.lora, "negative_prompt": spec.negative_prompt, "label": spec.label}
            for side, spec in sides.items()
        },
        "rewards": reward_entries(names, scored_by_side),
        "regions": {side: region_rates([sc.regions(i) for i in range(len(sc))]) for side, sc in scored_by_side.items()},
        "region_size": _size_drift(scored_by_side, (rc.height, rc.width)),
        "styles": _style_summary(styles, names, scored_by_side) if styles else None,
        "collapse": collapse,
        "samples": samples,
    }


def evaluate(
    cfg,
    model: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    baseline: ModelSpec | None = None,
    prompt_set: str = "",
    batch_size: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    report: bool = True,
    train_prompts: Sequence[str] = (),
    styles: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Sample, score, summarise and write ``eval.json`` (+ images and the HTML report).

    Args:
        cfg: a :class:`rlfh.config.schema.Config`; ``model`` (dtype, vae), ``rollout`` (sampling settings)
            and ``rewards`` are used.
        model: the model under evaluation.
        prompts: the prompt set; every prompt is sampled at every seed.
        seeds: the seeds, shared by both models.
        out_dir: where outputs go (created).
        baseline: the model to compare with, on the same (prompt, seed) pairs; its own
            ``negative_prompt`` gives FaceScore's "SDXL-Neg" baseline.
        prompt_set: the set's name or file, recorded in the summary.
        batch_size: images per sampling/scoring batch (default ``rollout.sample_batch_size_per_actor``).
        device: torch device for the pipelines.
        progress: show progress bars.
        report: also write the HTML report (:func:`rlfh.eval.report.write_eval_report`).
        train_prompts: prompts the model was trained on, sampled at the same seeds by each model for
            the held-out reward gap (``collapse.<side>.reward_gap``: their combined reward minus that
            of ``prompts``); empty: the gap is reported as not measured.
        styles: one style per prompt (HPSv2's benchmark styles); the summary's ``styles`` then gives
            every reward's mean and win rate per style.

    Returns:
        The summary written to ``eval.json``.

    Raises:
        ValueError: no prompts or seeds, not one style per prompt, or a model's own negative prompt
            with ``rollout.guidance_scale`` <= 1 (where the sampler does not use it).
    """
    from rewards.composite import RewardSet

    _check_request(cfg, model, baseline, prompts, seeds, styles)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reward_set = RewardSet.from_config(cfg.rewards)  # built once, shared by both sides
    ctx = _EvalRun(
        cfg,
        reward_set,
        out,
        [p for p in prompts for _ in seeds],
        [int(s) for _ in prompts for s in seeds],
        [p for p in train_prompts for _ in seeds],
        [int(s) for _ in train_prompts for s in seeds],
        batch_size or cfg.rollout.sample_batch_size_per_actor,
        device,
        progress,
    )
    sides = {"model": model, **({"baseline": baseline} if baseline is not None else {})}
    scored_by_side, collapse = {}, {}
    with reward_set:  # closes the rewards' detectors, however sampling or scoring ends
        ctx.guidance = score_guidance(cfg, reward_set)
        for side, spec in sides.items():
            scored_by_side[side], collapse[side] = _sample_and_score(ctx, side, spec)
    meta = {"prompt_set": prompt_set, "num_prompts": len(prompts), "seeds": [int(s) for s in seeds]}
    meta["train_prompts"] = list(train_prompts)
    per_image_styles = [st for st in styles for _ in seeds] if styles else None
    summary = build_summary(ctx, sides, scored_by_side, collapse, meta, per_image_styles)
    (out / "eval.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    if report:
        from rlfh.eval.report import write_eval_report

        write_eval_report(out)
    return summary


def bucket_runs(cfg, out: str | Path) -> list[tuple[Any, Path]]:
    """The evaluations ``rlfh eval`` runs: with ``rollout.resolutions`` one per bucket, each sampling every prompt
    and seed at the bucket's size (as the run trained on it; SDXL's time ids carry the size) into ``out/<h>x<w>``;
    one bucket, or none, is one evaluation into ``out`` at that size (``rollout.height`` x ``rollout.width``
    without buckets). Returns [(the config at that size, its output folder)]."""
    rc, out = cfg.rollout, Path(out)
    if not rc.resolutions:
        return [(cfg, out)]

    def at(h: int, w: int):
        return dataclasses.replace(cfg, rollout=dataclasses.replace(rc, height=int(h), width=int(w), resolutions=[]))

    if len(rc.resolutions) == 1:
        return [(at(*rc.resolutions[0]), out)]
    return [(at(h, w), out / f"{h}x{w}") for h, w in rc.resolutions]


def _check_request(cfg, model, baseline, prompts, seeds, styles) -> None:
    if not prompts or not seeds:
        raise ValueError(f"nothing to evaluate: {len(prompts)} prompts x {len(seeds)} seeds")
    if styles is not None and len(styles) != len(prompts):
        raise ValueError(f"styles: {len(styles)} given for {len(prompts)} prompts; give one per prompt")
    own_negative = [s for s in (model, baseline) if s is not None and s.negative_prompt is not None]
    if own_negative and cfg.rollout.guidance_scale <= 1.0:
        raise ValueError(
            f"a negative prompt ({own_negative[0].negative_prompt!r}) acts only under classifier-free guidance: "
            f"rollout.guidance_scale is {cfg.rollout.guidance_scale}, set it above 1"
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of the summary for the terminal."""
    sides = list(summary["models"])
    lines = [
        f"{summary['num_images_per_model']} images per model ({summary['num_prompts']} prompts x "
        f"{len(summary['seeds'])} seeds); 95% CI: {summary['ci_method']}"
    ]
    for name, e in summary["rewards"].items():
        parts = []
        for side in sides:
            st = e[side]
            mean = "n/a" if st["mean"] is None else f"{st['mean']:.4g}"
            ci = "" if st["ci_low"] is None else f" [{st['ci_low']:.4g}, {st['ci_high']:.4g}]"
            parts.append(f"{side} {mean}{ci} (not computable {st['not_computable_rate']:.0%})")
        if "win_rate" in e and e["win_rate"]["win_rate"] is not None:
            w = e["win_rate"]
            parts.append(f"win rate {w['win_rate']:.1%} over {w['n_compared']} pairs ({w['excluded']} excluded)")
        lines.append(f"  {name}: " + "; ".join(parts))
        for side in sides:
            dw = e[side].get("detection_weighted")
            if dw and dw["mean"] is not None:
                lines.append(
                    f"    {side}: detection-weighted mean {dw['mean']:.4g} over {dw['n_detections']} detections"
                )
    lines += _size_lines(summary, sides)
    for style, st in (summary.get("styles") or {}).items():
        means = [f"{side} {_fmt(st['rewards'][COMBINED][side]['mean'])}" for side in sides]
        lines.append(f"  style {style} ({st['n_images']} images): combined " + ", ".join(means))
    for side in sides:
        for key, m in summary.get("collapse", {}).get(side, {}).items():
            lines.append(
                f"  {side}: {key} " + (f"{m['value']:.4g}" if m["value"] is not None else f"n/a ({m['reason']})")
            )
    for side in sides:
        for region, r in summary["regions"][side].items():
            if not math.isnan(r["no_detection_rate"]):
                lines.append(f"  {side}: no {region} detected in {r['no_detection_rate']:.0%} of {r['checked']} images")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _size_lines(summary: dict[str, Any], sides: list[str]) -> list[str]:
    """Count and size of the detected regions per model (and the change vs the baseline)."""
    lines = []
    for region, e in (summary.get("region_size") or {}).items():
        for side in sides:
            st = e[side]
            lines.append(
                f"  {side}: {_fmt(st['per_image'])} {region}s per image, mean {region} area share "
                f"{_fmt(st['area_share'])}, largest {_fmt(st['largest_share'])}"
            )
        if "change" in e:
            c = e["change"]
            lines.append(
                f"  change vs baseline: {region}s per image {_fmt(c['per_image'])}, "
                f"area share {_fmt(c['area_share'])}, largest {_fmt(c['largest_share'])}"
            )
    return lines
