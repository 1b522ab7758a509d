"""Stop rules of an online run, checked after every round: reward hacking shows up as a held-out
reward that falls while the training reward rises, or as a policy that drifts far from its reference.

* ``guards.every`` rounds: sample the held-out prompts (``guards.heldout_prompts`` x
  ``seeds_per_prompt``, the same seeds every time) with the current policy, score them with
  ``guards.heldout_rewards`` (or the training rewards), log ``heldout/...``; stop when the combined
  held-out reward fell more than ``guards.max_heldout_drop`` below its first value.
* every round: stop when the training pairs' mean (eps_theta - eps_ref)^2 (``ref/eps_mse``)
  exceeds ``guards.max_reference_mse``.
"""

from __future__ import annotations


class Guards:
    """Args: cfg: the run's config. fleet: the rollout fleet. settings: the sampler settings.
    scorer: the training rewards' scorer. heldout_scorer: the held-out rewards' scorer, or None."""

    def __init__(self, cfg, fleet, settings, scorer, heldout_scorer=None):
        self.gc, self.fleet, self.settings = cfg.guards, fleet, settings
        self.batch_size = cfg.rollout.sample_batch_size_per_actor
        self.scorer = heldout_scorer or scorer
        self.prompts = [p for p in self.gc.heldout_prompts for _ in range(self.gc.seeds_per_prompt)]
        self.seeds = list(range(10**9, 10**9 + len(self.prompts)))  # the same seeds at every evaluation
        self.first = None  # the first held-out reward of this process (the baseline of the drop)

    def check(self, rnd: int, metrics: dict) -> str | None:
        """Add this round's held-out metrics to ``metrics``; return why the run must stop, or None."""
        gc, stop = self.gc, None
        if gc.every and (rnd + 1) % gc.every == 0:  # held-out prompts, fixed seeds, current policy
            hb = self.fleet.collect(self.fleet.submit(self.prompts, self.seeds, self.settings, self.batch_size))
            hs = self.scorer.score(hb.images, hb.prompts)
            metrics.update({f"heldout/{k.removeprefix('reward/')}": v for k, v in hs.means().items()})
            value = metrics.get("heldout/combined/mean")
            if value is not None:
                self.first = value if self.first is None else self.first
                if gc.max_heldout_drop is not None and self.first - value > gc.max_heldout_drop:
                    stop = f"held-out reward fell from {self.first:.4g} to {value:.4g} (> guards.max_heldout_drop)"
        ref_mse = metrics.get("ref/eps_mse")
        if gc.max_reference_mse is not None and ref_mse is not None and ref_mse > gc.max_reference_mse:
            stop = f"policy-reference eps MSE {ref_mse:.4g} > guards.max_reference_mse={gc.max_reference_mse}"
        return stop
