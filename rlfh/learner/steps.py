"""One round of training, written out: preference pairs, weighted samples, DDPO trajectories, or prompts (DRaFT).
DDPO's loop is in rlfh/learner/ddpo_steps.py, the parts every loop shares (optimizer steps, micro-batches,
regularizers, the update) in rlfh/learner/loop.py.

Each ``train_*`` function is an ordinary loop a reader follows top to bottom:

    for each optimizer step (epochs x shuffled order, a remainder < one step dropped):
        draw the step's randomness (t, eps per item; or DDPO's timestep order)
        for each micro-batch of this rank's share of the step:
            predict with the policy (and the reference), compute the loss per region,
            combine the regions by the fairness rule, back-propagate through the engine
        finish the optimizer step (count it, check the weights are finite, update the EMA)

A DPO micro-batch, with regions r in ``learner.regions.names``:

    x_0^w, x_0^l (B, 4, h, w)   final latents of winner / loser, UNet space
    t ~ U{0..T-1}, eps ~ N(0, I)       shared by w and l
    x_t^* = sqrt(abar_t) x_0^* + sqrt(1 - abar_t) eps
    eps_theta, eps_ref = UNet(x_t^*, t, c) with / without the LoRA adapter
    L_r = DPO loss on region r's errors                        (rlfh/losses/objectives.py)
    loss = sum_r c_r L_r, c from the fairness rule              (rlfh/losses/fairness.py; MPD by default)
         + regularizers (KL, guidance-free distillation)
         + guidance.coef * L_guide on the loser half                (rlfh/losses/guidance.py)

Every rank walks the same shuffled order and draws the same randomness for a whole optimizer step,
then trains on its own share of the step's items. W ranks with micro-batch m thus take the same
update as one rank accumulating W micro-batches of m, and the draws do not depend on W. MPD and
MGDA weights are computed per micro-batch, so with accumulation the step is the mean of
per-micro-batch MPD updates. Metrics come back as a flat dict of floats with slash names
(``loss/dpo``, ``mpd/weight/face``), averaged over the micro-batches where each was present.
"""

from __future__ import annotations

import numpy as np
import torch

from families import Conditioning
from rlfh.data.batches import PairBatch, PromptBatch, SampleBatch, TrajectoryBatch, rows
from rlfh.data.buckets import BucketBatches, merge_stats
from rlfh.learner.ddpo_steps import train_trajectories
from rlfh.learner.draft_steps import decode, differentiable_rewards, sampling_step, score
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.loop import (
    check_batch,
    guidance_term,
    hcp_term,
    masks_at,
    micro_batches,
    optimizer_steps,
    plus,
    regularizers,
    summary,
    update,
)
from rlfh.losses.draft import region_objectives, scored_latents
from rlfh.losses.guidance import winner_noise
from rlfh.losses.objectives import advantage_objectives, pairwise_objectives, weighted_objectives
from rlfh.losses.registry import OLD_POLICY, PAIRS, PROMPTS, SAMPLES, loss_spec


def train(lrn: LearnerEngine, batch, epochs: int = 1) -> dict[str, float]:
    """One round's training on what :func:`rlfh.data.pairs.learner_batch` built."""
    # prompt embeddings from the rollouts when the batch brings them (no text encoder runs)
    lrn.take_conditioning(batch.conditioning, batch.prompts)
    lrn.begin_round()  # the sampling policy's weights (nft, awm) and the EMA reference, if any
    # a multi-aspect round (rlfh/data/buckets.py): each bucket's batch in turn, latents never stacked across sizes
    parts = batch.parts if isinstance(batch, BucketBatches) else [batch]
    version = lrn.policy_version
    results = [(len(part), train_batch(lrn, part, epochs)) for part in parts]
    lrn.policy_version = version + int(lrn.policy_version > version)  # one policy version per round
    metrics = results[0][1] if len(results) == 1 else bucket_metrics(results)
    lrn.end_round(metrics)  # a once-per-round EMA (learner.ema.schedule=round_ramp); GARDO's reference refresh
    return metrics


def train_batch(lrn: LearnerEngine, batch, epochs: int) -> dict[str, float]:
    if isinstance(batch, PairBatch):
        return train_pairs(lrn, batch, epochs)
    if isinstance(batch, TrajectoryBatch):
        return train_trajectories(lrn, batch, epochs)
    if isinstance(batch, SampleBatch):
        return train_samples(lrn, batch, epochs)
    if isinstance(batch, PromptBatch):
        return train_prompts(lrn, batch, epochs)
    raise TypeError(f"cannot train on {type(batch).__name__}")


def bucket_metrics(results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """A round's metrics from its buckets' (size, metrics): means weighted by size, the items summed, the
    step counter and learning rate as the last bucket left them, skipped only if every bucket was."""
    out = merge_stats([(n, {k: v for k, v in m.items() if not k.startswith("learner/")}) for n, m in results])
    last = results[-1][1]
    out.update({k: last[k] for k in ("learner/steps", "learner/lr") if k in last})
    out["learner/items"] = float(sum(m["learner/items"] for _, m in results))
    if all("learner/skipped" in m for _, m in results):
        out["learner/skipped"] = 1.0
    out["learner/buckets"] = float(len(results))
    return out


# ---------------------------------------------------------------------------------------- DPO family
def train_pairs(lrn: LearnerEngine, pairs: PairBatch, epochs: int = 1) -> dict[str, float]:
    """Diffusion-DPO (or a variant) on preference pairs, per region."""
    lc = lrn.cfg.learner
    if check_batch(lc.loss, PAIRS).aligned_only:
        return train_aligned_pairs(lrn, pairs, epochs)
    h, w = pairs.latents_w.shape[-2] * lrn.vae_scale, pairs.latents_w.shape[-1] * lrn.vae_scale
    aligned = pairs.aligned_rows()
    history = []
    for step in optimizer_steps(lrn, len(pairs), epochs):
        t_all, eps_all = lrn.draw_noise(len(step), pairs.latents_w.shape[1:])
        for idx, sl in micro_batches(lrn, step):
            b = len(idx)
            prompts = [pairs.prompts[i] for i in idx]
            # winner and loser in one batch of 2B, with the same t and eps for both halves
            x0 = torch.cat([rows(pairs.latents_w, idx, lrn.device), rows(pairs.latents_l, idx, lrn.device)])
            t, eps = torch.cat([t_all[sl], t_all[sl]]), torch.cat([eps_all[sl], eps_all[sl]])
            x_t, t, target = lrn.noised(x0, t, eps)
            enc, added = lrn.condition(prompts + prompts, h, w)
            pred = lrn.policy(x_t, t, enc, added)
            ref = lrn.reference(x_t, t, enc, added)
            masks_w, masks_l = masks_at(pairs.masks_w, idx, lrn.device), masks_at(pairs.masks_l, idx, lrn.device)
            objectives, metrics = pairwise_objectives(
                lc.loss,
                lc.dpo.beta,
                pred[:b],
                pred[b:],
                ref[:b],
                ref[b:],
                target[:b],
                masks_w,
                masks_l,
                list(lc.regions.names),
                lc.regions.scale,
                target_l=target[b:],  # the loser's own: a velocity target holds its x0
            )
            extra = regularizers(lrn, pred, ref, x_t, t, h, w, metrics)
            extra = plus(extra, hcp_term(lrn, t, prompts + prompts, (pairs.priors_w, pairs.priors_l), idx, metrics))
            guide = guidance_term(lrn, pred[b:], x_t[b:], t[b:], x0[:b], masks_l, aligned[idx], metrics)
            history.append(update(lrn, objectives, metrics, pred, plus(extra, guide)))
    return summary(lrn, history, len(pairs))


def train_aligned_pairs(lrn: LearnerEngine, pairs: PairBatch, epochs: int = 1) -> dict[str, float]:
    """A loss of aligned region pairs alone (the spec's ``aligned_only``: the guidance loss,
    rlfh/losses/guidance_finetune.py), per region: the policy at the loser's x_t^l, regressed onto the
    target that denoises it to the winner; one UNet call per pair, no reference."""
    lc = lrn.cfg.learner
    spec = check_batch(lc.loss, PAIRS)
    h, w = pairs.latents_w.shape[-2] * lrn.vae_scale, pairs.latents_w.shape[-1] * lrn.vae_scale
    aligned = torch.from_numpy(pairs.aligned_rows().copy())  # Ray hands out read-only arrays
    history = []
    for step in optimizer_steps(lrn, len(pairs), epochs):
        t_all, eps_all = lrn.draw_noise(len(step), pairs.latents_w.shape[1:])
        for idx, sl in micro_batches(lrn, step):
            x0_w = rows(pairs.latents_w, idx, lrn.device)
            x_t, t, _ = lrn.noised(rows(pairs.latents_l, idx, lrn.device), t_all[sl], eps_all[sl])
            enc, added = lrn.condition([pairs.prompts[i] for i in idx], h, w)
            pred = lrn.policy(x_t, t, enc, added)
            target = lrn.prediction_target(x0_w, t, winner_noise(x_t, x0_w, lrn.alpha_bar(t)))
            masks = masks_at(pairs.masks_l, idx, lrn.device)
            objectives, metrics = spec.objective_fn()(pred, target, masks, aligned[idx], list(lc.regions.names))
            history.append(update(lrn, objectives, metrics, pred))
    return summary(lrn, history, len(pairs))


# ---------------------------------------------------------------------------------------- RWR, filtered, NFT, AWM
def train_samples(lrn: LearnerEngine, samples: SampleBatch, epochs: int = 1) -> dict[str, float]:
    """Reward-weighted (RWR) or filtered diffusion loss on weighted samples, per region; or
    DiffusionNFT / AWM, whose per-sample signal (r or A) comes from the batch's advantages and which
    compare the policy with the round's sampling policy on the same x_t (``lrn.old_policy``)."""
    lc = lrn.cfg.learner
    advantage = OLD_POLICY in check_batch(lc.loss, SAMPLES).needs
    h, w = samples.latents.shape[-2] * lrn.vae_scale, samples.latents.shape[-1] * lrn.vae_scale
    history = []
    for step in optimizer_steps(lrn, len(samples), epochs):
        t_all, eps_all = lrn.draw_noise(len(step), samples.latents.shape[1:])
        for idx, sl in micro_batches(lrn, step):
            x_t, t, target = lrn.noised(rows(samples.latents, idx, lrn.device), t_all[sl], eps_all[sl])
            enc, added = lrn.condition([samples.prompts[i] for i in idx], h, w)
            pred = lrn.policy(x_t, t, enc, added)
            masks = masks_at(samples.masks, idx, lrn.device)
            if advantage:  # the x0 scale is NFT's knob; AWM does not read it
                objectives, metrics = advantage_objectives(
                    lc.loss,
                    pred,
                    lrn.old_policy(x_t, t, enc, added),
                    target,
                    advantage_signal(lc, samples, idx).to(lrn.device),
                    masks,
                    list(lc.regions.names),
                    lc.regions.scale,
                    lc.nft.beta,
                    lc.awm.clip_range,
                    lc.nft.adv_clip,
                    lrn.x0_scale(t) if lc.nft.weighting == "adaptive" else None,
                    lrn.ghuber(t) if lc.awm.weighting == "ghuber" else None,  # read by awm only
                )
            else:
                objectives, metrics = weighted_objectives(
                    lc.loss,
                    pred,
                    target,
                    rows(samples.weights, idx, lrn.device),
                    masks,
                    list(lc.regions.names),
                    lc.regions.scale,
                )
            needs_ref = lc.reference.kl_coef > 0 or lc.guidance_free.scale is not None
            ref = lrn.reference(x_t, t, enc, added) if needs_ref else None
            gate = None if samples.kl_gate is None else torch.from_numpy(np.asarray(samples.kl_gate[idx], bool))
            extra = plus(
                regularizers(lrn, pred, ref, x_t, t, h, w, metrics, gate),
                hcp_term(lrn, t, [samples.prompts[i] for i in idx], (samples.priors,), idx, metrics),
            )
            history.append(update(lrn, objectives, metrics, pred, extra))
    return summary(lrn, history, len(samples))


def advantage_signal(lc, samples: SampleBatch, idx: list[int]) -> torch.Tensor:
    """The per-sample signal of NFT / AWM for rows ``idx``, from the batch's advantages A by the loss
    spec's ``signal`` (rlfh/losses/registry.py): AWM's A itself, NFT's r = 0.5 + 0.5 clip(A, -c, c) / c."""
    adv = torch.from_numpy(np.array(samples.advantages[idx], dtype=np.float64))
    return loss_spec(lc.loss).signal_of(adv, lc).float()


# ---------------------------------------------------------------------------------------- DRaFT, AlignProp, ReFL
def train_prompts(lrn: LearnerEngine, batch: PromptBatch, epochs: int = 1) -> dict[str, float]:
    """DRaFT-K / DRaFT-LV / AlignProp / ReFL on a round's prompts (``learner.draft.variant``): the learner
    samples each prompt again from the current weights with gradient, decodes, scores with the differentiable
    rewards per region and back-propagates (rlfh/losses/draft.py; the parts: rlfh/learner/draft_steps.py)."""
    lc, rc = lrn.cfg.learner, lrn.cfg.rollout
    check_batch(lc.loss, PROMPTS)
    dc = lc.draft
    rewards = differentiable_rewards(lrn)
    scheduler = lrn.family.stochastic_scheduler(lrn.pipe.scheduler.config)
    lrn.family.set_timesteps(scheduler, rc.num_inference_steps, rc.height, rc.width, lrn.device)
    timesteps = scheduler.timesteps
    n = len(timesteps)
    t_last = timesteps[-1]  # draft_lv re-noises x_0 to the last step's start with the training forward process

    def renoise_last(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return lrn.schedule.add_noise(x0, eps, t_last)

    negative = rc.negative_prompt if rc.guidance_scale > 1.0 else None
    copies = dc.lv_n if dc.variant == "draft_lv" else 1
    history = []
    for step in optimizer_steps(lrn, len(batch), epochs):
        for idx, _ in micro_batches(lrn, step):
            prompts = [batch.prompts[i] for i in idx]
            # draft_lv's last step runs on m B rows (copy j of sample b at row j B + b): conditioning to match
            conds = {
                len(prompts) * c: Conditioning(*lrn.condition(prompts * c, rc.height, rc.width, negative))
                for c in {1, copies}
            }
            step_fn = sampling_step(lrn, scheduler, timesteps, conds, rc.guidance_scale, dc.kl_coef > 0)
            latent_hw = (rc.height // lrn.vae_scale, rc.width // lrn.vae_scale)
            channels = lrn.family.latent_channels(lrn.pipe)
            x_T = torch.randn((len(prompts), channels, *latent_hw), generator=lrn.generator)
            # a flow scheduler has no init_noise_sigma: its chain starts at sigma = 1, x_1 = eps
            x_T = (x_T * getattr(scheduler, "init_noise_sigma", 1.0)).to(lrn.device)
            x, kl, metrics = scored_latents(dc, x_T, n, step_fn, renoise_last, lrn.generator)
            images = decode(lrn, x, dc.checkpoint)
            verdicts = score(rewards, images, prompts * copies, list(lc.regions.names), metrics)
            objectives, present = region_objectives(verdicts)
            metrics.update(present)
            extra = None
            if kl is not None:
                extra = dc.kl_coef * kl
                metrics["loss/kl"] = float(kl.detach())
            for region, term in objectives.items():
                metrics[f"loss/draft/{region}"] = float(term.detach())
            history.append(update(lrn, objectives, metrics, x, extra))
    return summary(lrn, history, len(batch))
