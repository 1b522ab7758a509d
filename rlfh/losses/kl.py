"""KL between the policy's and a reference's reverse transitions, as a loss term in eps space.

Sources: the Gaussian KL identity KL(N(m1, s^2 I) || N(m2, s^2 I)) = ||m1 - m2||^2 / (2 s^2); DDPM's
ELBO (Ho et al., arXiv 2006.11239, eq. 8 and 12), whose terms are exactly these KLs; DDIM's
eta-stochastic step (Song et al., arXiv 2010.02502, eq. 12 and 16), as families/ddim.py
computes it; the eps/velocity-space KL penalty of Flow-GRPO (arXiv 2505.05470) and DiffusionNFT
(arXiv 2509.16117, NVlabs/DiffusionNFT: beta * mean((v_theta - v_ref)^2)). Derivation in full:
docs/online_rl.md.

Derivation. The DDIM step from x_t (a = abar_t) to x_t' (a' = abar_t') with noise eta is Gaussian,
N(mu, sigma^2 I), with

    x0_hat  = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)
    sigma^2 = eta^2 (1 - a') / (1 - a) (1 - a / a')
    mu      = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat
            = sqrt(a' / a) x_t + k_t eps_hat,     k_t = sqrt(1 - a' - sigma^2) - sqrt(a' (1 - a) / a)

The x_t term is the same for policy and reference, and sigma does not depend on the network, so

    KL(pi_theta(. | x_t) || pi_ref(. | x_t)) = ||mu_theta - mu_ref||^2 / (2 sigma^2)
                                             = w_t ||eps_theta - eps_ref||^2,   w_t = k_t^2 / (2 sigma^2)

(:func:`transition_kl_weight`). Per latent element, as families/ddim.py's log-probs, the
squared norm becomes a mean over C,H,W. For v-prediction eps_hat = sqrt(a) v_hat + sqrt(1 - a) x_t, so
the weight is a * w_t on ||v_theta - v_ref||^2. For eta = 1 and consecutive timesteps this is DDPM's
ELBO weight beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) with sigma_t^2 = beta~_t (checked in
tests/rlfh/test_losses_kl.py), and by the chain rule of KL the sum over the sampler's steps is the KL
between the two samplers' whole trajectories, an upper bound on the KL of their images.

As a training loss on forward-noised samples (t ~ U{0..T-1}, as Diffusion-DPO / RWR / NFT train) the
exact weight w_t spans orders of magnitude (w_t -> inf as t -> 0); like DDPM's L_simple, and like the
reference implementations' eps/velocity-space KL, the learner's term uses unit weight:

    L_KL = kl_coef * mean_b mean over C,H,W of (eps_theta - sg(eps_ref))^2       (:func:`eps_kl`)

which is E_t[ KL_t / w_t ]: the same zero and the same direction, a per-t reweighting of the path KL.
``weights`` (B,) passes w_t for the exact per-step KL: the learner does so for ``ddpo``, whose trained
steps are the sampler's own DDIM steps (rlfh/learner/ddpo_steps.py: transition_weight), so that its term is
kl_coef * KL(pi_theta(. | x_j) || pi_ref(. | x_j)) of each trained step.

Notation (code name -> symbol):
    alpha_bar      -> a = abar_t;   alpha_bar_prev -> a' = abar_t' (the step's target)
    eta            -> eta, DDIM noise (1 = DDPM-like ancestral)
    pred, ref_pred -> eps_theta, eps_ref (or v)

Shapes: alpha_bar, alpha_bar_prev scalars or (B,); pred, ref_pred (B, C, H, W); weights (B,); KLs (B,).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from families.ddim import ddim_transition_coefficients  # the step's own coefficients, shared with the sampler side

__all__ = ["ddim_transition_coefficients", "eps_kl", "per_sample_eps_kl", "transition_kl_weight"]


def upcast(x: Tensor) -> Tensor:
    """Half/bfloat16 -> float32 (squares of small gaps lose nothing); float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def transition_kl_weight(alpha_bar, alpha_bar_prev, eta: float = 1.0, prediction_type: str = "epsilon") -> Tensor:
    """w_t = k_t^2 / (2 sigma_t^2) (times abar_t for v-prediction), float64: KL per unit squared eps gap.

    Raises:
        ValueError: if eta = 0 (a deterministic step has no KL) or on a bad schedule / prediction type.
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for the transition to have a density, got {eta}")
    _, k, sigma = ddim_transition_coefficients(alpha_bar, alpha_bar_prev, eta)
    w = k**2 / (2 * sigma**2)
    if prediction_type == "epsilon":
        return w
    if prediction_type == "v_prediction":
        return w * torch.as_tensor(alpha_bar, dtype=torch.float64)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def per_sample_eps_kl(pred: Tensor, ref_pred: Tensor, weights: Tensor | None = None) -> Tensor:
    """w_b * mean over C,H,W of (eps_theta - sg(eps_ref))^2, (B,); w = 1 when ``weights`` is None."""
    if pred.ndim < 2 or pred.shape != ref_pred.shape:
        raise ValueError(
            f"pred and ref_pred must have the same shape (B, ...), got {tuple(pred.shape)} and {tuple(ref_pred.shape)}"
        )
    d = upcast(pred) - upcast(ref_pred.detach())
    kl = d.pow(2).flatten(1).mean(dim=1)
    if weights is None:
        return kl
    if weights.shape != kl.shape:
        raise ValueError(f"weights must be (B,) = ({kl.shape[0]},), got {tuple(weights.shape)}")
    return weights.detach().to(kl.dtype) * kl


def eps_kl(pred: Tensor, ref_pred: Tensor, coef: float, weights: Tensor | None = None) -> Tensor:
    """coef * mean_b of :func:`per_sample_eps_kl`: the KL-to-reference term added to a loss.

    Raises:
        ValueError: if ``coef`` is negative or not finite, or on bad shapes.
    """
    coef = float(coef)
    if not (coef >= 0 and math.isfinite(coef)):
        raise ValueError(f"kl coef must be finite and >= 0, got {coef}")
    return coef * per_sample_eps_kl(pred, ref_pred, weights).mean()
