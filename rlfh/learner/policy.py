"""The learner's policy and reference weights: the denoiser being trained, how it is adapted (LoRA
via peft, or every weight), its reference, its EMA and the kept copies it can predict with.

* LoRA (``model.lora``): the policy is the denoiser with an adapter; the reference is the same
  denoiser with the adapter off (:meth:`PolicyWeights.adapters_off`: the LoRA layers' own flag).
  The HcP layer (``model.hcp``) is attached after the adapter, so phi gets none.
* Full fine-tuning: every weight trains; the reference is a frozen copy (a second denoiser).
* ``learner.ema.decay``: an EMA of the trainable weights (diffusers' ``EMAModel``).
* Kept copies (:meth:`PolicyWeights.predict_with`): the weights a round was sampled with (nft, awm,
  the DDPO trust regions) and the EMA reference (``learner.reference.model=ema``).

Built in two steps around the optimizer: :class:`PolicyWeights` makes the trainable set, the
optimization wraps it (``rlfh.learner.optimization``), then :meth:`PolicyWeights.wrapped` takes the
wrapped module and starts the EMA from the weights as the optimizer holds them.
"""

from __future__ import annotations

import contextlib
import copy

import torch


class DenoiserWithWeights:
    """Calls ``model`` with some of its parameters replaced (``torch.func.functional_call``): the
    module's own parameters are never written, so autograd graphs through them stay valid."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self.denoiser, self.weights = model, weights

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.denoiser, self.weights, args, kwargs)


class WithoutAdapter:
    """Calls the LoRA UNet with its adapter off (:meth:`PolicyWeights.adapters_off`)."""

    def __init__(self, weights: "PolicyWeights"):
        self.weights = weights

    def __call__(self, *args, **kwargs):
        with self.weights.adapters_off():
            return self.weights.denoiser(*args, **kwargs)


class PolicyWeights:
    """The trainable denoiser and its reference.

    Args:
        model: the pipeline's denoiser (frozen here, then adapted).
        lora: ``model.lora`` (enabled, rank, alpha, target_modules).
        hcp: ``model.hcp`` (the HcP layer; needs the LoRA).
        tokenizer: the pipeline's first tokenizer (HcP finds the human words with it).
        seed: the run's seed: LoRA A matrices and phi come from torch's global RNG.
        gradient_checkpointing: ``learner.engine.gradient_checkpointing``.
    """

    def __init__(self, model, lora, hcp, tokenizer, seed: int, gradient_checkpointing: bool):
        from families import add_lora

        model.requires_grad_(False)
        self.ref_denoiser = None
        self.lora_adapter: dict | None = None  # the LoRA file's adapter metadata (rank, alpha, targets)
        self.hcp = None
        if lora.enabled:
            torch.manual_seed(seed)  # LoRA A matrices come from the global RNG: make runs repeatable
            add_lora(model, lora.rank, lora.alpha, lora.target_modules)
            self.lora_adapter = {
                "r": lora.rank,
                "lora_alpha": lora.alpha,
                "target_modules": sorted(lora.target_modules),
            }
            if hcp.enabled:  # after the LoRA, so that phi gets no adapter; its init draws from the same seeded RNG
                from rlfh.learner.hcp import HcP

                self.hcp = HcP(model, hcp, tokenizer)
        else:
            # full fine-tuning: the reference is a frozen copy (LoRA avoids this second UNet)
            self.ref_denoiser = copy.deepcopy(model).eval()
            model.requires_grad_(True)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32; DeepSpeed bf16 keeps its own copy
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                "no trainable parameters: check model.lora.target_modules against the denoiser's module names"
            )
        self.denoiser = model
        self.trainable = params  # fixed from here on; walking the UNet's parameters costs ms per call
        self.num_trainable = sum(p.numel() for p in params)
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.ema = None
        # Kept copies of the trainable weights the UNet can predict with (predict_with): the policy that
        # sampled the round (nft, awm) and the EMA reference (learner.reference.model=ema); see keep_sampled.
        self.old_weights: list[torch.Tensor] | None = None
        self.reference_weights: list[torch.Tensor] | None = None
        self.lora_layers: list | None = []

    @property
    def lora(self) -> bool:
        return self.ref_denoiser is None

    def wrapped(self, module, ema_decay: float | None, compile: bool) -> None:
        """After the optimizer wrapped the denoiser: the module to call (``module``), its EMA
        (``learner.ema.decay``), the LoRA layers the reference switches off, ``learner.engine.compile``."""
        self.denoiser = module
        if ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=ema_decay)
        # diffusers' ModelMixin.dtype walks every parameter on each access; the dtype never changes
        self.dtype = module.dtype
        # The LoRA layers, collected once: the reference switches only them off. peft's
        # disable_adapters()/enable_adapters() walk every module of the UNet (and flip requires_grad
        # on every adapter weight) twice per step: 15 ms of a 100 ms step on the tiny model.
        if self.lora:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.lora_layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
            if not all(hasattr(m, "_disable_adapters") for m in self.lora_layers):
                self.lora_layers = None  # a peft without the flag: fall back to its own toggle
        if compile:
            # in place: the engine's forward (policy) and direct calls (reference, sync checks) both
            # run the compiled UNet; the adapter flag is a guard, so policy and reference get a graph each
            module.compile(dynamic=False)

    # ------------------------------------------------------------------ the reference
    @contextlib.contextmanager
    def adapters_off(self):
        """The UNet without its LoRA adapter (and without the HcP layer's residual: the base model has
        neither): the flag peft's LoRA forward reads (``layer.disable_adapters``), set on the collected
        LoRA layers only. Same forward as ``model.disable_adapters()``, which also walks every module and
        flips requires_grad."""
        if self.hcp is not None:
            self.hcp.set_active(False)
            try:
                with self.lora_off():
                    yield
            finally:
                self.hcp.set_active(True)
            return
        with self.lora_off():
            yield

    @contextlib.contextmanager
    def lora_off(self):
        if self.lora_layers is None:
            self.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.denoiser.enable_adapters()
            return
        for m in self.lora_layers:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m in self.lora_layers:
                m._disable_adapters = False

    def reference_denoiser(self):
        """The reference as a UNet-like callable (call it without gradients): the frozen copy, or the
        UNet with its adapter off; with ``learner.reference.model=ema`` the UNet with the EMA weights of
        :meth:`refresh_reference`."""
        if self.reference_weights is not None:
            return self.denoiser_with(self.reference_weights)
        if self.ref_denoiser is not None:
            return self.ref_denoiser
        return WithoutAdapter(self)

    def denoiser_with(self, weights: list[torch.Tensor]) -> DenoiserWithWeights:
        """The UNet as a callable whose trainable weights are ``weights`` (same order as the trainable
        parameters) for each call only: a policy forward already taken keeps its autograd graph."""
        return DenoiserWithWeights(self.denoiser, dict(zip(self.trainable_names, weights)))

    # ------------------------------------------------------------------ kept copies
    def sampling_weights(self, from_ema: bool) -> list[torch.Tensor] | None:
        """The trainable weights the rollout actors sample with when they are not the trained ones:
        the EMA with ``learner.ema.sampling_policy=ema`` (``from_ema``; DiffusionNFT samples with a slowly
        moving copy of the policy, off-policy); else None."""
        if not from_ema:
            return None
        return [s.detach().to(p.dtype) for s, p in zip(self.ema.shadow_params, self.trainable)]

    def keep_sampled(self, from_ema: bool) -> None:
        """Keep the weights the round was sampled with (the EMA has not moved since the last sync: it
        steps with the optimizer, so either way these are the sampler's)."""
        sampled = self.sampling_weights(from_ema) or self.trainable
        self.old_weights = [p.detach().clone() for p in sampled]

    def refresh_reference(self) -> None:
        """Take the EMA as the reference (``learner.reference.model=ema``)."""
        self.reference_weights = [
            p.detach().clone().to(q.dtype) for p, q in zip(self.ema.shadow_params, self.trainable)
        ]

    def reference_from_policy(self) -> None:
        """Take the current trained weights as the reference (GARDO's adaptive reference, ``gardo``)."""
        self.reference_weights = [p.detach().clone() for p in self.trainable]

    def step_ema(self) -> None:
        if self.ema is not None:
            self.ema.step(self.trainable)

    @torch.no_grad()
    def blend_ema(self, decay: float) -> None:
        """EMA <- decay * EMA + (1 - decay) * trained, once (``learner.ema.schedule=round_ramp``)."""
        for s, p in zip(self.ema.shadow_params, self.trainable):
            s.mul_(decay).add_(p.detach().to(s.device, s.dtype), alpha=1.0 - decay)

    def weights_finite(self) -> bool:
        """Whether this rank's trainable weights are all finite (under ZeRO-3, its partition)."""
        local = [getattr(p, "ds_tensor", p).detach() for p in self.trainable]
        local = [v for v in local if v.numel()]
        return not local or bool(torch.stack(torch._foreach_norm(local)).isfinite().all())

    def lora_state_dict(self, weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA weights as a peft state dict on CPU (what rollout actors load): the trained ones,
        or ``weights`` in the order of the trainable parameters (e.g. their EMA)."""
        from peft import get_peft_model_state_dict

        if not self.lora:
            raise RuntimeError("full-UNet training has no LoRA state; sync full weights instead")
        state = None
        if weights is not None:
            state = dict(self.denoiser.state_dict())
            state.update(zip(self.trainable_names, weights))
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(self.denoiser, state).items()}


def lora_of(lora, family):
    """``model.lora`` with its target modules resolved: the family's (diffusers' own) where unset."""
    import dataclasses

    return dataclasses.replace(lora, target_modules=list(lora.target_modules or family.lora_targets))
