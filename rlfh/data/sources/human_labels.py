"""People's labels as a data source (``labels: human``): the pairs of the rollout log's labels table
(rlfh/data/human_pairs.py) replace the pairs its rewards would make, offline (``rlfh offline-dpo``).

The scored samples are rebuilt with one prompt group per labeled pair, the winner scored 1 and the
loser 0, so the loss's own batch builder makes exactly those pairs, and every option that works on
pairs (region masks and MPD, the guidance term, HG-DPO's mixing, HcP's priors) applies unchanged.
"""

from __future__ import annotations

import numpy as np

from rlfh.data.sources.base import DataSource, SourceContext


class HumanLabels(DataSource):
    name = "human_labels"
    switch = "labels=human"

    @staticmethod
    def section(cfg):
        return cfg.labels

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        return cfg.labels == "human"

    def __init__(self, cfg, ctx: SourceContext):
        from rlfh.losses.registry import PAIRS, loss_spec

        if ctx.online:
            raise ValueError("labels=human trains on a labeled rollout log: use rlfh offline-dpo rollouts=DIR")
        if loss_spec(cfg.learner.loss).batch != PAIRS:
            raise ValueError(f"labels=human makes preference pairs: learner.loss={cfg.learner.loss} trains no pairs")
        self.log_dir = cfg.rollouts
        self.stats: dict[str, float] = {}

    def annotate(self, samples) -> None:
        from rlfh.data.human_pairs import human_pairs

        if samples.ids is None:
            raise ValueError("labels=human needs the rollout ids of the samples (a rollout log's records)")
        pairs, self.stats = human_pairs(self.log_dir, samples.ids)
        rows = np.array([i for p in pairs for i in (p.winner, p.loser)], dtype=np.int64)
        samples.latents = samples.latents[rows]
        samples.prompts = [samples.prompts[i] for i in rows]
        samples.regions = [samples.regions[i] for i in rows]
        samples.ids = [samples.ids[i] for i in rows]
        samples.groups = [("human", k) for k in range(len(pairs)) for _ in range(2)]
        samples.scores = [1.0, 0.0] * len(pairs)
        for name in ("images", "priors"):
            if getattr(samples, name) is not None:
                setattr(samples, name, getattr(samples, name)[rows])

    def extend(self, batch, rnd):
        return batch, dict(self.stats)  # the labels' counts in the round's metrics
