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

Regions: one pair per detected box of the region (``data.region_pairs.per_region: each``, FaceScore's
46k pairs from 23k images: one face inpainted at a time), or one pair per image with all its boxes
inpainted at once (``union``). The boxes are found on the image the pair starts from: online the
sample itself, in ``rlfh make-region-pairs`` the photo before its VAE round trip.

Pair: x^w, x^l by ``data.region_pairs.winner``: ``original`` (FaceScore's labelling rule: the original
wins and its inpainted copy loses by hypothesis, no scorer) or ``reward`` (the learner's score,
:func:`rlfh.data.pairs.learner_scores` over the two, decides; a missing score or a tie makes no pair
and is counted). Masks: {region: M, other local regions: 0} for both, so no other region's loss sees
the pair. The ``global`` objective, when trained, still sees it: outside M the two latents are equal.
The batch marks these pairs ``aligned`` (:class:`rlfh.data.batches.PairBatch`): the guidance loss
(rlfh/losses/guidance.py) trains on them only.

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
    boxes: list[list] = None  # the boxes inpainted in each entry (one with per_region: each)


def plan_inpainting(
    regions: Sequence[dict], rp, image_hw: tuple[int, int], choose: np.ndarray | None = None
) -> InpaintPlan:
    """The images whose ``rp.region`` was detected (all of them, or those where ``choose`` is true),
    one entry per box (``rp.per_region`` = each) or per image (union), with its strength and mask.

    Args:
        regions: per image, region name -> detections (``ScoredBatch.regions(i)``).
        rp: ``cfg.data.region_pairs``.
        image_hw: (H, W).
        choose: optional (N,) bool: a further selection (the online ``fraction`` draw).
    """
    idx, strengths, masks, ratios, inpainted = [], [], [], [], []
    for i, per_image in enumerate(regions):
        boxes = list(per_image.get(rp.region) or [])
        if not boxes or (choose is not None and not choose[i]):
            continue
        for part in [[b] for b in boxes] if rp.per_region == "each" else [boxes]:
            ratio = area_ratio(part, image_hw)
            idx.append(i)
            ratios.append(ratio)
            strengths.append(noise_strength(ratio, rp.strength, rp.strength_table))
            masks.append(inpaint_mask(part, image_hw, rp.dilate))
            inpainted.append(part)
    h, w = image_hw[0] // 8, image_hw[1] // 8
    stacked = np.stack(masks) if masks else np.zeros((0, 1, h, w), np.float32)
    return InpaintPlan(idx, strengths, stacked, ratios, inpainted)


def strength_groups(strengths: Sequence[float]) -> dict[float, list[int]]:
    """Positions grouped by strength: one refine call per strength (it takes one for its batch)."""
    groups: dict[float, list[int]] = {}
    for k, s in enumerate(strengths):
        groups.setdefault(float(s), []).append(k)
    return groups


def pair_order(winner: str, score_orig, score_inp) -> bool | None:
    """Whether the inpainted image wins its pair: never under ``winner: original`` (FaceScore's rule),
    by the two scores under ``reward``; None when the reward cannot order them (unusable, or a tie)."""
    from rlfh.data.pairs import usable

    if winner == "original":
        return False
    if winner != "reward":
        raise ValueError(f"data.region_pairs.winner={winner!r}: use original or reward")
    if not (usable(score_orig) and usable(score_inp)) or score_orig == score_inp:
        return None
    return bool(score_inp > score_orig)


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
    winner: str = "reward",
):
    """(original, inpainted) pairs ordered by ``winner`` (:func:`pair_order`), with the region's mask.

    Args:
        latents_orig, latents_inp: (K, 4, h, w) UNet-space latents, equal outside ``masks``.
        prompts: K prompts.
        values_orig, values_inp: {reward name: K values (None: not computable)}; unread under
            ``winner: original``.
        weights: {reward name: weight} (the config's rewards).
        masks: (K, 1, h, w) the inpainting masks.
        region: the inpainted region; regions: ``learner.regions.names`` (other local ones get zero masks).
        normalization: ``rewards_normalization``; each pair is its own group.
        winner: ``data.region_pairs.winner``: original or reward.

    Returns:
        (PairBatch, stats): ``region_pairs/count``, ``region_pairs/inpainted_won_share`` (of the
        pairs), ``region_pairs/skipped`` (no usable score, or a tie), ``region_pairs/mean_margin``
        (0 under ``winner: original``, which reads no score).
    """
    from rlfh.data.batches import PairBatch
    from rlfh.data.pairs import learner_scores

    k = len(prompts)
    scores = [None] * (2 * k)
    if winner == "reward":
        values = {n: list(values_orig[n]) + list(values_inp[n]) for n in weights}
        scores, _ = learner_scores(values, weights, list(range(k)) * 2, normalization)
    win, lose, margins = [], [], []
    for j in range(k):
        inp_wins = pair_order(winner, scores[j], scores[k + j])
        if inp_wins is not None:
            win.append(k + j if inp_wins else j)
            lose.append(j if inp_wins else k + j)
            margins.append(abs(scores[k + j] - scores[j]) if winner == "reward" else 0.0)
    stacked = np.concatenate([latents_orig, latents_inp]) if k else np.zeros((0, *latents_orig.shape[1:]), np.float32)
    pm = np.concatenate([masks, masks])
    zero = np.zeros((len(win), *masks.shape[1:]), np.float32)
    mw = {r: (pm[win] if r == region else zero) for r in regions if r != "global"}
    ml = {r: (pm[lose] if r == region else zero) for r in regions if r != "global"}
    prompts_w = [prompts[i % k] for i in win]
    aligned = np.ones(len(win), bool)
    batch = PairBatch(stacked[win], stacked[lose], prompts_w, mw, ml, conditioning, None, None, aligned)
    stats = {
        "region_pairs/count": float(len(win)),
        "region_pairs/skipped": float(k - len(win)),
        "region_pairs/inpainted_won_share": sum(w >= k for w in win) / len(win) if win else 0.0,
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
        None if a.aligned is None and b.aligned is None else np.concatenate([a.aligned_rows(), b.aligned_rows()]),
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


def inpainted_boxes(boxes: Sequence, latent_orig: np.ndarray, latent_inp: np.ndarray, image_hw, dilate: int) -> list:
    """The boxes of ``boxes`` that were inpainted: those whose dilated mask holds a latent that differs
    between the original and its inpainted copy (equal outside the inpainting mask, so one face of a
    ``per_region: each`` pair, every face of a ``union`` pair); all of them when none differs."""
    changed = np.abs(np.asarray(latent_orig) - np.asarray(latent_inp)).max(0) > 0  # (h, w)
    hit = [b for b in boxes if (inpaint_mask([b], image_hw, dilate)[0].astype(bool) & changed).any()]
    return hit or list(boxes)


def logged_links(records: Sequence[dict], learner_regions: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """{region: [(source row, inpainted row)]} of a rollout log's inpainted records.

    Raises:
        ValueError: a source the log lacks, or a region that is not a local one of ``learner_regions``.
    """
    inpainted = [i for i, r in enumerate(records) if (r.get("region_pair") or {}).get("role") == "inpainted"]
    if not inpainted:
        return {}
    by_id = {r["rollout_id"]: i for i, r in enumerate(records)}
    problems: list[str] = []
    links: dict[str, list[tuple[int, int]]] = {}
    for i in inpainted:
        r = records[i]
        rp = r["region_pair"]
        src = by_id.get(rp["source_id"])
        if src is None:
            problems.append(f"record {r['rollout_id']} was inpainted from {rp['source_id']}, which the log lacks")
        elif rp["region"] not in learner_regions or rp["region"] == "global":
            problems.append(
                f"record {r['rollout_id']} is a {rp['region']!r} region pair, not a local region of "
                f"learner.regions.names={list(learner_regions)}"
            )
        else:
            links.setdefault(rp["region"], []).append((src, i))
    if problems:
        raise ValueError("region pairs in the rollout log cannot be trained: " + "; ".join(problems[:5]))
    return links


def pairs_from_records(
    records: Sequence[dict],
    latents: np.ndarray,
    regions: Sequence[dict],
    weights: dict[str, float],
    learner_regions: Sequence[str],
    image_hw: tuple[int, int],
    normalization: str = "weighted_sum",
    winner: str = "reward",
):
    """The region pairs of a rollout log: each ``inpainted`` record with the record it was inpainted
    from, ordered by ``winner`` (:func:`pair_order`), the mask rebuilt with the logged ``dilate`` from
    the source's logged boxes of the region that were inpainted (:func:`inpainted_boxes`).

    Args:
        records: log rows with ``rollout_id``, ``prompt``, ``rewards``, ``region_pair``.
        latents: (N, 4, h, w) the records' latents; regions: per record, region -> detections.

    Returns:
        (PairBatch or None when the log holds no inpainted record, stats)
    """
    out, stats = None, {}
    vals = [{rw["name"]: rw["value"] for rw in r["rewards"]} for r in records]
    for region, links in logged_links(records, learner_regions).items():
        src, dst = [s for s, _ in links], [d for _, d in links]
        masks = []
        for s, d in links:
            dilate = records[d]["region_pair"]["dilate"]
            boxes = inpainted_boxes(regions[s].get(region) or [], latents[s], latents[d], image_hw, dilate)
            masks.append(inpaint_mask(boxes, image_hw, dilate))
        batch, st = region_pair_batch(
            latents[src],
            latents[dst],
            [records[s]["prompt"] for s in src],
            {n: [vals[s].get(n) for s in src] for n in weights},
            {n: [vals[d].get(n) for d in dst] for n in weights},
            weights,
            np.stack(masks),
            region,
            learner_regions,
            normalization,
            winner=winner,
        )
        out = batch if out is None else concat_pairs(out, batch)
        for key, v in st.items():  # summed over regions; the share re-weighted below
            stats[key] = stats.get(key, 0.0) + (
                v * st["region_pairs/count"] if key.endswith(("share", "margin")) else v
            )
    n = stats.get("region_pairs/count", 0.0)
    for key in ("region_pairs/inpainted_won_share", "region_pairs/mean_margin"):
        if key in stats:
            stats[key] = stats[key] / n if n else 0.0
    return out, stats


def no_sample_pairs(learner_cfg, rnd):
    """The batch builder of a loss of aligned region pairs alone (the registry's ``aligned_only``): the
    round's own samples make no pair (two samples are not one trajectory apart), so the batch is empty
    until the region pairs join it (``data.region_pairs`` online, :func:`with_region_pairs` offline)."""
    from rlfh.data.batches import PairBatch

    empty = np.zeros((0, *rnd.latents.shape[1:]), np.float32)
    masks = {r: np.zeros((0, *m.shape[1:]), np.float32) for r, m in rnd.masks.items()}
    batch = PairBatch(empty, empty.copy(), [], masks, dict(masks), rnd.conditioning, aligned=np.zeros(0, bool))
    return batch, {"pairs/count": 0.0, **rnd.unscored}


def with_region_pairs(cfg, batch, region_pairs):
    """A logged log's batch with its region pairs (offline): the pairs of aligned region pairs alone for a loss
    that trains on nothing else, and a clear error when the config's guidance loss finds none in the log."""
    from rlfh.losses.registry import loss_spec

    spec = loss_spec(cfg.learner.loss)
    if region_pairs is None and (spec.aligned_only or cfg.learner.dpo.guidance.coef > 0):
        key = f"learner.loss={cfg.learner.loss}" if spec.aligned_only else "learner.dpo.guidance.coef > 0"
        raise ValueError(
            f"{key} needs region pairs, and the rollout log {cfg.rollouts} holds none: log them with "
            f"rlfh make-region-pairs (or train online with data.region_pairs)"
        )
    return batch if region_pairs is None else concat_pairs(batch, region_pairs)
