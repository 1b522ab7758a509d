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
from typing import Hashable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["per_prompt_advantages", "group_indices", "gdpo_advantages", "no_spread_share", "ADV_CLIP"]

ADV_CLIP = 5.0  # ddpo-pytorch's adv_clip_max, for per-prompt and GDPO advantages alike


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


# ------------------------------------------------------------------------------------------------
# GDPO: each reward normalized within its prompt group before the rewards combine
# ------------------------------------------------------------------------------------------------


def _usable(v) -> bool:
    return v is not None and math.isfinite(v)


def gdpo_advantages(
    values: Mapping[str, Sequence[Optional[float]]],
    weights: Mapping[str, float],
    prompt_ids: Sequence[Hashable],
    eps: float = 1e-6,
) -> list[Optional[float]]:
    """GDPO's combined advantage per sample: every reward z-scored in its prompt group, weighted,
    summed, and the sum normalized over the batch.

    Paper: Liu et al., "GDPO: Group reward-Decoupled Normalization Policy Optimization for
    Multi-reward RL Optimization", arXiv 2601.05242 (2026). Its point: GRPO on the weighted sum
    of several rewards lets the reward with the widest spread decide the ranking and maps distinct
    reward combinations to the same advantage; normalizing each reward on its own first keeps
    every reward's within-group ranking in the signal.

    Formula (our reading of the paper's description: group-wise normalization of each reward,
    sum, batch-wise normalization), for reward k with weight w_k != 0, sample b in prompt group g:

        A_k,b = (r_k,b - mean_{b' in g} r_k,b') / (std_{b' in g} r_k,b' + eps)     (population std)
        S_b   = sum_k w_k A_k,b
        A_b   = (S_b - mean_batch S) / (std_batch S + eps)

    The group and batch statistics run over the usable samples only: a sample with a weighted
    reward that is missing (None, NaN, inf) gets None, as in ``rewards.composite.combined_scores``,
    and does not move the statistics of the samples that are trained on. A lone usable sample of
    a group gets A_k = 0 (no sample to compare with: GRPO's reading, ``fallback="zero"`` above); a
    reward that does not spread in a group gives A_k = 0 there. Rewards of weight 0 are logged,
    not trained on, so they are left out. Population std and eps = 1e-6 follow
    :func:`per_prompt_advantages` (ddpo-pytorch); the paper's GRPO code base (TRL) uses torch's
    unbiased std and eps = 1e-4, which changes the scale of A, not its order within a group.

    The result is the score every loss family trains on under ``rewards_normalization: gdpo``: DPO
    pairs take its best and worst sample per group (stage 3 is an increasing affine map, so the
    pairs are those of S), RWR / filtered weight it, DDPO uses it clipped as its advantage.

    Args:
        values: {reward name: value per sample}, lists of one length B.
        weights: {reward name: weight} covering ``values``.
        prompt_ids: the prompt group of each sample (B hashable ids).
        eps: added to each std, > 0.

    Returns:
        B floats or None (sample not usable).

    Raises:
        ValueError: on lists of different lengths or a bad eps.
    """
    lengths = {len(v) for v in values.values()} | {len(prompt_ids)}
    if len(lengths) > 1:
        raise ValueError(
            f"{len(prompt_ids)} prompt ids for reward lists of lengths { {n: len(v) for n, v in values.items()} }"
        )
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    n = len(prompt_ids)
    active = [k for k in values if weights[k] != 0.0]
    if not active:
        return [None] * n
    keep = [b for b in range(n) if all(_usable(values[k][b]) for k in active)]
    if not keep:
        return [None] * n
    members: dict = {}
    for j, b in enumerate(keep):
        members.setdefault(prompt_ids[b], []).append(j)
    total = torch.zeros(len(keep), dtype=torch.float64)
    for k in active:
        r = torch.tensor([float(values[k][b]) for b in keep], dtype=torch.float64)
        for idx in members.values():
            rg = r[idx]
            # a reward that does not spread (or a lone sample) adds exactly 0, not rounding noise / eps
            if len(idx) > 1 and bool(rg.max() > rg.min()):
                mu = rg.mean()
                total[idx] += float(weights[k]) * (rg - mu) / ((rg - mu).pow(2).mean().sqrt() + eps)
    mean = total.mean()
    std = (total - mean).pow(2).mean().sqrt()
    adv = (total - mean) / (std + eps)
    out: list[Optional[float]] = [None] * n
    for j, b in enumerate(keep):
        out[b] = float(adv[j])
    return out


def no_spread_share(
    values: Sequence[Optional[float]], prompt_ids: Sequence[Hashable], rel_tol: float = 1e-9
) -> Optional[float]:
    """Share of prompt groups that carry no learning signal: fewer than two usable values, or all
    usable values equal (max - min <= rel_tol * max(1, max |v|), so that sums of z-scores that
    cancel up to rounding count as equal). Such a group gives no DPO pair and zero advantages, and
    RWR / filtered weights in it do not depend on the sample. None when there are no groups.

    Example: groups a: [1, 1], b: [1, 2], c: [None, 3] -> a and c have no spread -> 2/3.
    """
    if len(values) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompt ids for {len(values)} values")
    groups: dict = {}
    for v, g in zip(values, prompt_ids):
        groups.setdefault(g, [])
        if _usable(v):
            groups[g].append(float(v))
    if not groups:
        return None
    flat = 0
    for vs in groups.values():
        if len(vs) < 2 or max(vs) - min(vs) <= rel_tol * max(1.0, max(abs(x) for x in vs)):
            flat += 1
    return flat / len(groups)
