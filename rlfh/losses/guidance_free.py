"""guidance-free training: the reference's classifier-free-guided prediction as a teacher term.

Sources: classifier-free guidance (Ho & Salimans, arXiv 2207.12598, eq. 6); guidance distillation
into a single conditional model (Meng et al., "On Distillation of Guided Diffusion Models",
arXiv 2210.03142, stage one: the student eps_theta(x_t, c) regresses onto the teacher's guided eps
at the same x_t); guidance-free RL fine-tuning as the flow-model systems do it (DiffusionNFT,
arXiv 2509.16117, trains and samples at guidance 1 with the guided reference as the target of a
regularizer). Our reading for SDXL's epsilon parameterization:

    eps_T   = eps_ref(x_t, c_neg) + w (eps_ref(x_t, c) - eps_ref(x_t, c_neg))     (the teacher, no grad)
    L_CFG   = coef * mean_b mean_{C,H,W} (eps_theta(x_t, c) - eps_T)^2

with w = ``learner.guidance_free.scale`` (the guidance scale the model is distilled to, e.g. 5) and c_neg
the negative prompt (``rollout.negative_prompt``, "" by default), exactly the two rows SDXL's
pipeline runs per step at guidance w. The reference is the frozen base (or its EMA,
``learner.reference.model``), so the target does not move with the policy. Rollouts then sample at
guidance 1 (``rollout.guidance_scale: 1``, one UNet row per image per step instead of two) and the
reward loss (DPO, RWR, NFT, AWM...) trains the same conditional prediction the sampler uses; the
trained model needs no CFG at inference. For v-prediction models the same holds with v in place
of eps (guidance is linear in either).

The term is added after the fairness rule, like the KL term: a whole-image regularizer, not a
region objective. Shapes: predictions (B, C, h, w).
"""

from __future__ import annotations

from torch import Tensor


def guided_teacher(ref_cond: Tensor, ref_uncond: Tensor, scale: float) -> Tensor:
    """eps_T = eps_uncond + w (eps_cond - eps_uncond), detached (the teacher takes no gradient)."""
    if ref_cond.shape != ref_uncond.shape:
        raise ValueError(
            f"conditional {tuple(ref_cond.shape)} and unconditional {tuple(ref_uncond.shape)} "
            f"predictions differ in shape"
        )
    return (ref_uncond + scale * (ref_cond - ref_uncond)).detach()


def guidance_free_loss(pred: Tensor, teacher: Tensor, coef: float) -> Tensor:
    """coef * mean_b mean_{C,H,W} (pred - teacher)^2, in float32."""
    if pred.shape != teacher.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    return coef * (pred.float() - teacher.float().detach()).pow(2).flatten(1).mean(1).mean()
