"""The parts every training loop of :mod:`rlfh.learner.steps` shares: the batch-kind check, the optimizer steps
over a shuffled order and each rank's micro-batches, the regularizers added to a loss (KL, guidance-free
distillation, the guidance term, HcP's alignment), the update through the engine, and the metrics' summary."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from rlfh.data.batches import rows
from rlfh.learner.engine import LearnerEngine
from rlfh.losses import fairness
from rlfh.losses.gardo import gated_kl
from rlfh.losses.guidance import guidance_loss, winner_noise
from rlfh.losses.guidance_free import guidance_free_loss, guided_teacher
from rlfh.losses.kl import per_sample_eps_kl
from rlfh.losses.registry import loss_spec


def check_batch(loss: str, kind: str):
    """The spec of ``loss`` (rlfh/losses/registry.py), which must train on ``kind``."""
    spec = loss_spec(loss)
    if spec.batch != kind:
        raise ValueError(f"learner.loss={loss} trains on {spec.batch}, not {kind}")
    return spec


def optimizer_steps(lrn: LearnerEngine, n: int, epochs: int) -> Iterator[list[int]]:
    """The items of each optimizer step: ``epochs`` shuffled passes over n items in steps of
    ``learner.train_batch_size``, the same on every rank; a remainder < one step is dropped.
    After the caller has trained on a step, the step is finished on the engine."""
    bs = lrn.cfg.learner.train_batch_size
    n_use = (n // bs) * bs
    if n_use == 0:
        return
    if not lrn.denoiser.training:  # Module.train walks every submodule: ~10 ms a step on a UNet
        lrn.engine.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=lrn.generator)[:n_use].tolist()
        for start in range(0, n_use, bs):
            yield order[start : start + bs]
            lrn.finish_optimizer_step()


def micro_batches(lrn: LearnerEngine, step: list[int]) -> Iterator[tuple[list[int], slice]]:
    """This rank's micro-batches of a step: the items, and their positions in the step's draws."""
    share = len(step) // lrn.world_size
    mb = lrn.cfg.learner.micro_batch_size_per_gpu
    lo = lrn.rank * share
    for start in range(lo, lo + share, mb):
        yield step[start : start + mb], slice(start, start + mb)


def masks_at(masks: dict[str, np.ndarray], idx: list[int], device) -> dict[str, torch.Tensor]:
    return {r: rows(m, idx, device) for r, m in masks.items()}


def kl_term(lrn: LearnerEngine, pred, ref, metrics: dict[str, float], weights=None, gate=None):
    """``learner.reference.kl_coef`` * mean w (eps_theta - eps_ref)^2 (rlfh/losses/kl.py), or None when off: unit weight
    on forward-noised samples, the per-sample ``weights`` (B,) w_t of a DDPO step (the exact transition KL). With
    GARDO's ``gate`` (B,) bool the mean runs over the gated rows only (rlfh/losses/gardo.py: gated_kl).
    With GARDO on, ``gardo/kl``: the plain mean KL of the rows the term covers, what ``gardo.refresh_kl``
    compares."""
    coef = lrn.cfg.learner.reference.kl_coef
    if coef <= 0 or ref is None:
        return None
    per_sample = per_sample_eps_kl(pred, ref, weights)
    term = coef * per_sample.mean() if gate is None else gated_kl(per_sample, gate, coef)
    metrics["loss/kl"] = float(term.detach())
    if gate is None and lrn.refresh is None:  # GARDO off: the term as it always was
        return term
    covered = per_sample.detach() if gate is None else per_sample.detach()[gate.to(per_sample.device)]
    if covered.numel():
        metrics["gardo/kl"] = float(covered.mean())
    if gate is not None:
        metrics["gardo/kl_gated_share"] = float(gate.float().mean())
    return term


def guidance_free_term(lrn: LearnerEngine, pred, ref, x_t, t, height: int, width: int, metrics: dict[str, float]):
    """guidance-free distillation (rlfh/losses/guidance_free.py): the policy's conditional eps regressed onto the
    reference's guided eps at ``learner.guidance_free.scale``; one extra no-grad reference forward on the
    negative prompt's rows. None when off."""
    lc = lrn.cfg.learner
    if lc.guidance_free.scale is None:
        return None
    neg_enc, neg_added = lrn.condition([lrn.cfg.rollout.negative_prompt] * x_t.shape[0], height, width)
    teacher = guided_teacher(ref, lrn.reference(x_t, t, neg_enc, neg_added), lc.guidance_free.scale)
    term = guidance_free_loss(pred, teacher, lc.guidance_free.coef)
    metrics["loss/guidance_free"] = float(term.detach()) / max(lc.guidance_free.coef, 1e-30)  # the plain mean error
    return term


def guidance_term(
    lrn: LearnerEngine,
    pred_l,
    x_t_l,
    t,
    x0_w,
    masks_l: dict[str, torch.Tensor],
    aligned: np.ndarray,
    metrics: dict[str, float],
):
    """The guidance term (rlfh/losses/guidance.py): ``learner.dpo.guidance.coef`` * the masked error of the
    policy's prediction at the loser's x_t^l against the target that denoises x_t^l to the winner,
    inside the loser's ``learner.dpo.guidance.region`` mask, on the ALIGNED region pairs of the
    micro-batch only (``aligned`` (B,) bool; two different samples are not one trajectory apart). None
    when off or when no aligned pair has the region. ``loss/guidance`` is the plain (unweighted) mean
    error of the pairs with the region."""
    lc = lrn.cfg.learner
    if lc.dpo.guidance.coef <= 0:
        return None
    region = lc.dpo.guidance.region
    if region != "global" and region not in masks_l:
        raise ValueError(
            f"learner.dpo.guidance.region={region}: the batch has no {region!r} masks (it holds "
            f"{sorted(masks_l)}); the pairs must come from learner_batch with this config"
        )
    rows_on = torch.as_tensor(np.asarray(aligned, bool), device=pred_l.device).view(-1, 1, 1, 1)
    mask = rows_on.to(pred_l.dtype).expand(-1, 1, *pred_l.shape[-2:]) if region == "global" else masks_l[region]
    mask = mask * rows_on.to(mask.dtype)  # a pair that is not an aligned region pair has no region here
    # x_t^l as the UNet saw it (in its dtype), so that eps* denoises exactly that input to x_0^w
    target = lrn.prediction_target(x0_w, t, winner_noise(x_t_l, x0_w, lrn.alpha_bar(t)))
    term, err = guidance_loss(pred_l, target, mask, lc.dpo.guidance.coef)
    present = mask.flatten(1).amax(1) > 0
    metrics["guidance/region_present"] = float(present.float().mean())
    if term is None:
        return None
    metrics["loss/guidance"] = float(err.detach()[present].mean())
    return term


def regularizers(lrn: LearnerEngine, pred, ref, x_t, t, height: int, width: int, metrics: dict[str, float], gate=None):
    """The whole-image terms added after the fairness rule: KL to the reference (on the ``gate``'s rows only when
    GARDO gates it), guidance-free distillation."""
    terms = [
        term
        for term in (
            kl_term(lrn, pred, ref, metrics, gate=gate),
            guidance_free_term(lrn, pred, ref, x_t, t, height, width, metrics),
        )
        if term is not None
    ]
    return sum(terms) if terms else None


def hcp_term(lrn: LearnerEngine, t, prompts: list[str], prior_sets, idx: list[int], metrics: dict[str, float]):
    """The HcP layer's alignment term (rlfh/learner/hcp.py, rlfh/losses/hcp.py) on the policy forward just
    taken, whose rows are the pose priors' rows ``idx`` of ``prior_sets`` one after the other (pairs:
    ``priors_w``, ``priors_l``). None when ``model.hcp`` is off or nothing counts."""
    if lrn.hcp is None:
        return None
    prior = (
        torch.cat([rows(p, idx, lrn.device) for p in prior_sets]) if all(p is not None for p in prior_sets) else None
    )
    return lrn.hcp.term(t, prompts, prior, metrics)


def plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


def update(
    lrn: LearnerEngine,
    objectives: dict[str, torch.Tensor],
    metrics: dict[str, float],
    pred,
    extra: torch.Tensor | None = None,
) -> dict[str, float]:
    """Combine the regions' losses by the fairness rule, add ``extra`` (the KL term: a whole-image
    regularizer, outside the fairness rule) and back-propagate through the engine."""
    lc = lrn.cfg.learner
    loss, fair_metrics = fairness.combine_objectives(
        objectives,
        lc.regions.fairness.rule,
        len(lc.regions.names),
        lrn.trainable_parameters(),
        lc.regions.fairness.weights,
        lc.regions.fairness.alpha,
    )
    if loss is None:
        loss = pred.sum() * 0.0  # no region present: keeps DeepSpeed's micro-step bookkeeping
    if extra is not None:
        loss = loss + extra
    metrics.update(fair_metrics)
    for region in lc.regions.names:
        metrics[f"regions/{region}/present"] = float(region in objectives)
    lrn.backward(loss)
    return metrics


def summary(lrn: LearnerEngine, history: list[dict[str, float]], n: int) -> dict[str, float]:
    """The round's metrics: each averaged over the micro-batches where it was present."""
    if not history:
        return {"learner/steps": float(lrn.global_step), "learner/items": float(n), "learner/skipped": 1.0}
    keys = sorted({k for h in history for k in h})
    metrics = {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}
    metrics.update(
        {
            "learner/steps": float(lrn.global_step),
            "learner/items": float(n),
            "learner/lr": float(lrn.optimizer.param_groups[0]["lr"]),
        }
    )
    lrn.policy_version += 1
    return metrics
