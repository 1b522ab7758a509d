"""Stop rules of an online run, checked after every round: reward hacking shows up as a held-out
reward that falls while the training reward rises, or as a policy that drifts far from its reference.

* ``guards.every`` rounds: sample the held-out prompts (``guards.heldout_prompts`` x
  ``seeds_per_prompt``, the same seeds every time) with the current policy, score them with
  ``guards.heldout_rewards`` (or the training rewards), log ``heldout/...``; stop when the combined
  held-out reward fell more than ``guards.max_heldout_drop`` below its first value.
* every round: stop when the training pairs' mean (eps_theta - eps_ref)^2 (``ref/eps_mse``)
  exceeds ``guards.max_reference_mse``.

At each held-out evaluation, the collapse and hacking metrics of :mod:`rlfh.eval.diversity` on the
held-out samples, the same as ``rlfh eval`` computes:

* ``collapse/face_identity_sim``: mean pairwise cosine similarity of the held-out faces' embeddings
  across prompts and seeds (by a training reward's model, on the training reward actor); stop when
  it exceeds ``guards.max_face_identity_sim`` (every face turning into one face);
* ``collapse/image_diversity``: RMS pixel distance between the seeds of a held-out prompt;
* ``heldout/reward_gap``: this round's training combined reward (``reward/combined/mean``) minus the
  held-out samples' combined reward under the same training rewards (scored again with them when
  ``guards.heldout_rewards`` differ). The training samples come from the policy before this round's
  update and the held-out ones after it, so one round's gap mixes two policy versions; its trend over
  rounds is what to watch.
* ``heldout/reward_gap/<region>``: the same gap for each region's trained rewards alone (face, hand, global:
  the combined reward of the rewards of that region); stop when a region's gap exceeds
  ``guards.max_region_reward_gap[<region>]``, so a face reward won on the training prompts only stops the run
  even while the global rewards generalize.

A metric that cannot be computed is logged as null with ``<metric>_reason`` saying why.
"""

from __future__ import annotations


class Guards:
    """Args: cfg: the run's config. fleet: the rollout fleet. settings: the sampler settings.
    scorer: the training rewards' scorer. heldout_scorer: the held-out rewards' scorer, or None."""

    def __init__(self, cfg, fleet, settings, scorer, heldout_scorer=None):
        self.gc, self.fleet, self.settings = cfg.guards, fleet, settings
        self.batch_size = cfg.rollout.sample_batch_size_per_actor
        self.scorer = heldout_scorer or scorer
        self.train_scorer = scorer  # the training rewards: face embeddings and the held-out reward gap
        self.prompts = [p for p in self.gc.heldout_prompts for _ in range(self.gc.seeds_per_prompt)]
        self.seeds = list(range(10**9, 10**9 + len(self.prompts)))  # the same seeds at every evaluation
        self.first = None  # the first held-out reward of this process (the baseline of the drop)

    def check(self, rnd: int, metrics: dict, scored=None) -> str | None:
        """Add this round's held-out metrics to ``metrics``; return why the run must stop, or None. ``scored``:
        the round's training samples as the training rewards scored them (the per-region gaps)."""
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
            stop = self.collapse(hb, hs, metrics, scored) or stop
        ref_mse = metrics.get("ref/eps_mse")
        if gc.max_reference_mse is not None and ref_mse is not None and ref_mse > gc.max_reference_mse:
            stop = f"policy-reference eps MSE {ref_mse:.4g} > guards.max_reference_mse={gc.max_reference_mse}"
        return stop

    def collapse(self, hb, hs, metrics: dict, scored=None) -> str | None:
        """Add the collapse and hacking metrics of the held-out batch ``hb`` (scored ``hs``) to
        ``metrics``; return why the run must stop (``guards.max_face_identity_sim``, ``guards.max_region_reward_gap``),
        or None."""
        from rlfh.eval.diversity import face_lists, face_similarity_from, image_diversity, reward_gap

        faces = face_lists([hs.regions(i) for i in range(len(hs))])
        embed = getattr(self.train_scorer, "face_embeddings", None)
        embedded = (
            embed(hb.images, faces)
            if embed is not None
            else {"embeddings": None, "reason": "the reward scorer does not serve embeddings"}
        )
        train_rewards = hs if self.scorer is self.train_scorer else self.train_scorer.score(hb.images, hb.prompts)
        train_mean = metrics.get("reward/combined/mean")
        gap = reward_gap([train_mean] if train_mean is not None else [], train_rewards.combined())
        found = {
            "collapse/face_identity_sim": face_similarity_from(embedded),
            "collapse/image_diversity": image_diversity(hb.images, hb.prompts),
            "heldout/reward_gap": gap,
        }
        for key, m in found.items():
            metrics[key] = m["value"]
            if m["value"] is None:
                metrics[f"{key}_reason"] = m["reason"]
        stop = self.region_gaps(scored, train_rewards, metrics)
        sim, limit = found["collapse/face_identity_sim"]["value"], self.gc.max_face_identity_sim
        if limit is not None and sim is not None and sim > limit:
            return f"held-out face identity similarity {sim:.4g} > guards.max_face_identity_sim={limit}"
        return stop

    def region_gaps(self, scored, heldout, metrics: dict) -> str | None:
        """``heldout/reward_gap/<region>`` for each region with a trained (non-zero weight) reward: the round's
        training samples' combined reward of that region's rewards minus the held-out samples' (``heldout``,
        scored by the same rewards); the first region over ``guards.max_region_reward_gap`` stops the run."""
        from rlfh.eval.diversity import reward_gap

        if scored is None:
            return None
        stop = None
        trained = sorted({scored.regions_of[n] for n, w in scored.weights.items() if w != 0.0})
        for region in trained:
            gap = reward_gap(scored.combined(region), heldout.combined(region))["value"]
            metrics[f"heldout/reward_gap/{region}"] = gap
            limit = self.gc.max_region_reward_gap.get(region)
            if stop is None and limit is not None and gap is not None and gap > limit:
                stop = f"held-out {region} reward gap {gap:.4g} > guards.max_region_reward_gap.{region}={limit}"
        return stop
