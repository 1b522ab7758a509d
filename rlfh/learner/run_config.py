"""What the learner reads from the run's whole config, beyond its own section: the DDPO timesteps trained per
trajectory, whether the text encoders stay loaded, and DeepSpeed's config (accumulation over ranks and steps)."""

from __future__ import annotations

import math

from rlfh.learner.optimization import engine_config
from rlfh.losses.registry import TEXT_ENCODERS, TRAJECTORIES, loss_spec


def ddpo_train_steps(cfg) -> int:
    """Denoising steps of each trajectory trained per epoch: DDPO's timestep fraction of the recorded
    steps, which are the SDE window's ``learner.ddpo.window`` with one, all T without."""
    recorded = cfg.learner.ddpo.window or cfg.rollout.num_inference_steps
    return max(1, math.ceil(cfg.learner.ddpo.timestep_fraction * recorded))


def needs_text_encoders(cfg) -> bool:
    """Whether the learner must keep its text encoders when batches bring the rollouts' conditioning:
    colocated sampling encodes with this pipeline, HG-DPO trains on real images' captions and
    ``data.human_labels`` on a labeled log's prompts that no rollout conditioned on, DDPO's guided eps
    needs the negative prompt (the rollouts send positive embeddings only), and so does CFG
    distillation's teacher. Offline DPO keeps them because its batches (from the rollout log) carry none."""
    return bool(
        cfg.resources.colocate
        or cfg.data.hgdpo.real_images
        or cfg.data.human_labels.log  # its pairs' prompts: no rollout of the round conditioned on them
        or TEXT_ENCODERS in loss_spec(cfg.learner.loss).needs
        or cfg.learner.guidance_free.scale is not None
    )


def deepspeed_config(cfg) -> dict:
    """DeepSpeed's config for ``cfg`` (:func:`rlfh.learner.optimization.engine_config`)."""
    lc = cfg.learner
    # DDPO accumulates over the trained timesteps of each micro-batch too (one backward per step)
    per_item = ddpo_train_steps(cfg) if loss_spec(lc.loss).batch == TRAJECTORIES else 1
    return engine_config(
        lc, cfg.gradient_accumulation_steps * per_item, cfg.learner_world_size, bf16=cfg.model.dtype == "bfloat16"
    )
