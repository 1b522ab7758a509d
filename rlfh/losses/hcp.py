"""Human-centric alignment loss of the HcP layer (Wang et al., CVPR 2024, arXiv 2403.05239).

The HcP layer (rlfh/learner/hcp.py) adds to a cross-attention layer of the UNet a second key built
from the text by a small MLP, and with it a human-centric attention map; the loss pulls that map
toward a human-centric prior (a pose heatmap of the image trained on), at chosen resolutions and
timesteps.

Notation (code name: paper symbol):

    q        (B, heads, N, d)  the layer's queries Q = to_q(z), N = h_f * w_f latent positions
    k_h      (B, heads, L, d)  K_h = phi(C_h), phi a 2-layer MLP on the text embeddings C_h (L = 77 tokens)
    m_h      (B, N, L)         M_h = softmax(Q K_h^T / sqrt(d)) over the L tokens, averaged over heads
    H        (B, L) bool       the human-centric tokens of each prompt (``token_mask``)
    S        (B, N)            S(p) = sum_{j in H} M_h[p, j]: how much position p attends to human tokens
    P        (B, 1, h, w)      the prior: a pose heatmap in [0, 1] at latent size (rlfh/data/pose_prior.py)
    P_f      (B, N)            P average-pooled by the layer's downsampling factor f (h_f = h / f)

    L_hca = 1/|B'| sum_{b in B'} sum_f w_f * 1/|layers_f| sum_{layers l at f} 1/N_f sum_p (S_l,b(p) - P_f,b(p))^2

    B' = {b : P_b has a pose (max > 0) and t_b in [t_lo, t_hi]}    (the step-wise constraint)
    w_f = ``model.hcp.scale_weights[f]``                            (the scale-aware constraint)

The term added to the learner's loss is ``model.hcp.coef`` * L_hca (rlfh/learner/loop.py: hcp_term).

What comes from the paper: M_h = softmax(Q K_h^T / sqrt(d)) with K_h = phi(C_h), phi an MLP on
human-centric text embeddings; a human-centric alignment loss between that map and a human-centric
prior; weighting by the attention layers' resolution (scale-aware) and by the denoising step
(step-wise); the layer is trained while the pre-trained model stays as it was at inference. What is
ours, since the stored copies of the paper we could read give neither the loss form nor its
constants (and we found no public code or formula for them): the squared
error between S and the pooled heatmap; S as the attention mass on the human tokens; the prior as a
MediaPipe Pose heatmap; the default weights (factor 4 = SDXL's 32x32 maps at 1024 px: 1.0, factor
2 = 64x64: 0.5, coarse maps carrying the body's layout) and the default window (t >= 500 of 1000, the
noisier half where the layout forms). The layer feeds the attention output as the paper's does (it is
trained in a frozen model and changes generation): with ``model.hcp.mode: residual`` (default) the
human-centric attention's output M_h V is added through a zero-initialised projection, so a fresh layer
is exact; its values V (the layer's own), the projection and its zero start are ours. ``mode: observe``
keeps an output-neutral form of ours: the layer only shares Q with the layer it watches, so the loss
trains the LoRA on to_q (and upstream) and phi, and a sampler without the layer samples the same policy
(see rlfh/learner/hcp.py).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def human_map(m_h: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """S(p) = sum over human-centric tokens j of M_h[p, j].

    Args:
        m_h: (B, N, L) attention probabilities over the L tokens (heads averaged).
        token_mask: (B, L) bool or 0/1, the human-centric tokens.

    Returns:
        (B, N) in [0, 1].
    """
    return (m_h * token_mask.to(m_h.dtype)[:, None, :]).sum(-1)


def pooled_prior(prior: torch.Tensor, factor: int) -> torch.Tensor:
    """The prior at a layer's resolution: (B, 1, h, w) average-pooled by ``factor`` -> (B, h*w / factor^2)."""
    p = F.avg_pool2d(prior, factor) if factor > 1 else prior
    return p.flatten(1)


def hcp_alignment_loss(
    maps: Sequence[tuple[int, torch.Tensor]],
    prior: torch.Tensor,
    scale_weights: Mapping[int, float],
    keep: torch.Tensor,
) -> torch.Tensor | None:
    """L_hca (module docstring) over the recorded layers.

    Args:
        maps: one (f, S) per recorded layer: its downsampling factor and S (B, N_f), row-major over
            (h / f, w / f).
        prior: (B, 1, h, w) pose heatmaps at latent size.
        scale_weights: f -> w_f; layers at a factor not listed do not count.
        keep: (B,) bool, the items of B' (a pose found and t in the window).

    Returns:
        The scalar loss, or None when no item is kept or no layer is weighted.
    """
    keep = keep.to(prior.device).bool()
    if not bool(keep.any()):
        return None
    per_scale: dict[int, list[torch.Tensor]] = {}
    for f, s in maps:
        if scale_weights.get(f, 0.0) == 0.0:
            continue
        target = pooled_prior(prior.float(), f)
        if target.shape != s.shape:
            raise ValueError(
                f"an attention map at factor {f} has {tuple(s.shape)} positions; the prior pooled by {f} "
                f"has {tuple(target.shape)}"
            )
        per_scale.setdefault(f, []).append(((s.float() - target) ** 2).mean(1))  # (B,)
    if not per_scale:
        return None
    per_item = sum(scale_weights[f] * torch.stack(errs).mean(0) for f, errs in per_scale.items())  # (B,)
    return per_item[keep].mean()
