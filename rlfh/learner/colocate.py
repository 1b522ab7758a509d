"""Colocated mode: rollout and learner take turns on one device (``resources.colocate``).

One process holds one SDXL pipeline: the learner's. Sampling uses the learner's UNet itself (LoRA
adapter on, or the fully trained weights), so the weight sync is a version bump and there is no
second UNet. What differs between the phases is what else must sit on the device:

    sampling: UNet, text encoders, VAE (decoding)        optimizer states, reference UNet not needed
    training: UNet, text encoders, gradients, optimizer states, reference UNet (full fine-tuning)
              VAE not needed

:class:`Handover` moves the VAE, the frozen reference UNet of full fine-tuning and the optimizer
states across at each phase change and empties the CUDA cache, so the peak is the larger of the two
phases, not their sum. The optimizer states go
through DeepSpeed's ``offload_states`` / ``reload_states`` (ZeRO 1-3); with ZeRO-0 they are the
wrapped torch optimizer's tensors, moved directly. With ``learner.engine.offload_optimizer`` they live on
the CPU anyway. On a CPU-only machine the same calls run and move nothing (which is how the tests
check that a handover leaves training exactly as it was).
"""

from __future__ import annotations

import torch

# The rollout side of a colocated learner, the one place the learner imports rollouts/ (the layering
# test holds it): batching as the rollout actors batch.
from rollouts.actor import refine_in_batches, sample_in_batches  # noqa: F401 (used by rlfh.learner.actor)


def colocated_sampler(learner, model_id: str, scheduler: str):
    """A rollout sampler over the learner's own pipeline: its denoiser is the one being trained."""
    from rollouts.sampler import Sampler

    return Sampler(learner.pipe, model_id=model_id, scheduler=scheduler)


def move_optimizer_state(optimizer: torch.optim.Optimizer, device) -> int:
    """Move a torch optimizer's state tensors (Adam moments) to ``device``; returns bytes moved."""
    moved = 0
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.device != torch.device(device):
                state[k] = v.to(device, non_blocking=True)
                moved += v.numel() * v.element_size()
    return moved


class Handover:
    """Puts the learner's device in sampling or training shape (idempotent per phase).

    Args:
        offload_optimizer: move the optimizer states off the device while sampling. Default: for
            full-UNet training only. A LoRA adapter's states are a few hundred MB on SDXL, and
            DeepSpeed's ``offload_states`` runs three ``gc.collect()`` passes (0.8 s per handover
            on the 2-core CI machine, bench/colocate_bench.py), more than moving them saves.
    """

    def __init__(self, learner, offload_optimizer: bool | None = None):
        self.learner = learner
        self.offload_optimizer = learner.ref_denoiser is not None if offload_optimizer is None else offload_optimizer
        self.phase = "training"
        self.device = learner.device
        if self.device.type == "cuda":
            learner.vae.to("cpu")  # the first phase after set-up may be either; start lean

    def _optimizer_states(self, offload: bool) -> None:
        lc, engine = self.learner.cfg.learner, self.learner.engine
        if lc.engine.offload_optimizer or not self.offload_optimizer:
            return  # ZeRO-Offload: the states never leave the CPU; or not worth moving
        if lc.engine.zero_stage >= 1:
            if offload:
                engine.offload_states(pin_memory=self.device.type == "cuda")
            else:
                engine.reload_states()
        else:
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            move_optimizer_state(inner, "cpu" if offload else self.device)

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def to_sampling(self) -> None:
        if self.phase == "sampling":
            return
        self.learner.denoiser.eval()
        self._optimizer_states(offload=True)
        if self.learner.ref_denoiser is not None:
            self.learner.ref_denoiser.to("cpu")
        self._empty_cache()
        self.learner.vae.to(self.device)
        self.phase = "sampling"

    def to_training(self) -> None:
        if self.phase == "training":
            return
        self.learner.vae.to("cpu")
        self._empty_cache()
        if self.learner.ref_denoiser is not None:
            self.learner.ref_denoiser.to(self.device)
        self._optimizer_states(offload=False)
        self.learner.denoiser.train()
        self.phase = "training"
