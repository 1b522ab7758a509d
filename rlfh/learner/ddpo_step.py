"""The learner's DDPO step: a clipped-ratio policy gradient over recorded DDIM trajectories.

For each trained timestep j of a trajectory (x_T .. x_0 recorded by the rollout actor with
log p_old(x_{j+1} | x_j)), the policy's log-probability of the same transition is recomputed with
the guided eps of the trained UNet, and ``rlfh.losses.ddpo.ddpo_clipped_loss`` is back-propagated
through the engine: one backward and one DeepSpeed micro-step per timestep (``deepspeed_config``
multiplies the accumulation steps accordingly). ``learner.ddpo_timestep_fraction`` of the steps are
trained per epoch, in one random order per optimizer step.
"""

from __future__ import annotations

import numpy as np
import torch


def ddpo_step(learner, idx: list[int], tb, order: list[int], first: bool) -> dict[str, float]:
    """One micro-batch of trajectories: a DDPO clipped-ratio loss per trained timestep."""
    from rlfh.learner.engine import _tensor
    from rlfh.losses.ddpo import ddpo_clipped_loss
    from rollouts.ddim_logprob import scheduler_step_with_logprob
    from rollouts.sampler import guided_eps, sdxl_conditioning

    s = tb.settings
    prompts = [tb.prompts[i] for i in idx]
    pos, added = sdxl_conditioning(learner.pipe, prompts, s.height, s.width, learner.device,
                                   s.negative_prompt if s.guidance_scale > 1.0 else None)
    pooled, time_ids = added["text_embeds"], added["time_ids"]
    dtype = learner.unet.dtype
    lat = _tensor(tb.latents, idx, learner.device)  # (B, T+1, 4, h, w)
    old = _tensor(tb.log_probs, idx, learner.device)  # (B, T)
    adv = _tensor(tb.advantages, idx, learner.device)  # (B,)
    metrics: list[dict[str, float]] = []
    for j in order:
        t = int(tb.timesteps[j])
        eps = guided_eps(learner._forward, learner.ddim, lat[:, j].to(dtype), t, pos.to(dtype), pooled.to(dtype),
                         time_ids.to(dtype), s.guidance_scale)
        step = scheduler_step_with_logprob(learner.ddim, eps.float(), t, lat[:, j], eta=s.eta, prev_sample=lat[:, j + 1])
        out = ddpo_clipped_loss(step.log_prob, old[:, j], adv, learner.cfg.learner.ddpo_clip_range)
        m = {"loss/ddpo": float(out.loss.detach()), "ddpo/approx_kl": float(out.approx_kl),
             "ddpo/clipfrac": float(out.clipfrac), "ddpo/ratio": float(out.ratio_mean)}
        if first:  # before any update of this round the policy is the sampler's: the ratio must be 1
            m["ddpo/recorded_logprob_max_diff"] = float((step.log_prob.detach() - old[:, j]).abs().max())
        learner.engine.backward(out.loss)
        learner.engine.step()
        metrics.append(m)
    return {k: float(np.mean([m[k] for m in metrics if k in m])) for k in {k for m in metrics for k in m}}


def train_on_trajectories(learner, tb, epochs: int = 1) -> dict[str, float]:
    """DDPO over a TrajectoryBatch (per-prompt advantages) in the learner's optimizer steps."""
    from rlfh.learner.engine import ddpo_train_steps

    cfg = learner.cfg
    if cfg.learner.loss != "ddpo":
        raise ValueError(f"learner.loss={cfg.learner.loss} does not train on trajectories")
    k = ddpo_train_steps(cfg)
    n_steps = tb.latents.shape[1] - 1
    if n_steps != cfg.rollout.num_inference_steps:
        raise ValueError(f"trajectories have {n_steps} steps, rollout.num_inference_steps is "
                         f"{cfg.rollout.num_inference_steps}")
    state = {"first": True}

    def micro(idx, order, _):
        out = ddpo_step(learner, idx, tb, order, state["first"])
        state["first"] = False
        return out

    # one timestep order per optimizer step, shared by its micro-batches (and ranks)
    return learner._run(len(tb), epochs, lambda _: torch.randperm(n_steps, generator=learner.generator)[:k].tolist(),
                        micro)
