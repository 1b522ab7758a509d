"""Preference pairs from scored samples, grouped by prompt.

Samples of the same prompt (and the same round) form a group. ``best_worst`` takes one pair per
group, the highest- vs the lowest-scoring sample (the FaceScore-DPO and Diffusion-DPO on-policy
recipe); ``all`` takes every ordered pair with a strict preference. Samples without a usable
combined score (None: a reward could not be computed; or NaN / inf) never enter a pair nor get a
weight; groups whose scores all tie give none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np


def usable(score: float | None) -> bool:
    """A score that can rank or weight a sample: present and finite (NaN compares false with
    everything and inf beats every real score, so either would pick pairs by accident)."""
    return score is not None and math.isfinite(score)


@dataclass(frozen=True)
class Pair:
    winner: int  # index into the scored batch
    loser: int
    margin: float  # score(winner) - score(loser) > 0


def build_pairs(groups: Sequence[Hashable], scores: Sequence[float | None], strategy: str = "best_worst") -> list[Pair]:
    """Pairs within each group.

    Args:
        groups: group key per sample (prompt, or (round, prompt)).
        scores: combined reward per sample; None (or non-finite) = not computable.
        strategy: ``best_worst`` or ``all``.
    """
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} group keys for {len(scores)} scores")
    by_group: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        if usable(scores[i]):
            by_group.setdefault(g, []).append(i)
    pairs: list[Pair] = []
    for members in by_group.values():
        if len(members) < 2:
            continue
        if strategy == "best_worst":
            # first occurrence wins ties, so pairs do not depend on sort stability
            best = max(members, key=lambda i: scores[i])
            worst = min(members, key=lambda i: scores[i])
            if scores[best] > scores[worst]:
                pairs.append(Pair(best, worst, scores[best] - scores[worst]))
        elif strategy == "all":
            for i in members:
                for j in members:
                    if scores[i] > scores[j]:
                        pairs.append(Pair(i, j, scores[i] - scores[j]))
        else:
            raise ValueError(f"unknown pair strategy {strategy!r}; use 'best_worst' or 'all'")
    return pairs


def region_mask_arrays(
    regions: Sequence[dict], names: Sequence[str], image_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Latent-size masks {region: (N, 1, h, w)} for the non-global regions in ``names``."""
    local = [n for n in names if n != "global"]
    if not local:
        return {}
    from rewards.regions import region_masks

    m = region_masks(list(regions), local, image_hw).numpy()  # (N, R, h, w)
    return {n: np.ascontiguousarray(m[:, i : i + 1]) for i, n in enumerate(local)}


def mask_regions(learner_cfg) -> list[str]:
    """The regions whose masks a round's batch carries: ``learner.regions.names``, and the guidance term's
    region (``learner.dpo.guidance.region``) when the term is on, even if no objective is computed on it."""
    names = list(learner_cfg.regions.names)
    if learner_cfg.dpo.guidance.coef > 0 and learner_cfg.dpo.guidance.region not in names:
        names.append(learner_cfg.dpo.guidance.region)
    return names


def sample_weights(scores: Sequence[float | None], weigh) -> "np.ndarray":
    """Per-sample weights for weighted losses over the round's usable scores; 0 for the others.

    ``weigh`` maps the usable scores r (n,) to their weights: the family's formula over the whole round
    (:func:`rwr_batch`: :func:`rlfh.losses.rwr.rwr_weights`; :func:`filtered_batch`:
    :func:`rlfh.losses.filtered.filter_weights`).
    """
    valid = np.array([usable(s) for s in scores], dtype=bool)
    w = np.zeros(len(scores))
    if not valid.any():
        return w
    w[valid] = weigh(np.array([s for s in scores if usable(s)], dtype=np.float64))
    return w


def ddpo_window(cfg, round: int):
    """The SDE window the rollout actors record in round ``round`` of a DDPO run (``Sampler.sample``'s
    ``record``): ``learner.ddpo.window`` = W consecutive stochastic steps starting at j, drawn
    uniformly from 0..``learner.ddpo.window_max_start`` (default T - W: anywhere), deterministic DDIM
    elsewhere; the whole trajectory (j = 0, W = T) when ``ddpo_window`` is null.

    j is drawn once per round, seeded by (``seed``, round): every sample of the round, so every sample
    of a prompt group, shares it (as Flow-GRPO-Fast, arXiv 2505.05470, draws one window per sampling
    call): the group's advantages then compare trajectories whose randomness lies in the same steps,
    and a learner micro-batch trains one timestep at a time, as without a window. The draw depends on
    nothing but the seed and the round, so a resumed run and a re-issued share of a dead actor record
    the same window. A small ``ddpo_window_max_start`` keeps it to the early, high-noise steps where
    Flow-GRPO-Fast and MixGRPO (arXiv 2507.21802) find the exploration that moves the reward.
    """
    from rollouts.types import SDEWindow

    n_steps, size = cfg.rollout.num_inference_steps, cfg.learner.ddpo.window
    if size is None:
        return SDEWindow(0, n_steps)
    max_start = n_steps - size if cfg.learner.ddpo.window_max_start is None else cfg.learner.ddpo.window_max_start
    start = int(np.random.default_rng([cfg.seed, round, 13]).integers(0, max_start + 1))
    return SDEWindow(start, size)


def ddpo_branch_seeds(cfg, prompts: Sequence[str], seeds: Sequence[int]) -> list[int] | None:
    """The x_T seed of each sample of a round under ``learner.ddpo.branch`` (``Sampler.sample``'s
    ``branch_seeds``), or None without branching: the seed of the first sample of its prompt group, a
    group being the round's samples of one prompt (the groups of the per-prompt advantages).

    TempFlow-GRPO's trajectory branching (arXiv 2508.04324): the group's samples share x_T and the
    deterministic DDIM steps before the round's SDE window (:func:`ddpo_window`), which the sampler
    then runs once per group instead of once per sample, and branch at the window with their own
    noise; so they differ only by the window's noise, which is what the group's advantages score
    (Flow-GRPO shares the initial noise of a prompt's samples likewise, its ``same_latent``). A pure
    function of the round's prompts and seeds, so resumes and re-issued shares repeat it.
    """
    if not cfg.learner.ddpo.branch:
        return None
    first: dict[str, int] = {}
    for p, s in zip(prompts, seeds):
        first.setdefault(p, int(s))
    return [first[p] for p in prompts]


NORMALIZATIONS = ("weighted_sum", "gdpo")


def learner_scores(
    values: dict[str, Sequence[float | None]],
    weights: dict[str, float],
    groups: Sequence[Hashable],
    normalization: str = "weighted_sum",
) -> tuple[list[float | None], dict[str, float]]:
    """The per-sample score every loss family trains on (``rewards_normalization``), and how many
    prompt groups carry no learning signal.

    ``weighted_sum``: sum_k w_k r_k (``rewards.composite.combined_scores``, the rewards as scored).
    ``gdpo``: each reward z-scored within its prompt group, weighted, summed and normalized over the
    round (``rlfh.losses.advantages.gdpo_advantages``, arXiv 2601.05242), so a reward on a wide
    scale no longer decides the pairs alone. Either way a sample missing a weighted reward gets None.
    Under ``gdpo`` the scores have unit std over the round, so ``learner.rwr.beta`` and
    ``learner.filtered.threshold`` act in those units, not in the rewards' own.

    Returns:
        (scores, stats): ``pairs/no_spread_share`` is the share of prompt groups whose scores do not
        spread (no pair, zero advantage; ``rlfh.losses.advantages.no_spread_share``), and
        ``reward/<name>/no_spread_share`` the same for each reward's own values. A share that cannot be
        computed (no groups) is left out.
    """
    from rewards.composite import combined_scores
    from rlfh.losses.advantages import gdpo_advantages, no_spread_share

    if normalization == "weighted_sum":
        scores = combined_scores(values, weights)
    elif normalization == "gdpo":
        scores = gdpo_advantages(values, weights, groups)
    else:
        raise ValueError(f"unknown rewards_normalization {normalization!r}; use one of {NORMALIZATIONS}")
    shares = {"pairs/no_spread_share": no_spread_share(scores, groups)}
    shares.update({f"reward/{n}/no_spread_share": no_spread_share(v, groups) for n, v in values.items()})
    return scores, {k: v for k, v in shares.items() if v is not None}


COMBINED = "combined"  # the score named by `reward_training.score` for learner_scores' combined score


def logged_scores(records: Sequence[dict], rewards, normalization: str, source: str, score: str = COMBINED):
    """Per-record scores of rollout-log records, grouped by (round, prompt) as the log's samples competed.

    Args:
        records: rollout-log rows with ``round``, ``prompt`` and ``rewards`` (``rollouts.log.SCHEMA``).
        rewards: the config's reward entries; their weights make the combined score.
        normalization: ``rewards_normalization`` for the combined score (:func:`learner_scores`).
        source: the log's directory, for error messages.
        score: ``combined`` (the weighted rewards, as online and offline-dpo train on) or the name
            of one logged reward, whose raw values are the scores (a missing or non-finite value: None).

    Returns:
        (scores, values, weights, groups, stats): ``values`` {reward: per-record values} of the
        rewards the score reads, ``weights`` their weights (1 for a named reward), ``stats`` as
        :func:`learner_scores` gives them.

    Raises:
        ValueError: a reward the score needs is not in the log (naming what the log holds).
    """
    logged = {rw["name"] for r in records for rw in r["rewards"]}
    logged_values = [{rw["name"]: rw["value"] for rw in r["rewards"]} for r in records]
    groups = [(r["round"], r["prompt"]) for r in records]
    if score == COMBINED:
        weights = {(e.name or e.target): e.weight for e in rewards}
        missing = sorted(set(weights) - logged) if records else []  # no records: nothing to score, nothing missing
        if missing:
            raise ValueError(
                f"rewards {missing} are not in the rollout log {source} (it holds {sorted(logged)}); "
                f"set `rewards:` to logged rewards"
            )
    elif score in logged:
        weights, normalization = {score: 1.0}, "weighted_sum"  # one reward's own values, unscaled
    else:
        raise ValueError(
            f"reward_training.score={score!r} is not a reward in the rollout log {source} (it holds "
            f"{sorted(logged)}); name one of those, or `combined` for the `rewards:` weights"
        )
    values = {n: [v.get(n) for v in logged_values] for n in weights}
    scores, stats = learner_scores(values, weights, groups, normalization)
    return scores, values, weights, groups, stats


def logged_regions(records: Sequence[dict]) -> list[dict[str, list]]:
    """Per record, {region name: [Detection, ...]} from a rollout log's ``regions`` column."""
    from rewards.base import Detection

    out: list[dict[str, list]] = []
    for r in records:
        dets: dict[str, list] = {}
        for g in r["regions"]:
            dets.setdefault(g["region"], []).append(
                Detection((g["x1"], g["y1"], g["x2"], g["y2"]), g["confidence"], g["label"])
            )
        out.append(dets)
    return out


@dataclass(frozen=True)
class ScoredRound:
    """A round's scored samples as every batch builder takes them: the :class:`ScoredSamples` with
    their region masks made and the unscored ones counted (:func:`learner_batch`)."""

    latents: np.ndarray  # (N, 4, h, w) final latents
    prompts: Sequence[str]
    groups: Sequence[Hashable]  # the prompt group of each sample (pairs and advantages stay inside one)
    scores: Sequence[float | None]  # from learner_scores; None = not usable
    masks: dict[str, np.ndarray]  # {region: (N, 1, h, w)}
    priors: np.ndarray | None  # HcP's pose priors (N, 1, h, w), selected with the rows
    conditioning: dict | None  # the rollout batch's {prompt: (embeds, pooled)}, passed on unchanged
    normalization: str  # rewards_normalization the scores were made with
    trajectory: dict | None  # the sampler's recorded steps (trajectory families)
    settings: object  # the round's sampler settings (trajectory families)
    unscored: dict[str, float]  # {"samples/unscored": count}, merged into every builder's stats
    kl_gate: np.ndarray | None = None  # (N,) bool, GARDO's gated KL (rlfh/losses/gardo.py); None: every sample
    embeddings: np.ndarray | None = None  # (N, D), GARDO's diversity-aware advantage; None: off

    def gate_rows(self, idx) -> np.ndarray | None:
        return None if self.kl_gate is None else np.asarray(self.kl_gate, bool)[idx]

    def diversity(self, idx) -> np.ndarray | None:
        """GARDO's diversity factors of rows ``idx`` within their prompt groups
        (``rlfh.losses.gardo.diversity_factors``), or None when off."""
        from rlfh.losses.gardo import diversity_factors

        if self.embeddings is None:
            return None
        idx = list(idx)
        return diversity_factors(self.embeddings[idx], [self.groups[i] for i in idx])

    def keep(self) -> list[int]:
        """The samples with a usable score."""
        return [i for i, s in enumerate(self.scores) if usable(s)]

    def prior_rows(self, idx) -> np.ndarray | None:
        return None if self.priors is None else self.priors[idx]


def learner_batch(learner_cfg, samples, normalization: str = "weighted_sum"):
    """What the learner trains on this round, from its scored samples (``rlfh.data.batches.ScoredSamples``),
    built by the loss's batch builder (``rlfh.losses.registry``: its ``build_batch``): a PairBatch
    (:func:`pair_batch`), a SampleBatch (:func:`rwr_batch`, :func:`filtered_batch`,
    :func:`advantage_batch`) or a TrajectoryBatch (:func:`trajectory_batch`).

    ``samples.scores`` come from :func:`learner_scores` with ``normalization``. ``samples.conditioning``
    (the rollout batch's {prompt: (embeds, pooled)}) goes with the batch unchanged; ``samples.priors``
    (HcP's pose priors) are selected with the rows, as the region masks.

    Returns:
        (batch, stats) with stats a flat dict of floats for metrics; ``samples/unscored`` counts the
        samples left out for want of a usable score.
    """
    from rlfh.losses.registry import loss_spec

    spec = loss_spec(learner_cfg.loss)
    # a family trained on the whole image only (spec.regions false: DDPO) carries no masks
    masks = region_mask_arrays(samples.regions, mask_regions(learner_cfg), samples.image_hw) if spec.regions else {}
    unscored = {"samples/unscored": float(sum(not usable(s) for s in samples.scores))}
    rnd = ScoredRound(
        samples.latents,
        samples.prompts,
        samples.groups,
        samples.scores,
        masks,
        samples.priors,
        samples.conditioning,
        normalization,
        samples.trajectory,
        samples.settings,
        unscored,
        samples.kl_gate,
        samples.embeddings,
    )
    return spec.builder()(learner_cfg, rnd)


def pair_batch(learner_cfg, rnd: ScoredRound):
    """DPO family: the prompt groups' pairs (``learner.dpo.pair_strategy``, :func:`build_pairs`)."""
    from rlfh.data.batches import PairBatch

    pairs = build_pairs(rnd.groups, rnd.scores, learner_cfg.dpo.pair_strategy)
    w, l = [p.winner for p in pairs], [p.loser for p in pairs]
    batch = PairBatch(
        rnd.latents[w],
        rnd.latents[l],
        [rnd.prompts[i] for i in w],
        {r: m[w] for r, m in rnd.masks.items()},
        {r: m[l] for r, m in rnd.masks.items()},
        rnd.conditioning,
        rnd.prior_rows(w),
        rnd.prior_rows(l),
    )
    return batch, {
        "pairs/count": float(len(pairs)),
        **rnd.unscored,
        "pairs/mean_margin": float(np.mean([p.margin for p in pairs])) if pairs else 0.0,
    }


def weighted_batch(rnd: ScoredRound, weights: np.ndarray):
    """The samples with a positive weight, with their weights (RWR, filtered); with GARDO's diversity-aware
    shaping the weights of the samples above their group's mean score times their diversity factor."""
    from rlfh.data.batches import SampleBatch
    from rlfh.losses.gardo import shaped_weights

    factors = rnd.diversity(range(len(rnd.scores)))
    if factors is not None:
        weights = shaped_weights(weights, rnd.scores, rnd.groups, factors)
    keep = np.nonzero(weights > 0)[0]
    batch = SampleBatch(
        rnd.latents[keep],
        [rnd.prompts[i] for i in keep],
        weights[keep].astype(np.float32),
        {r: m[keep] for r, m in rnd.masks.items()},
        rnd.conditioning,
        rnd.prior_rows(keep),
        kl_gate=rnd.gate_rows(keep),
    )
    return batch, {
        "samples/kept": float(len(keep)),
        **rnd.unscored,
        "samples/max_weight": float(weights.max()) if len(weights) else 0.0,
    }


def rwr_batch(learner_cfg, rnd: ScoredRound):
    """RWR: weights N * softmax(beta r) over the round (:func:`rlfh.losses.rwr.rwr_weights`)."""
    from rlfh.losses.rwr import rwr_weights

    return weighted_batch(rnd, sample_weights(rnd.scores, lambda r: rwr_weights(r, learner_cfg.rwr.beta)))


def filtered_batch(learner_cfg, rnd: ScoredRound):
    """Filtered fine-tuning: weights 1[r >= C] (:func:`rlfh.losses.filtered.filter_weights`)."""
    from rlfh.losses.filtered import filter_weights

    lc = learner_cfg
    weigh = lambda r: filter_weights(r, lc.filtered.threshold, lc.filtered.top_fraction)  # noqa: E731
    return weighted_batch(rnd, sample_weights(rnd.scores, weigh))


def round_advantages(rnd: ScoredRound, keep: Sequence[int]):
    """Per-prompt advantages A of the kept samples (z-scores clipped to +-5, rlfh.losses.advantages), (n,)
    float64; under ``gdpo`` the scores are GDPO's advantages already and are only clipped (GDPO's last
    normalization is over the batch)."""
    import torch

    from rlfh.losses.advantages import ADV_CLIP, per_prompt_advantages
    from rlfh.losses.gardo import shaped_advantages

    if not len(keep):
        return torch.zeros(0, dtype=torch.float64)
    if rnd.normalization == "gdpo":
        adv = torch.tensor([rnd.scores[i] for i in keep], dtype=torch.float64).clamp(-ADV_CLIP, ADV_CLIP)
    else:
        adv = per_prompt_advantages(
            torch.tensor([rnd.scores[i] for i in keep], dtype=torch.float64), [rnd.groups[i] for i in keep]
        )
    factors = rnd.diversity(keep)  # GARDO's diversity-aware advantage (rlfh/losses/gardo.py), when on
    return adv if factors is None else torch.from_numpy(shaped_advantages(adv.numpy(), factors, ADV_CLIP))


def advantage_batch(learner_cfg, rnd: ScoredRound):
    """DiffusionNFT / AWM: every scored sample with its per-prompt advantage A (:func:`round_advantages`)
    in a SampleBatch's ``advantages``; the family's step takes its signal from them (the spec's
    ``signal``: NFT's r, AWM's A itself)."""
    from rlfh.data.batches import SampleBatch

    keep = np.array(rnd.keep(), dtype=np.int64)
    adv = round_advantages(rnd, keep)
    batch = SampleBatch(
        rnd.latents[keep],
        [rnd.prompts[i] for i in keep],
        None,
        {r: m[keep] for r, m in rnd.masks.items()},
        rnd.conditioning,
        rnd.prior_rows(keep),
        adv.float().numpy(),
        rnd.gate_rows(keep),
    )
    return batch, {
        "samples/kept": float(len(keep)),
        **rnd.unscored,
        "samples/advantage_abs_mean": float(adv.abs().mean()) if len(keep) else 0.0,
    }


def trajectory_batch(learner_cfg, rnd: ScoredRound):
    """DDPO: the recorded trajectories of the scored samples with their per-prompt advantages
    (:func:`round_advantages`), which under ``gdpo`` are taken as they are instead of being z-scored
    per prompt a second time."""
    from rlfh.data.batches import TrajectoryBatch

    tr = rnd.trajectory
    if tr is None:
        raise ValueError(
            f"learner.loss={learner_cfg.loss} needs the sampling trajectories (the rollout actors record them)"
        )
    keep = rnd.keep()
    adv = round_advantages(rnd, keep).float().numpy()
    start = int(tr.get("window_start", 0))
    batch = TrajectoryBatch(
        tr["latents"][keep],
        tr["log_probs"][keep],
        tr["timesteps"],
        adv,
        [rnd.prompts[i] for i in keep],
        rnd.settings,
        start,
        rnd.conditioning,
        rnd.gate_rows(keep),
    )
    return batch, {
        "samples/kept": float(len(keep)),
        **rnd.unscored,
        "ddpo/window_start": float(start),
        "ddpo/advantage_abs_mean": float(np.abs(adv).mean()) if keep else 0.0,
    }


def prompt_batch(learner_cfg, rnd: ScoredRound):
    """Direct reward fine-tuning (learner.loss=draft): the prompts of the round's samples, one row per sample
    (a prompt group of G samples gives G rows: as many images as the round sampled, each from fresh x_T)."""
    from rlfh.data.batches import PromptBatch

    return PromptBatch(list(rnd.prompts), rnd.conditioning), {"samples/kept": float(len(rnd.prompts)), **rnd.unscored}
