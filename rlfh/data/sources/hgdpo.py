"""HG-DPO's real and SDRecon winners as a per-round data source, one implementation for both loops.

``rlfh train`` (rlfh/recipes/online.py) and ``rlfh offline-dpo`` (rlfh/recipes/offline.py) both mix
them into each round's pairs when ``data.hgdpo.real_images`` is set (:meth:`RealWinners.extend`);
they differ only in what samples with the current policy (``SourceContext.sampler``: the SDRecon
winners, and the fresh losers of ``data.hgdpo.fresh_losers``):

    online    the rollout actors (``rollouts.actor.RolloutFleet``), or the colocated learner rank
    offline   the learner rank itself, with its own UNet (``LearnerRank`` set up with ``colocate``;
              rlfh/learner/colocate.py hands the device over between sampling and training)

Either offers ``sample(prompts, seeds, settings, batch_size)`` and ``refine(latents, prompts, seeds,
settings, strength, masks=None, batch_size=...)``, each returning one ``RolloutBatch`` in input order.
The curriculum, the mixing and the formulas are rlfh/data/hgdpo.py's.
"""

from __future__ import annotations

from rlfh.config.schema import Config
from rlfh.data.sources.base import DataSource, RoundData, SourceContext


def hgdpo_section(cfg):
    """The HG-DPO section of the config: the one place that says where it lives."""
    return cfg.data.hgdpo


def needs_policy_samples(hg) -> bool:
    """Whether ``data.hgdpo`` samples with the current policy: fresh losers, or a stage with SDRecon winners."""
    return hg.real_images is not None and (hg.fresh_losers or any(s.sdrecon_winner_fraction > 0 for s in hg.stages))


class RealWinners(DataSource):
    """HG-DPO: real images, or SDRecon images made from them by the current policy, replace the
    winners of a share of the pairs on the curriculum (``data.hgdpo``); with ``fresh_losers`` the
    losers are sampled anew from the real images' captions.

    Args:
        cfg: the run's config.
        ctx: ``run_dir`` caches the encoded real latents; ``sampler`` samples with the current policy
            (``sample`` and ``refine``, see the module docstring), None only when
            :func:`needs_policy_samples` is false; ``settings`` are the run's samples' sampler settings,
            whose height x width the real images are prepared at.

    With ``model.hcp`` the real winners (and the fresh losers, ``prior: samples``) get their pose
    priors from a detector of this source's own.
    """

    name = "hgdpo"
    switch = "data.hgdpo.real_images"
    needs_settings = True
    section = staticmethod(hgdpo_section)

    @classmethod
    def samples_with_policy(cls, cfg) -> str | None:
        if not needs_policy_samples(cls.section(cfg)):
            return None
        return (
            "data.hgdpo samples its fresh losers and SDRecon winners with the current policy (not with "
            "data.hgdpo.fresh_losers=false and no sdrecon_winner_fraction)"
        )

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        return cls.section(cfg).real_images is not None

    def __init__(self, cfg: Config, ctx: SourceContext):
        import torch

        from rlfh.config.rules import hgdpo_sdrecon_problems
        from rlfh.data.hgdpo import Curriculum
        from rlfh.data.real_images import RealImageSource, load_vae
        from rlfh.data.sources.hcp_priors import HcpPriors

        hg, sampler, settings = self.section(cfg), ctx.sampler, ctx.settings
        if sampler is None and needs_policy_samples(hg):
            raise ValueError(
                "data.hgdpo: fresh losers and SDRecon winners sample with the current policy, "
                "and this loop has no sampler"
            )
        # offline, the steps are the log's, which the config rules could not see
        problems = hgdpo_sdrecon_problems(hg, settings.num_inference_steps)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.sampler, self.settings = cfg, sampler, settings
        self.curriculum = Curriculum(hg.stages, hg.interpolate)
        self.source = RealImageSource(
            hg.real_images,
            settings.height,
            settings.width,
            cache_dir=ctx.run_dir,
            encode_batch_size=hg.encode_batch_size,
            latent_mode=hg.latent_mode,
            seed=cfg.seed,
        )
        hc, hcp_on = HcpPriors.section(cfg), HcpPriors.wanted(cfg, ctx)
        self.prior_of_losers = hcp_on and hc.prior == "samples"  # the fresh losers are samples too
        if hcp_on:
            from rlfh.data.pose_prior import PosePriors

            self.source.pose_priors = PosePriors(hc.sigma, hc.min_visibility)
        self.source.encode(load_vae(cfg.model, "cuda" if torch.cuda.is_available() else "cpu"))  # cached across resumes

    def close(self) -> None:
        if self.source.pose_priors is not None:
            self.source.pose_priors.close()

    def extend(self, batch, rnd: RoundData):
        return self.mix(batch, rnd.rnd)

    def mix(self, train_batch, rnd: int):
        """Round ``rnd``'s pairs with the curriculum's share of real and SDRecon winners; returns
        (pairs, hgdpo/* stats)."""
        import numpy as np

        from rlfh.data.hgdpo import latent_rms, mix_real_winners, prompts_for_losers, sdrecon_inputs

        cfg, hg = self.cfg, self.section(self.cfg)
        n, bs = len(train_batch), cfg.rollout.sample_batch_size_per_actor
        frac, sd_frac = self.curriculum.fraction(rnd), self.curriculum.sdrecon_fraction(rnd)
        losers = sdrecon = None
        losers_priors = None
        stats = {"hgdpo/stage": float(self.curriculum.stage(rnd))}
        caps = prompts_for_losers(self.source, frac, n, rnd, cfg.seed, sd_frac) if hg.fresh_losers else []
        if caps:
            loser_seeds = np.random.default_rng([cfg.seed, rnd, 0x4C]).integers(0, 2**31 - 1, len(caps)).tolist()
            fresh = self.sampler.sample(caps, loser_seeds, self.settings, bs)
            losers = fresh.latents
            if self.prior_of_losers:
                losers_priors = self.source.pose_priors(fresh.images)
        real, sd_caps = sdrecon_inputs(self.source, frac, n, rnd, cfg.seed, sd_frac)
        if sd_caps:
            # the normal stage's winners: the real latents re-noised part-way and denoised by the current policy
            sd_seeds = np.random.default_rng([cfg.seed, rnd, 0x5344]).integers(0, 2**31 - 1, len(sd_caps)).tolist()
            sdrecon = self.sampler.refine(
                real, sd_caps, sd_seeds, self.settings, hg.sdrecon_strength, batch_size=bs
            ).latents
            # how far the intermediate domain is from the real
            stats["hgdpo/sdrecon_real_rms"] = latent_rms(sdrecon, real)
            if losers is not None:  # and a fresh sample for the same caption, for scale
                stats["hgdpo/loser_real_rms"] = latent_rms(losers[len(caps) - len(sd_caps) :], real)
        mixed, mix_stats = mix_real_winners(
            train_batch,
            self.source,
            frac,
            rnd,
            cfg.seed,
            losers_latents=losers,
            losers_priors=losers_priors,
            sdrecon_fraction=sd_frac,
            sdrecon_latents=sdrecon,
        )
        return mixed, {**stats, **mix_stats}
