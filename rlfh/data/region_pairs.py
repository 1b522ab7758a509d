"""Region pairs by inpainting (FaceScore, arXiv 2406.17100, "Dataset construction" and "Noise Factor").

For an image with a detected face (or hand), the region's boxes are dilated into a mask, the image's
latent is re-noised to a strength s and denoised again only inside the mask (``Sampler.refine``, or
a diffusers inpainting pipeline), so the inpainted image differs from the original only there. The
reward decides which of the two wins (FaceScore assumes the original; we never do), and the pair
trains DPO with the region's mask for both images, so the credit goes to the region that differs.

Strength (FaceScore's adaptive noise factor: smaller faces are destroyed more easily, so they get
less noise):

    a = |union of the region's boxes| / (H W)           the region's area ratio (boxes undilated)
    s = strength_table[k][1],  k = min {k : strength_table[k][0] >= a}
    s = data.region_pairs.strength                   when set (FaceScore's fixed 0.1 / 0.4)

Mask: the boxes filled and dilated with a ``dilate`` x ``dilate`` kernel, resized (nearest) to latent
size (h, w) = (H/8, W/8) and binarized: :func:`rewards.regions.region_mask`, FairHuman's region
mask, so with ``dilate`` = 16 it is the learner's own mask of the region.

Pair: x^w, x^l = (original, inpainted) or (inpainted, original) by the learner's score
(:func:`rlfh.data.pairs.learner_scores` over the two; a missing score or a tie makes no pair and is
counted). Masks: {region: M, other local regions: 0} for both, so no other region's loss sees the
pair. The ``global`` objective, when trained, still sees it: outside M the two latents are equal.

In the rollout log an inpainted record carries ``region_pair`` = {role: "inpainted", source_id:
the original's rollout_id, region, strength, dilate}; the originals that ``rlfh make-region-pairs``
logs carry role "original". Such records pair only with each other, never within a prompt group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def area_ratio(boxes: Sequence, image_hw: tuple[int, int]) -> float:
    """The share of the image the union of ``boxes`` covers (undilated, PIL-filled pixels)."""
    from rewards.regions import pixel_mask

    return float(pixel_mask(list(boxes), image_hw, dilate=0).mean())


def noise_strength(ratio: float, strength: float | None, table: Sequence[Sequence[float]]) -> float:
    """The inpainting strength of a region covering ``ratio`` of its image: ``strength`` when given,
    else the first ``table`` row [max_area_ratio, strength] whose bound is >= ratio."""
    if strength is not None:
        return float(strength)
    for bound, s in table:
        if ratio <= bound:
            return float(s)
    raise ValueError(f"area ratio {ratio} exceeds every bound of data.region_pairs.strength_table {list(table)}")


def inpaint_mask(boxes: Sequence, image_hw: tuple[int, int], dilate: int) -> np.ndarray:
    """(1, h, w) float32 0/1 latent mask of the dilated boxes (``rewards.regions.region_mask``)."""
    from rewards.regions import region_mask

    return region_mask(list(boxes), image_hw, dilate=dilate).numpy()[None]


@dataclass
class InpaintPlan:
    """Which images get inpainted, how strongly, inside which mask."""

    indices: list[int]  # into the scored batch
    strengths: list[float]
    masks: np.ndarray  # (K, 1, h, w)
    ratios: list[float]


def plan_inpainting(
    regions: Sequence[dict], rp, image_hw: tuple[int, int], choose: np.ndarray | None = None
) -> InpaintPlan:
    """The images whose ``rp.region`` was detected (all of them, or those where ``choose`` is true),
    with each one's strength and mask.

    Args:
        regions: per image, region name -> detections (``ScoredBatch.regions(i)``).
        rp: ``cfg.data.region_pairs``.
        image_hw: (H, W).
        choose: optional (N,) bool: a further selection (the online ``fraction`` draw).
    """
    idx, strengths, masks, ratios = [], [], [], []
    for i, per_image in enumerate(regions):
        boxes = per_image.get(rp.region) or []
        if not boxes or (choose is not None and not choose[i]):
            continue
        ratio = area_ratio(boxes, image_hw)
        idx.append(i)
        ratios.append(ratio)
        strengths.append(noise_strength(ratio, rp.strength, rp.strength_table))
        masks.append(inpaint_mask(boxes, image_hw, rp.dilate))
    h, w = image_hw[0] // 8, image_hw[1] // 8
    return InpaintPlan(idx, strengths, np.stack(masks) if masks else np.zeros((0, 1, h, w), np.float32), ratios)


def strength_groups(strengths: Sequence[float]) -> dict[float, list[int]]:
    """Positions grouped by strength: one refine call per strength (it takes one for its batch)."""
    groups: dict[float, list[int]] = {}
    for k, s in enumerate(strengths):
        groups.setdefault(float(s), []).append(k)
    return groups


def region_pair_batch(
    latents_orig: np.ndarray,
    latents_inp: np.ndarray,
    prompts: Sequence[str],
    values_orig: dict[str, list],
    values_inp: dict[str, list],
    weights: dict[str, float],
    masks: np.ndarray,
    region: str,
    regions: Sequence[str],
    normalization: str = "weighted_sum",
    conditioning: dict | None = None,
):
    """(original, inpainted) pairs ordered by the learner's score, with the region's mask.

    Args:
        latents_orig, latents_inp: (K, 4, h, w) UNet-space latents, equal outside ``masks``.
        prompts: K prompts.
        values_orig, values_inp: {reward name: K values (None: not computable)}.
        weights: {reward name: weight} (the config's rewards).
        masks: (K, 1, h, w) the inpainting masks.
        region: the inpainted region; regions: ``learner.regions.names`` (other local ones get zero masks).
        normalization: ``rewards_normalization``; each pair is its own group.

    Returns:
        (PairBatch, stats): ``region_pairs/count``, ``region_pairs/inpainted_won_share`` (of the
        pairs), ``region_pairs/skipped`` (no usable score, or a tie), ``region_pairs/mean_margin``.
    """
    from rlfh.data.batches import PairBatch
    from rlfh.data.pairs import learner_scores, usable

    k = len(prompts)
    values = {n: list(values_orig[n]) + list(values_inp[n]) for n in weights}
    scores, _ = learner_scores(values, weights, list(range(k)) * 2, normalization)
    win, lose, inp_won, margins, skipped = [], [], 0, [], 0
    stacked = np.concatenate([latents_orig, latents_inp]) if k else np.zeros((0, *latents_orig.shape[1:]), np.float32)
    for j in range(k):
        so, si = scores[j], scores[k + j]
        if not (usable(so) and usable(si)) or so == si:
            skipped += 1
            continue
        w, l = (k + j, j) if si > so else (j, k + j)
        inp_won += si > so
        win.append(w)
        lose.append(l)
        margins.append(abs(si - so))
    pm = np.concatenate([masks, masks])
    local = [r for r in regions if r != "global"]
    zero = np.zeros((len(win), *masks.shape[1:]), np.float32)
    mw = {r: (pm[win] if r == region else zero) for r in local}
    ml = {r: (pm[lose] if r == region else zero) for r in local}
    batch = PairBatch(stacked[win], stacked[lose], [prompts[i % k] for i in win], mw, ml, conditioning)
    stats = {
        "region_pairs/count": float(len(win)),
        "region_pairs/skipped": float(skipped),
        "region_pairs/inpainted_won_share": inp_won / len(win) if win else 0.0,
        "region_pairs/mean_margin": float(np.mean(margins)) if margins else 0.0,
    }
    return batch, stats


def concat_pairs(a, b):
    """Two PairBatches as one (the same local regions in both)."""
    from rlfh.data.batches import PairBatch

    if set(a.masks_w) != set(b.masks_w):
        raise ValueError(f"pair batches hold masks of different regions: {sorted(a.masks_w)} and {sorted(b.masks_w)}")
    if (a.priors_w is None) != (b.priors_w is None):
        raise ValueError("one pair batch holds HcP pose priors and the other does not")
    # a table missing some prompt makes the learner encode those (LearnerEngine.condition)
    cond = (
        None
        if a.conditioning is None and b.conditioning is None
        else {**(a.conditioning or {}), **(b.conditioning or {})}
    )
    return PairBatch(
        np.concatenate([a.latents_w, b.latents_w]),
        np.concatenate([a.latents_l, b.latents_l]),
        [*a.prompts, *b.prompts],
        {r: np.concatenate([a.masks_w[r], b.masks_w[r]]) for r in a.masks_w},
        {r: np.concatenate([a.masks_l[r], b.masks_l[r]]) for r in a.masks_l},
        cond,
        *(
            (None, None)
            if a.priors_w is None
            else (np.concatenate([a.priors_w, b.priors_w]), np.concatenate([a.priors_l, b.priors_l]))
        ),
    )


def log_marks(
    role: str, source_ids: Sequence[str | None], region: str, strengths: Sequence[float | None], dilate: int
) -> list[dict]:
    """The rollout log's ``region_pair`` values of records in region pairs."""
    return [
        {
            "role": role,
            "source_id": sid,
            "region": region,
            "strength": None if s is None else float(s),
            "dilate": int(dilate),
        }
        for sid, s in zip(source_ids, strengths)
    ]


# long: split pending: the region-pair guidance-loss work is rewriting this function
def pairs_from_records(
    records: Sequence[dict],
    latents: np.ndarray,
    regions: Sequence[dict],
    weights: dict[str, float],
    learner_regions: Sequence[str],
    image_hw: tuple[int, int],
    normalization: str = "weighted_sum",
):
    """The region pairs of a rollout log: each ``inpainted`` record with the record it was inpainted
    from, the mask rebuilt from the source's logged boxes of the region with the logged ``dilate``.

    Args:
        records: log rows with ``rollout_id``, ``prompt``, ``rewards``, ``region_pair``.
        latents: (N, 4, h, w) the records' latents; regions: per record, region -> detections.

    Returns:
        (PairBatch or None when the log holds no inpainted record, stats)
    """
    inp = [i for i, r in enumerate(records) if (r.get("region_pair") or {}).get("role") == "inpainted"]
    if not inp:
        return None, {}
    by_id = {r["rollout_id"]: i for i, r in enumerate(records)}
    problems: list[str] = []
    per_region: dict[str, list[tuple[int, int]]] = {}
    for i in inp:
        rp = records[i]["region_pair"]
        src = by_id.get(rp["source_id"])
        if src is None:
            problems.append(
                f"record {records[i]['rollout_id']} was inpainted from {rp['source_id']}, which the log lacks"
            )
        elif rp["region"] not in learner_regions or rp["region"] == "global":
            problems.append(
                f"record {records[i]['rollout_id']} is a {rp['region']!r} region pair, not a local region of "
                f"learner.regions.names={list(learner_regions)}"
            )
        else:
            per_region.setdefault(rp["region"], []).append((src, i))
    if problems:
        raise ValueError("region pairs in the rollout log cannot be trained: " + "; ".join(problems[:5]))
    out, stats = None, {}
    for region, links in per_region.items():
        src, dst = [s for s, _ in links], [d for _, d in links]
        masks = np.stack(
            [
                inpaint_mask(regions[s].get(region) or [], image_hw, records[d]["region_pair"]["dilate"])
                for s, d in links
            ]
        )
        vals = [{rw["name"]: rw["value"] for rw in records[i]["rewards"]} for i in range(len(records))]
        batch, st = region_pair_batch(
            latents[src],
            latents[dst],
            [records[s]["prompt"] for s in src],
            {n: [vals[s].get(n) for s in src] for n in weights},
            {n: [vals[d].get(n) for d in dst] for n in weights},
            weights,
            masks,
            region,
            learner_regions,
            normalization,
        )
        out = batch if out is None else concat_pairs(out, batch)
        for key, v in st.items():  # summed over regions; the share re-weighted below
            stats[key] = stats.get(key, 0.0) + (
                v * st["region_pairs/count"] if key.endswith(("share", "margin")) else v
            )
    n = stats.get("region_pairs/count", 0.0)
    for key in ("region_pairs/inpainted_won_share", "region_pairs/mean_margin"):
        stats[key] = stats[key] / n if n else 0.0
    return out, stats
