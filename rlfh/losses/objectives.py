"""Per-region objectives: every loss computed once per region (``global``, ``face``, ``hand``, ...).

Regions are names, not special cases. ``global`` uses the plain per-sample epsilon-MSE; any other
region r uses FairHuman's masked error, mean over ALL latent elements of (s * 1[M_r > 0] * (eps_hat
- eps))^2 (rlfh/losses/region_mse.py; not normalised by the mask area). A sample (or a pair, when
neither image has the region) without the region does not enter that region's mean; a region no
sample of the micro-batch has is absent from the result, so the fairness rule drops it.

Shapes: predictions and targets (B, C, h, w); masks {region: (B, 1, h, w)} of 0/1 at latent size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlfh.losses.awm import GHuber, awm_loss, ghuber_error
from rlfh.losses.dpo import dpo_loss_from_mse
from rlfh.losses.dpo_variants import dpo_variant_loss
from rlfh.losses.nft import adaptive_errors, implicit_predictions, nft_loss_from_errors
from rlfh.losses.region_mse import per_sample_mse, per_sample_region_mse, region_difference
from rlfh.losses.registry import OLD_POLICY, PAIRS, loss_spec
from rlfh.losses.rwr import weighted_loss


def region_errors(pred: Tensor, target: Tensor, region: str, masks: dict[str, Tensor], scale: float) -> Tensor:
    """Per-sample error (B,) of one region."""
    if region == "global":
        return per_sample_mse(pred, target)
    return per_sample_region_mse(pred, target, _mask(masks, region), scale)


def nft_region_errors(
    pred: Tensor, target: Tensor, region: str, masks: dict[str, Tensor], scale: float, x0_scale: Tensor | None
) -> Tensor:
    """Per-sample error (B,) of an implicit NFT prediction in one region: the region's eps error, or
    with ``x0_scale`` (k_t per sample) the reference's adaptive x_0-space error of the region's
    (masked) difference (:func:`rlfh.losses.nft.adaptive_errors`)."""
    if x0_scale is None:
        return region_errors(pred, target, region, masks, scale)
    diff = pred - target if region == "global" else region_difference(pred, target, _mask(masks, region), scale)
    return adaptive_errors(diff, x0_scale)


def _mask(masks: dict[str, Tensor], region: str) -> Tensor:
    if region not in masks:
        raise ValueError(f"no mask for region {region!r}; masks hold {sorted(masks)}")
    return masks[region]


def has_region(masks: dict[str, Tensor], region: str, batch: int, device) -> Tensor:
    """(B,) bool: which samples contain the region (all of them for ``global``)."""
    if region == "global":
        return torch.ones(batch, dtype=torch.bool, device=device)
    return _mask(masks, region).flatten(1).amax(1) > 0


def metric_suffix(region: str, regions: list[str]) -> str:
    """A region's metric suffix: none for a lone global objective, ``/region`` otherwise."""
    return "" if region == "global" and len(regions) == 1 else f"/{region}"


def present_regions(masks: dict[str, Tensor], regions: list[str], pred: Tensor):
    """(region, valid rows, metric suffix) for each region some row of ``pred``'s batch has."""
    for region in regions:
        valid = has_region(masks, region, pred.shape[0], pred.device)
        if bool(valid.any()):
            yield region, valid, metric_suffix(region, regions)


def pairwise_objectives(
    loss: str,
    beta: float,
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    target: Tensor,
    masks_w: dict[str, Tensor],
    masks_l: dict[str, Tensor],
    regions: list[str],
    scale: float,
    target_l: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The DPO-family loss of each region present in the micro-batch, and its metrics: the sigmoid loss,
    or the spec's ``variant`` (rlfh/losses/dpo_variants.py). ``target`` is the winner's training target and
    ``target_l`` the loser's; None: the winner's, which is the loser's too for eps-prediction (both are the
    shared eps), not for v-prediction or a flow model's velocity eps - x0 (it holds each one's x0)."""
    spec = loss_spec(loss)
    if spec.batch != PAIRS:
        raise ValueError(f"pairwise objectives are for losses that train on {PAIRS}, not {loss!r}")
    b = pred_w.shape[0]
    objectives: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for region in regions:
        valid = has_region(masks_w, region, b, pred_w.device) | has_region(masks_l, region, b, pred_w.device)
        if not bool(valid.any()):
            continue
        tl = target if target_l is None else target_l
        m = [
            region_errors(p, tg, region, mk, scale)[valid]
            for p, tg, mk in (
                (pred_w, target, masks_w),
                (pred_l, tl, masks_l),
                (ref_w, target, masks_w),
                (ref_l, tl, masks_l),
            )
        ]
        out = dpo_loss_from_mse(m[0], m[1], m[2], m[3], beta)  # diagnostics (and the sigmoid loss)
        if spec.variant is None:
            value = out.loss
        else:
            value = dpo_variant_loss(spec.variant, m[0], m[1], m[2], m[3], beta)
        objectives[region] = value
        suffix = metric_suffix(region, regions)
        metrics.update({k: v for k, v in out.metrics("dpo" + suffix).items() if not k.startswith("loss/")})
        if region == "global":  # how far the policy has moved from the reference (a reward-hacking guard)
            metrics["ref/eps_mse"] = float(torch.cat([pred_w - ref_w, pred_l - ref_l]).detach().float().pow(2).mean())
        metrics[f"loss/{loss}{suffix}"] = float(value.detach())
    return objectives, metrics


def weighted_objectives(
    loss: str, pred: Tensor, target: Tensor, weights: Tensor, masks: dict[str, Tensor], regions: list[str], scale: float
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Reward-weighted (RWR) or filtered (weights 0/1) diffusion loss per region.

    ``weights`` (B,) are computed over the whole round by the caller (:func:`rlfh.losses.rwr.rwr_weights`,
    :func:`rlfh.losses.filtered.filter_weights`); each region's loss is :func:`rlfh.losses.rwr.weighted_loss`
    over the samples that have the region and a positive weight.
    """
    b = pred.shape[0]
    objectives: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for region in regions:
        valid = has_region(masks, region, b, pred.device) & (weights > 0)
        if not bool(valid.any()):
            continue
        err = region_errors(pred, target, region, masks, scale)
        value = weighted_loss(err[valid], weights[valid])
        objectives[region] = value
        suffix = metric_suffix(region, regions)
        metrics[f"loss/{loss}{suffix}"] = float(value.detach())
    return objectives, metrics


class AdvantageKnobs(NamedTuple):
    """The knobs of the advantage families' objectives (each reads its own)."""

    nft_beta: float = 1.0  # NFT: strength beta of the implicit policies
    clip_range: float = 0.2  # AWM: ratio clip
    nft_scale: float = 1.0  # NFT: the loss scale (the learner passes the advantage clip c, as the reference does)
    x0_scale: Tensor | None = None  # NFT: k_t per sample for the adaptive x_0-space errors; None: eps errors
    ghuber: GHuber | None = None  # AWM: the reference configs' generalised-Huber log p; None: -e


def advantage_objectives(
    loss: str,
    pred: Tensor,
    old_pred: Tensor | None,
    target: Tensor,
    signal: Tensor,
    masks: dict[str, Tensor],
    regions: list[str],
    scale: float,
    nft_beta: float = 1.0,
    clip_range: float = 0.2,
    nft_scale: float = 1.0,
    x0_scale: Tensor | None = None,
    ghuber: GHuber | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """DiffusionNFT or AWM per region, on re-noised samples of the sampling policy: the spec's
    objective (:func:`nft_objectives`, :func:`awm_objectives`), and ``<loss>/old_eps_mse``, how far
    training has moved the policy from the one that sampled."""
    spec = loss_spec(loss)
    if OLD_POLICY not in spec.needs:
        raise ValueError(f"advantage objectives are for losses that compare with the sampling policy, not {loss!r}")
    knobs = AdvantageKnobs(nft_beta, clip_range, nft_scale, x0_scale, ghuber)
    objectives, metrics = spec.objective_fn()(pred, old_pred, target, signal, masks, regions, scale, knobs)
    for region, value in objectives.items():
        suffix = metric_suffix(region, regions)
        metrics[f"loss/{loss}{suffix}"] = float(value.detach())
    if old_pred is not None:
        metrics[f"{loss}/old_eps_mse"] = float((pred.detach().float() - old_pred.detach().float()).pow(2).mean())
    return objectives, metrics


def nft_objectives(
    pred: Tensor,
    old_pred: Tensor | None,
    target: Tensor,
    signal: Tensor,
    masks: dict[str, Tensor],
    regions: list[str],
    scale: float,
    knobs: AdvantageKnobs,
):
    """DiffusionNFT: ``signal`` is r in [0, 1] (:func:`rlfh.losses.nft.nft_reward_weight`) and ``old_pred``
    the sampling policy's prediction on the same x_t; each region's loss is
    :func:`rlfh.losses.nft.nft_loss_from_errors` on the region errors of eps_+ and eps_-, times
    ``knobs.nft_scale``; with ``knobs.x0_scale`` (k_t = s_t / a_t per sample, (B,)) the errors are the
    reference's adaptive x_0-space ones (:func:`nft_region_errors`), else plain eps errors."""
    if old_pred is None:
        raise ValueError("nft needs the sampling policy's prediction (old_pred)")
    pos, neg = implicit_predictions(pred, old_pred, knobs.nft_beta)
    objectives: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for region, valid, suffix in present_regions(masks, regions, pred):
        out = nft_loss_from_errors(
            nft_region_errors(pos, target, region, masks, scale, knobs.x0_scale)[valid],
            nft_region_errors(neg, target, region, masks, scale, knobs.x0_scale)[valid],
            signal[valid],
            knobs.nft_beta,
            knobs.nft_scale,
        )
        metrics.update({f"nft/positive{suffix}": float(out.positive), f"nft/negative{suffix}": float(out.negative)})
        objectives[region] = out.loss
    return objectives, metrics


def awm_objectives(
    pred: Tensor,
    old_pred: Tensor | None,
    target: Tensor,
    signal: Tensor,
    masks: dict[str, Tensor],
    regions: list[str],
    scale: float,
    knobs: AdvantageKnobs,
):
    """AWM: ``signal`` is the advantage A; each region's loss is :func:`rlfh.losses.awm.awm_loss` on the
    region errors of the policy and of ``old_pred`` (None: on-policy, ratio 1), clipped at ``knobs.clip_range``."""
    objectives: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    g = knobs.ghuber

    def log_p_error(p: Tensor, region: str, valid: Tensor) -> Tensor:  # -log p: e, or the ghuber form of e
        e = region_errors(p, target, region, masks, scale)[valid]
        return e if g is None else ghuber_error(e, GHuber(g.power, g.x0_scale[valid], g.flow_time[valid]))

    for region, valid, suffix in present_regions(masks, regions, pred):
        old_err = None if old_pred is None else log_p_error(old_pred.detach(), region, valid)
        out = awm_loss(log_p_error(pred, region, valid), signal[valid], old_err, knobs.clip_range)
        metrics.update({f"awm/clipfrac{suffix}": float(out.clipfrac), f"awm/ratio{suffix}": float(out.ratio_mean)})
        objectives[region] = out.loss
    return objectives, metrics
