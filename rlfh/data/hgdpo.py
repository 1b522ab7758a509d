"""HG-DPO: Diffusion-DPO with REAL images as winners, on a curriculum (seed 002, arXiv 2405.20216).

HG-DPO (Na, Kim, Lee; CVPR 2025) trains in three consecutive stages, each a separate DPO run
whose LoRA is merged before the next (our reading of arXiv 2405.20216v2; the seed file holds only
the abstract):

    easy    winner = best, loser = worst generated image of a per-prompt image pool (generated vs
            generated; the prompts are the captions of the real-image set)
    normal  winner = an intermediate-domain image (SDRecon: the real image noised part-way and
            denoised by the model), loser = a generated image for the real image's caption
    hard    winner = the real image,  loser = a generated image for the real image's caption

The stage switch is abrupt (a fixed number of steps per stage), so :class:`Curriculum` is
piecewise-constant by default; ``interpolate=True`` ramps linearly instead, an extension. rlfh maps
the stages onto rounds of online training as a per-round fraction of real-winner pairs: 0.0 is
the easy stage (the engine's own best-vs-worst pairs), 1.0 the hard stage; fractions in between
mix both kinds in one round. SDRecon winners (the normal stage) are not implemented here.

The real images and their latents come from :class:`rlfh.data.real_images.RealImageSource`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from rlfh.config.rules import hgdpo_stage_problems
from rlfh.config.schema import HGDPOStage
from rlfh.data.batches import PairBatch
from rlfh.data.real_images import RealImageSource


# ---------------------------------------------------------------------------- curriculum
class Curriculum:
    """Fraction of a round's pairs whose winner is a real image, by round.

    Stage i covers rounds ``[until_round[i-1], until_round[i])`` (the first from round 0); rounds
    after the last stage keep its fraction. Piecewise-constant by default, as HG-DPO switches stages
    abruptly; with ``interpolate`` the fraction ramps linearly across stage i from stage i-1's
    value to stage i's, reached at ``until_round[i]`` (the first stage stays constant).

    Args:
        stages: the config's ``learner.hgdpo.stages`` (:class:`rlfh.config.schema.HGDPOStage`), or
            mappings with the same two keys.
        interpolate: linear ramps instead of steps.

    Raises:
        ValueError: every problem at once (:func:`rlfh.config.rules.hgdpo_stage_problems`).
    """

    def __init__(self, stages: Sequence[HGDPOStage | Mapping[str, Any]], interpolate: bool = False):
        parsed = []
        for i, s in enumerate(stages):
            try:  # mappings: callers that pass dataclasses.asdict() of the config's stages
                parsed.append(s if isinstance(s, HGDPOStage) else HGDPOStage(**s))
            except TypeError as e:
                raise ValueError(f"bad HG-DPO curriculum: stages[{i}]={dict(s)!r}: a stage has exactly "
                                 f"until_round and real_winner_fraction ({e})") from None
        parsed = tuple(parsed)
        problems = hgdpo_stage_problems(parsed)
        if problems:
            raise ValueError("bad HG-DPO curriculum:\n  - " + "\n  - ".join(problems))
        self.stages, self.interpolate = parsed, bool(interpolate)

    def fraction(self, round: int) -> float:
        prev_end, prev_f = 0, self.stages[0].real_winner_fraction
        for s in self.stages:
            if round < s.until_round:
                if not self.interpolate:
                    return s.real_winner_fraction
                a = (round - prev_end) / (s.until_round - prev_end)
                return prev_f + a * (s.real_winner_fraction - prev_f)
            prev_end, prev_f = s.until_round, s.real_winner_fraction
        return self.stages[-1].real_winner_fraction


# ---------------------------------------------------------------------------- mixing
def real_pair_count(fraction: float, n_pairs: int) -> int:
    """round(fraction * N), halves rounded up (Python's round() would round 2.5 to 2)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"real_winner_fraction={fraction} must be in [0, 1]")
    return min(n_pairs, int(math.floor(fraction * n_pairs + 0.5)))


def prompts_for_losers(source: RealImageSource, fraction: float, n_pairs: int, round: int, seed: int) -> list[str]:
    """Captions of the real images :func:`mix_real_winners` will use with the same arguments, in order.

    HG-DPO's losers are generated for the real image's caption: sample one image per caption
    with the rollout actors and pass their latents as ``losers_latents``.
    """
    idx = source.sample(real_pair_count(fraction, n_pairs), round, seed)
    return [source.items[i].text for i in idx]


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
        best = max((j for j in range(len(prompts)) if j not in taken),
                   key=lambda j: (len(ct & toks[j]) / max(len(ct | toks[j]), 1), -tie[j]))
        taken.add(best)
        chosen.append(best)
    return chosen


def mix_real_winners(pairs: PairBatch, source: RealImageSource, fraction: float, round: int, seed: int,
                     losers_latents: np.ndarray | None = None,
                     losers_masks: Mapping[str, np.ndarray] | None = None) -> tuple[PairBatch, dict[str, float]]:
    """Give k = round(fraction * N) of the round's N generated pairs a real winner.

    HG-DPO's hard stage pairs a real image (winner) with an image the model generated for that
    image's caption (loser), under the caption. This function does that when ``losers_latents``
    holds one generated latent per caption of :func:`prompts_for_losers` (same arguments, same
    order): k pairs, chosen by a permutation seeded by (seed, round), become (real, fresh loser,
    caption). Without them it keeps the engine's generated losers: each real caption takes the
    pair whose prompt shares the most words with it, and that pair becomes (real, its generated
    loser, caption); the loser was then sampled for a nearby prompt, not the caption.

    :meth:`RealImageSource.encode` must have run (it needs the VAE). Real winners' region masks
    come from the source's boxes (zeros without); the kept losers keep theirs; fresh losers take
    ``losers_masks`` (zeros when not given).

    Args:
        pairs: the round's pairs, latents (N, 4, h, w), masks {region: (N, 1, h, w)}.
        source: the encoded real images, at the run's (H, W) = (8h, 8w).
        fraction: the curriculum's real-winner fraction for this round, in [0, 1].
        round, seed: select the real images (and the replaced pairs) deterministically.
        losers_latents: (k, 4, h, w) generated for :func:`prompts_for_losers`' captions, or None.
        losers_masks: {region: (k, 1, h, w)} for ``losers_latents``.

    Returns:
        (new PairBatch of N pairs, stats {hgdpo/real_winner_fraction, hgdpo/real_pairs}).

    Raises:
        RuntimeError: the source was not encoded. ValueError: shapes that do not match.
    """
    real = source.latents
    n = len(pairs)
    k = real_pair_count(fraction, n)
    stats = {"hgdpo/real_winner_fraction": float(fraction), "hgdpo/real_pairs": float(k)}
    if k == 0:
        return pairs, stats
    if real.shape[1:] != pairs.latents_w.shape[1:]:
        raise ValueError(f"real latents {real.shape[1:]} do not match the pairs' {pairs.latents_w.shape[1:]}: "
                         f"the source was built for {source.height}x{source.width}")
    idx = source.sample(k, round, seed)
    captions = [source.items[i].text for i in idx]
    rng = np.random.default_rng([int(seed), int(round), 0x4C])
    if losers_latents is None:
        slots = _closest_pairs(captions, pairs.prompts, rng)
    else:
        if losers_latents.shape != (k,) + pairs.latents_l.shape[1:]:
            raise ValueError(f"losers_latents {losers_latents.shape}: expected {(k,) + pairs.latents_l.shape[1:]} "
                             f"(one per caption of prompts_for_losers)")
        slots = [int(j) for j in rng.permutation(n)[:k]]
    lat_w, lat_l = np.array(pairs.latents_w, np.float32), np.array(pairs.latents_l, np.float32)  # copies: Ray's are read-only
    prompts = list(pairs.prompts)
    masks_w = {r: np.array(m) for r, m in pairs.masks_w.items()}
    masks_l = {r: np.array(m) for r, m in pairs.masks_l.items()}
    real_masks = source.region_masks(idx, list(masks_w))
    for slot_i, (j, i) in enumerate(zip(slots, idx)):
        lat_w[j], prompts[j] = real[i], captions[slot_i]
        for r in masks_w:
            masks_w[r][j] = real_masks[r][slot_i]
        if losers_latents is not None:
            lat_l[j] = losers_latents[slot_i]
            for r in masks_l:
                masks_l[r][j] = losers_masks[r][slot_i] if losers_masks and r in losers_masks else 0.0
    return PairBatch(lat_w, lat_l, prompts, masks_w, masks_l), stats
