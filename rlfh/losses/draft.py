"""Direct reward fine-tuning: back-propagating a differentiable reward through the sampling chain.

Papers:
    DRaFT: Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", arXiv 2309.17400
        (DRaFT-K: algorithm 1 truncated to the last K steps; DRaFT-LV: algorithm 2).
    AlignProp: Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward Backpropagation",
        arXiv 2310.03739 (randomized truncated back-propagation, section 4).
    ReFL: Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
        arXiv 2304.05977 (reward feedback learning, section 4, algorithm 1).

The policy samples x_0 from x_T ~ N(0, I) with n deterministic DDIM steps (eta = 0) under classifier-free
guidance w, x_{i+1} = s_i(x_i, eps_hat_i), eps_hat_i = eps_u + w (eps_c - eps_u) of the trained UNet at
x_i, t_i (i = 0 .. n-1 in sampling order; x_n is the sample). D is the VAE decoder, r_k the differentiable
rewards, each with its weight lambda_k and region g(k). The loss of a micro-batch of B prompts is

    L = sum_g c_g L_g + kl_coef * KL,     L_g = - (1 / |B_g|) sum_{b in B_g} sum_{k: g(k) = g} lambda_k r_k(D(x^b), p_b)

with c_g the fairness rule's coefficients over the regions (rlfh/losses/fairness.py; MPD by default),
B_g the images where region g was found, x^b the image the variant scores, and the gradient taken
only through the steps the variant keeps (every other step runs without a graph: stop-gradient on its
output):

    draft_k    x^b = x_n; gradient through steps i >= n - K (the last K).
    alignprop  x^b = x_n; gradient through the last K' steps, K' ~ U{k_min .. k_max} drawn per micro-batch
               (randomized truncation), capped at n.
    draft_lv   x_n sampled without gradient; then, for j = 1..m (m = ``lv_n``):
                   x_{n-1}^(j) = sqrt(abar_{t_{n-1}}) x_n + sqrt(1 - abar_{t_{n-1}}) eps^(j),  eps^(j) ~ N(0, I)
               (a flow model's forward process: x_{n-1}^(j) = (1 - sigma_{n-1}) x_n + sigma_{n-1} eps^(j))
               and the last step is taken from each with gradient; the rewards are averaged over the m
               (K = 1 with m re-noised copies: a lower-variance estimate of the last step's gradient).
    refl       j ~ U{floor(lo n) .. ceil(hi n) - 1} (``refl_range`` = [lo, hi]); x_j reached without gradient;
               one step with gradient and its x_0 prediction scored:
                   x^b = x0_hat(x_j) = (x_j - sqrt(1 - abar_{t_j}) eps_hat_j) / sqrt(abar_{t_j}).

On a flow-matching model (SD3: velocity v_hat, x_t = (1 - sigma) x_0 + sigma eps, v = eps - x_0) the steps
are the probability-flow ODE's Euler steps x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_hat_i and ReFL's
prediction is x0_hat(x_j) = x_j - sigma_j v_hat_j (docs/online_rl.md, reward back-propagation).

The loss is the plain -r of the papers' objective; ImageReward's training code instead takes relu(2 - r) scaled by
1e-3 and alternates ReFL steps with the pre-training loss, which rlfh leaves to the KL term.

KL to the reference: at every step taken with gradient, KL_i = mean (eps_hat_i - eps_hat_i^ref)^2 with the
reference's guided eps at the same x_i (no gradient); KL is their mean over those steps. For DDIM with eta > 0
this is the exact KL of the two Gaussian steps up to the per-step weight w_t (rlfh/losses/kl.py); at eta = 0
it is the squared gap of the two deterministic steps' means per unit k_t^2.

Memory: each step with gradient and the decoder run under activation checkpointing (``checkpoint``): a step
keeps its input only, and its UNet is recomputed in the backward pass.

Shapes: x (B, 4, h, w) latents in UNet space; images (B, 3, H, W) float in [0, 1]; rewards (B,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

VARIANTS = ("draft_k", "draft_lv", "alignprop", "refl")


@dataclass(frozen=True)
class DraftConfig:
    """``learner.draft``: direct reward fine-tuning (DRaFT-K, DRaFT-LV, AlignProp, ReFL). The rewards are the
    run's ``rewards:`` entries, each with its weight and region; every one must be differentiable.

    Attributes:
        variant: which steps carry the gradient (module docstring): draft_k, draft_lv, alignprop or refl.
        k: draft_k: the number of last sampling steps back-propagated through.
        k_range: alignprop: [k_min, k_max], the truncation K' ~ U{k_min .. k_max} per micro-batch (capped at the
            sampling steps).
        lv_n: draft_lv: the re-noised copies of x_0 whose last step is back-propagated.
        refl_range: refl: [lo, hi] fractions of the sampling steps; the step with gradient j ~ U{floor(lo n) ..
            ceil(hi n) - 1} (ImageReward: 40 steps, j in 30..39: [0.75, 1.0]).
        kl_coef: weight of the KL to the reference at the steps with gradient (0: none).
        checkpoint: activation checkpointing of every step with gradient and of the VAE decoder.
    """

    variant: Literal[VARIANTS] = "draft_k"
    k: int = 1
    k_range: list[int] = field(default_factory=lambda: [1, 4])
    lv_n: int = 2
    refl_range: list[float] = field(default_factory=lambda: [0.75, 1.0])
    kl_coef: float = 0.0
    checkpoint: bool = True

    def problems(self, key: str) -> list[str]:
        p = [f"{key}.{name}={getattr(self, name)}: must be >= 1" for name in ("k", "lv_n") if getattr(self, name) < 1]
        if not 0 <= self.kl_coef < math.inf:
            p.append(f"{key}.kl_coef={self.kl_coef}: must be finite and >= 0")
        if len(self.k_range) != 2 or not 1 <= self.k_range[0] <= self.k_range[1]:
            p.append(f"{key}.k_range={self.k_range}: give [k_min, k_max] with 1 <= k_min <= k_max")
        lo_hi = self.refl_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            p.append(f"{key}.refl_range={lo_hi}: give [lo, hi] with 0 <= lo < hi <= 1 (fractions of the steps)")
        return p


class Step(NamedTuple):
    """One sampling step's outputs: the next latent, the step's x_0 prediction and its KL term (or None)."""

    x_next: Tensor
    x0: Tensor
    kl: Tensor | None


StepFn = Callable[[Tensor, int], Step]


def first_grad_step(cfg: DraftConfig, n: int, generator: torch.Generator) -> int:
    """The index (0-based, sampling order) of the first of the n steps taken with gradient."""
    if cfg.variant == "draft_k":
        return max(n - cfg.k, 0)
    if cfg.variant == "alignprop":
        lo, hi = cfg.k_range
        k = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        return max(n - k, 0)
    if cfg.variant == "draft_lv":
        return n - 1
    lo, hi = refl_steps(cfg.refl_range, n)
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def refl_steps(refl_range: Sequence[float], n: int) -> tuple[int, int]:
    """ReFL's step range [j_lo, j_hi] of n steps: floor(lo n) .. ceil(hi n) - 1, at least one step."""
    lo = min(int(math.floor(refl_range[0] * n)), n - 1)
    return lo, max(lo, min(int(math.ceil(refl_range[1] * n)) - 1, n - 1))


def run_step(step: StepFn, x: Tensor, i: int, checkpoint: bool) -> Step:
    """Step i with gradient, under activation checkpointing when asked (recomputed in the backward pass)."""
    if not checkpoint:
        return step(x, i)
    return activation_checkpoint(step, x, i, use_reentrant=False)


def sample_chain(x: Tensor, n: int, start: int, step: StepFn, checkpoint: bool, stop: int | None = None):
    """Steps 0 .. stop-1 (default n) from x: those before ``start`` without a graph, the rest with gradient.

    Returns:
        (the last step's outputs, the KL terms of the steps with gradient).
    """
    stop = n if stop is None else stop
    kls: list[Tensor] = []
    out = Step(x, x, None)
    for i in range(stop):
        if i < start:
            with torch.no_grad():
                out = step(out.x_next, i)
            out = Step(out.x_next.detach(), out.x0.detach(), None)
        else:
            out = run_step(step, out.x_next, i, checkpoint)
            if out.kl is not None:
                kls.append(out.kl)
    return out, kls


def renoise(x0: Tensor, abar: float, noise: Tensor) -> Tensor:
    """DRaFT-LV's x_{n-1}^(j) = sqrt(abar) stopgrad(x_0) + sqrt(1 - abar) eps^(j)."""
    return math.sqrt(abar) * x0.detach() + math.sqrt(1.0 - abar) * noise


def scored_latents(
    cfg: DraftConfig,
    x_T: Tensor,
    n: int,
    step: StepFn,
    renoise_last: float | Callable[[Tensor, Tensor], Tensor],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor | None, dict[str, float]]:
    """The latents the variant scores (B, or m B for draft_lv: copy j of sample b at row j B + b), the mean
    KL of its steps with gradient (None without) and the step indices drawn (metrics). ``renoise_last``:
    draft_lv's x_{n-1}^(j) from (x_n, eps^(j)), the model's forward process at t_{n-1}; a number is abar_{t_{n-1}}
    of the DDPM form (:func:`renoise`)."""
    if not callable(renoise_last):
        abar = float(renoise_last)
        renoise_last = lambda x0, noise: renoise(x0, abar, noise)  # noqa: E731
    start = first_grad_step(cfg, n, generator)
    if cfg.variant == "refl":
        out, kls = sample_chain(x_T, n, start, step, cfg.checkpoint, stop=start + 1)
        x = out.x0
    elif cfg.variant == "draft_lv":
        out, _ = sample_chain(x_T, n, n, step, cfg.checkpoint)
        noise = torch.randn((cfg.lv_n, *x_T.shape), generator=generator).to(x_T.device, x_T.dtype)
        x_prev = renoise_last(out.x_next.detach().expand_as(noise), noise).flatten(0, 1)
        last = run_step(step, x_prev, n - 1, cfg.checkpoint)
        x, kls = last.x_next, [] if last.kl is None else [last.kl]
    else:
        out, kls = sample_chain(x_T, n, start, step, cfg.checkpoint)
        x = out.x_next
    kl = torch.stack(kls).mean() if kls else None
    grad_steps = 1 if cfg.variant in ("refl", "draft_lv") else n - start
    return x, kl, {"draft/first_grad_step": float(start), "draft/grad_steps": float(grad_steps)}


class ScoredRegion(NamedTuple):
    """One differentiable reward's verdict on a batch: scores (B,) with gradient, and where it applies (B,)."""

    scores: Tensor
    present: Tensor


def region_objectives(verdicts: Sequence[tuple[str, float, ScoredRegion]]) -> tuple[dict[str, Tensor], dict]:
    """L_g per region g: minus the weighted rewards of region g, averaged over the images where g was found.

    Args:
        verdicts: (region, weight lambda_k, reward k's verdict) per reward.
            For draft_lv the verdicts are over the m B re-noised images: the mean over them is each sample's
            mean over its m copies, averaged over the samples.

    Returns:
        ({region: L_g} for the regions found in some image, {draft/present/<region>: share of images}).
    """
    per_region: dict[str, list[tuple[float, ScoredRegion]]] = {}
    for region, weight, v in verdicts:
        per_region.setdefault(region, []).append((weight, v))
    objectives, metrics = {}, {}
    for region, items in per_region.items():
        present = torch.stack([v.present for _, v in items]).any(0)
        if not bool(present.any()):
            continue
        total = sum(weight * torch.where(v.present, v.scores, torch.zeros_like(v.scores)) for weight, v in items)
        objectives[region] = -total[present].sum() / present.sum()
        metrics[f"draft/present/{region}"] = float(present.float().mean())
    return objectives, metrics
