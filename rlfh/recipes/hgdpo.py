"""HG-DPO's real and SDRecon winners for a round's pairs, one implementation for both loops.

``rlfh train`` (rlfh/recipes/online.py) and ``rlfh offline-dpo`` (rlfh/recipes/offline.py) both call
:meth:`RealWinners.mix` on each round's pairs when ``data.hgdpo.real_images`` is set; they differ
only in what samples with the current policy (the SDRecon winners, and the fresh losers of
``data.hgdpo.fresh_losers``):

    online    the rollout actors (``rollouts.actor.RolloutFleet``), or the colocated learner rank
    offline   the learner rank itself, with its own UNet (``LearnerRank`` set up with ``colocate``;
              rlfh/learner/colocate.py hands the device over between sampling and training)

Either offers ``sample(prompts, seeds, settings, batch_size)`` and ``refine(latents, prompts, seeds,
settings, strength, masks=None, batch_size=...)``, each returning one ``RolloutBatch`` in input order.
The curriculum, the mixing and the formulas are rlfh/data/hgdpo.py's.
"""

from __future__ import annotations

from pathlib import Path

from rlfh.config.schema import Config


def needs_policy_samples(hg) -> bool:
    """Whether ``data.hgdpo`` samples with the current policy: fresh losers, or a stage with SDRecon winners."""
    return hg.real_images is not None and (hg.fresh_losers or any(s.sdrecon_winner_fraction > 0 for s in hg.stages))


class RealWinners:
    """HG-DPO: real images, or SDRecon images made from them by the current policy, replace the
    winners of a share of the pairs on the curriculum (``data.hgdpo``); with ``fresh_losers`` the
    losers are sampled anew from the real images' captions.

    Args:
        cfg: the run's config. cache_dir: where the encoded real latents are cached (the run directory).
        sampler: samples with the current policy (``sample`` and ``refine``, see the module docstring);
            None only when :func:`needs_policy_samples` is false.
        settings: ``rollouts.types.SamplerSettings`` of the run's samples; the real images are
            prepared at its height x width.
        pose_priors: HcP's pose-prior detector (``rlfh.data.pose_prior.PosePriors``) or None.
    """

    def __init__(self, cfg: Config, cache_dir: Path, sampler, settings, pose_priors=None):
        import torch

        from rlfh.config.rules import hgdpo_sdrecon_problems
        from rlfh.data.hgdpo import Curriculum
        from rlfh.data.real_images import RealImageSource, load_vae

        hg = cfg.data.hgdpo
        if sampler is None and needs_policy_samples(hg):
            raise ValueError("data.hgdpo: fresh losers and SDRecon winners sample with the current policy, "
                             "and this loop has no sampler")
        # offline, the steps are the log's, which the config rules could not see
        problems = hgdpo_sdrecon_problems(hg, settings.num_inference_steps)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.sampler, self.settings = cfg, sampler, settings
        self.curriculum = Curriculum(hg.stages, hg.interpolate)
        self.source = RealImageSource(hg.real_images, settings.height, settings.width, cache_dir=cache_dir,
                                      encode_batch_size=hg.encode_batch_size, latent_mode=hg.latent_mode, seed=cfg.seed)
        self.source.pose_priors = pose_priors
        self.source.encode(load_vae(cfg.model, "cuda" if torch.cuda.is_available() else "cpu"))  # cached across resumes

    def mix(self, train_batch, rnd: int):
        """Round ``rnd``'s pairs with the curriculum's share of real and SDRecon winners; returns
        (pairs, hgdpo/* stats)."""
        import numpy as np

        from rlfh.data.hgdpo import latent_rms, mix_real_winners, prompts_for_losers, sdrecon_inputs

        cfg, hg = self.cfg, self.cfg.data.hgdpo
        n, bs = len(train_batch), cfg.rollout.sample_batch_size_per_actor
        frac, sd_frac, losers, sdrecon = self.curriculum.fraction(rnd), self.curriculum.sdrecon_fraction(rnd), None, None
        losers_masks = None
        stats = {"hgdpo/stage": float(self.curriculum.stage(rnd))}
        caps = prompts_for_losers(self.source, frac, n, rnd, cfg.seed, sd_frac) if hg.fresh_losers else []
        if caps:
            loser_seeds = np.random.default_rng([cfg.seed, rnd, 0x4C]).integers(0, 2**31 - 1, len(caps)).tolist()
            fresh = self.sampler.sample(caps, loser_seeds, self.settings, bs)
            losers = fresh.latents
            if cfg.model.hcp.enabled and cfg.data.hcp_priors.prior == "samples":  # the fresh losers are samples too
                from rlfh.data.pose_prior import HCP_PRIOR

                losers_masks = {HCP_PRIOR: self.source.pose_priors(fresh.images)}
        real, sd_caps = sdrecon_inputs(self.source, frac, n, rnd, cfg.seed, sd_frac)
        if sd_caps:
            # the normal stage's winners: the real latents re-noised part-way and denoised by the current policy
            sd_seeds = np.random.default_rng([cfg.seed, rnd, 0x5344]).integers(0, 2**31 - 1, len(sd_caps)).tolist()
            sdrecon = self.sampler.refine(real, sd_caps, sd_seeds, self.settings, hg.sdrecon_strength, batch_size=bs).latents
            stats["hgdpo/sdrecon_real_rms"] = latent_rms(sdrecon, real)  # how far the intermediate domain is from the real
            if losers is not None:  # and a fresh sample for the same caption, for scale
                stats["hgdpo/loser_real_rms"] = latent_rms(losers[len(caps) - len(sd_caps):], real)
        mixed, mix_stats = mix_real_winners(train_batch, self.source, frac, rnd, cfg.seed, losers_latents=losers,
                                            losers_masks=losers_masks, sdrecon_fraction=sd_frac, sdrecon_latents=sdrecon)
        return mixed, {**stats, **mix_stats}
