"""Per-round data sources: what joins a round's samples and batch besides the policy's own samples.

A source is one file here with one class behind :class:`DataSource`, built from its own config
section, and one line in :data:`SOURCES`. The training loop (rlfh/recipes/rounds.py) builds every
source whose section turns it on and calls it each round, without knowing which ones exist:

    annotate(samples)       per-sample fields of the round's scored samples, before the batch is
                            built from them (HcP's pose priors: ``ScoredSamples.priors``)
    extend(batch, round)    the round's training batch, transformed or extended (HG-DPO's real
                            winners; inpainted region pairs); returns (batch, stats)
    close()                 release what it holds (MediaPipe graphs), at teardown

The sources run in :data:`SOURCES` order (HcP's priors exist before people's labels pick the rows and
before HG-DPO mixes real winners in).
"""

from __future__ import annotations

from pathlib import Path

from rlfh.data.sources.base import DataSource, RoundData, SourceContext
from rlfh.data.sources.gardo import Gardo
from rlfh.data.sources.hcp_priors import HcpPriors
from rlfh.data.sources.hgdpo import RealWinners
from rlfh.data.sources.human_labels import HumanLabels
from rlfh.data.sources.labeled_pairs import LabeledPairs
from rlfh.data.sources.region_pairs import InpaintedRegions

# name -> source, in the order they run: a new source is one file and one line here
SOURCES: dict[str, type[DataSource]] = {
    HcpPriors.name: HcpPriors,
    HumanLabels.name: HumanLabels,
    RealWinners.name: RealWinners,
    InpaintedRegions.name: InpaintedRegions,
    LabeledPairs.name: LabeledPairs,  # after HG-DPO: people's winners stay theirs
    Gardo.name: Gardo,
}

__all__ = ["SOURCES", "DataSource", "RoundData", "SourceContext", "bucket_problems", "build_sources", "close_sources"]


def build_sources(cfg, ctx: SourceContext) -> list[DataSource]:
    """Every source this config turns on, built in order; one that fails to build releases those before it."""
    built: list[DataSource] = []
    try:
        for cls in SOURCES.values():
            if cls.wanted(cfg, ctx):
                built.append(cls(cfg, ctx))
    except BaseException:
        close_sources(built)
        raise
    return built


def bucket_problems(cfg) -> list[str]:
    """rollout.resolutions x the sources `rlfh train` would build: only those that annotate each bucket's samples
    (``DataSource.per_bucket``) run with several buckets; the others extend a round's batch of one size (HG-DPO's
    real winners prepared at one size, region pairs inpainted at the round's size, people's labels)."""
    n = len(cfg.rollout.resolutions)
    if n < 2:
        return []
    online = SourceContext(Path(cfg.run_dir), scorer=True)  # what `rlfh train` builds them with
    return [
        f"rollout.resolutions: {n} buckets with {cls.switch} (the {cls.name} data source), which extends a round's "
        f"batch of one size: use one resolution, or drop {cls.switch}"
        for cls in SOURCES.values()
        if not cls.per_bucket and cls.wanted(cfg, online)
    ]


def close_sources(sources: list[DataSource]) -> None:
    for s in reversed(sources):
        s.close()
