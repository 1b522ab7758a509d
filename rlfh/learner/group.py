"""The learner's data-parallel ranks on Ray, driven as one learner.

``resources.num_learner_gpus: N`` (or ``num_learner_ranks: N`` on CPU) starts N
:class:`rlfh.learner.actor.LearnerActor` ranks, reserved together in a PACK placement group (one
bundle per rank) so they land on as few nodes as possible; rank 0 names the rendezvous and every
rank joins one torch.distributed group (nccl on GPUs, gloo on CPU) for one DeepSpeed engine.

Every rank receives the same batch (one object in the store) and trains on its share of each
optimizer step (``rlfh.learner.loop.optimizer_steps``); metrics are averaged over the ranks. Checkpoints, weight
buckets and ZeRO-3 gathers are collective, so every call here goes to all ranks.
"""

from __future__ import annotations

import numpy as np
import ray


def get_all(refs: list, what: str) -> list:
    """``ray.get`` of every rank's call, failing as soon as one rank fails: the other ranks may be
    blocked in a collective waiting for it, and an in-order ``ray.get`` would wait forever."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception as e:
            raise RuntimeError(f"learner rank {refs.index(done[0])} failed in {what}: {e}") from e
    return ray.get(list(refs))


def mean_metrics(per_rank: list[dict]) -> dict:
    """Average each metric over the ranks that report it (a region absent on one rank's share)."""
    keys = sorted({k for m in per_rank for k in m})
    return {k: float(np.mean([m[k] for m in per_rank if k in m])) for k in keys}


class LearnerGroup:
    """Args:
    cfg: the run's config. num_threads: torch threads per rank.
    colocate: one rank that also samples (``resources.colocate``).
    """

    def __init__(self, cfg, num_threads: int = 1, colocate: bool = False):
        self.args = (cfg, num_threads, colocate)  # what restart() builds the ranks from again
        self.start(cfg, num_threads, colocate)

    def start(self, cfg, num_threads: int, colocate: bool) -> None:
        from rlfh.learner.actor import LearnerActor

        res = cfg.resources
        self.world_size = cfg.learner_world_size
        gpus = 1 if res.num_learner_gpus or (colocate and res.gpus_per_rollout_actor) else 0
        opts = [
            dict(num_cpus=res.num_cpus_per_actor, num_gpus=gpus, resources=dict(res.learner_resources))
            for _ in range(self.world_size)
        ]
        self.placement_group = None
        if self.world_size > 1:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            from rlfh.learner.placement import reserve

            bundle = {"CPU": res.num_cpus_per_actor, **({"GPU": gpus} if gpus else {}), **res.learner_resources}
            self.placement_group = reserve([dict(bundle) for _ in range(self.world_size)], "PACK", "the learner ranks")
            for i, o in enumerate(opts):
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i
                )
        self.ranks = [LearnerActor.options(**o).remote(num_threads) for o in opts]
        master = ray.get(self.ranks[0].rendezvous.remote()) if self.world_size > 1 else None
        # deepspeed.initialize is collective: every rank must be inside it at once
        try:
            get_all(
                [a.setup.remote(cfg, i, self.world_size, master, colocate) for i, a in enumerate(self.ranks)], "set-up"
            )
        except BaseException:
            self.shutdown()  # the other ranks may wait in a collective for the failed one
            raise

    @property
    def lead(self):
        return self.ranks[0]

    def train(self, batch, epochs: int) -> dict:
        ref = ray.put(batch)
        return mean_metrics(get_all([a.train.remote(ref, epochs) for a in self.ranks], "train"))

    def weight_buckets(self, bucket_bytes: int) -> list:
        """Object-store refs of the policy weights, one per bucket (rank 0's)."""
        return get_all([a.weight_buckets.remote(bucket_bytes) for a in self.ranks], "weight sync")[0]

    def policy_version(self) -> int:
        return ray.get(self.lead.policy_version.remote())

    def denoiser_output(self, x, t: int, prompt: str):
        # under ZeRO-3 a forward gathers parameters from every rank
        return get_all([a.denoiser_output.remote(x, t, prompt) for a in self.ranks], "denoiser_output")[0]

    def save_checkpoint(self, path: str, extra_state: dict) -> str:
        return get_all([a.save_checkpoint.remote(path, extra_state) for a in self.ranks], "save_checkpoint")[0]

    def load_checkpoint(self, path: str) -> dict:
        return get_all([a.load_checkpoint.remote(path) for a in self.ranks], "load_checkpoint")[0]

    def dead_ranks(self, timeout_s: float = 60.0) -> list[int]:
        """The ranks whose actor has died (a live rank answers a cheap call; a dead one raises)."""
        dead = []
        for i, a in enumerate(self.ranks):
            try:
                ray.get(a.policy_version.remote(), timeout=timeout_s)
            except ray.exceptions.RayActorError:
                dead.append(i)
            except ray.exceptions.GetTimeoutError:
                pass  # busy (in a collective with the dead one): alive, and restarted with the group
        return dead

    def restart(self) -> None:
        """Kill every rank (the survivors may wait in a collective for a dead one) and start them afresh,
        with the initial weights: the caller loads a checkpoint next."""
        self.shutdown()
        self.start(*self.args)

    def shutdown(self) -> None:
        for a in self.ranks:
            ray.kill(a)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
