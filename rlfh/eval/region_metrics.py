"""Evaluation metrics on the detected regions and on subsets of the prompts, beside the per-image means.

* :func:`size_drift`: how many faces (hands, ...) a model draws and how large. FaceScore (Liao et
  al. 2024, arXiv 2406.17100) reports that fine-tuning on a face reward drifts towards larger faces
  (a close-up scores a face better); with the boxes the rewards already report, per model::

      faces_per_image = (1/N) sum_i |F_i|
      area_share      = (1/|F|) sum_{f in F} area(box_f ∩ image) / (H W)      (mean over every face)
      largest_share   = mean over images with a face of max_{f in F_i} area(box_f ∩ image) / (H W)

  and the change of each vs the baseline (model minus baseline). The boxes are those of ONE
  reward per region (:func:`region_sources`: the first configured reward reporting the region), so
  two face rewards with their own detectors do not count a face twice.
* :func:`detection_weighted_mean`: FairHuman (arXiv 2507.02714, ``evaluate/face_confidence.py``,
  ``hand_confidence.py``) averages its confidence over every detected face or hand of the test set,
  so an image with three faces weighs three times; rlfh's per-image value aggregates an image's
  detections first, so the image-weighted mean weighs every image once. Both are reported for
  region rewards; the per-detection scores come from ``info["<region>_scores"]`` (FaceScore,
  LocalIR / LocalHPS, the detection-confidence rewards; None entries, detections that were not
  scored, are left out).
* :func:`by_style`: every reward's mean (and win rate) per style of a styled prompt set (HPSv2's
  benchmark: anime, concept-art, paintings, photo).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rewards.base import Detection


def _share(det: Detection, h: int, w: int) -> float:
    x1, y1, x2, y2 = det.box
    iw = max(0.0, min(x2, w) - max(x1, 0.0))
    ih = max(0.0, min(y2, h) - max(y1, 0.0))
    return iw * ih / float(h * w)


def size_stats(detections: Sequence[Sequence[Detection]], image_hw: tuple[int, int]) -> dict[str, Any]:
    """Count and size of one region's detections over one model's images (formulas: module docstring)."""
    h, w = image_hw
    shares = [[_share(d, h, w) for d in dets] for dets in detections]
    flat = [s for per in shares for s in per]
    largest = [max(per) for per in shares if per]
    n = len(detections)
    return {
        "n_images": n,
        "n_detections": len(flat),
        "per_image": len(flat) / n if n else None,
        "images_with_detection_rate": len(largest) / n if n else None,
        "area_share": float(np.mean(flat)) if flat else None,
        "largest_share": float(np.mean(largest)) if largest else None,
    }


def _change(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def size_drift(
    regions_by_side: Mapping[str, Sequence[Mapping[str, Sequence[Detection]]]], image_hw: tuple[int, int]
) -> dict[str, Any]:
    """Per region name: :func:`size_stats` per side and, with a baseline, model minus baseline.

    Args:
        regions_by_side: side -> per image, region name -> detections (of the one source reward).
        image_hw: (H, W) of every image.
    """
    names = sorted({k for per_side in regions_by_side.values() for r in per_side for k in r})
    out: dict[str, Any] = {}
    for name in names:
        entry = {
            side: size_stats([r.get(name, []) for r in per_side], image_hw)
            for side, per_side in regions_by_side.items()
        }
        if "baseline" in entry and "model" in entry:
            keys = ("per_image", "images_with_detection_rate", "area_share", "largest_share")
            entry["change"] = {k: _change(entry["model"][k], entry["baseline"][k]) for k in keys}
        out[name] = entry
    return out


def source_regions(scored, index: int, sources: Mapping[str, str]) -> dict[str, list[Detection]]:
    """Image ``index``'s detections per region, each region taken from its source reward only."""
    return {region: list(scored.results[name][index].regions.get(region, [])) for region, name in sources.items()}


def region_sources(scored) -> dict[str, str]:
    """Region name -> the first reward (config order) that reports that region on any image."""
    sources: dict[str, str] = {}
    for name, res in scored.results.items():
        for r in res:
            for region in r.regions:
                sources.setdefault(region, name)
    return sources


def detection_weighted_mean(results: Sequence[Any], region: str) -> dict[str, Any]:
    """FairHuman's mean over every scored detection of a region reward's results, with the count.

    ``info["<region>_scores"]`` of each result lists its detections' scores (None: not scored).
    """
    key = f"{region}_scores"
    if not any(key in r.info for r in results):
        return {"mean": None, "n_detections": 0, "reason": f"the reward reports no per-detection {key!r}"}
    vals = [float(v) for r in results for v in (r.info.get(key) or []) if v is not None]
    if not vals:
        return {"mean": None, "n_detections": 0, "reason": f"no {region} was scored"}
    return {"mean": float(np.mean(vals)), "n_detections": len(vals), "reason": None}


def by_style(
    styles: Sequence[str],
    values_by_side: Mapping[str, Mapping[str, Sequence[float | None]]],
    stats: Callable[[Sequence[float | None]], dict[str, Any]],
    wins: Callable[[Sequence[float | None], Sequence[float | None]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per style: the number of images and, per reward and side, ``stats`` of the style's values.

    Args:
        styles: one style per image.
        values_by_side: side -> reward name -> one value per image (None: not computable).
        stats: summary of one list of values (e.g. ``value_stats`` with its reasons).
        wins: with a baseline, the win rate of the model on the style's images.
    """
    out: dict[str, Any] = {}
    for style in sorted(set(styles)):
        idx = [i for i, s in enumerate(styles) if s == style]
        rewards: dict[str, Any] = {}
        for side, by_name in values_by_side.items():
            for name, vals in by_name.items():
                rewards.setdefault(name, {})[side] = stats([vals[i] for i in idx])
        if wins is not None and {"model", "baseline"} <= set(values_by_side):
            for name in rewards:
                m, b = values_by_side["model"][name], values_by_side["baseline"][name]
                rewards[name]["win_rate"] = wins([m[i] for i in idx], [b[i] for i in idx])
        out[style] = {"n_images": len(idx), "rewards": rewards}
    return out
