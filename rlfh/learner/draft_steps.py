"""The parts of direct reward fine-tuning's round (learner.loss=draft, rlfh/losses/draft.py) that
:func:`rlfh.learner.steps.train_prompts` calls; its loop:

    for each optimizer step (epochs x shuffled prompts, as every loop of rlfh/learner/steps.py):
        for each micro-batch of this rank's prompts:
            x_T ~ N(0, I) from the engine's generator
            sample with the trained denoiser (deterministic DDIM, or the flow models' Euler steps; the
                rollout's steps, guidance and size),
                the variant's steps with gradient, the others without (rlfh/losses/draft.py)
            decode with the VAE (checkpointed), score with every differentiable reward
            L_g per region, combined by the fairness rule, + kl_coef * KL; back-propagate

The learner samples itself because the gradient runs through its own sampling steps: the rollouts' samples
give the round's prompts (and the reward metrics of the round) only. The sampler here is DDIM with eta = 0
over the model's noise schedule (``ModelFamily.stochastic_scheduler``), whatever ``rollout.scheduler`` is;
on a flow model (SD3) the probability-flow ODE's Euler steps of its own flow-matching scheduler, the
x_0 prediction x0_hat = x_t - sigma v_hat (``ModelFamily.step_and_x0``).
"""

from __future__ import annotations

import torch

from rlfh.learner.engine import LearnerEngine
from rlfh.losses.draft import ScoredRegion, Step


def sampling_step(lrn: LearnerEngine, scheduler, timesteps, conds: dict, guidance_scale: float, kl: bool):
    """Step i of the sampling chain as rlfh/losses/draft.py takes it: x_i -> (x_{i+1}, x0_hat_i, KL_i).

    The trained UNet is called as the module DeepSpeed wraps (its gradient hooks stay on the parameters), so
    one backward covers every step. KL_i is computed only where the step has a graph (the steps with gradient;
    under checkpointing also in the recomputation, whose copy is discarded)."""
    family = lrn.family

    def step(x: torch.Tensor, i: int) -> Step:
        t = timesteps[i]
        cond = conds[x.shape[0]]
        eps = family.guided_prediction(lrn.denoiser, scheduler, x.to(lrn.dtype), t, cond, guidance_scale).float()
        x_next, x0 = family.step_and_x0(scheduler, eps, t, x.float())
        term = None
        if kl and torch.is_grad_enabled():
            with torch.no_grad():
                ref = family.guided_prediction(
                    lrn.reference_denoiser(), scheduler, x.to(lrn.dtype), t, cond, guidance_scale
                )
            term = (eps - ref.float()).pow(2).mean()
        return Step(x_next, x0, term)

    return step


def decode(lrn: LearnerEngine, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    """Denoiser-space latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1], differentiable; the decoder
    under activation checkpointing when asked (its activations at full resolution dominate the memory)."""
    vae = lrn.vae
    if vae is None:
        raise RuntimeError("learner.loss=draft decodes its samples: the learner must keep the VAE")

    def run(z: torch.Tensor) -> torch.Tensor:
        img = vae.decode(lrn.family.decoder_input(vae, z.to(vae.dtype)), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    if checkpoint and x.requires_grad:
        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    return run(x)


def score(rewards, images: torch.Tensor, prompts: list[str], regions: list[str], metrics: dict) -> list:
    """Each reward's (region, weight, verdict) on the images; a reward's region outside ``learner.regions.names``
    counts toward ``global``. ``draft/reward/<name>`` is its mean raw score over the images it applies to."""
    verdicts = []
    for reward, weight in rewards:
        scores, present = reward.score_tensor(images, prompts)
        scores, present = scores.to(images.device).float(), present.to(images.device).bool()
        if bool(present.any()):
            metrics[f"draft/reward/{reward.name}"] = float(scores.detach()[present].mean())
        region = reward.region if reward.region in regions else "global"
        verdicts.append((region, weight, ScoredRegion(scores, present)))
    return verdicts


def differentiable_rewards(lrn: LearnerEngine) -> list:
    """The run's ``rewards:`` built in the learner's process (once per engine), with their weights. The config
    refuses a reward without ``differentiable_score`` (rlfh/config/rules.py); this checks the built object too
    (a ``module:callable`` factory may return anything)."""
    built = getattr(lrn, "draft_rewards", None)
    if built is None:
        from rewards.registry import build_reward

        built = []
        for i, entry in enumerate(lrn.cfg.rewards):
            reward = build_reward(entry.target, entry.options, entry.name)
            if not getattr(reward, "differentiable_score", False):
                raise ValueError(
                    f"rewards[{i}].target={entry.target!r}: learner.loss=draft back-propagates through the reward, "
                    f"and {reward.name} is not differentiable (no score_tensor)"
                )
            built.append((reward, float(entry.weight)))
        lrn.draft_rewards = built
        if lrn.vae is not None:
            lrn.vae.requires_grad_(False)  # the gradient passes through the decoder; it does not train
    return built
