"""One learner rank: a :class:`rlfh.learner.engine.LearnerEngine` (DeepSpeed engine) and the round's
training (:func:`rlfh.learner.steps.train`), as a Ray actor (:class:`LearnerActor`) or in the calling
process (offline DPO on one rank).

Built in two calls, because the ranks of a data-parallel learner must meet: the actor starts empty,
rank 0 names a rendezvous address (:meth:`LearnerRank.rendezvous`), then every rank runs
:meth:`LearnerRank.setup` at the same time (``rlfh.learner.group`` drives this).

In colocated mode (``resources.colocate``) the same actor is also the run's only rollout actor: it
samples with the learner's own pipeline and UNet, so there is no second UNet and no weight
transfer, and it hands the device over between the phases (``rlfh.learner.colocate``).
"""

from __future__ import annotations

import ray


class LearnerRank:
    """Args: num_threads: torch threads of this process (None: leave as is)."""

    def __init__(self, num_threads: int | None = 1):
        import torch

        if num_threads is not None:
            torch.set_num_threads(max(num_threads, 1))
        self.learner = None
        self.handover = None  # colocated mode only

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the process group (called on rank 0)."""
        from rlfh.learner.distributed import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def setup(
        self, cfg, rank: int = 0, world_size: int = 1, master: tuple[str, int] | None = None, colocate: bool = False
    ) -> int:
        from rlfh.learner.distributed import set_rendezvous
        from rlfh.learner.engine import LearnerEngine

        if world_size > 1:
            set_rendezvous(rank, world_size, *master)
        self.learner = LearnerEngine(cfg, keep_vae=colocate)
        if colocate:
            from rlfh.learner.colocate import Handover, colocated_sampler

            self.sampler = colocated_sampler(self.learner, model_id=cfg.model.path, scheduler=cfg.rollout.scheduler)
            self.handover = Handover(self.learner)
        return self.learner.num_trainable

    def train(self, batch, epochs: int) -> dict:
        from rlfh.learner.steps import train

        if self.handover is not None:
            self.handover.to_training()
        return train(self.learner, batch, epochs)

    def weight_buckets(self, bucket_bytes: int) -> list:
        """The policy weights as object-store refs, one per bucket (``rlfh.learner.weight_sync``); every rank
        takes part (ZeRO-3 gathers collectively), rank 0's refs are the ones to send."""
        refs = []
        for bucket in self.learner.policy_weight_buckets(bucket_bytes):
            if self.learner.rank == 0:
                refs.append(ray.put(bucket))
            del bucket  # one bucket in this process's memory at a time
        return refs

    def denoiser_output(self, x, t: int, prompt: str):
        return self.learner.denoiser_output(x, t, prompt)

    def policy_version(self) -> int:
        return self.learner.policy_version

    def save_checkpoint(self, path: str, extra_state: dict) -> str:
        return str(self.learner.save_checkpoint(path, extra_state))

    def load_checkpoint(self, path: str) -> dict:
        return self.learner.load_checkpoint(path)

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks, logs)."""
        return ray.get_runtime_context().get_node_id()

    def weights_digest(self) -> str:
        """sha256 of this rank's trainable weights: data-parallel ranks must agree exactly."""
        import hashlib

        h = hashlib.sha256()
        for p in self.learner.denoiser.parameters():
            if p.requires_grad:
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ colocated mode: the rollout side
    def sample(self, prompts, seeds, settings, batch_size: int, record: bool = False, branch_seeds=None):
        from rlfh.learner.colocate import sample_in_batches

        self.handover.to_sampling()
        return sample_in_batches(self.sampler, prompts, seeds, settings, batch_size, record, branch_seeds)

    def refine(self, latents, prompts, seeds, settings, strength: float, masks=None, batch_size: int = 8):
        """``Sampler.refine`` (SDEdit, or inpainting with masks) with the learner's own UNet."""
        from rlfh.learner.colocate import refine_in_batches

        self.handover.to_sampling()
        return refine_in_batches(self.sampler, latents, prompts, seeds, settings, strength, masks, batch_size)

    def load_weights(self, buckets, policy_version: int, lora: bool = True) -> int:
        """Nothing to copy: the sampler's UNet is the learner's. Only the version moves on."""
        if buckets:
            raise RuntimeError("a colocated learner samples with its own weights; it takes no weight buckets")
        if policy_version != self.learner.policy_version:
            raise RuntimeError(
                f"sync to policy version {policy_version}, but the learner is at {self.learner.policy_version}"
            )
        self.sampler.policy_version = policy_version
        return policy_version

    def shares_denoiser(self) -> bool:
        """Whether sampler and learner hold one denoiser (the point of colocated mode)."""
        return self.sampler.denoiser is self.learner.denoiser

    def shutdown(self) -> None:
        """Nothing to release in-process (the group's interface, for offline DPO on one rank)."""


@ray.remote
class LearnerActor(LearnerRank):
    """A learner rank in its own Ray worker process (the runtime_env carries rlfh's environment)."""
