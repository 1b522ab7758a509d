"""Optimization on DeepSpeed: the engine around the trainable denoiser (ZeRO, gradient accumulation,
clipping, bf16), the optimizer, and the micro-step.

Reads the optimizer and engine knobs of ``learner`` (lr, adam_betas, weight_decay, optimizer_impl,
zero_stage, offload_optimizer, offload_params, micro_batch_size_per_gpu, max_grad_norm); what comes
from elsewhere (the accumulation steps, the number of ranks, bf16) is passed in.

Three of DeepSpeed's per-step walks are replaced on the paths where they change no value (each
reason beside it, in :meth:`Optimization.skip_identity_work`): the one-rank gradient all-reduce, and
the fp32 path's clip and zero_grad over every parameter of the module.
"""

from __future__ import annotations

import contextlib

import torch


def make_optimizer(params, lc, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``params`` with ``learner.engine.optimizer_impl``: ``auto`` takes torch's fused kernel
    where torch has one for the device (CUDA, and CPU since torch 2.4), else foreach: one kernel
    (or one vectorized loop) over all tensors instead of ~10 small ops per tensor, which matters for
    LoRA's hundreds of small matrices. Fused/foreach differ from the per-tensor loop by float
    rounding only (tests/rlfh/test_learner_fast.py bounds it)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    impl = lc.engine.optimizer_impl
    if impl == "auto":
        impl = "fused" if device.type in _get_fused_kernels_supported_devices() else "foreach"
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(params, lr=lc.lr, betas=tuple(lc.adam_betas), weight_decay=lc.weight_decay, **kw)


def engine_config(lc, accumulation_steps: int, world_size: int, bf16: bool) -> dict:
    """DeepSpeed's config from ``learner``'s engine knobs, with ``accumulation_steps`` micro-steps
    per optimizer step on each of ``world_size`` ranks."""
    zero: dict = {"stage": lc.engine.zero_stage}
    if lc.engine.zero_stage == 3:
        # ZeRO-3's memory-efficient linear computes x @ W^T + b in another order than torch's linear:
        # the policy would differ from the rollout actors' copy in the last bits (sync check, DDPO ratios)
        zero["memory_efficient_linear"] = False
    if lc.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if lc.engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_batch_size": lc.micro_batch_size_per_gpu * accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": lc.micro_batch_size_per_gpu,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": lc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if lc.engine.offload_optimizer:
        # ZeRO-Offload steps the optimizer on CPU with DeepSpeed's own CPUAdam (built on first use)
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lc.lr, "betas": list(lc.adam_betas), "weight_decay": lc.weight_decay},
        }
    return ds


class Optimization:
    """The DeepSpeed engine and optimizer over ``params`` of ``module``.

    Args:
        module: the denoiser (DeepSpeed wraps it; ``engine.module`` is the same object).
        params: its trainable parameters, fixed for the run.
        lc: the ``learner`` section (its optimizer and engine knobs only).
        ds_config: :func:`engine_config`'s dict.
        world_size: learner ranks.
        device: this rank's device.
    """

    def __init__(self, module, params: list[torch.Tensor], lc, ds_config: dict, world_size: int, device: torch.device):
        import deepspeed

        self.params = params
        self.device = device
        self.zero_stage = lc.engine.zero_stage
        optimizer = None if lc.engine.offload_optimizer else make_optimizer(params, lc, device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, config=ds_config
        )
        self.skip_allreduce = False
        self.skip_identity_work(world_size)

    def skip_identity_work(self, world_size: int) -> None:
        """Replace DeepSpeed's per-step walks that change no value on this configuration."""
        engine = self.engine
        # One rank, ZeRO-0, fp32 optimizer: DeepSpeed's gradient all-reduce is a flatten, an all_reduce
        # over one rank and a copy back of every gradient (and a /1): it changes no value, so skip it.
        # Its one other effect, zero gradients for trainable weights that got none, backward() keeps.
        # (bf16 keeps it: DeepSpeed's BF16 optimizer reduces its own fp32 gradient buffers there.)
        self.skip_allreduce = (
            world_size == 1 and self.zero_stage == 0 and not hasattr(engine.optimizer, "get_grads_for_reduction")
        )
        if self.skip_allreduce:
            engine.enable_backward_allreduce = False
        if not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
            # DeepSpeed's plain fp32 step clips and zeroes gradients by walking every parameter of the
            # module (a LoRA UNet's ~2.5k frozen ones too), ~20 ms of Python per step: do the same on
            # the trainable ones. The frozen ones never hold a gradient, so the values are the same.
            engine.clip_fp32_gradients = self.clip_trainable_gradients
            engine.zero_grad = self.zero_trainable_gradients

    def clip_trainable_gradients(self) -> torch.Tensor:
        """DeepSpeed's fp32 ``clip_grad_norm_`` (2-norm of the per-tensor norms, coefficient
        min(1, max / (norm + 1e-6))) on the trainable parameters' gradients, without its walk over the
        module and its all-reduce of the norm over a data-parallel group (this path is ZeRO-0, whose
        gradients are already reduced when it runs)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.stack(torch._foreach_norm(grads)).pow(2).sum().pow(0.5)
        coef = torch.clamp(self.engine.gradient_clipping() / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    def zero_trainable_gradients(self) -> None:
        for p in self.params:
            p.grad = None

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss and take DeepSpeed's micro-step (it steps the
        optimizer at the accumulation boundary)."""
        self.engine.backward(loss)
        if self.skip_allreduce and self.engine.is_gradient_accumulation_boundary():
            # what DeepSpeed's skipped reduction also did: a weight without a gradient gets a zero
            # one, so AdamW still steps it (decays its moments) exactly as before
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.engine.step()

    def gathered(self, params):
        """A context in which ``params`` hold their whole values: ZeRO-3 keeps only each rank's
        slice and gathers them here (collective: every rank enters); other stages need nothing."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or weight: training stops before it reaches the weights or a checkpoint."""


NONFINITE_CAUSES = (
    "a NaN/inf hyperparameter (learner.dpo.beta, learner.lr, ...), non-finite rewards or latents in "
    "the batch, or a diverging run (lower learner.lr, set learner.max_grad_norm)"
)
