"""GARDO: reward hacking prevented in the objective, for every online loss (ddpo, nft, awm, rwr, filtered).

Paper: He et al., "GARDO: Reinforcing Diffusion Models without Reward Hacking" (Gated and Adaptive
Regularization with Diversity-aware Optimization), arXiv 2512.24138; reference code tinnerhrhe/GARDO
(scripts/train_sd3_grpo_gardo.py, flow_grpo/stat_tracking.py), built on Flow-GRPO (yifan123/flow_grpo).
Its three parts, as rlfh reads them (derivations: docs/online_rl.md, section 9):

1. Gated KL. The KL to the reference is applied only to the samples whose reward is least trustworthy.
   Uncertainty is the disagreement of the trained score with auxiliary rewards the run also computes
   (``gardo.uncertainty_rewards``, logged with weight 0 as GARDO logs aesthetic and ImageReward
   beside its trained reward). With the win rate of sample b under a reward r over the round's n usable
   samples (ties count half),

       w_r(b) = (#{b' : r(b') < r(b)} + 0.5 #{b' != b : r(b') = r(b)}) / (n - 1)       (:func:`win_rates`)
       u_b    = w_score(b) - mean_k w_k(b)                                               (:func:`reward_uncertainty`)

   u_b > 0: the trained score ranks b higher than the other rewards do, the signature of a sample that
   wins by exploiting the trained reward. The gate takes the ceil(f n) samples of largest u_b > 0,
   f = ``gardo.kl_gate_fraction`` (:func:`kl_gate`), and the KL term becomes the mean over the
   gated samples of a micro-batch (0 when none is gated; :func:`gated_kl`), as the reference averages its
   KL over the gated samples only. The reference code ranks with rank 1 for the best sample and takes
   rank_trained - mean rank_aux; we write it in win rates, which number the best sample highest, so the
   gated samples are the ones the trained reward over-rates, the reading the paper's text gives (samples
   of high proxy reward that the other models do not confirm).

   Uncertainty under augmentation (``gardo.uncertainty_augmentations``). Beside other rewards, the same
   trained score on deterministic augmented copies of the images (:func:`augment`) is a view k of its own: the
   trained score of sample b's copy, ranked over the round's copies. A reward that is right about an image
   ranks its mirror image, a slightly tighter crop or a JPEG re-encoding of it about where it ranks the
   image; a sample that wins by a pixel pattern the reward over-reads (the adversarial kind of reward hacking)
   loses its rank under the copy, u_b > 0, and gets the KL. Our reading: the views are ``hflip`` (mirrored
   left-right), ``crop`` (the central 7/8 of each side, resized back with Pillow's bicubic) and ``jpeg`` (a
   JPEG round trip at quality 90), each a deterministic function of the image so that a round's gate is
   reproducible; an augmented view enters u_b exactly as an auxiliary reward does (the mean over views k).

   Adaptive gate fraction (``gardo.kl_gate_range: [f_min, f_max]``; the reference's RiskCompensator,
   tinnerhrhe/GARDO scripts/train_sd3_grpo_gardo.py): with m_r the mean of the round's u_b >= 0 and H the
   m of the last 20 rounds, f <- f (1 + 0.1) when m_r > max H, f (1 - 0.1) when m_r < min H, clipped to
   [f_min, f_max] (the reference's [0.02, 0.2] from f = 0.1), before the round's gate is taken
   (:class:`AdaptiveGate`): the gate widens while the trained reward's disagreement with the others keeps
   reaching new highs and narrows while it keeps falling. Without the range f is the fixed knob.

2. Adaptive reference. The reference is replaced by the current policy when the round's mean KL to it
   exceeds ``gardo.refresh_kl`` or ``gardo.refresh_rounds`` rounds have passed since the
   last replacement (the reference's ``kl_thres`` and ``reset_freq``): the KL then keeps the policy near a
   recent, already improved policy instead of the base model (:class:`ReferenceRefresh`).

3. Diversity-aware advantage. Within a prompt group g, with unit embeddings e_i of its samples,

       d_i = min_{j in g, j != i} (1 - e_i . e_j)                 the cosine distance to the nearest neighbour
       A'_i = A_i * d_i / mean_{j in g} d_j    where A_i > 0,      A'_i = A_i elsewhere  (:func:`diversity_factors`)

   so a sample above its group's mean is amplified when it is unlike the others and damped when it is a
   near copy of one; below-mean samples keep their (negative) advantage, which keeps the optimization
   stable (the paper's point: shaping multiplies the positive advantages, never creates signal). GARDO
   embeds with DINOv3; rlfh embeds face identity (``gardo.diversity: identity``: the embeddings of
   the collapse metric, rlfh/eval/diversity.py, one per image as the mean of its faces' unit embeddings),
   which penalizes the same face across seeds of a prompt, or the image's pixels box-downsampled to
   64 x 64 (``pixels``: the image-diversity metric's view, for images without faces and for the tiny test
   model, whose samples hold no faces). An image without an embedding keeps its advantage (factor 1).
   ddpo / nft / awm shape A before their signal (NFT's r clips it); rwr / filtered have no signed
   advantage: their weights w_i >= 0 of the samples above their group's mean score are multiplied by the
   same factor (:func:`shaped_weights`), which keeps them >= 0.

Notation (code name -> symbol):
    score, values  -> the trained score and the auxiliary rewards r_k per sample (None: unusable)
    fraction       -> f;  uncertainty -> u;  factors -> d_i / mean_g d
    embeddings     -> e (N, D), a NaN row for an image without one

Shapes: per-sample arrays (N,); embeddings (N, D); the gated KL a scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

AUGMENTATIONS = ("hflip", "crop", "jpeg")  # uncertainty under augmentation: deterministic copies (module docstring)
GATE_RATE, GATE_WINDOW = 0.1, 20  # the reference's RiskCompensator: alpha and the history's length

__all__ = [
    "AUGMENTATIONS",
    "AdaptiveGate",
    "GardoConfig",
    "ReferenceRefresh",
    "augment",
    "diversity_factors",
    "face_boxes",
    "gated_kl",
    "kl_gate",
    "per_image_embeddings",
    "pixel_embeddings",
    "reward_uncertainty",
    "shaped_advantages",
    "shaped_weights",
    "win_rates",
]


def _usable(v) -> bool:
    return v is not None and math.isfinite(v)


def win_rates(values: np.ndarray) -> np.ndarray:
    """w(b) = (#{b': v_b' < v_b} + 0.5 #{b' != b: v_b' = v_b}) / (n - 1), float64 (n,); n = 1 gives 0.5.

    Example: [1, 3, 3, 0] -> [1/3, 5/6, 5/6, 0].
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        return np.full(n, 0.5)
    below = (v[None, :] < v[:, None]).sum(1)
    ties = (v[None, :] == v[:, None]).sum(1) - 1
    return (below + 0.5 * ties) / (n - 1)


def reward_uncertainty(score: Sequence[Optional[float]], values: dict[str, Sequence[Optional[float]]]) -> np.ndarray:
    """u_b = w_score(b) - mean_k w_k(b) over the samples whose score and auxiliary values are all usable
    (win rates among those samples); NaN for the others.

    Raises:
        ValueError: with no auxiliary reward, or lists of different lengths.
    """
    if not values:
        raise ValueError("the uncertainty needs at least one auxiliary reward (gardo.uncertainty_rewards)")
    n = len(score)
    if any(len(v) != n for v in values.values()):
        raise ValueError(f"{n} scores for auxiliary rewards of lengths { {k: len(v) for k, v in values.items()} }")
    ok = [b for b in range(n) if _usable(score[b]) and all(_usable(v[b]) for v in values.values())]
    u = np.full(n, np.nan)
    if not ok:
        return u
    main = win_rates(np.array([score[b] for b in ok]))
    aux = np.mean([win_rates(np.array([v[b] for b in ok])) for v in values.values()], axis=0)
    u[ok] = main - aux
    return u


def kl_gate(uncertainty: np.ndarray, fraction: float) -> np.ndarray:
    """The gated samples: the ceil(f n) of largest u > 0 among the n with a finite u (ties by index), (N,) bool.

    Example: u = [0.5, -0.2, 0.1, nan, 0.3], f = 0.5 -> n = 4, ceil(2) = 2 -> [True, F, F, F, True].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the gate's fraction must be in (0, 1], got {fraction}")
    u = np.asarray(uncertainty, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(u))
    gate = np.zeros(len(u), dtype=bool)
    k = math.ceil(fraction * len(finite) - 1e-9)
    order = finite[np.argsort(-u[finite], kind="stable")][:k]
    gate[order[u[order] > 0]] = True
    return gate


class AdaptiveGate:
    """The gate fraction f moved once per :meth:`update` by the reference's rule (module docstring, part 1).

    Example: f = 0.1 in [0.02, 0.2]; rounds with mean u >= 0 of 0.2, 0.3, 0.25, 0.1 give f = 0.1 (first round),
    0.11 (a new high), 0.11 (inside the history), 0.099 (a new low).
    """

    def __init__(self, fraction: float, low: float, high: float):
        if not 0 < low <= fraction <= high <= 1:
            raise ValueError(f"the gate needs 0 < low <= fraction <= high <= 1, got {low}, {fraction}, {high}")
        self.fraction, self.low, self.high = float(fraction), float(low), float(high)
        self.history: list[float] = []

    def update(self, uncertainty: np.ndarray) -> float:
        """The fraction for this round's gate from its uncertainties (N,) (NaN: not usable); unchanged when no
        sample has a finite u >= 0."""
        u = np.asarray(uncertainty, dtype=np.float64)
        u = u[np.isfinite(u) & (u >= 0)]
        if not len(u):
            return self.fraction
        m = float(u.mean())
        if self.history and m > max(self.history):
            self.fraction *= 1 + GATE_RATE
        elif self.history and m < min(self.history):
            self.fraction *= 1 - GATE_RATE
        self.fraction = float(np.clip(self.fraction, self.low, self.high))
        self.history = (self.history + [m])[-GATE_WINDOW:]
        return self.fraction


def augment(images: np.ndarray, name: str) -> np.ndarray:
    """A deterministic augmented copy of uint8 images (N, H, W, 3), the same shape (module docstring, part 1):
    ``hflip`` mirrored left-right, ``crop`` the central 7/8 of each side resized back (Pillow bicubic), ``jpeg``
    a JPEG round trip at quality 90 (Pillow's encoder, 4:2:0)."""
    import io

    from PIL import Image

    x = np.asarray(images, dtype=np.uint8)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {x.shape}")
    if name == "hflip":
        return np.ascontiguousarray(x[:, :, ::-1])
    if name not in ("crop", "jpeg"):
        raise ValueError(f"unknown augmentation {name!r}; use one of {list(AUGMENTATIONS)}")
    h, w = x.shape[1:3]
    out = np.empty_like(x)
    for i, im in enumerate(x):
        pil = Image.fromarray(im)
        if name == "crop":
            dh, dw = h // 16, w // 16  # 1/16 off each side: the central 7/8
            pil = pil.crop((dw, dh, w - dw, h - dh)).resize((w, h), Image.BICUBIC)
        else:
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=90)
            pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        out[i] = np.asarray(pil)
    return out


def gated_kl(per_sample: Tensor, gate: Tensor, coef: float) -> Tensor:
    """coef * mean over the gated samples of the per-sample KL (B,); coef * 0 (keeping the graph) when none is."""
    if gate.shape != per_sample.shape:
        raise ValueError(f"gate must be (B,) = {tuple(per_sample.shape)}, got {tuple(gate.shape)}")
    g = gate.to(per_sample.device, torch.bool)
    if not bool(g.any()):
        return per_sample.sum() * 0.0
    return float(coef) * per_sample[g].mean()


def diversity_factors(embeddings: np.ndarray, groups: Sequence[Hashable]) -> np.ndarray:
    """d_i / mean_{j in g(i)} d_j with d_i the cosine distance to the nearest other embedded sample of i's
    prompt group, (N,) float64; 1 for a sample without an embedding (a NaN row), one alone in its group,
    or a group whose distances are all 0 (nothing to tell its samples apart by).

    Example: one group, e = [1, 0], [1, 0], [0, 1] -> d = [0, 0, 1], mean 1/3 -> [0, 0, 3].
    """
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != len(groups):
        raise ValueError(f"embeddings must be (N, D) with N = {len(groups)} samples, got shape {e.shape}")
    out = np.ones(len(groups))
    members: dict = {}
    for i, g in enumerate(groups):
        if np.all(np.isfinite(e[i])) and np.linalg.norm(e[i]) > 0:
            members.setdefault(g, []).append(i)
    for idx in members.values():
        if len(idx) < 2:
            continue
        u = e[idx] / np.linalg.norm(e[idx], axis=1, keepdims=True)
        dist = 1.0 - np.clip(u @ u.T, -1.0, 1.0)
        np.fill_diagonal(dist, np.inf)
        d = dist.min(axis=1)
        if d.mean() > 0:
            out[idx] = d / d.mean()
    return out


def shaped_advantages(adv: np.ndarray, factors: np.ndarray, clip: float) -> np.ndarray:
    """A' = A * factor where A > 0, A elsewhere, clipped to [-clip, clip]."""
    a = np.asarray(adv, dtype=np.float64)
    return np.clip(np.where(a > 0, a * factors, a), -clip, clip)


def shaped_weights(weights: np.ndarray, scores: Sequence[Optional[float]], groups, factors: np.ndarray) -> np.ndarray:
    """rwr / filtered: the weights of the samples scoring above their prompt group's mean usable score,
    times the diversity factor; the others unchanged (weights stay >= 0)."""
    w = np.asarray(weights, dtype=np.float64).copy()
    sums: dict = {}
    for s, g in zip(scores, groups):
        if _usable(s):
            t = sums.setdefault(g, [0.0, 0])
            t[0], t[1] = t[0] + float(s), t[1] + 1
    for i, (s, g) in enumerate(zip(scores, groups)):
        if _usable(s) and float(s) > sums[g][0] / sums[g][1]:
            w[i] *= factors[i]
    return w


def pixel_embeddings(images, side: int = 64) -> np.ndarray:
    """Each image box-downsampled to ``side`` x ``side`` RGB in [0, 1], flattened: (N, 3 side^2) float64, the view
    the image-diversity metric compares (rlfh/eval/diversity.py), for images without faces."""
    from PIL import Image

    def small(image) -> np.ndarray:
        im = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((side, side), Image.BOX)
        return np.asarray(im, dtype=np.float64).ravel() / 255.0

    return np.stack([small(im) for im in images]) if len(images) else np.zeros((0, 3 * side * side))


def per_image_embeddings(embedded: dict, n_images: int) -> np.ndarray | None:
    """One embedding per image from what ``RewardSet.face_embeddings`` returned: the mean of the unit embeddings
    of its faces, a NaN row for an image without a face; None when nothing was embedded."""
    emb = embedded.get("embeddings")
    if emb is None:
        return None
    e = np.asarray(emb, dtype=np.float64)
    owners = np.asarray(embedded.get("owners", []), dtype=np.int64)
    if e.shape[0] != len(owners):
        raise ValueError(f"{e.shape[0]} face embeddings for {len(owners)} owners")
    out = np.full((n_images, e.shape[1] if e.ndim == 2 else 0), np.nan)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    u = np.where(norms > 0, e / np.where(norms > 0, norms, 1.0), np.nan)
    for i in set(owners.tolist()):
        out[i] = u[owners == i].mean(axis=0)
    return out


def face_boxes(regions: Sequence[dict]) -> list[list] | None:
    """Per image, its face detections (``ScoredSamples.regions``), or None when no reward looked for faces (the
    embedding reward's own detector then runs)."""
    if not any("face" in r for r in regions):
        return None
    return [list(r.get("face", [])) for r in regions]


class ReferenceRefresh:
    """When the reference becomes the current policy (GARDO's adaptive reference): after a round whose
    mean KL to the reference exceeded ``refresh_kl``, or ``refresh_rounds`` rounds after the last refresh.
    :meth:`observe` after each round's training, :meth:`take` before the next (True: refresh now)."""

    def __init__(self, refresh_kl: Optional[float], refresh_rounds: Optional[int]):
        self.refresh_kl, self.refresh_rounds = refresh_kl, refresh_rounds
        self.since, self.pending, self.count = 0, False, 0

    def observe(self, kl: Optional[float]) -> None:
        self.since += 1
        over = self.refresh_kl is not None and kl is not None and kl > self.refresh_kl
        late = self.refresh_rounds is not None and self.since >= self.refresh_rounds
        self.pending = self.pending or over or late

    def take(self) -> bool:
        if not self.pending:
            return False
        self.pending, self.since, self.count = False, 0, self.count + 1
        return True

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run refreshes at the same rounds."""
        return {"since": self.since, "pending": self.pending, "count": self.count}

    def load(self, state: dict) -> None:
        self.since, self.pending, self.count = int(state["since"]), bool(state["pending"]), int(state["count"])


@dataclass(frozen=True)
class GardoConfig:
    """``gardo``: GARDO's gated KL, adaptive reference and diversity-aware advantage (rlfh/losses/gardo.py;
    docs/online_rl.md, section 9). Everything is off by default.

    Attributes:
        kl_gate_fraction: the share f of the round's samples, those whose trained score is most over-rated
            against ``uncertainty_rewards``, that get the KL to the reference (``learner.reference.kl_coef``);
            null: every sample, the plain KL.
        uncertainty_rewards: names of rewards in ``rewards:`` (weight 0 to log them without training on them)
            whose ranks are compared with the trained score's.
        uncertainty_augmentations: deterministic copies of the images (hflip, crop, jpeg) whose trained score's
            ranks are compared with the trained score's, beside or instead of ``uncertainty_rewards``.
        kl_gate_range: [f_min, f_max]: the reference's adaptive gate moves the fraction within it from
            ``kl_gate_fraction`` (the reference: [0.02, 0.2] from 0.1); null: the fraction stays fixed.
        refresh_kl: replace the reference by the current policy after a round whose mean KL to it (the
            ``gardo/kl`` metric: mean (eps_theta - eps_ref)^2, ddpo: the steps' exact KL) exceeds this.
        refresh_rounds: ... or this many rounds after the last replacement (the reference's reset_freq, 15).
        diversity: the diversity-aware advantage's embedding: off, identity (face identity embeddings of the
            training reward that serves them) or pixels (64 x 64 pixels; images without faces).
    """

    kl_gate_fraction: Optional[float] = None
    uncertainty_rewards: list[str] = field(default_factory=list)
    uncertainty_augmentations: list[str] = field(default_factory=list)
    kl_gate_range: Optional[list[float]] = None
    refresh_kl: Optional[float] = None
    refresh_rounds: Optional[int] = None
    diversity: Literal["off", "identity", "pixels"] = "off"

    @property
    def refreshes(self) -> bool:
        return self.refresh_kl is not None or self.refresh_rounds is not None

    @property
    def enabled(self) -> bool:
        return self.kl_gate_fraction is not None or self.refreshes or self.diversity != "off"

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        if self.kl_gate_fraction is not None and not 0 < self.kl_gate_fraction <= 1:
            p.append(f"{key}.kl_gate_fraction={self.kl_gate_fraction}: must be in (0, 1] or null (every sample)")
        if self.kl_gate_fraction is not None and not (self.uncertainty_rewards or self.uncertainty_augmentations):
            p.append(
                f"{key}.kl_gate_fraction needs {key}.uncertainty_rewards: the rewards whose ranks the trained "
                f"score is compared with (e.g. [aesthetic] with weight 0 in rewards:), or "
                f"{key}.uncertainty_augmentations (e.g. [hflip, jpeg])"
            )
        for name in ("uncertainty_rewards", "uncertainty_augmentations", "kl_gate_range"):
            if getattr(self, name) and self.kl_gate_fraction is None:
                p.append(f"{key}.{name} is read by {key}.kl_gate_fraction only: set it or drop it")
        bad = [a for a in self.uncertainty_augmentations if a not in AUGMENTATIONS]
        if bad:
            p.append(f"{key}.uncertainty_augmentations {bad}: unknown; use some of {list(AUGMENTATIONS)}")
        r, f = self.kl_gate_range, self.kl_gate_fraction
        if r is not None and f is not None and (len(r) != 2 or not 0 < r[0] <= f <= r[1] <= 1):
            p.append(f"{key}.kl_gate_range={r}: [f_min, f_max] with 0 < f_min <= kl_gate_fraction={f} <= f_max <= 1")
        if self.refresh_kl is not None and not 0 < self.refresh_kl < math.inf:
            p.append(f"{key}.refresh_kl={self.refresh_kl}: must be finite and > 0, or null")
        if self.refresh_rounds is not None and self.refresh_rounds < 1:
            p.append(f"{key}.refresh_rounds={self.refresh_rounds}: must be >= 1, or null")
        return p
