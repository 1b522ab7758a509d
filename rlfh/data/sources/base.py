"""The interface of a per-round data source (see rlfh/data/sources/__init__.py for the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class SourceContext:
    """What a source may use, given by the loop that runs it.

    ``sampler``: samples with the current policy (``sample`` / ``refine``, as
    ``rollouts.actor.RolloutFleet``): the rollout fleet online, the learner rank offline, or None.
    ``settings``: the sampler settings of the round's samples (``rollouts.types.SamplerSettings``);
    None offline without a source that samples. ``scorer`` (``rewards.actor.RewardScorer``) and ``log``
    (``rollouts.log.RolloutLog``) exist in the online loop only.
    """

    run_dir: Path
    sampler: Any = None
    settings: Any = None
    scorer: Any = None
    log: Any = None

    @property
    def online(self) -> bool:
        return self.scorer is not None


@dataclass
class RoundData:
    """One round as a source sees it: its index, the policy version now, and online the round's
    ``rollouts.types.RolloutBatch`` (with ``rollout_ids``) and its scores (``rewards.actor.Scored``)."""

    rnd: int
    version: int
    samples: Optional[Any] = None
    scored: Optional[Any] = None


class DataSource:
    """The interface of a per-round data source (module docstring); the defaults do nothing."""

    name = ""
    # the config key that turns the source on, named when a run refuses it
    switch = ""
    # True: annotate() only, which sees one bucket's samples at a time, so the source runs with rollout.resolutions
    # (the builder calls it per bucket); False: extend() takes a round's batch of one size
    per_bucket = False
    needs_images = False  # annotate() reads ScoredSamples.images (offline: decoded from the rollout log)
    needs_settings = False  # reads SourceContext.settings (offline: the rollout log's, which must be one)

    @staticmethod
    def section(cfg):
        """The source's config section: the one place that says where it lives."""
        raise NotImplementedError

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        """Whether this run uses the source (its section turns it on)."""
        raise NotImplementedError

    @classmethod
    def samples_with_policy(cls, cfg) -> str | None:
        """Why this source samples with the current policy (``SourceContext.sampler``), or None when it
        does not; offline, the learner's rank 0 then samples with its own UNet."""
        return None

    def annotate(self, samples) -> None:
        """Set per-sample fields of ``samples`` (``rlfh.data.batches.ScoredSamples``) before the batch is built."""

    def extend(self, batch, rnd: RoundData):
        """The round's batch with this source's data; returns (batch, stats)."""
        return batch, {}

    def state(self) -> dict:
        """What the source carries from round to round, JSON-able, kept in the checkpoint ({}: nothing)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state`'s output; ``{}``: from the start (a run resumed before any checkpoint)."""

    def close(self) -> None:
        """Release what the source holds."""
