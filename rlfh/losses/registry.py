"""The loss families: one :class:`LossSpec` per value of ``learner.loss``.

Everything that depends on the loss reads its spec instead of comparing names: the config rules
(what the family needs from the sampler and the run), the batch builder (rlfh/data/pairs.py), the
learner (which step loop runs, which models it keeps: rlfh/learner/engine.py, rlfh/learner/steps.py),
the objectives (rlfh/losses/objectives.py) and the recipes. A new family is its loss file plus one
line in :data:`LOSSES` (docs/extending.md, "A loss").

The section types come with the loss files; builders and objectives are named as ``"module:function"``
and imported on first use: they live in the data and learner layers, which read this registry themselves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from rlfh.losses.awm import AWMConfig
from rlfh.losses.ddpo import DDPOConfig
from rlfh.losses.dpo import DPOConfig
from rlfh.losses.draft import DraftConfig
from rlfh.losses.filtered import FilteredConfig
from rlfh.losses.nft import NFTConfig
from rlfh.losses.rwr import RWRConfig

# What a family trains on: the batch its builder makes and the step loop that consumes it.
PAIRS = "pairs"  # (winner, loser) latents of one prompt: rlfh.data.batches.PairBatch
SAMPLES = "weighted samples"  # latents with a per-sample weight or signal: rlfh.data.batches.SampleBatch
TRAJECTORIES = "trajectories"  # recorded sampler steps with log-probs: rlfh.data.batches.TrajectoryBatch
PROMPTS = "prompts"  # prompts the learner samples itself, with gradient: rlfh.data.batches.PromptBatch

# What a family needs beyond the policy and its batch.
REFERENCE = "reference"  # the frozen reference's prediction on every item (DPO's implicit reward)
OLD_POLICY = "old policy"  # the prediction of the weights that sampled the round (snapshotted at its start)
SAMPLER_LOGPROB = "sampler log-probs"  # a stochastic DDIM sampler that records each step's log-prob
TEXT_ENCODERS = "text encoders"  # the learner encodes prompts itself (the negative prompt of guided eps)
VAE_DECODER = "VAE decoder"  # the learner decodes its own samples (a reward back-propagated through the decoder)
DIFFERENTIABLE_REWARDS = "differentiable rewards"  # every `rewards:` entry has score_tensor (rewards/base.py)


@dataclass(frozen=True)
class LossSpec:
    """One loss family member: the value of ``learner.loss`` and what it takes to train it.

    Attributes:
        name: the value of ``learner.loss``.
        section: ``learner.<section>``, the config section of the family's own knobs (variants share one).
        config: that section's frozen dataclass, defined in the loss's file; its ``problems(key)`` checks
            its own fields (rlfh/config/fields.py).
        batch: what it trains on: :data:`PAIRS`, :data:`SAMPLES`, :data:`TRAJECTORIES` or :data:`PROMPTS`.
        on_policy: compares with the policy that sampled the round, so it trains neither from a logged
            rollout log nor on samples one round stale.
        needs: what the learner keeps or the sampler records for it (:data:`REFERENCE`, ...).
        build_batch: ``module:function`` making the round's batch from scored samples, called as
            ``f(learner_cfg, round_data, spec)`` (rlfh/data/pairs.py).
        objective: ``module:function`` of the family's loss on one micro-batch (per region, or per
            recorded step for trajectories).
        variant: the DPO variant's name in rlfh/losses/dpo_variants.py; None for the sigmoid loss.
        regions: trains one objective per region of ``learner.regions.names`` (else the whole image only).
        signal: ``module:function`` turning a SampleBatch's advantages A into the per-sample signal the
            objective takes, called as ``f(A, learner_cfg)``; None: A itself.
        aligned_only: trains on the batch's aligned region pairs only (an image and its inpainted copy,
            ``PairBatch.aligned``), so a run needs region pairs (``data.region_pairs`` or a logged log of them).
    """

    name: str
    section: str
    config: type
    batch: str
    on_policy: bool
    needs: frozenset[str]
    build_batch: str
    objective: str
    variant: str | None = None
    regions: bool = True
    signal: str | None = None
    aligned_only: bool = False
    _resolved: dict = field(default_factory=dict, compare=False, repr=False)

    def builder(self) -> Callable:
        return self.resolve(self.build_batch)

    def signal_of(self, advantages, learner_cfg):
        """The objective's per-sample signal from the batch's advantages (:attr:`signal`)."""
        return advantages if self.signal is None else self.resolve(self.signal)(advantages, learner_cfg)

    def objective_fn(self) -> Callable:
        return self.resolve(self.objective)

    def resolve(self, target: str) -> Callable:
        if target not in self._resolved:
            module, _, name = target.partition(":")
            self._resolved[target] = getattr(importlib.import_module(module), name)
        return self._resolved[target]


_PAIRWISE = "rlfh.losses.objectives:pairwise_objectives"
_PAIR_BATCH = "rlfh.data.pairs:pair_batch"

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec("dpo", "dpo", DPOConfig, PAIRS, False, frozenset({REFERENCE}), _PAIR_BATCH, _PAIRWISE),
        LossSpec(
            "dpo_hinge", "dpo", DPOConfig, PAIRS, False, frozenset({REFERENCE}), _PAIR_BATCH, _PAIRWISE, variant="hinge"
        ),
        LossSpec(
            "dpo_ipo", "dpo", DPOConfig, PAIRS, False, frozenset({REFERENCE}), _PAIR_BATCH, _PAIRWISE, variant="ipo"
        ),
        LossSpec(
            "guidance",
            "dpo",  # a pair loss filed with the DPO family's section; it reads none of its knobs
            DPOConfig,
            PAIRS,
            False,
            frozenset(),
            "rlfh.data.region_pairs:no_sample_pairs",
            "rlfh.losses.guidance_finetune:guidance_objectives",
            aligned_only=True,
        ),
        LossSpec(
            "rwr",
            "rwr",
            RWRConfig,
            SAMPLES,
            False,
            frozenset(),
            "rlfh.data.pairs:rwr_batch",
            "rlfh.losses.objectives:weighted_objectives",
        ),
        LossSpec(
            "filtered",
            "filtered",
            FilteredConfig,
            SAMPLES,
            False,
            frozenset(),
            "rlfh.data.pairs:filtered_batch",
            "rlfh.losses.objectives:weighted_objectives",
        ),
        LossSpec(
            "ddpo",
            "ddpo",
            DDPOConfig,
            TRAJECTORIES,
            True,
            frozenset({SAMPLER_LOGPROB, TEXT_ENCODERS}),
            "rlfh.data.pairs:trajectory_batch",
            "rlfh.learner.ddpo_steps:trust_region_loss",
            regions=False,
        ),
        LossSpec(
            "nft",
            "nft",
            NFTConfig,
            SAMPLES,
            True,
            frozenset({OLD_POLICY}),
            "rlfh.data.pairs:advantage_batch",
            "rlfh.losses.objectives:nft_objectives",
            signal="rlfh.losses.nft:nft_signal",
        ),
        LossSpec(
            "awm",
            "awm",
            AWMConfig,
            SAMPLES,
            True,
            frozenset({OLD_POLICY}),
            "rlfh.data.pairs:advantage_batch",
            "rlfh.losses.objectives:awm_objectives",
        ),
        LossSpec(
            "draft",
            "draft",
            DraftConfig,
            PROMPTS,
            False,  # it samples from the current weights itself: the rollouts give it prompts only
            frozenset({REFERENCE, TEXT_ENCODERS, VAE_DECODER, DIFFERENTIABLE_REWARDS}),
            "rlfh.data.pairs:prompt_batch",
            "rlfh.losses.draft:region_objectives",
        ),
    ]
}

LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def loss_spec(name: str) -> LossSpec:
    """The spec of ``learner.loss`` = ``name``; a ValueError naming the known ones otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"learner.loss={name!r}: unknown loss; use one of {list(LOSSES)}") from None


def loss_sections() -> dict[str, type]:
    """``{section: config type}`` of every family, in registry order: the sections of ``learner``."""
    sections: dict[str, type] = {}
    for spec in LOSSES.values():
        if sections.setdefault(spec.section, spec.config) is not spec.config:
            raise TypeError(f"learner.{spec.section}: losses of one section must share its config type")
    return sections


def names_where(predicate: Callable[[LossSpec], bool]) -> list[str]:
    """The loss names whose spec satisfies ``predicate``, for messages that list the choices."""
    return [s.name for s in LOSSES.values() if predicate(s)]
