"""People's pairs mixed into every round (``data.human_labels``): the (winner, loser) pairs of a labeled
rollout log (its labels table, rlfh/data/human_pairs.py) join the round's pairs, online or offline.

The pairs are built once: the logged latents, the prompts, and the region masks the round's pairs
carry (``learner.regions.names``, the guidance region) from the logged boxes. Each round takes all of
them, or a draw of ``pairs_per_round`` seeded by (seed, round), so a resumed run mixes the same ones.
Their prompts are encoded by the learner (no rollout conditioned on them): the learner keeps its text
encoders (rlfh.learner.run_config.needs_text_encoders).
"""

from __future__ import annotations

import numpy as np

from rlfh.data.sources.base import DataSource, RoundData, SourceContext


class LabeledPairs(DataSource):
    name = "labeled_pairs"
    switch = "data.human_labels.log"

    @staticmethod
    def section(cfg):
        return cfg.data.human_labels

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        return cls.section(cfg).log is not None

    def __init__(self, cfg, ctx: SourceContext):
        from rlfh.losses.registry import PAIRS, loss_spec

        key = "data.human_labels.log"
        if loss_spec(cfg.learner.loss).batch != PAIRS:
            raise ValueError(f"{key} mixes preference pairs in: learner.loss={cfg.learner.loss} trains no pairs")
        if cfg.model.hcp.enabled:
            raise ValueError(f"{key}: the labeled pairs carry no HcP pose priors; turn model.hcp off")
        self.cfg, self.pairs, self.stats = cfg, *labeled_pair_batch(self.section(cfg).log, cfg.learner)

    def take(self, rnd: int):
        """The labeled pairs of round ``rnd``: all, or a seeded draw of ``pairs_per_round``."""
        from rlfh.data.batches import PairBatch

        n, k = len(self.pairs), self.section(self.cfg).pairs_per_round
        if not k or k >= n:
            return self.pairs
        rng = np.random.default_rng([self.cfg.seed, rnd, 0x484C])  # 0x484C "HL": a stream of its own
        idx = np.sort(rng.choice(n, size=k, replace=False))
        p = self.pairs
        return PairBatch(
            p.latents_w[idx],
            p.latents_l[idx],
            [p.prompts[i] for i in idx],
            {r: m[idx] for r, m in p.masks_w.items()},
            {r: m[idx] for r, m in p.masks_l.items()},
        )

    def extend(self, batch, rnd: RoundData):
        from rlfh.data.region_pairs import concat_pairs

        add = self.take(rnd.rnd)
        if len(batch) and batch.latents_w.shape[1:] != add.latents_w.shape[1:]:
            raise ValueError(
                f"data.human_labels.log={self.section(self.cfg).log}: its latents are {add.latents_w.shape[1:]}, "
                f"the run's {batch.latents_w.shape[1:]}; label a log of this model at this image size"
            )
        return concat_pairs(batch, add), {**self.stats, "human_labels/pairs": float(len(add))}


def labeled_pair_batch(log_dir, learner_cfg):
    """A PairBatch of every labeled pair of ``log_dir`` with the masks of ``learner_cfg``; (batch, stats)."""
    from rlfh.data.batches import PairBatch
    from rlfh.data.human_pairs import human_pairs
    from rlfh.data.pairs import logged_regions, mask_regions, region_mask_arrays
    from rlfh.losses.registry import loss_spec
    from rollouts.log import RolloutLog, decode_latent

    records = RolloutLog(log_dir).records(["rollout_id", "prompt", "regions", "sampler", "latent", "latent_shape"])
    pairs, stats = human_pairs(log_dir, [r["rollout_id"] for r in records])
    rows = [i for p in pairs for i in (p.winner, p.loser)]
    sizes = {(records[i]["sampler"]["height"], records[i]["sampler"]["width"]) for i in rows}
    if len(sizes) != 1:
        raise ValueError(f"data.human_labels.log={log_dir}: the labeled images have sizes {sorted(sizes)}; use one")
    latents = np.stack([decode_latent(records[i]) for i in rows])
    masks = {}
    if loss_spec(learner_cfg.loss).regions:
        regions = logged_regions([records[i] for i in rows])
        masks = region_mask_arrays(regions, mask_regions(learner_cfg), sizes.pop())
    w, l = slice(0, None, 2), slice(1, None, 2)
    batch = PairBatch(
        latents[w],
        latents[l],
        [records[p.winner]["prompt"] for p in pairs],
        {r: m[w] for r, m in masks.items()},
        {r: m[l] for r, m in masks.items()},
    )
    return batch, {f"human_labels/{k.split('/', 1)[1]}": v for k, v in stats.items()}
