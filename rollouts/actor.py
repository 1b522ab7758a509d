"""The rollout actor: one per GPU, a :class:`rollouts.sampler.Sampler` behind a Ray handle."""

from __future__ import annotations

import time

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

# a dead actor (RayActorError) or one Ray is restarting (ActorUnavailableError)
_ACTOR_ERRORS = (RayActorError, ActorUnavailableError)


def sample_in_batches(sampler, prompts, seeds, settings, batch_size: int, record: bool = False, branch_seeds=None):
    """A share of a round through ``sampler`` in batches of ``batch_size``, as one RolloutBatch.

    ``branch_seeds`` (``Sampler.sample``'s trajectory branching) name each sample's x_T, so a group cut
    by a batch boundary keeps its x_T; its deterministic prefix is then computed once per batch it
    spans rather than once in all."""
    from rollouts.types import RolloutBatch

    return RolloutBatch.concat(
        [
            sampler.sample(
                prompts[i : i + batch_size],
                seeds[i : i + batch_size],
                settings,
                record=record,
                branch_seeds=None if branch_seeds is None else branch_seeds[i : i + batch_size],
            )
            for i in range(0, len(prompts), batch_size)
        ]
    )


def refine_in_batches(sampler, latents, prompts, seeds, settings, strength: float, masks=None, batch_size: int = 8):
    """``Sampler.refine`` of a share in calls of at most ``batch_size``, as one RolloutBatch."""
    from rollouts.types import RolloutBatch

    return RolloutBatch.concat(
        [
            sampler.refine(
                latents[i : i + batch_size],
                prompts[i : i + batch_size],
                seeds[i : i + batch_size],
                settings,
                strength,
                None if masks is None else masks[i : i + batch_size],
            )
            for i in range(0, len(prompts), batch_size)
        ]
    )


@ray.remote
class RolloutActor:
    """Holds an SDXL pipeline with the policy's LoRA merged into its UNet and samples on request.

    Args:
        model_cfg: ``cfg.model``. lora_cfg: ``cfg.model.lora`` (the adapter the learner trains).
        compile: ``cfg.rollout.compile`` (``Sampler.compile``). merge_lora: ``cfg.rollout.merge_lora``
            (False: an unmerged peft adapter, as the learner holds it).
    """

    def __init__(
        self,
        model_cfg,
        lora_cfg,
        num_threads: int = 1,
        scheduler: str = "default",
        compile: bool = False,
        merge_lora: bool = True,
    ):
        # process-wide environment (offline hub, quiet libraries) comes with the job's runtime_env
        import torch

        from families import load_pipeline
        from rollouts.sampler import Sampler

        torch.set_num_threads(max(num_threads, 1))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sampler = Sampler(load_pipeline(model_cfg, device), model_id=model_cfg.path, scheduler=scheduler)
        if lora_cfg.enabled:
            self.sampler.add_lora(lora_cfg.rank, lora_cfg.alpha, lora_cfg.target_modules, merge=merge_lora)
        if compile:  # after add_lora, so an unmerged adapter is compiled with the UNet
            self.sampler.compile()

    def sample(self, prompts, seeds, settings, batch_size: int, record: bool = False, branch_seeds=None):
        return sample_in_batches(self.sampler, prompts, seeds, settings, batch_size, record, branch_seeds)

    def refine(self, latents, prompts, seeds, settings, strength: float, masks=None, batch_size: int = 8):
        """``Sampler.refine``: SDEdit or, with masks, inpainting by the current policy."""
        return refine_in_batches(self.sampler, latents, prompts, seeds, settings, strength, masks, batch_size)

    def load_weights(self, buckets: list, policy_version: int, lora: bool = True) -> int:
        """The learner's policy weights as object-store refs, one per bucket (``rlfh.learner.weight_sync``):
        LoRA (fast path, merged and loaded at once) or the whole UNet, fetched and copied in place
        one bucket at a time."""
        if lora:
            state = {}
            for ref in buckets:
                state.update(ray.get(ref))
            self.sampler.load_lora(state, policy_version)
        else:
            self.sampler.load_full((ray.get(ref) for ref in buckets), policy_version)
        return policy_version

    def denoiser_output(self, x, t: int, prompt: str):
        return self.sampler.denoiser_output(x, t, prompt)

    def policy_version(self) -> int:
        return self.sampler.policy_version

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks, logs)."""
        return ray.get_runtime_context().get_node_id()


class RolloutFleet:
    """The rollout actors of a run, driven as one: even split of a round, weight sync, and recovery.

    A rollout actor that dies (node lost, OOM, killed) is restarted by Ray (``max_restarts``); the
    fleet then re-sends it the current policy weights and re-issues its share of the round with the
    same prompts and seeds, so the round's samples are exactly those it would have produced: none
    lost, none duplicated (the driver logs a round only once all its samples are in).

    Args:
        actors: RolloutActor handles. max_retries: re-issues per actor and round before giving up.
    """

    def __init__(self, actors: list, max_retries: int = 3):
        self.actors = actors
        self.max_retries = max_retries
        self._weights = None  # (bucket refs, version, lora): what a restarted actor must load
        self.restarts = 0

    def sync(self, buckets: list | None, version: int, lora: bool) -> None:
        """Queue the new weights (object-store refs, one per bucket; None when colocated) on every
        actor, after any sampling already queued there."""
        self._weights = (buckets, version, lora)
        refs = [a.load_weights.remote(buckets, version, lora) for a in self.actors]
        for i, ref in enumerate(refs):
            for attempt in range(self.max_retries + 1):
                try:
                    ray.get(ref)
                    break
                except _ACTOR_ERRORS as e:
                    if attempt == self.max_retries:
                        raise RuntimeError(
                            f"rollout actor {i} died {attempt + 1} times during a weight sync: {e}"
                        ) from e
                    self.restarts += 1
                    print(
                        f"[rlfh] rollout actor {i} died during a weight sync ({type(e).__name__}); "
                        "re-sending the weights"
                    )
                    # once it is back: a restart (a new process importing torch, loading the model) can
                    # take far longer than a fixed pause on a busy machine
                    ref = self._reissue(i, "policy_version", ())

    def _reissue(self, i: int, method: str, args: tuple, timeout_s: float = 300.0):
        """Send the current weights to actor i once it is back, then its share again; returns the ref."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._weights is not None:
                    ray.get(self.actors[i].load_weights.remote(*self._weights))
                return getattr(self.actors[i], method).remote(*args)
            except _ACTOR_ERRORS as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollout actor {i} did not come back within {timeout_s:.0f}s: {e}") from e
                time.sleep(1.0)  # still restarting

    def submit(
        self,
        prompts: list,
        seeds: list,
        settings,
        batch_size: int,
        record: bool = False,
        branch_seeds: list | None = None,
    ) -> dict:
        """Start a round's sampling on every actor; returns a handle for :meth:`collect`.

        ``branch_seeds`` (``Sampler.sample``'s trajectory branching) travel with their samples: each
        sample's x_T is named by its branch seed, not by where the split puts it, so a prompt group
        cut between two actors keeps one x_T (its prefix is computed once per actor it spans) and a
        re-issued share reproduces its samples."""
        return self._start(
            "sample",
            len(prompts),
            lambda lo, hi: (
                prompts[lo:hi],
                seeds[lo:hi],
                settings,
                batch_size,
                record,
                None if branch_seeds is None else branch_seeds[lo:hi],
            ),
        )

    def sample(
        self,
        prompts: list,
        seeds: list,
        settings,
        batch_size: int,
        record: bool = False,
        branch_seeds: list | None = None,
    ):
        """:meth:`submit` and :meth:`collect` in one call: one RolloutBatch in input order."""
        return self.collect(self.submit(prompts, seeds, settings, batch_size, record, branch_seeds))

    def refine(self, latents, prompts: list, seeds: list, settings, strength: float, masks=None, batch_size: int = 8):
        """``Sampler.refine`` (SDEdit, or inpainting inside ``masks``) of (N, 4, h, w) latents, split
        over the actors as a round is (each share in calls of at most ``batch_size``), with the same
        recovery; returns one RolloutBatch in input order."""
        n = len(prompts)
        if len(latents) != n or len(seeds) != n or (masks is not None and len(masks) != n):
            raise ValueError(
                f"got {len(latents)} latents, {n} prompts, {len(seeds)} seeds"
                + ("" if masks is None else f" and {len(masks)} masks")
            )
        return self.collect(
            self._start(
                "refine",
                n,
                lambda lo, hi: (
                    latents[lo:hi],
                    prompts[lo:hi],
                    seeds[lo:hi],
                    settings,
                    strength,
                    None if masks is None else masks[lo:hi],
                    batch_size,
                ),
            )
        )

    def _start(self, method: str, n: int, share) -> dict:
        """Call ``method`` on every actor with ``share(lo, hi)``, its contiguous part of n items."""
        k = len(self.actors)
        version = self._weights[1] if self._weights is not None else 0  # what these samples must come from
        bounds = [n * i // k for i in range(k + 1)]  # contiguous, sizes differ by at most one
        jobs = {}
        for i, a in enumerate(self.actors):
            lo, hi = bounds[i], bounds[i + 1]
            if lo < hi:
                args = share(lo, hi)
                jobs[i] = (method, args, getattr(a, method).remote(*args), version)
        return jobs

    def collect(self, jobs: dict):
        """Wait for a round's samples, recovering from dead actors; returns one RolloutBatch."""
        from rollouts.types import RolloutBatch

        parts = {}
        for i, (method, args, ref, version) in jobs.items():
            for attempt in range(self.max_retries + 1):
                try:
                    part = ray.get(ref)
                    if part.policy_version >= version:
                        parts[i] = part
                        break
                    # the actor died while idle and came back with the base weights: not this policy
                    problem = f"restarted with policy version {part.policy_version} < {version}"
                except _ACTOR_ERRORS as e:
                    problem = f"died ({type(e).__name__})"
                if attempt == self.max_retries:
                    raise RuntimeError(f"rollout actor {i} failed {attempt + 1} times in one round; last: {problem}")
                self.restarts += 1
                print(f"[rlfh] rollout actor {i} {problem}; re-sending the weights and re-issuing its share")
                ref = self._reissue(i, method, args)
        return RolloutBatch.concat([parts[i] for i in sorted(parts)])
