"""One round of training, written out: preference pairs, weighted samples, DDPO trajectories, or prompts (DRaFT).

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

from typing import Iterator

import numpy as np
import torch

from families import Conditioning, first_of_each
from rlfh.data.batches import PairBatch, PromptBatch, SampleBatch, TrajectoryBatch, rows
from rlfh.data.buckets import BucketBatches, merge_stats
from rlfh.learner.draft_steps import decode, differentiable_rewards, sampling_step, score
from rlfh.learner.engine import LearnerEngine, ddpo_train_steps
from rlfh.losses import fairness
from rlfh.losses.ddpo import ddpo_clipped_loss
from rlfh.losses.draft import region_objectives, scored_latents
from rlfh.losses.gardo import gated_kl
from rlfh.losses.guidance import guidance_loss, winner_noise
from rlfh.losses.guidance_free import guidance_free_loss, guided_teacher
from rlfh.losses.kl import per_sample_eps_kl
from rlfh.losses.objectives import advantage_objectives, pairwise_objectives, weighted_objectives
from rlfh.losses.registry import OLD_POLICY, PAIRS, PROMPTS, SAMPLES, TRAJECTORIES, loss_spec
from rlfh.losses.trust_region import dppo_loss, gaussian_mean_kl, guard_loss


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


# ---------------------------------------------------------------------------------------- DDPO
def train_trajectories(lrn: LearnerEngine, tb: TrajectoryBatch, epochs: int = 1) -> dict[str, float]:
    """DDPO: a clipped-ratio policy gradient over the rollout actors' recorded DDIM trajectories.

    For each trained timestep j of a trajectory (x_T .. x_0 with log p_old(x_{j+1} | x_j) recorded
    at sampling), the policy's log-probability of the same transition is recomputed with the guided
    eps of the trained UNet, and ``ddpo_clipped_loss`` is back-propagated: one backward and one
    DeepSpeed micro-step per timestep (``deepspeed_config`` multiplies the accumulation steps).
    With ``learner.reference.kl_coef`` each trained step adds kl_coef * KL(pi_theta(. | x_j) || pi_ref(. | x_j)), the
    closed-form KL of the two DDIM-eta Gaussian steps from the guided predictions on x_j: w_j * mean
    (eps_theta - eps_ref)^2 with w_j = k_j^2 / (2 sigma_j^2) (:func:`kl_term`, :func:`transition_weight`;
    rlfh/losses/kl.py). ``learner.ddpo.timestep_fraction`` of the recorded steps are trained, in one random order per
    optimizer step. With ``learner.ddpo.window`` = W only the round's SDE window was stochastic and
    recorded (``rlfh.data.pairs.ddpo_window``): the W steps from x_j (j = ``tb.window_start``) are the
    only actions, the deterministic steps around it are not trained, and the fraction is of W. With
    ``learner.ddpo.branch`` a prompt group's samples share x_j (``Sampler.sample``'s ``branch_seeds``):
    the window's first step runs the UNet once per distinct (prompt, x_j) of a micro-batch.
    """
    lc = lrn.cfg.learner
    check_batch(lc.loss, TRAJECTORIES)
    n_steps = tb.latents.shape[1] - 1  # the recorded steps: W with an SDE window, else T
    expected = lc.ddpo.window or lrn.cfg.rollout.num_inference_steps
    if n_steps != expected or tb.log_probs.shape[1] != n_steps or len(tb.timesteps) != n_steps:
        raise ValueError(
            f"trajectories record {n_steps} steps ({tb.log_probs.shape[1]} log-probs, {len(tb.timesteps)} "
            f"timesteps); learner.ddpo.window / rollout.num_inference_steps give {expected}"
        )
    k = ddpo_train_steps(lrn.cfg)
    s = tb.settings
    # the sampler's timesteps at the batch's size (a bucket's; FLUX shifts them by the image's token count)
    lrn.family.set_timesteps(lrn.stochastic, s.num_inference_steps, s.height, s.width, lrn.device)
    history = []
    first = True  # before any update of this round the policy is the sampler's: the ratio must be 1
    for step in optimizer_steps(lrn, len(tb), epochs):
        order = torch.randperm(n_steps, generator=lrn.generator)[:k].tolist()  # shared by the step's micro-batches
        for idx, _ in micro_batches(lrn, step):
            enc, added = lrn.condition(
                [tb.prompts[i] for i in idx], s.height, s.width, s.negative_prompt if s.guidance_scale > 1.0 else None
            )
            lat = rows(tb.latents, idx, lrn.device)  # (B, W+1, 4, h, w), W = T without a window
            old = rows(tb.log_probs, idx, lrn.device)  # (B, W)
            adv = rows(tb.advantages, idx, lrn.device)  # (B,)
            gate = None if tb.kl_gate is None else torch.from_numpy(np.asarray(tb.kl_gate[idx], bool))
            per_step = []
            # learner.ddpo.branch: a prompt group's branches share x_j, the window's first input, so the
            # trained UNet runs once per distinct (prompt, x_j) there and its eps is copied per sample
            # (the gradient sums over the copies, as over the samples)
            shared = distinct_rows([tb.prompts[i] for i in idx], lat[:, 0]) if lc.ddpo.branch and 0 in order else None
            for j in order:
                t = tb.timesteps[j].item()  # an int step (DDPM) or a float 1000 sigma (flow)
                if j == 0 and shared is not None:
                    heads, copies = shared
                    cond1 = lrn.condition(
                        [tb.prompts[idx[i]] for i in heads],
                        s.height,
                        s.width,
                        s.negative_prompt if s.guidance_scale > 1.0 else None,
                    )
                    eps = lrn.guided(lrn.policy_model, lat[heads, 0], t, cond1, s.guidance_scale)[copies]
                else:
                    eps = lrn.guided(lrn.policy_model, lat[:, j], t, (enc, added), s.guidance_scale)
                out = lrn.step_logprob(eps, t, lat[:, j], lat[:, j + 1], s.eta)
                loss, m = trust_region_loss(lrn, out, old[:, j], adv, lat[:, j], lat[:, j + 1], t, enc, added, s, j)
                if first:
                    m["ddpo/recorded_logprob_max_diff"] = float((out.log_prob.detach() - old[:, j]).abs().max())
                ref = reference_eps(lrn, lat[:, j], t, enc, added, s)
                w_t = None if ref is None else transition_weight(lrn, t, s.eta, len(idx))
                kl = None if ref is None else kl_term(lrn, eps, ref, m, w_t, gate)
                lrn.backward(loss.loss if kl is None else loss.loss + kl)
                per_step.append(m)
            keys = {key for m in per_step for key in m}  # per-step drift keys differ between steps
            history.append({key: float(np.mean([m[key] for m in per_step if key in m])) for key in keys})
            first = False
    return summary(lrn, history, len(tb))


def distinct_rows(prompts: list[str], x: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
    """The first row of each distinct (prompt, x[i]) of a micro-batch and, per row, the index of its
    distinct one; None when every row is distinct. Rows are compared bit for bit."""
    keys = [(p, x[i].detach().cpu().numpy().tobytes()) for i, p in enumerate(prompts)]
    heads, group = first_of_each(keys)
    if len(heads) == len(keys):
        return None
    return heads, torch.tensor(group, device=x.device)


def reference_eps(lrn: LearnerEngine, x, t: int, enc, added, s):
    """The reference's guided eps on a recorded step's input x_j (the KL term's target), or None
    without ``learner.reference.kl_coef``."""
    if lrn.cfg.learner.reference.kl_coef <= 0:
        return None
    with torch.no_grad():
        return lrn.guided(lrn.reference_denoiser(), x, t, (enc, added), s.guidance_scale)


def transition_weight(lrn: LearnerEngine, t, eta: float, n: int) -> torch.Tensor:
    """w_t = k_t^2 / (2 s_t^2) of the sampler's stochastic step from timestep t (rlfh/losses/kl.py; the family's
    :meth:`families.base.ModelFamily.step_coefficients`), (n,) on the device: KL(pi_theta || pi_ref) of the
    step per unit mean squared gap of the guided predictions (eps, v or velocity)."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for the transition to have a density, got {eta}")
    k, s = lrn.family.step_coefficients(lrn.stochastic, t, eta)
    return (k**2 / (2 * s**2)).float().expand(n).to(lrn.device)


def mean_jacobian(lrn: LearnerEngine, t, eta: float) -> torch.Tensor:
    """d mu_t / d (prediction) of the sampler's stochastic step from timestep t, a float32 scalar on the device
    (k_t of :meth:`families.base.ModelFamily.step_coefficients`; DDIM: mu_t = sqrt(abar_t' / abar_t) x_t +
    k_t eps_hat, rlfh/losses/kl.py). GRPO-Guard's per-step weight is its inverse."""
    k, _ = lrn.family.step_coefficients(lrn.stochastic, t, eta)
    return k.float().to(lrn.device)


def trust_region_loss(lrn: LearnerEngine, out, old_log_prob, adv, x, x_next, t: int, enc, added, s, j: int):
    """One DDIM step's policy-gradient loss under ``learner.ddpo.trust_region`` (rlfh/losses/trust_region.py)
    and its metrics: ``clip`` (DDPO's clipped ratio), ``dppo`` (Flow-DPPO's KL mask) or ``guard``
    (GRPO-Guard's drift-free normalized ratio, the step's loss weighted by 1 / |k_t|:
    :func:`mean_jacobian`). The last two need the sampling policy's mean of the step (``s``: the round's sampler
    settings, CFG and eta): recomputed here with the round's starting weights (``lrn.old_weights``), which are the
    sampler's (DDPO is on-policy: rollout.max_staleness=0). ``ddpo/log_ratio_drift/step{j}`` is the
    mean log-ratio of recorded step j (its expectation is -KL_j)."""
    lc = lrn.cfg.learner
    m = {f"ddpo/log_ratio_drift/step{j}": float((out.log_prob.detach() - old_log_prob).mean())}
    if lc.ddpo.trust_region == "clip":
        loss = ddpo_clipped_loss(out.log_prob, old_log_prob, adv, lc.ddpo.clip_range)
        m.update(
            {
                "loss/ddpo": float(loss.loss.detach()),
                "ddpo/approx_kl": float(loss.approx_kl),
                "ddpo/clipfrac": float(loss.clipfrac),
                "ddpo/ratio": float(loss.ratio_mean),
            }
        )
        return loss, m
    with torch.no_grad():
        eps_old = lrn.guided(lrn.denoiser_with(lrn.old_weights), x, t, (enc, added), s.guidance_scale)
        mean_old = lrn.step_logprob(eps_old, t, x, x_next, s.eta).mean
    kl = gaussian_mean_kl(out.mean, mean_old, out.std_dev)  # (B,), with the gradient (guard uses it)
    if lc.ddpo.trust_region == "dppo":
        loss = dppo_loss(out.log_prob, old_log_prob, adv, kl, lc.ddpo.trust_region_kl)
        limited = "ddpo/maskedfrac"
    else:
        loss = guard_loss(
            out.log_prob, old_log_prob, adv, kl, out.std_dev, lc.ddpo.clip_range, 1 / mean_jacobian(lrn, t, s.eta).abs()
        )
        limited = "ddpo/clipfrac"
    m.update(
        {
            "loss/ddpo": float(loss.loss.detach()),
            "ddpo/kl": float(loss.kl_mean),
            limited: float(loss.limited_frac),
            "ddpo/ratio": float(loss.ratio_mean),
        }
    )
    return loss, m


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


# ---------------------------------------------------------------------------------------- the shared loop parts
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
