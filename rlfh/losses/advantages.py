"""Per-prompt z-scored advantages (DDPO's per-prompt stat tracking, GRPO's group normalization).

Papers: DDPO, Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301
(reference: kvablack/ddpo-pytorch, ddpo_pytorch/stat_tracking.py and train.py); GRPO, Shao et al.,
"DeepSeekMath", arXiv 2402.03300.

Formula, for sample b whose prompt belongs to group g(b) with n_g samples in the batch:

    mu_g    = mean_{b' in g} r_b'
    sigma_g = sqrt(mean_{b' in g} (r_b' - mu_g)^2)        (population std, ddof = 0, as ddpo-pytorch)
    A_b     = clip((r_b - mu_g(b)) / (sigma_g(b) + eps), -c, c),   eps = 1e-6, c = 5

Groups with fewer than ``min_group_size`` samples (by default: a prompt seen once) have no usable
statistics. ``fallback="global"`` (ddpo-pytorch's behaviour when a prompt has too few samples) uses
the mean and std of the whole batch for them; ``fallback="zero"`` gives them A = 0 (GRPO: a lone
sample carries no relative signal). A group whose rewards are all equal gets A = 0 either way.
Advantages are constants: rewards are detached.

Notation (code name -> paper symbol):
    rewards    -> r(x_0, c)
    prompt_ids -> the prompt c of each sample (any hashable ids, or an integer tensor)
    clip       -> adv_clip_max (5 in ddpo-pytorch)
    eps        -> the std epsilon (1e-6 in ddpo-pytorch)

Shapes: rewards (B,); prompt_ids B ids or (B,) integer tensor; advantages (B,).
"""

from __future__ import annotations

import math
from typing import Hashable, Literal, Sequence, Union

import torch
from torch import Tensor

__all__ = ["per_prompt_advantages", "group_indices"]


def group_indices(prompt_ids: Union[Sequence[Hashable], Tensor]) -> Tensor:
    """Map prompt ids to dense group indices 0..G-1 in order of first appearance.

    Args:
        prompt_ids: B hashable ids (for example prompt strings) or a (B,) integer tensor.

    Returns:
        Long tensor of shape (B,) on the CPU.

    Raises:
        ValueError: if a tensor of ids is not 1-D.
    """
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.ndim != 1:
            raise ValueError(f"prompt_ids tensor must be 1-D (B,), got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    seen: dict = {}
    return torch.tensor([seen.setdefault(p, len(seen)) for p in prompt_ids], dtype=torch.long)


def per_prompt_advantages(
    rewards: Tensor,
    prompt_ids: Union[Sequence[Hashable], Tensor],
    eps: float = 1e-6,
    clip: float = 5.0,
    min_group_size: int = 2,
    fallback: Literal["global", "zero"] = "global",
) -> Tensor:
    """Z-score rewards within each prompt group and clip them.

    Args:
        rewards: r, shape (B,), finite.
        prompt_ids: the prompt of each sample: B hashable ids or a (B,) integer tensor.
        eps: added to the std, > 0.
        clip: c, advantages are clipped to [-c, c]; > 0 (``math.inf`` disables clipping).
        min_group_size: groups smaller than this use ``fallback``; >= 2.
        fallback: "global" (batch mean/std) or "zero" (A = 0) for too-small groups.

    Returns:
        Advantages A, shape (B,), dtype of ``rewards`` (float32 for integer rewards), detached.

    Raises:
        ValueError: on bad shapes, non-finite rewards or bad arguments.
    """
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be 1-D (B,) with B > 0, got shape {tuple(rewards.shape)}")
    if len(prompt_ids) != rewards.shape[0]:
        raise ValueError(f"got {len(prompt_ids)} prompt ids for {rewards.shape[0]} rewards")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if int(min_group_size) != min_group_size or min_group_size < 2:
        raise ValueError(f"min_group_size must be an integer >= 2, got {min_group_size}")
    if fallback not in ("global", "zero"):
        raise ValueError(f"fallback must be 'global' or 'zero', got {fallback!r}")

    r = rewards.detach()
    r = r if r.is_floating_point() else r.float()
    r64 = r.double()  # statistics in float64
    idx = group_indices(prompt_ids).to(r.device)  # (B,)
    num_groups = int(idx.max().item()) + 1
    counts = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, idx, torch.ones_like(r64))
    sums = torch.zeros_like(counts).index_add_(0, idx, r64)
    mean_g = sums / counts  # (G,)
    sq = torch.zeros_like(counts).index_add_(0, idx, (r64 - mean_g[idx]).pow(2))
    std_g = (sq / counts).sqrt()  # (G,), population std

    mean_b, std_b = mean_g[idx], std_g[idx]  # (B,)
    small = counts[idx] < min_group_size  # (B,)
    adv = (r64 - mean_b) / (std_b + eps)
    if bool(small.any()):
        if fallback == "global":
            global_mean = r64.mean()
            global_std = (r64 - global_mean).pow(2).mean().sqrt()
            adv = torch.where(small, (r64 - global_mean) / (global_std + eps), adv)
        else:
            adv = torch.where(small, torch.zeros_like(adv), adv)
    return adv.clamp(-clip, clip).to(r.dtype)
