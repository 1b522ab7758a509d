"""The learner's engine: the SDXL UNet being trained, its reference, and the DeepSpeed engine around it.

:class:`LearnerEngine` holds the state and the model calls; the training loops that use it are
plain functions in :mod:`rlfh.learner.steps`. What it owns:

* the pipeline (the UNet; the text encoders only until a round's batch brings the rollouts' prompt
  embeddings, unless HG-DPO, DDPO or colocated sampling needs them; the VAE only in colocated mode);
* the policy: the UNet with a LoRA adapter (``model.lora``), or the whole UNet trainable;
* the reference: the same UNet with the adapter disabled, or a frozen copy for full training;
* the DeepSpeed engine (ZeRO, accumulation, clipping, bf16), an optional EMA of the weights;
* the step counters and the generator that draws every t, eps and shuffle (saved in checkpoints);
* the policy's weights for the rollout actors, in buckets, and checkpoint save / load.

With several ranks (``resources.num_learner_ranks`` / ``num_learner_gpus``; the process group is
set up by :mod:`rlfh.learner.group`) every rank builds one engine; DeepSpeed averages gradients.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from rlfh.losses.registry import OLD_POLICY, SAMPLER_LOGPROB, TEXT_ENCODERS, TRAJECTORIES, loss_spec


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or weight: training stops before it reaches the weights or a checkpoint."""


NONFINITE_CAUSES = ("a NaN/inf hyperparameter (learner.dpo.beta, learner.lr, ...), non-finite rewards or latents in "
                    "the batch, or a diverging run (lower learner.lr, set learner.max_grad_norm)")


def ddpo_train_steps(cfg) -> int:
    """Denoising steps of each trajectory trained per epoch: DDPO's timestep fraction of the recorded
    steps, which are the SDE window's ``learner.ddpo.window`` with one, all T without."""
    recorded = cfg.learner.ddpo.window or cfg.rollout.num_inference_steps
    return max(1, math.ceil(cfg.learner.ddpo.timestep_fraction * recorded))


def needs_text_encoders(cfg) -> bool:
    """Whether the learner must keep its text encoders when batches bring the rollouts' conditioning:
    colocated sampling encodes with this pipeline, HG-DPO trains on real images' captions that no
    rollout conditioned on, DDPO's guided eps needs the negative prompt (the rollouts send positive
    embeddings only), and so does guidance-free distillation's teacher. Offline DPO keeps them because its batches
    (from the rollout log) carry none."""
    return bool(cfg.resources.colocate or cfg.data.hgdpo.real_images
                or TEXT_ENCODERS in loss_spec(cfg.learner.loss).needs or cfg.learner.guidance_free.scale is not None)


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


def deepspeed_config(cfg) -> dict:
    lc = cfg.learner
    # DDPO accumulates over the trained timesteps of each micro-batch too (one backward per step)
    per_item = ddpo_train_steps(cfg) if loss_spec(lc.loss).batch == TRAJECTORIES else 1
    gas = cfg.gradient_accumulation_steps * per_item
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
        "train_batch_size": lc.micro_batch_size_per_gpu * gas * cfg.learner_world_size,
        "train_micro_batch_size_per_gpu": lc.micro_batch_size_per_gpu,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": lc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if lc.engine.offload_optimizer:
        # ZeRO-Offload steps the optimizer on CPU with DeepSpeed's own CPUAdam (built on first use)
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": lc.lr, "betas": list(lc.adam_betas),
                                                       "weight_decay": lc.weight_decay}}
    return ds


class UNetWithWeights:
    """Calls ``unet`` with some of its parameters replaced (``torch.func.functional_call``): the
    module's own parameters are never written, so autograd graphs through them stay valid."""

    def __init__(self, unet, weights: dict[str, torch.Tensor]):
        self.unet, self.weights = unet, weights

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.unet, self.weights, args, kwargs)


class UNetWithoutAdapter:
    """Calls the engine's LoRA UNet with its adapter off (:meth:`LearnerEngine.adapters_off`)."""

    def __init__(self, lrn: "LearnerEngine"):
        self.lrn = lrn

    def __call__(self, *args, **kwargs):
        with self.lrn.adapters_off():
            return self.lrn.unet(*args, **kwargs)


class LearnerEngine:
    """An SDXL UNet (LoRA via peft, or full) inside a DeepSpeed engine, with its reference.

    Args:
        cfg: the full :class:`rlfh.config.schema.Config` (reads ``model``, ``learner``, ``seed``).
        device: torch device (``cuda`` when available, else ``cpu``).
        keep_vae: keep the pipeline's VAE (colocated mode samples with this engine's pipeline).
    """

    def __init__(self, cfg, device: str | None = None, keep_vae: bool = False):
        import deepspeed
        import torch.distributed as dist
        from diffusers import DDPMScheduler

        from rlfh.learner.distributed import init_distributed
        from rlfh.losses import fairness
        from rollouts.models import add_lora, load_pipeline

        self.cfg = cfg
        lc = cfg.learner
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != cfg.learner_world_size:
            raise RuntimeError(f"the process group has {self.world_size} ranks but the config asks for "
                               f"{cfg.learner_world_size} learner ranks (resources.num_learner_ranks / num_learner_gpus)")
        pipe = load_pipeline(cfg.model, self.device)
        self.vae = pipe.vae if keep_vae else None
        if not keep_vae:
            pipe.vae = None  # the learner trains on latents
        self.pipe = pipe
        self.vae_scale = 8
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.ddim = None
        if SAMPLER_LOGPROB in loss_spec(lc.loss).needs:
            from rollouts.sampler import ddim_scheduler

            self.ddim = ddim_scheduler(pipe.scheduler.config)  # what the rollout actors sample with
            self.ddim.set_timesteps(cfg.rollout.num_inference_steps, device=self.device)
        unet = pipe.unet
        unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder_2.requires_grad_(False)
        # what time ids need once the encoders are gone (see take_conditioning)
        self.projection_dim = pipe.text_encoder_2.config.projection_dim
        self.keep_text_encoders = keep_vae or needs_text_encoders(cfg)
        self.ref_unet = None
        self.hcp = None
        if cfg.model.lora.enabled:
            torch.manual_seed(cfg.seed)  # LoRA A matrices come from the global RNG: make runs repeatable
            add_lora(unet, cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
            # after the LoRA, so that phi gets no adapter; its init draws from the same seeded RNG
            if cfg.model.hcp.enabled:
                from rlfh.learner.hcp import HcP

                self.hcp = HcP(unet, cfg.model.hcp, pipe.tokenizer)
        else:
            # full fine-tuning: the reference is a frozen copy (LoRA avoids this second UNet)
            self.ref_unet = copy.deepcopy(unet).eval()
            unet.requires_grad_(True)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32; DeepSpeed bf16 keeps its own copy
        if lc.engine.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: check model.lora.target_modules against the UNet's module names")
        self.num_trainable = sum(p.numel() for p in params)
        optimizer = None
        if not lc.engine.offload_optimizer:
            optimizer = make_optimizer(params, lc, self.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=unet, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg))
        self._trainable = params  # fixed from here on; walking the UNet's parameters costs ms per call
        self.ema = None
        if lc.ema.decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=lc.ema.decay)
        # Kept copies of the trainable weights the UNet can predict with (predict_with): the policy that
        # sampled the round (nft, awm) and the EMA reference (learner.reference.model=ema); see begin_round.
        self.old_weights: list[torch.Tensor] | None = None
        self.reference_weights: list[torch.Tensor] | None = None
        self.trainable_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.unet = self.engine.module
        # diffusers' ModelMixin.dtype walks every parameter on each access; the dtype never changes
        self.dtype = self.unet.dtype
        # The LoRA layers, collected once: the reference switches only them off. peft's
        # disable_adapters()/enable_adapters() walk every module of the UNet (and flip requires_grad
        # on every adapter weight) twice per step: 15 ms of a 100 ms step on the tiny model.
        self.lora_layers = []
        if self.ref_unet is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.lora_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
            if not all(hasattr(m, "_disable_adapters") for m in self.lora_layers):
                self.lora_layers = None  # a peft without the flag: fall back to its own toggle
        # One rank, ZeRO-0, fp32 optimizer: DeepSpeed's gradient all-reduce is a flatten, an all_reduce
        # over one rank and a copy back of every gradient (and a /1): it changes no value, so skip it.
        # Its one other effect, zero gradients for trainable weights that got none, backward() keeps.
        # (bf16 keeps it: DeepSpeed's BF16 optimizer reduces its own fp32 gradient buffers there.)
        self.skip_allreduce = (self.world_size == 1 and lc.engine.zero_stage == 0
                               and not hasattr(self.engine.optimizer, "get_grads_for_reduction"))
        if self.skip_allreduce:
            self.engine.enable_backward_allreduce = False
        if not (self.engine.fp16_enabled() or self.engine.bfloat16_enabled() or self.engine.zero_optimization()):
            # DeepSpeed's plain fp32 step clips and zeroes gradients by walking every parameter of the
            # module (a LoRA UNet's ~2.5k frozen ones too), ~20 ms of Python per step: do the same on
            # the trainable ones. The frozen ones never hold a gradient, so the values are the same.
            self.engine.clip_fp32_gradients = self._clip_trainable_gradients
            self.engine.zero_grad = self._zero_trainable_gradients
        if lc.engine.compile:
            # in place: the engine's forward (policy) and direct calls (reference, sync checks) both
            # run the compiled UNet; the adapter flag is a guard, so policy and reference get a graph each
            self.unet.compile(dynamic=False)
        self.conditioning: dict | None = None  # the current batch's {prompt: (embeds, pooled)}
        # Per-region gradients (MPD, MGDA) take torch.autograd.grad, which the engine's forward refuses;
        # the wrapped module keeps ZeRO <= 2's gradient hooks on the parameters.
        per_region = fairness.needs_region_gradients(lc.regions.fairness.rule, len(lc.regions.names))
        self.policy_model = self.unet if per_region else self.engine
        self.global_step = 0  # optimizer steps
        self.policy_version = 0  # rounds trained: what the rollout actors' samples are tagged with
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)

    # ------------------------------------------------------------------ model calls
    def trainable_parameters(self) -> list[torch.Tensor]:
        return self._trainable

    def _clip_trainable_gradients(self) -> torch.Tensor:
        """DeepSpeed's fp32 ``clip_grad_norm_`` (2-norm of the per-tensor norms, coefficient
        min(1, max / (norm + 1e-6))) on the trainable parameters' gradients, without its walk over the
        module and its all-reduce of the norm over a data-parallel group (this path is ZeRO-0, whose
        gradients are already reduced when it runs)."""
        grads = [p.grad for p in self._trainable if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.stack(torch._foreach_norm(grads)).pow(2).sum().pow(0.5)
        coef = torch.clamp(self.engine.gradient_clipping() / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    def _zero_trainable_gradients(self) -> None:
        for p in self._trainable:
            p.grad = None

    @property
    def has_text_encoders(self) -> bool:
        return self.pipe.text_encoder is not None

    def take_conditioning(self, table: dict | None, prompts) -> None:
        """Use a batch's ``{prompt: (prompt_embeds (77, D), pooled (P,))}`` (what the rollout actors
        conditioned on) for :meth:`condition` while training on it. When it covers every prompt of
        the batch and nothing else in this run encodes (:func:`needs_text_encoders`), the text
        encoders are dropped: the learner then holds none (on SDXL 0.8 B parameters, 1.6 GB in bf16)."""
        self.conditioning = table or None
        if (self.conditioning is not None and not self.keep_text_encoders and self.has_text_encoders
                and all(p in self.conditioning for p in prompts)):
            self.pipe.text_encoder = self.pipe.text_encoder_2 = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def condition(self, prompts: list[str], height: int, width: int, negative_prompt: str | None = None):
        """SDXL conditioning (prompt embeddings, pooled embeddings and time ids) in the UNet's dtype;
        with ``negative_prompt``, the negative rows come first (classifier-free guidance).

        Prompt embeddings come from the batch's conditioning (:meth:`take_conditioning`) when it
        holds every prompt, else from the text encoders. Equal either way: the rollout actors
        encode with the same frozen encoders (tests/rlfh/test_learner_fast.py)."""
        table = self.conditioning
        wanted = list(prompts) + ([negative_prompt] if negative_prompt is not None else [])
        if table is not None and all(p in table for p in wanted):
            return self._condition_from_table(table, prompts, height, width, negative_prompt)
        if not self.has_text_encoders:
            missing = sorted({p for p in wanted if table is None or p not in table})
            raise RuntimeError(f"the learner dropped its text encoders (the rollouts send the prompt embeddings) "
                               f"but has none for {missing[:3]}: pass the batch's conditioning")
        from rollouts.models import sdxl_conditioning

        enc, added = sdxl_conditioning(self.pipe, prompts, height, width, self.device, negative_prompt)
        dtype = self.dtype
        return enc.to(dtype), {k: v.to(dtype) for k, v in added.items()}

    def _condition_from_table(self, table: dict, prompts, height: int, width: int, negative_prompt: str | None):
        # what sdxl_conditioning returns, with the encoder outputs looked up: embeddings stacked in
        # prompt order, time ids computed in the encoders' dtype (the model's) as it does
        from rollouts.models import DTYPES

        rows = ([negative_prompt] * len(prompts) if negative_prompt is not None else []) + list(prompts)
        enc = torch.from_numpy(np.stack([np.asarray(table[p][0]) for p in rows])).to(self.device)
        pooled = torch.from_numpy(np.stack([np.asarray(table[p][1]) for p in rows])).to(self.device)
        time_ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=DTYPES[self.cfg.model.dtype],
            text_encoder_projection_dim=self.projection_dim).to(self.device).repeat(len(rows), 1)
        dtype = self.dtype
        return enc.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}

    def draw_noise(self, count: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ U{0..T-1} and eps ~ N(0, I) for ``count`` items, from the engine's generator."""
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (count,), generator=self.generator)
        return t, torch.randn((count, *shape), generator=self.generator)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps in the UNet's dtype, t on the device, and the
        training target (eps, or v for v-prediction models)."""
        t, eps = t.to(self.device), eps.to(self.device)
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        return x_t.to(self.dtype), t, self.prediction_target(x0, t, eps)

    def prediction_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the UNet should output at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: eps, or
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for v-prediction models (the scheduler's ``prediction_type``)."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, eps, t)
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t (float32, on the device) of the training noise schedule at timesteps ``t``."""
        return self.noise_scheduler.alphas_cumprod.to(self.device)[t.to(self.device)].float()

    def x0_scale(self, t: torch.Tensor) -> torch.Tensor:
        """k_t per sample (B,), float32: x0_hat - x0 = -k_t (pred - target), k_t = sqrt(1 - abar_t) / sqrt(abar_t)
        for eps-prediction, sqrt(1 - abar_t) for v-prediction (DiffusionNFT's adaptive weighting)."""
        abar = self.alpha_bar(t).double()  # the schedule is float32: exact in double
        k = (1 - abar).sqrt()
        if self.noise_scheduler.config.prediction_type == "epsilon":
            k = k / abar.sqrt()
        return k.float()

    def policy(self, x_t, t, enc, added) -> torch.Tensor:
        """The trained UNet's prediction (with gradients)."""
        return self.policy_model(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample

    @torch.no_grad()
    def reference(self, x_t, t, enc, added) -> torch.Tensor:
        """The reference's prediction (:meth:`reference_unet`)."""
        return self.reference_unet()(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample

    def reference_unet(self):
        """The reference as a UNet-like callable (for guided_eps too; call it without gradients): the
        frozen copy, or the UNet with its adapter off; with ``learner.reference.model=ema`` the UNet with the
        EMA weights of :meth:`begin_round`."""
        if self.reference_weights is not None:
            return self.unet_with(self.reference_weights)
        if self.ref_unet is not None:
            return self.ref_unet
        return UNetWithoutAdapter(self)

    @contextlib.contextmanager
    def adapters_off(self):
        """The UNet without its LoRA adapter: the flag peft's LoRA forward reads
        (``layer.disable_adapters``), set on the collected LoRA layers only. Same forward as
        ``unet.disable_adapters()``, which also walks every module and flips requires_grad."""
        if self.lora_layers is None:
            self.unet.disable_adapters()
            try:
                yield
            finally:
                self.unet.enable_adapters()
            return
        for m in self.lora_layers:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m in self.lora_layers:
                m._disable_adapters = False

    @torch.no_grad()
    def predict_with(self, weights: list[torch.Tensor], x_t, t, enc, added) -> torch.Tensor:
        """The UNet's prediction with its trainable weights replaced by ``weights`` (same order) for this
        call only. ``torch.func.functional_call`` leaves the parameters untouched, so a policy forward
        already taken keeps its autograd graph (an in-place swap would invalidate it)."""
        return self.unet_with(weights)(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample

    def unet_with(self, weights: list[torch.Tensor]) -> "UNetWithWeights":
        """The UNet as a callable whose trainable weights are ``weights`` (for guided_eps and the like)."""
        return UNetWithWeights(self.unet, dict(zip(self.trainable_names, weights)))

    def old_policy(self, x_t, t, enc, added) -> torch.Tensor:
        """The prediction of the policy that sampled the round (nft, awm): the weights at its start."""
        if self.old_weights is None:
            raise RuntimeError("no sampling-policy weights: begin_round() snapshots them for learner.loss=nft/awm")
        return self.predict_with(self.old_weights, x_t, t, enc, added)

    def begin_round(self) -> None:
        """Before a round's training: keep the weights the round was sampled with (nft, awm: the rollout
        actors got them at the last sync; rollout.max_staleness=0), and with ``learner.reference.model=ema``
        take the EMA as the reference every ``learner.reference.refresh_rounds`` rounds (and on the
        first round of a process, e.g. after a resume)."""
        lc = self.cfg.learner
        if OLD_POLICY in loss_spec(lc.loss).needs or lc.ddpo.trust_region != "clip":
            # the EMA has not moved since the last sync (it steps with the optimizer), so either way these
            # are the weights the round was sampled with
            sampled = self.sampling_weights() or self.trainable_parameters()
            self.old_weights = [p.detach().clone() for p in sampled]
        if lc.reference.model == "ema" and (self.reference_weights is None
                                      or self.policy_version % lc.reference.refresh_rounds == 0):
            self.reference_weights = [p.detach().clone().to(q.dtype) for p, q in
                                      zip(self.ema.shadow_params, self.trainable_parameters())]

    # ------------------------------------------------------------------ updates
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss and take DeepSpeed's micro-step (it steps the
        optimizer at the accumulation boundary). A non-finite loss stops here, before any gradient."""
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(f"non-finite loss {float(loss.detach())} at optimizer step {self.global_step} "
                                 f"(policy version {self.policy_version}); nothing was applied. Likely cause: "
                                 f"{NONFINITE_CAUSES}")
        self.engine.backward(loss)
        if self.skip_allreduce and self.engine.is_gradient_accumulation_boundary():
            # what DeepSpeed's skipped reduction also did: a weight without a gradient gets a zero
            # one, so AdamW still steps it (decays its moments) exactly as before
            for p in self._trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.engine.step()

    def finish_optimizer_step(self) -> None:
        """After the last micro-batch of an optimizer step: count it, check the weights, update the EMA."""
        self.global_step += 1
        if not self.weights_finite():
            raise NonFiniteError(f"non-finite weights after optimizer step {self.global_step} (policy version "
                                 f"{self.policy_version}): a gradient was NaN/inf. Likely cause: {NONFINITE_CAUSES}")
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())

    def weights_finite(self) -> bool:
        """Whether this rank's trainable weights are all finite (under ZeRO-3, its partition)."""
        local = [getattr(p, "ds_tensor", p).detach() for p in self.trainable_parameters()]
        local = [v for v in local if v.numel()]
        return not local or bool(torch.stack(torch._foreach_norm(local)).isfinite().all())

    # ------------------------------------------------------------------ the policy's weights
    def gathered(self, params):
        """A context in which ``params`` hold their whole values: ZeRO-3 keeps only each rank's
        slice and gathers them here (collective: every rank enters); other stages need nothing."""
        if self.cfg.learner.engine.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def lora_state_dict(self, weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA weights as a peft state dict on CPU (what rollout actors load): the trained ones,
        or ``weights`` in the order of the trainable parameters (e.g. their EMA)."""
        from peft import get_peft_model_state_dict

        if self.ref_unet is not None:
            raise RuntimeError("full-UNet training has no LoRA state; sync full weights instead")
        state = None
        if weights is not None:
            state = dict(self.unet.state_dict())
            state.update(zip(self.trainable_names, weights))
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(self.unet, state).items()}

    def sampling_weights(self) -> list[torch.Tensor] | None:
        """The trainable weights the rollout actors sample with, when they are not the trained ones:
        with ``learner.ema.sampling_policy=ema``, the EMA (DiffusionNFT samples with a slowly moving copy
        of the policy, off-policy); else None."""
        if self.cfg.learner.ema.sampling_policy != "ema":
            return None
        return [s.detach().to(p.dtype) for s, p in zip(self.ema.shadow_params, self.trainable_parameters())]

    def policy_weight_buckets(self, bucket_bytes: int):
        """What rollout actors need to sample from the current policy, in buckets of at most
        ``bucket_bytes`` (CPU tensors): the LoRA weights (usually one bucket), or every UNet weight
        for full fine-tuning (``rlfh.learner.weight_sync``). Under ZeRO-3 every rank must iterate it."""
        from rlfh.learner.weight_sync import iter_state_buckets

        if self.ref_unet is None:
            with self.gathered(self.trainable_parameters()):
                state = self.lora_state_dict(self.sampling_weights())
            return iter_state_buckets(state, bucket_bytes)
        return iter_state_buckets(self.unet.state_dict(keep_vars=True), bucket_bytes, self.gathered)

    @torch.no_grad()
    def unet_output(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """The policy's eps prediction for one input (sync checks: the rollout actor must agree exactly)."""
        enc, added = self.condition([prompt] * x.shape[0], x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale)
        return self.unet(x.to(self.device, self.dtype), t, encoder_hidden_states=enc,
                         added_cond_kwargs=added).sample.float().cpu()

    # ------------------------------------------------------------------ checkpoints (every rank calls these)
    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def save_checkpoint(self, directory: str | Path, extra_state: dict | None = None) -> Path:
        """Write ``directory`` atomically: LoRA (diffusers format) or the UNet folder, DeepSpeed engine
        state (each rank writes its own ZeRO partition), EMA, the EMA reference (learner.reference.model=ema),
        trainer state, ``files.json``; with ``model.hcp`` the HcP layer's weights in ``hcp.safetensors``
        beside the LoRA.

        The folder is built under a temporary name by all ranks and renamed by rank 0 once every rank
        is done, so a crash never leaves a checkpoint that looks complete. With several nodes the run
        directory must be on a shared file system. ``load_lora_weights(directory)`` works on the result.
        Non-finite weights are never written.
        """
        from rlfh.run.checkpoints import write_file_manifest

        directory = Path(directory)
        if not self.weights_finite():
            raise NonFiniteError(f"refusing to write {directory}: the weights are not finite")
        tmp = directory.with_name(f".{directory.name}.tmp")
        lead = self.rank == 0
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        lora = self.ref_unet is None
        with self.gathered(self.trainable_parameters() if lora else list(self.unet.parameters())):
            if lead and lora:
                from diffusers import StableDiffusionXLPipeline
                from diffusers.utils import convert_state_dict_to_diffusers

                StableDiffusionXLPipeline.save_lora_weights(
                    tmp, unet_lora_layers=convert_state_dict_to_diffusers(self.lora_state_dict()))
                if self.hcp is not None:
                    from safetensors.torch import save_file

                    from rlfh.learner.hcp import HCP_FILE

                    save_file(self.hcp.state_dict(), tmp / HCP_FILE)
            elif lead:
                self.unet.save_pretrained(tmp / "unet")
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        self._barrier()
        if lead:
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)},
                          tmp / "ema.safetensors", metadata={"optimization_step": str(self.ema.optimization_step),
                                                              "decay": str(self.ema.decay)})
            if self.reference_weights is not None:
                # the EMA as it was at the last refresh (learner.reference.refresh_rounds): not today's EMA
                from safetensors.torch import save_file

                save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.reference_weights)},
                          tmp / "reference.safetensors")
            state = {
                "global_step": self.global_step,
                "policy_version": self.policy_version,
                "generator_state": self.generator.get_state().tolist(),
                "learner_ranks": self.world_size,
                **(extra_state or {}),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            write_file_manifest(tmp)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        self._barrier()
        return directory

    def load_checkpoint(self, directory: str | Path) -> dict:
        """Restore engine, optimizer, step counters, RNG, the EMA and the EMA reference of the last refresh
        from :meth:`save_checkpoint` output."""
        directory = Path(directory)
        state_file = directory / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{directory}: not an rlfh checkpoint (no trainer_state.json)")
        state = json.loads(state_file.read_text())
        saved_ranks = state.get("learner_ranks", 1)
        if saved_ranks != self.world_size and self.cfg.learner.engine.zero_stage > 0:
            raise RuntimeError(f"{directory} was written by {saved_ranks} learner ranks with ZeRO partitions; "
                               f"resume with the same number of ranks (now {self.world_size})")
        load_path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"{directory}: DeepSpeed found no engine state to load")
        if self.ema is not None:
            from safetensors import safe_open

            with safe_open(str(directory / "ema.safetensors"), framework="pt") as f:
                for i, p in enumerate(self.ema.shadow_params):
                    p.data.copy_(f.get_tensor(str(i)))
                self.ema.optimization_step = int(f.metadata()["optimization_step"])
        if (directory / "reference.safetensors").is_file() and self.cfg.learner.reference.model == "ema":
            from safetensors.torch import load_file

            saved = load_file(str(directory / "reference.safetensors"), device=str(self.device))
            self.reference_weights = [saved[str(i)] for i in range(len(saved))]
        self.global_step = state["global_step"]
        self.policy_version = state["policy_version"]
        self.generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
        return state
