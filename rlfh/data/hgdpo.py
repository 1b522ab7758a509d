"""HG-DPO: Diffusion-DPO with REAL images as winners, on a curriculum (seed 002, arXiv 2405.20216).

HG-DPO (Na, Kim, Lee; CVPR 2025) trains in three consecutive stages, each a separate DPO run
whose LoRA is merged before the next (our reading of arXiv 2405.20216v2; the seed file holds only
the abstract):

    easy    winner = best, loser = worst generated image of a per-prompt image pool (generated vs
            generated; the prompts are the captions of the real-image set)
    normal  winner = an intermediate-domain image (SDRecon: the real image noised part-way and
            denoised by the model), loser = a generated image for the real image's caption
    hard    winner = the real image,  loser = a generated image for the real image's caption

The stages and the winners of easy and hard are the paper's. That the normal stage's winner lies in
an "intermediate domain" between generated and real images is stated by public summaries of the
paper (e.g. papernotes.org's CVPR 2025 notes on it, deep-paper.org/en/paper/2405.20216); its exact construction (noise
level, sampler, which model denoises) could not be checked from
the sources at hand, so SDRecon here is OUR READING: SDEdit (img2img) of the real image's latent by
the CURRENT policy, ``data.hgdpo.sdrecon_strength`` s of the sampler's steps re-run
(``Sampler.refine``, equal to diffusers' SDXL img2img), under the real image's caption, seeded from
(seed, round). s -> 0 gives back the real image (the hard stage), s = 1 a fresh sample (easy).

The stage switch is abrupt (a fixed number of steps per stage), so :class:`Curriculum` is
piecewise-constant by default; ``interpolate=True`` ramps linearly instead, an extension. rlfh maps
the stages onto rounds of online training as per-round shares of the pairs: ``real_winner_fraction``
of them get a real winner, ``sdrecon_winner_fraction`` an SDRecon winner, the rest keep the engine's
own best-vs-worst pairs. (0, 0) is the easy stage, (0, 1) the normal one, (1, 0) the hard one;
shares in between mix the kinds in one round.

The real images and their latents come from :class:`rlfh.data.real_images.RealImageSource`; the
SDRecon winners from the current policy (the rollout actors online, the learner rank offline; driven by
``rlfh.data.sources.hgdpo.RealWinners``, for ``rlfh train`` and ``rlfh offline-dpo``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from rlfh.config.schema import HGDPOStage, hgdpo_stage_problems
from rlfh.data.batches import PairBatch
from rlfh.data.real_images import RealImageSource


# ---------------------------------------------------------------------------- curriculum
class Curriculum:
    """Shares of a round's pairs whose winner is a real image, or an SDRecon image, by round.

    Stage i covers rounds ``[until_round[i-1], until_round[i])`` (the first from round 0); rounds
    after the last stage keep its shares. Piecewise-constant by default, as HG-DPO switches stages
    abruptly; with ``interpolate`` each share ramps linearly across stage i from stage i-1's
    value to stage i's, reached at ``until_round[i]`` (the first stage stays constant).

    Args:
        stages: the config's ``data.hgdpo.stages`` (:class:`rlfh.config.schema.HGDPOStage`), or
            mappings with the same keys.
        interpolate: linear ramps instead of steps.

    Raises:
        ValueError: every problem at once (:func:`rlfh.config.schema.hgdpo_stage_problems`).
    """

    def __init__(self, stages: Sequence[HGDPOStage | Mapping[str, Any]], interpolate: bool = False):
        parsed = []
        for i, s in enumerate(stages):
            try:  # mappings: callers that pass dataclasses.asdict() of the config's stages
                parsed.append(s if isinstance(s, HGDPOStage) else HGDPOStage(**s))
            except TypeError as e:
                raise ValueError(
                    f"bad HG-DPO curriculum: stages[{i}]={dict(s)!r}: a stage has exactly "
                    f"until_round and real_winner_fraction, and optionally sdrecon_winner_fraction "
                    f"({e})"
                ) from None
        parsed = tuple(parsed)
        problems = hgdpo_stage_problems(parsed)
        if problems:
            raise ValueError("bad HG-DPO curriculum:\n  - " + "\n  - ".join(problems))
        self.stages, self.interpolate = parsed, bool(interpolate)

    def stage(self, round: int) -> int:
        """The index of the stage covering ``round`` (the last one after the curriculum ends)."""
        return next((i for i, s in enumerate(self.stages) if round < s.until_round), len(self.stages) - 1)

    def _share(self, round: int, key: str) -> float:
        prev_end, prev_f = 0, getattr(self.stages[0], key)
        for s in self.stages:
            if round < s.until_round:
                if not self.interpolate:
                    return getattr(s, key)
                a = (round - prev_end) / (s.until_round - prev_end)
                return prev_f + a * (getattr(s, key) - prev_f)
            prev_end, prev_f = s.until_round, getattr(s, key)
        return getattr(self.stages[-1], key)

    def fraction(self, round: int) -> float:
        """The real-winner share (the hard stage's pairs)."""
        return self._share(round, "real_winner_fraction")

    def sdrecon_fraction(self, round: int) -> float:
        """The SDRecon-winner share (the normal stage's pairs)."""
        return self._share(round, "sdrecon_winner_fraction")


# ---------------------------------------------------------------------------- mixing
def real_pair_count(fraction: float, n_pairs: int) -> int:
    """round(fraction * N), halves rounded up (Python's round() would round 2.5 to 2)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"real_winner_fraction={fraction} must be in [0, 1]")
    return min(n_pairs, int(math.floor(fraction * n_pairs + 0.5)))


def pair_counts(fraction: float, sdrecon_fraction: float, n_pairs: int) -> tuple[int, int]:
    """(k_real, k_sdrecon) of a round's N pairs: each share rounded as :func:`real_pair_count`, the
    SDRecon count capped so that both fit in N."""
    k_real = real_pair_count(fraction, n_pairs)
    if not 0.0 <= sdrecon_fraction <= 1.0:
        raise ValueError(f"sdrecon_winner_fraction={sdrecon_fraction} must be in [0, 1]")
    return k_real, min(n_pairs - k_real, int(math.floor(sdrecon_fraction * n_pairs + 0.5)))


def _chosen(
    source: RealImageSource, fraction: float, n_pairs: int, round: int, seed: int, sdrecon_fraction: float
) -> tuple[list[int], int]:
    """The real images of a round, real winners first then SDRecon sources, and k_real."""
    k_real, k_sd = pair_counts(fraction, sdrecon_fraction, n_pairs)
    return source.sample(k_real + k_sd, round, seed), k_real


def prompts_for_losers(
    source: RealImageSource, fraction: float, n_pairs: int, round: int, seed: int, sdrecon_fraction: float = 0.0
) -> list[str]:
    """Captions of the real images :func:`mix_real_winners` will use with the same arguments, in order
    (the real winners' first, then the SDRecon winners').

    HG-DPO's losers are generated for the real image's caption: sample one image per caption
    with the rollout actors and pass their latents as ``losers_latents``.
    """
    idx, _ = _chosen(source, fraction, n_pairs, round, seed, sdrecon_fraction)
    return [source.items[i].text for i in idx]


def sdrecon_inputs(
    source: RealImageSource, fraction: float, n_pairs: int, round: int, seed: int, sdrecon_fraction: float
) -> tuple[np.ndarray, list[str]]:
    """What to SDRecon for :func:`mix_real_winners` with the same arguments: the real latents
    (k_sdrecon, 4, h, w) and their captions. Refine them with the current policy
    (``RolloutFleet.refine(latents, captions, seeds, settings, strength)``) and pass the result as
    ``sdrecon_latents``."""
    idx, k_real = _chosen(source, fraction, n_pairs, round, seed, sdrecon_fraction)
    idx = idx[k_real:]
    return np.array(source.latents[idx], np.float32), [source.items[i].text for i in idx]


def latent_rms(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over items of the RMS latent difference sqrt(mean_{C,h,w} (a - b)^2)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.sqrt((d.reshape(len(d), -1) ** 2).mean(1)).mean())


def _tokens(s: str) -> set[str]:
    return set("".join(c.lower() if c.isalnum() else " " for c in s).split())


def _closest_pairs(captions: Sequence[str], prompts: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Greedy: each caption takes the untaken pair whose prompt shares most words (Jaccard); seeded ties."""
    tie = rng.permutation(len(prompts))  # the rank of each pair among equals
    toks = [_tokens(p) for p in prompts]
    taken: set[int] = set()
    chosen = []
    for c in captions:
        ct = _tokens(c)
        best = max(
            (j for j in range(len(prompts)) if j not in taken),
            key=lambda j: (len(ct & toks[j]) / max(len(ct | toks[j]), 1), -tie[j]),
        )
        taken.add(best)
        chosen.append(best)
    return chosen


def mix_real_winners(
    pairs: PairBatch,
    source: RealImageSource,
    fraction: float,
    round: int,
    seed: int,
    losers_latents: np.ndarray | None = None,
    losers_priors: np.ndarray | None = None,
    sdrecon_fraction: float = 0.0,
    sdrecon_latents: np.ndarray | None = None,
) -> tuple[PairBatch, dict[str, float]]:
    """Give k_real = round(fraction * N) of the round's N generated pairs a real winner, and
    k_sdrecon = round(sdrecon_fraction * N) (capped at N - k_real) an SDRecon winner.

    HG-DPO's hard stage pairs a real image (winner) with an image the model generated for that
    image's caption (loser), under the caption; its normal stage does the same with the real image
    partly re-noised and denoised by the model as the winner. This function does that when
    ``losers_latents`` holds one generated latent per caption of :func:`prompts_for_losers` (same
    arguments, same order): k = k_real + k_sdrecon pairs, chosen by a permutation seeded by (seed,
    round), become (winner, fresh loser, caption). Without them it keeps the engine's generated
    losers: each caption takes the pair whose prompt shares the most words with it, and that pair
    becomes (winner, its generated loser, caption); the loser was then sampled for a nearby prompt,
    not the caption.

    :meth:`RealImageSource.encode` must have run (it needs the VAE). Real and SDRecon winners' region
    masks come from the source's boxes (zeros without; SDEdit keeps the layout); the kept losers
    keep theirs; fresh losers take zero masks. HcP's pose priors (when the pairs carry them) follow the
    same rule: the source's priors for the real and SDRecon winners, ``losers_priors`` for the fresh
    losers (zeros when not given).

    Args:
        pairs: the round's pairs, latents (N, 4, h, w), masks {region: (N, 1, h, w)}.
        source: the encoded real images, at the run's (H, W) = (8h, 8w).
        fraction: the curriculum's real-winner share for this round, in [0, 1].
        round, seed: select the real images (and the replaced pairs) deterministically.
        losers_latents: (k, 4, h, w) generated for :func:`prompts_for_losers`' captions, or None.
        losers_priors: (k, 1, h, w) HcP pose priors of ``losers_latents``, or None.
        sdrecon_fraction: the curriculum's SDRecon-winner share for this round.
        sdrecon_latents: (k_sdrecon, 4, h, w), the refined :func:`sdrecon_inputs` (same arguments).

    Returns:
        (new PairBatch of N pairs, stats {hgdpo/real_winner_fraction, hgdpo/real_pairs,
        hgdpo/sdrecon_winner_fraction, hgdpo/sdrecon_pairs, hgdpo/generated_pairs}).

    Raises:
        RuntimeError: the source was not encoded. ValueError: shapes that do not match, or SDRecon
        pairs asked for without ``sdrecon_latents``.
    """
    real = source.latents
    n = len(pairs)
    k_real, k_sd = pair_counts(fraction, sdrecon_fraction, n)
    k = k_real + k_sd
    stats = {
        "hgdpo/real_winner_fraction": float(fraction),
        "hgdpo/real_pairs": float(k_real),
        "hgdpo/sdrecon_winner_fraction": float(sdrecon_fraction),
        "hgdpo/sdrecon_pairs": float(k_sd),
        "hgdpo/generated_pairs": float(n - k),
    }
    if k == 0:
        return pairs, stats
    _check_shapes(pairs, source, k_sd, sdrecon_latents)
    idx, _ = _chosen(source, fraction, n, round, seed, sdrecon_fraction)
    captions = [source.items[i].text for i in idx]
    winners = [real[i] for i in idx[:k_real]] + [sdrecon_latents[j] for j in range(k_sd)]
    rng = np.random.default_rng([int(seed), int(round), 0x4C])
    if losers_latents is None:
        slots = _closest_pairs(captions, pairs.prompts, rng)
    else:
        if losers_latents.shape != (k,) + pairs.latents_l.shape[1:]:
            raise ValueError(
                f"losers_latents {losers_latents.shape}: expected {(k,) + pairs.latents_l.shape[1:]} "
                f"(one per caption of prompts_for_losers)"
            )
        slots = [int(j) for j in rng.permutation(n)[:k]]
    return _place(pairs, source, idx, slots, captions, winners, losers_latents, losers_priors), stats


def _check_shapes(pairs: PairBatch, source: RealImageSource, k_sd: int, sdrecon_latents: np.ndarray | None) -> None:
    real = source.latents
    if real.shape[1:] != pairs.latents_w.shape[1:]:
        raise ValueError(
            f"real latents {real.shape[1:]} do not match the pairs' {pairs.latents_w.shape[1:]}: "
            f"the source was built for {source.height}x{source.width}"
        )
    if k_sd and (sdrecon_latents is None or sdrecon_latents.shape != (k_sd,) + pairs.latents_w.shape[1:]):
        got = None if sdrecon_latents is None else sdrecon_latents.shape
        raise ValueError(
            f"sdrecon_latents {got}: expected {(k_sd,) + pairs.latents_w.shape[1:]}, the images of "
            f"sdrecon_inputs refined by the policy (RolloutFleet.refine)"
        )


def _place(
    pairs: PairBatch,
    source: RealImageSource,
    idx: list[int],
    slots: list[int],
    captions: list[str],
    winners: list,
    losers_latents: np.ndarray | None,
    losers_priors: np.ndarray | None,
) -> PairBatch:
    """The pairs with pair ``slots[i]`` given real item ``idx[i]``'s winner, caption, masks and prior (and
    the fresh loser ``losers_latents[i]`` when given); copies, since Ray hands out read-only arrays."""
    lat_w, lat_l = np.array(pairs.latents_w, np.float32), np.array(pairs.latents_l, np.float32)
    prompts = list(pairs.prompts)
    masks_w = {r: np.array(m) for r, m in pairs.masks_w.items()}
    masks_l = {r: np.array(m) for r, m in pairs.masks_l.items()}
    priors_w, priors_l = (
        (None, None) if pairs.priors_w is None else (np.array(pairs.priors_w), np.array(pairs.priors_l))
    )
    aligned = pairs.aligned_rows().copy()  # a real winner breaks a region pair's alignment
    real_masks = source.region_masks(idx, list(masks_w))
    real_priors = source.priors(idx) if priors_w is not None else None
    for slot_i, j in enumerate(slots):
        lat_w[j], prompts[j], aligned[j] = winners[slot_i], captions[slot_i], False
        for r in masks_w:
            masks_w[r][j] = real_masks[r][slot_i]
        if priors_w is not None:
            priors_w[j] = real_priors[slot_i]
        if losers_latents is not None:
            lat_l[j] = losers_latents[slot_i]
            for r in masks_l:
                masks_l[r][j] = 0.0
            if priors_l is not None:
                priors_l[j] = losers_priors[slot_i] if losers_priors is not None else 0.0
    return PairBatch(lat_w, lat_l, prompts, masks_w, masks_l, None, priors_w, priors_l, aligned)
