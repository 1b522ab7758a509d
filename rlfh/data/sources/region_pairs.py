"""FaceScore's region pairs online as a per-round data source (``data.region_pairs``; the pairs'
formulas and planning are rlfh/data/region_pairs.py).

A seeded ``fraction`` of the round's samples with the region detected get it inpainted by the
current policy (``RolloutFleet.refine``, one call per strength; one face at a time with
``per_region: each``), are logged (``region_pair`` marks them), and each (sample, inpainted) pair joins
the round's pairs with the region's mask, the original winning (``winner: original``, FaceScore's rule)
or the reward ordering the two (``winner: reward``: only then are the inpainted images scored).
Online only: offline, the rollout log's own region pairs (written by this source or ``rlfh
make-region-pairs``) are paired with each other as they were logged.
"""

from __future__ import annotations

import uuid

from rlfh.data.sources.base import DataSource, RoundData, SourceContext


class InpaintedRegions(DataSource):
    name = "region_pairs"
    switch = "data.region_pairs.region"
    needs_settings = True

    @classmethod
    def samples_with_policy(cls, cfg) -> str | None:
        return "data.region_pairs inpaints with the current policy"

    @staticmethod
    def section(cfg):
        return cfg.data.region_pairs

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        return cls.section(cfg).region is not None and ctx.online

    def __init__(self, cfg, ctx: SourceContext):
        import dataclasses

        rp = self.section(cfg)
        self.cfg, self.fleet, self.scorer, self.log = cfg, ctx.sampler, ctx.scorer, ctx.log
        steps = rp.num_inference_steps or ctx.settings.num_inference_steps
        self.settings = dataclasses.replace(ctx.settings, num_inference_steps=steps)

    def extend(self, batch, rnd: RoundData):
        """The round's pairs with the (sample, inpainted) pairs of its chosen samples; returns (pairs, stats)."""
        import numpy as np

        from rlfh.data.region_pairs import concat_pairs, plan_inpainting

        cfg, rp, rc = self.cfg, self.section(self.cfg), self.cfg.rollout
        samples, scored = rnd.samples, rnd.scored
        rng = np.random.default_rng([cfg.seed, rnd.rnd, 0x5250])  # 0x5250 "RP": a stream of its own
        choose = rng.random(len(samples)) < rp.fraction
        seeds = rng.integers(0, 2**31 - 1, len(samples))
        plan = plan_inpainting([scored.regions(i) for i in range(len(samples))], rp, (rc.height, rc.width), choose)
        stats = {"region_pairs/candidates": float(len(plan.indices))}
        if not plan.indices:
            return batch, {**stats, "region_pairs/count": 0.0}
        inp, order = self.inpaint(samples, plan, seeds)
        pairs, pair_stats = self.pairs(rnd, inp, plan, order)
        strengths = [plan.strengths[k] for k in order]
        stats.update(pair_stats)
        stats.update(
            {
                "region_pairs/mean_strength": float(np.mean(strengths)),
                "region_pairs/mean_area_ratio": float(np.mean(plan.ratios)),
            }
        )
        return concat_pairs(batch, pairs), stats

    def inpaint(self, samples, plan, seeds):
        """The planned samples with their region inpainted by the policy, one refine call per strength;
        returns (RolloutBatch, order of the plan's entries in it)."""
        from rlfh.data.region_pairs import strength_groups
        from rollouts.types import RolloutBatch

        parts, order = [], []
        for strength, ks in strength_groups(plan.strengths).items():
            idx = [plan.indices[k] for k in ks]
            parts.append(
                self.fleet.refine(
                    samples.latents[idx],
                    [samples.prompts[i] for i in idx],
                    [int(seeds[i]) for i in idx],
                    self.settings,
                    strength,
                    plan.masks[ks],
                )
            )
            order.extend(ks)
        inp = RolloutBatch.concat(parts)
        inp.rollout_ids = [uuid.uuid4().hex for _ in range(len(inp))]
        return inp, order

    def pairs(self, rnd: RoundData, inp, plan, order):
        """Score and log the inpainted samples; their (sample, inpainted) pairs and stats."""
        from rlfh.data.pairs import mask_regions
        from rlfh.data.region_pairs import log_marks, region_pair_batch
        from rollouts.log import make_records

        cfg, rp = self.cfg, self.section(self.cfg)
        samples, scored = rnd.samples, rnd.scored
        idx = [plan.indices[k] for k in order]
        strengths = [plan.strengths[k] for k in order]
        scored_inp = self.scorer.score(inp.images, inp.prompts) if rp.winner == "reward" else None
        marks = log_marks("inpainted", [samples.rollout_ids[i] for i in idx], rp.region, strengths, rp.dilate)
        self.log.append(make_records(inp, scored_inp, rnd.rnd, rnd.version - inp.policy_version, marks))
        values = scored.values()
        values_inp = scored_inp.values() if scored_inp is not None else {n: [None] * len(inp) for n in values}
        return region_pair_batch(
            samples.latents[idx],
            inp.latents,
            inp.prompts,
            {n: [v[i] for i in idx] for n, v in values.items()},
            values_inp,
            scored.weights,
            plan.masks[order],
            rp.region,
            mask_regions(cfg.learner),
            cfg.rewards_normalization,
            inp.conditioning,
            rp.winner,
        )
