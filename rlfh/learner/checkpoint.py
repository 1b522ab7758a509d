"""The learner's checkpoint I/O: the policy in the stock pipeline's format, DeepSpeed's engine state,
the EMA and the EMA reference, and the trainer state. Every rank calls these.

A checkpoint folder holds:

    pytorch_lora_weights.safetensors   the LoRA, diffusers' format (or unet/, transformer/ for full fine-tuning)
    hcp.safetensors                    the HcP layer's phi (model.hcp), beside the LoRA
    deepspeed/                         engine, optimizer and ZeRO partitions (each rank its own)
    ema.safetensors                    the EMA's shadow weights (learner.ema.decay)
    reference.safetensors              the EMA reference of the last refresh (learner.reference.model=ema)
    trainer_state.json                 step counters, the learner's RNG, ranks, the caller's extra state
    files.json                         the manifest (rlfh.run.checkpoints)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from rlfh.learner.optimization import Optimization
from rlfh.learner.policy import PolicyWeights


class CheckpointIO:
    """Writes and reads checkpoints of ``weights`` trained by ``optimization``.

    Args:
        family: the model family (how the LoRA is written for its stock pipeline).
        weights, optimization: the learner's parts.
        rank, world_size: this learner rank and the number of ranks.
        ema_reference: ``learner.reference.model == "ema"`` (a saved reference is restored only then).
        device: where restored weights go.
    """

    def __init__(
        self,
        family,
        weights: PolicyWeights,
        optimization: Optimization,
        rank: int,
        world_size: int,
        ema_reference: bool,
        device: torch.device,
    ):
        self.family, self.weights, self.optimization = family, weights, optimization
        self.rank, self.world_size = rank, world_size
        self.ema_reference = ema_reference
        self.device = device

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def save(self, directory: str | Path, trainer_state: dict) -> Path:
        """Write ``directory`` atomically. The folder is built under a temporary name by all ranks and
        renamed by rank 0 once every rank is done, so a crash never leaves a checkpoint that looks
        complete. With several nodes the run directory must be on a shared file system."""
        from rlfh.run.checkpoints import write_file_manifest

        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        lead = self.rank == 0
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        self.write_policy(tmp, lead)
        self.optimization.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        self.barrier()
        if lead:
            self.write_ema(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            write_file_manifest(tmp)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        self.barrier()
        return directory

    def write_policy(self, tmp: Path, lead: bool) -> None:
        """The LoRA for the stock pipeline's ``load_lora_weights`` (and HcP's phi beside it), or the
        whole denoiser folder; gathered under ZeRO-3 (every rank enters)."""
        w = self.weights
        with self.optimization.gathered(w.trainable if w.lora else list(w.denoiser.parameters())):
            if lead and w.lora:
                self.family.save_lora(tmp, w.lora_state_dict(), w.lora_adapter)
                if w.hcp is not None:
                    from safetensors.torch import save_file

                    from rlfh.learner.hcp import HCP_FILE

                    save_file(w.hcp.state_dict(), tmp / HCP_FILE)
            elif lead:
                w.denoiser.save_pretrained(tmp / self.family.denoiser)  # unet/ or transformer/, as the pipeline

    def write_ema(self, tmp: Path) -> None:
        from safetensors.torch import save_file

        ema = self.weights.ema
        if ema is not None:
            save_file(
                {str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                tmp / "ema.safetensors",
                metadata={"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)},
            )
        if self.weights.reference_weights is not None:
            # the EMA as it was at the last refresh (learner.reference.refresh_rounds): not today's EMA
            save_file(
                {str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.weights.reference_weights)},
                tmp / "reference.safetensors",
            )

    def load(self, directory: str | Path) -> dict:
        """Restore the engine, optimizer, EMA and the EMA reference of the last refresh; returns the
        trainer state (the caller restores its counters and RNG from it)."""
        directory = Path(directory)
        state_file = directory / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{directory}: not an rlfh checkpoint (no trainer_state.json)")
        state = json.loads(state_file.read_text())
        saved_ranks = state.get("learner_ranks", 1)
        if saved_ranks != self.world_size and self.optimization.zero_stage > 0:
            raise RuntimeError(
                f"{directory} was written by {saved_ranks} learner ranks with ZeRO partitions; "
                f"resume with the same number of ranks (now {self.world_size})"
            )
        load_path, _ = self.optimization.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_module_strict=False
        )
        if load_path is None:
            raise RuntimeError(f"{directory}: DeepSpeed found no engine state to load")
        self.read_ema(directory)
        return state

    def read_ema(self, directory: Path) -> None:
        ema = self.weights.ema
        if ema is not None:
            from safetensors import safe_open

            with safe_open(str(directory / "ema.safetensors"), framework="pt") as f:
                for i, p in enumerate(ema.shadow_params):
                    p.data.copy_(f.get_tensor(str(i)))
                ema.optimization_step = int(f.metadata()["optimization_step"])
        if (directory / "reference.safetensors").is_file() and self.ema_reference:
            from safetensors.torch import load_file

            saved = load_file(str(directory / "reference.safetensors"), device=str(self.device))
            self.weights.reference_weights = [saved[str(i)] for i in range(len(saved))]
