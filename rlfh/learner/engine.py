"""The learner's engine: the model being trained, its reference, and the DeepSpeed engine around it.

:class:`LearnerEngine` holds the state and the model calls; the training loops that use it are
plain functions in :mod:`rlfh.learner.steps`. It composes three parts, each built from what it
needs of the config:

* :class:`rlfh.learner.policy.PolicyWeights`: the denoiser with a LoRA adapter (``model.lora``)
  or every weight trainable, its reference (adapter off, a frozen copy, or the EMA), the EMA, the
  HcP layer, the kept copies of the sampling policy;
* :class:`rlfh.learner.optimization.Optimization`: the DeepSpeed engine (ZeRO, accumulation,
  clipping, bf16) and the optimizer;
* :class:`rlfh.learner.checkpoint.CheckpointIO`: checkpoint save / load.

Itself it holds the pipeline (the denoiser; the text encoders only until a round's batch brings the
rollouts' prompt embeddings, unless HG-DPO, DDPO or colocated sampling needs them; the VAE only in
colocated mode), the model family's calls (:mod:`families`: conditioning with its prompt cache, the
noise schedule, the stochastic sampler step), the step counters and the generator that draws every
t, eps and shuffle (saved in checkpoints).

With several ranks (``resources.num_learner_ranks`` / ``num_learner_gpus``; the process group is
set up by :mod:`rlfh.learner.group`) every rank builds one engine; DeepSpeed averages gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from families import Conditioning
from rlfh.learner.checkpoint import CheckpointIO
from rlfh.learner.optimization import NONFINITE_CAUSES, NonFiniteError, Optimization
from rlfh.learner.policy import PolicyWeights, lora_of
from rlfh.learner.run_config import deepspeed_config, needs_text_encoders
from rlfh.losses.gardo import ReferenceRefresh
from rlfh.losses.registry import OLD_POLICY, SAMPLER_LOGPROB, VAE_DECODER, loss_spec


class LearnerEngine:
    """A model family's denoiser (LoRA via peft, or full) inside a DeepSpeed engine, with its reference.

    Args:
        cfg: the full :class:`rlfh.config.schema.Config`; each part gets what it needs of it
            (``model``, ``learner``, ``seed``, and the rollout's step count for DDPO's sampler).
        device: torch device (``cuda`` when available, else ``cpu``).
        keep_vae: keep the pipeline's VAE (colocated mode samples with this engine's pipeline).
    """

    def __init__(self, cfg, device: str | None = None, keep_vae: bool = False):
        from families import PromptCache
        from rlfh.learner.distributed import join_learner_group
        from rlfh.losses import fairness

        self.cfg = cfg
        lc = cfg.learner
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = join_learner_group(cfg.learner_world_size)
        self._load_pipeline(cfg, keep_vae or VAE_DECODER in loss_spec(lc.loss).needs)
        self.keep_text_encoders = keep_vae or needs_text_encoders(cfg)
        # the batch's prompt embeddings (take_conditioning), and prompts encoded here; one round's worth
        self.prompts = PromptCache(self.family)
        self._build_parts()
        self.dtype = self.weights.dtype
        # Per-region gradients (MPD, MGDA) take torch.autograd.grad, which the engine's forward refuses;
        # the wrapped module keeps ZeRO <= 2's gradient hooks on the parameters.
        per_region = fairness.needs_region_gradients(lc.regions.fairness.rule, len(lc.regions.names))
        self.policy_model = self.denoiser if per_region else self.engine
        self.global_step = 0  # optimizer steps
        self.policy_version = 0  # rounds trained: what the rollout actors' samples are tagged with
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        # GARDO's adaptive reference: the policy becomes the reference when the rule says (rlfh/losses/gardo.py)
        g = cfg.gardo
        self.refresh = ReferenceRefresh(g.refresh_kl, g.refresh_rounds) if g.refreshes else None

    def _load_pipeline(self, cfg, keep_vae: bool) -> None:
        """The family's pipeline (text encoders frozen), noise schedule and, for a log-prob loss, sampler."""
        from families import family_of, load_pipeline

        pipe = load_pipeline(cfg.model, self.device)
        self.family = family = family_of(pipe)
        self.vae = pipe.vae if keep_vae else None
        if not keep_vae:
            pipe.vae = None  # the learner trains on latents
        self.pipe = pipe
        self.vae_scale = family.latent_factor
        self.schedule = family.noise_schedule(pipe.scheduler.config)
        self.stochastic = None
        if SAMPLER_LOGPROB in loss_spec(cfg.learner.loss).needs:
            self.stochastic = family.stochastic_scheduler(pipe.scheduler.config)  # what the rollout actors sample with
            r = cfg.rollout
            family.set_timesteps(self.stochastic, r.num_inference_steps, r.height, r.width, self.device)
        for name in family.text_encoders:
            if getattr(pipe, name, None) is not None:  # an optional encoder may be absent (SD3 without T5)
                getattr(pipe, name).requires_grad_(False)

    def _build_parts(self) -> None:
        """The policy's weights, their DeepSpeed optimization, and the checkpoint I/O over both."""
        cfg, lc, family, pipe = self.cfg, self.cfg.learner, self.family, self.pipe
        self.weights = PolicyWeights(
            family.model(pipe),
            lora_of(cfg.model.lora, family),
            cfg.model.hcp,
            pipe.tokenizer,
            cfg.seed,
            lc.engine.gradient_checkpointing,
        )
        self.optimization = Optimization(
            self.weights.denoiser, self.weights.trainable, lc, deepspeed_config(cfg), self.world_size, self.device
        )
        # round_ramp never steps the EMA per optimizer step: its ceiling is only the recorded nominal decay
        ema_decay = lc.ema.decay if lc.ema.schedule == "step" else lc.ema.ramp_max
        self.weights.wrapped(self.optimization.engine.module, ema_decay, lc.engine.compile)
        self.checkpoints = CheckpointIO(
            family,
            self.weights,
            self.optimization,
            self.rank,
            self.world_size,
            lc.reference.model == "ema" or cfg.gardo.refreshes,
            self.device,
        )

    # ------------------------------------------------------------------ the parts' state, by its old names
    denoiser = property(lambda self: self.weights.denoiser)
    ref_denoiser = property(lambda self: self.weights.ref_denoiser)
    hcp = property(lambda self: self.weights.hcp)
    ema = property(lambda self: self.weights.ema)
    lora_layers = property(lambda self: self.weights.lora_layers)
    num_trainable = property(lambda self: self.weights.num_trainable)
    trainable_names = property(lambda self: self.weights.trainable_names)
    old_weights = property(lambda self: self.weights.old_weights)
    reference_weights = property(lambda self: self.weights.reference_weights)
    engine = property(lambda self: self.optimization.engine)
    optimizer = property(lambda self: self.optimization.optimizer)

    @property
    def skip_allreduce(self) -> bool:
        return self.optimization.skip_allreduce

    @skip_allreduce.setter
    def skip_allreduce(self, value: bool) -> None:
        self.optimization.skip_allreduce = value

    def trainable_parameters(self) -> list[torch.Tensor]:
        return self.weights.trainable

    # ------------------------------------------------------------------ conditioning
    @property
    def has_text_encoders(self) -> bool:
        return self.family.has_text_encoders(self.pipe)

    @property
    def conditioning(self) -> dict:
        """The prompt rows this engine holds, {prompt: the family's per-prompt rows}."""
        return self.prompts.rows_of

    @conditioning.setter
    def conditioning(self, table: dict | None) -> None:
        """Start over from a batch's ``{prompt: per-prompt arrays}`` (what the rollout actors
        conditioned on; None or empty: nothing)."""
        self.prompts.clear()
        for prompt, rows in (table or {}).items():
            self.prompts.put(prompt, tuple(torch.tensor(np.asarray(r), device=self.device) for r in rows))

    def take_conditioning(self, table: dict | None, prompts) -> None:
        """Use a batch's ``{prompt: per-prompt rows}`` (what the rollout actors
        conditioned on) for :meth:`condition` while training on it. When it covers every prompt of
        the batch and nothing else in this run encodes (:func:`needs_text_encoders`), the text
        encoders are dropped: the learner then holds none (on SDXL 0.8 B parameters, 1.6 GB in bf16)."""
        self.conditioning = table
        if table and not self.keep_text_encoders and self.has_text_encoders and all(p in table for p in prompts):
            self.family.drop_text_encoders(self.pipe)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def condition(self, prompts: list[str], height: int, width: int, negative_prompt: str | None = None):
        """The family's conditioning (for SDXL: prompt embeddings, pooled embeddings and time ids) in the
        UNet's dtype, as ``(enc, added)``; with ``negative_prompt``, the negative rows come first
        (classifier-free guidance).

        Prompt embeddings come from the batch's conditioning (:meth:`take_conditioning`) where it
        has them, else from the text encoders, each prompt once per round (:class:`families.PromptCache`).
        Equal either way: the rollout actors encode with the same frozen encoders
        (tests/rlfh/test_learner_fast.py)."""
        wanted = list(prompts) + ([negative_prompt] if negative_prompt is not None else [])
        missing = self.prompts.missing(wanted)
        if missing and not self.has_text_encoders:
            raise RuntimeError(
                f"the learner dropped its text encoders (the rollouts send the prompt embeddings) "
                f"but has none for {sorted(missing)[:3]}: pass the batch's conditioning"
            )
        cond = self.prompts.conditioning(self.pipe, prompts, height, width, self.device, negative_prompt)
        # a guidance-distilled model (FLUX.1-dev) predicts at the scale the rollouts sample with
        return self.family.with_guidance_input(self.pipe, cond, self.cfg.rollout.guidance_scale).to(self.dtype)

    # ------------------------------------------------------------------ the noise schedule
    def draw_noise(self, count: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """t (the schedule's training timesteps: U{0..T-1} for DDPM) and eps ~ N(0, I) for ``count`` items,
        from the engine's generator."""
        t = self.schedule.draw_timesteps(count, self.generator)
        return t, torch.randn((count, *shape), generator=self.generator)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps in the UNet's dtype, t on the device, and the
        training target (eps, or v for v-prediction models)."""
        t, eps = t.to(self.device), eps.to(self.device)
        x_t = self.schedule.add_noise(x0, eps, t)
        return x_t.to(self.dtype), t, self.schedule.target(x0, eps, t)

    def prediction_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the denoiser should output at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eps, or v)."""
        return self.schedule.target(x0, eps, t)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t (float32, on the device) of the training noise schedule at timesteps ``t``."""
        return self.schedule.alpha_bar(t, self.device)

    def x0_scale(self, t: torch.Tensor) -> torch.Tensor:
        """k_t per sample (B,): x0_hat - x0 = -k_t (pred - target) (:meth:`families.schedule.DDPMSchedule.x0_scale`)."""
        return self.schedule.x0_scale(t, self.device)

    def ghuber(self, t: torch.Tensor):
        """AWM's generalised-Huber inputs at timesteps t (:class:`rlfh.losses.awm.GHuber`): q, k_t and the flow
        time sigma_t (DDPM: b / (a + b) of x_t / (a + b), a = sqrt(abar_t), b = sqrt(1 - abar_t))."""
        from rlfh.losses.awm import GHuber

        return GHuber(self.cfg.learner.awm.ghuber_power, self.x0_scale(t), self.schedule.flow_time(t, self.device))

    # ------------------------------------------------------------------ model calls
    def policy(self, x_t, t, enc, added) -> torch.Tensor:
        """The trained UNet's prediction (with gradients)."""
        return self.family.predict(self.policy_model, x_t, t, Conditioning(enc, added))

    @torch.no_grad()
    def reference(self, x_t, t, enc, added) -> torch.Tensor:
        """The reference's prediction (:meth:`reference_denoiser`)."""
        return self.family.predict(self.reference_denoiser(), x_t, t, Conditioning(enc, added))

    def reference_denoiser(self):
        """The reference as a UNet-like callable (:meth:`rlfh.learner.policy.PolicyWeights.reference_denoiser`)."""
        return self.weights.reference_denoiser()

    def adapters_off(self):
        """The UNet without its LoRA adapter (:meth:`rlfh.learner.policy.PolicyWeights.adapters_off`)."""
        return self.weights.adapters_off()

    @torch.no_grad()
    def predict_with(self, weights: list[torch.Tensor], x_t, t, enc, added) -> torch.Tensor:
        """The UNet's prediction with its trainable weights replaced by ``weights`` (same order) for this
        call only. ``torch.func.functional_call`` leaves the parameters untouched, so a policy forward
        already taken keeps its autograd graph (an in-place swap would invalidate it)."""
        return self.family.predict(self.denoiser_with(weights), x_t, t, Conditioning(enc, added))

    def denoiser_with(self, weights: list[torch.Tensor]):
        """The UNet as a callable whose trainable weights are ``weights`` (for guided predictions and the like)."""
        return self.weights.denoiser_with(weights)

    def guided(self, model, x, t: int, cond, guidance_scale: float) -> torch.Tensor:
        """``model``'s prediction on x (in the UNet's dtype) under guidance, with the rollout sampler's
        scheduler (:meth:`families.base.ModelFamily.guided_prediction`; DDPO's recorded steps)."""
        return self.family.guided_prediction(
            model, self.stochastic, x.to(self.dtype), t, Conditioning(*cond), guidance_scale
        )

    def step_logprob(self, prediction, t: int, x, x_next, eta: float):
        """The sampler's step from x with ``prediction`` scored at the recorded x_next (DDPO)."""
        return self.family.step_with_logprob(self.stochastic, prediction.float(), t, x, eta=eta, prev_sample=x_next)

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
            self.weights.keep_sampled(lc.ema.sampling_policy == "ema")
        if lc.reference.model == "ema" and (
            self.reference_weights is None or self.policy_version % lc.reference.refresh_rounds == 0
        ):
            self.weights.refresh_reference()
        if self.refresh is not None and self.refresh.take():
            self.weights.reference_from_policy()

    # ------------------------------------------------------------------ updates
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss and take DeepSpeed's micro-step (it steps the
        optimizer at the accumulation boundary). A non-finite loss stops here, before any gradient."""
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(
                f"non-finite loss {float(loss.detach())} at optimizer step {self.global_step} "
                f"(policy version {self.policy_version}); nothing was applied. Likely cause: "
                f"{NONFINITE_CAUSES}"
            )
        self.optimization.backward_and_step(loss)

    def finish_optimizer_step(self) -> None:
        """After the last micro-batch of an optimizer step: count it, check the weights, update the EMA."""
        self.global_step += 1
        if not self.weights_finite():
            raise NonFiniteError(
                f"non-finite weights after optimizer step {self.global_step} (policy version "
                f"{self.policy_version}): a gradient was NaN/inf. Likely cause: {NONFINITE_CAUSES}"
            )
        if self.cfg.learner.ema.schedule == "step":
            self.weights.step_ema()

    def end_round(self, metrics: dict | None = None) -> None:
        """After a round's training: with ``learner.ema.schedule=round_ramp`` the EMA moves once, by the ramp's
        decay at the current optimizer step (DiffusionNFT's once-per-epoch update of its sampling policy); GARDO's
        refresh rule reads the round's mean KL (``gardo/kl`` of ``metrics``) and adds its count to them."""
        if self.refresh is not None and metrics is not None:
            self.refresh.observe(metrics.get("gardo/kl"))
            metrics["gardo/reference_refreshes"] = float(self.refresh.count)
            metrics["gardo/refresh_due"] = float(self.refresh.pending)
        ema = self.cfg.learner.ema
        if ema.schedule == "round_ramp":
            with self.gathered(self.weights.trainable):
                self.weights.blend_ema(ema.round_decay(self.global_step))

    def weights_finite(self) -> bool:
        """Whether this rank's trainable weights are all finite (under ZeRO-3, its partition)."""
        return self.weights.weights_finite()

    # ------------------------------------------------------------------ the policy's weights
    def gathered(self, params):
        """A context in which ``params`` hold their whole values (ZeRO-3 gathers; collective)."""
        return self.optimization.gathered(params)

    def lora_state_dict(self, weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA weights as a peft state dict on CPU (what rollout actors load): the trained ones,
        or ``weights`` in the order of the trainable parameters (e.g. their EMA)."""
        return self.weights.lora_state_dict(weights)

    def sampling_weights(self) -> list[torch.Tensor] | None:
        """The trainable weights the rollout actors sample with, when they are not the trained ones:
        with ``learner.ema.sampling_policy=ema``, the EMA; else None."""
        return self.weights.sampling_weights(self.cfg.learner.ema.sampling_policy == "ema")

    def policy_weight_buckets(self, bucket_bytes: int):
        """What rollout actors need to sample from the current policy, in buckets of at most
        ``bucket_bytes`` (CPU tensors): the LoRA weights (usually one bucket), or every UNet weight
        for full fine-tuning (``rlfh.learner.weight_sync``). Under ZeRO-3 every rank must iterate it."""
        from rlfh.learner.weight_sync import iter_state_buckets

        if self.ref_denoiser is None:
            with self.gathered(self.trainable_parameters()):
                state = self.lora_state_dict(self.sampling_weights())
            return iter_state_buckets(state, bucket_bytes)
        return iter_state_buckets(self.denoiser.state_dict(keep_vars=True), bucket_bytes, self.gathered)

    @torch.no_grad()
    def denoiser_output(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """The policy's eps prediction for one input (sync checks: the rollout actor must agree exactly, so
        the prompt is encoded as ``Sampler.denoiser_output`` encodes it while the encoders are here)."""
        f, h, w = self.family, x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
        if self.has_text_encoders:
            cond = f.conditioning(f.encode_prompts(self.pipe, [prompt] * x.shape[0], self.device), h, w).to(self.dtype)
        else:
            cond = self.condition([prompt] * x.shape[0], h, w)
        return f.predict(self.denoiser, x.to(self.device, self.dtype), t, cond).float().cpu()

    # ------------------------------------------------------------------ checkpoints (every rank calls these)
    def save_checkpoint(self, directory: str | Path, extra_state: dict | None = None) -> Path:
        """Write ``directory`` atomically (:class:`rlfh.learner.checkpoint.CheckpointIO`): the LoRA in
        diffusers' format (``load_lora_weights(directory)`` works on it) or the UNet folder, the HcP
        layer beside it, DeepSpeed's engine state, the EMA and its reference, the trainer state.
        Non-finite weights are never written."""
        if not self.weights_finite():
            raise NonFiniteError(f"refusing to write {directory}: the weights are not finite")
        state = {
            "global_step": self.global_step,
            "policy_version": self.policy_version,
            "generator_state": self.generator.get_state().tolist(),
            "learner_ranks": self.world_size,
            **({"gardo_refresh": self.refresh.state()} if self.refresh is not None else {}),
            **(extra_state or {}),
        }
        return self.checkpoints.save(directory, state)

    def load_checkpoint(self, directory: str | Path) -> dict:
        """Restore engine, optimizer, step counters, RNG, the EMA and the EMA reference of the last refresh, GARDO's
        refresh counters, from :meth:`save_checkpoint` output."""
        state = self.checkpoints.load(directory)
        self.global_step = state["global_step"]
        self.policy_version = state["policy_version"]
        self.generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
        if self.refresh is not None and "gardo_refresh" in state:  # GARDO's refresh rule counts on where it was
            self.refresh.load(state["gardo_refresh"])
        return state
