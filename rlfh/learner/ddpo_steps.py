"""DDPO / GRPO on recorded trajectories (:func:`train_trajectories`): the clipped ratio of each trained step's
log-probability under the policy and the sampler, or a trust region (DPPO's masked KL, GRPO-Guard's normalized
ratio), with the helpers that recompute a step's Gaussian under the current weights."""

from __future__ import annotations

import numpy as np
import torch

from families import first_of_each
from rlfh.data.batches import TrajectoryBatch, rows
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.loop import check_batch, kl_term, micro_batches, optimizer_steps, summary
from rlfh.learner.run_config import ddpo_train_steps
from rlfh.losses.ddpo import ddpo_clipped_loss
from rlfh.losses.registry import TRAJECTORIES
from rlfh.losses.trust_region import dppo_loss, gaussian_mean_kl, guard_loss


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
