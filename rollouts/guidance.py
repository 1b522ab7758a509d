"""Sampling guidance by a differentiable image score: FaceScore's classifier-style guidance.

Paper: Liao et al., "FaceScore: Benchmarking and Enhancing Face Quality in Human Generation",
arXiv 2406.17100, appendix "Sampling Guidance based on FS", eqs. (5) and (6). At every denoising step,
with the paper's alpha_t = sqrt(abar_t) (variance-preserving latents z_t = alpha_t z_0 + sqrt(1 - abar_t) eps):

    z_0  = (z_t - sqrt(1 - abar_t) eps_theta(z_t, t, c)) / sqrt(abar_t)                         (5)
    eps' = eps_theta(z_t, t, c) - clamp(mu * grad_{z_t} s(D(z_0)), -clamp, clamp)                 (6)

with s the score (FaceScore of the faces in the decoded image, :meth:`rewards.facescore.FaceScore.guide`),
D the VAE decoder and mu the guidance strength. The paper clamps "the guidance" against striping
artifacts without giving the bound: here the clamp is elementwise on mu * grad, ``clamp`` its bound (None:
no clamp). Subtracting the score's gradient from eps moves z_0's estimate up the score's gradient, as
classifier guidance does.

Ours, where the paper gives no detail: eps_theta is held constant in the gradient (grad_{z_t} through
eq. (5) only, 1 / sqrt(abar_t) times the gradient at z_0: no backward through the UNet, whose cost the
paper does not state either); the guided eps (classifier-free guidance already applied) is what the
scheduler steps with; z_t is the variance-preserving latent the UNet reads (``scale_model_input`` of the
sampler's x: the same for DDIM, x / sqrt(sigma^2 + 1) for Euler), so mu means the same under either
scheduler. The sampler applies it with epsilon-prediction models only.

Shapes: eps, z_t, grad (B, 4, h, w); abar_t a float or (B,); scores (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def x0_estimate(z_t: Tensor, eps: Tensor, abar_t: Tensor | float) -> Tensor:
    """Eq. (5): z_0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = torch.as_tensor(abar_t, dtype=z_t.dtype, device=z_t.device)
    abar = abar.view(-1, *([1] * (z_t.ndim - 1))) if abar.ndim else abar
    return (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def guided_eps(eps: Tensor, grad: Tensor, mu: float, clamp: float | None) -> Tensor:
    """Eq. (6): eps - clamp(mu * grad, -clamp, clamp) (no clamp when ``clamp`` is None)."""
    step = mu * grad.to(eps.dtype)
    if clamp is not None:
        step = step.clamp(-clamp, clamp)
    return eps - step


@dataclass(frozen=True)
class ScoreGuidance:
    """The guidance of one sampling call.

    Attributes:
        score: images (B, 3, H, W) float in [0, 1] -> (B,) scores, differentiable w.r.t. the pixels
            (an image with nothing to score gives a constant: no guidance for it).
        mu: the guidance strength, > 0.
        clamp: the bound of |mu * grad| per element, > 0; None: no clamp.
    """

    score: Callable[[Tensor], Tensor]
    mu: float
    clamp: float | None = None

    def __post_init__(self):
        if not self.mu > 0:
            raise ValueError(f"score guidance mu must be > 0, got {self.mu}")
        if self.clamp is not None and not self.clamp > 0:
            raise ValueError(f"score guidance clamp must be > 0 or None, got {self.clamp}")

    def gradient(self, z_t: Tensor, eps: Tensor, abar_t: Tensor | float, decode: Callable[[Tensor], Tensor]) -> Tensor:
        """grad_{z_t} of the summed scores of D(z_0(z_t)), eps held constant; ``decode`` maps UNet-space
        latents to images in [0, 1], differentiably."""
        with torch.enable_grad():
            z = z_t.detach().float().requires_grad_(True)
            scores = self.score(decode(x0_estimate(z, eps.detach().float(), abar_t)))
            if not scores.requires_grad:  # nothing scored in the batch: no guidance
                return torch.zeros_like(z)
            (grad,) = torch.autograd.grad(scores.float().sum(), z)
        return grad

    def apply(self, z_t: Tensor, eps: Tensor, abar_t: Tensor | float, decode: Callable[[Tensor], Tensor]) -> Tensor:
        """Eq. (6) at z_t: the guided eps, in eps's dtype."""
        return guided_eps(eps, self.gradient(z_t, eps, abar_t, decode), self.mu, self.clamp)
