"""The learner: an SDXL UNet with a LoRA adapter (or fully trainable) inside a DeepSpeed engine.

One call of :meth:`DPOLearner.train_on_pairs` (DPO family) or :meth:`DPOLearner.train_on_samples`
(RWR / filtered) runs ``epochs`` passes in optimizer steps of ``learner.train_batch_size`` items
(micro-batches of ``micro_batch_size_per_gpu``; DeepSpeed accumulates and clips). A DPO micro-batch:

    x_0^w, x_0^l (B, 4, h, w)   final latents of winner / loser, UNet space
    t ~ U{0..T-1}, eps ~ N(0, I)       shared by w and l
    x_t^* = sqrt(abar_t) x_0^* + sqrt(1 - abar_t) eps
    eps_theta, eps_ref = UNet(x_t^*, t, c) with / without the LoRA adapter
    L_r = DPO loss on region r's errors, for r in learner.regions   (rlfh/losses/objectives.py)
    d   = sum_r c_r grad L_r, c from the fairness rule               (rlfh/losses/fairness.py; MPD by default)

The combined update is taken by back-propagating sum_r c_r L_r through the engine, so ZeRO
partitioning, accumulation and clipping stay DeepSpeed's. MPD and MGDA need the per-region
gradients first (one extra backward per region, ``torch.autograd.grad``); they are applied per
micro-batch, so with gradient accumulation the step is the mean of per-micro-batch MPD updates.
Metrics come back as a flat dict of floats with slash names (``loss/dpo``, ``mpd/weight/face``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlfh.losses.objectives import pairwise_objectives, weighted_objectives


def _tensor(a: np.ndarray, idx: list[int], device) -> torch.Tensor:
    return torch.from_numpy(np.array(a[idx], dtype=np.float32)).to(device)  # copies: Ray hands read-only arrays


def ddpo_train_steps(cfg) -> int:
    """Denoising steps of each trajectory trained per epoch (DDPO's timestep fraction)."""
    return max(1, math.ceil(cfg.learner.ddpo_timestep_fraction * cfg.rollout.num_inference_steps))


def deepspeed_config(cfg) -> dict:
    lc = cfg.learner
    # DDPO accumulates over the trained timesteps of each micro-batch too (one backward per step)
    per_item = ddpo_train_steps(cfg) if lc.loss == "ddpo" else 1
    gas = cfg.gradient_accumulation_steps * per_item
    zero: dict = {"stage": lc.zero_stage}
    if lc.zero_stage == 3:
        # ZeRO-3's memory-efficient linear computes x @ W^T + b in another order than torch's linear:
        # the policy would differ from the rollout actors' copy in the last bits (sync check, DDPO ratios)
        zero["memory_efficient_linear"] = False
    if lc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if lc.offload_params:
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
    if lc.offload_optimizer:
        # ZeRO-Offload steps the optimizer on CPU with DeepSpeed's own CPUAdam (built on first use)
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": lc.lr, "betas": list(lc.adam_betas),
                                                       "weight_decay": lc.weight_decay}}
    return ds


class DPOLearner:
    """Diffusion-DPO on an SDXL UNet, LoRA via peft, optimised inside a DeepSpeed engine.

    Args:
        cfg: the full :class:`rlfh.config.schema.Config` (reads ``model``, ``learner``, ``seed``).
        device: torch device for the learner (``cuda`` when available, else ``cpu``).
        keep_vae: keep the pipeline's VAE (colocated mode samples with this learner's pipeline).

    With several ranks (``resources.num_learner_ranks`` / ``num_learner_gpus``; the process group is
    set up by ``rlfh.learner.group``) every rank holds the full batch and trains on its share of
    each optimizer step; DeepSpeed averages the gradients.
    """

    def __init__(self, cfg, device: str | None = None, keep_vae: bool = False):
        import deepspeed
        from diffusers import DDPMScheduler

        import torch.distributed as dist

        from rlfh.learner.distributed import init_distributed
        from rollouts.models import load_pipeline

        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != cfg.learner_world_size:
            raise RuntimeError(f"the process group has {self.world_size} ranks but the config asks for "
                               f"{cfg.learner_world_size} learner ranks (resources.num_learner_ranks / num_learner_gpus)")
        pipe = load_pipeline(cfg.model, self.device)
        if not keep_vae:
            pipe.vae = None  # the learner trains on latents; free the VAE
        self.pipe = pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if cfg.learner.loss == "ddpo":
            from rollouts.sampler import ddim_scheduler

            self.ddim = ddim_scheduler(pipe.scheduler.config)  # what the rollout actors sample with
            self.ddim.set_timesteps(cfg.rollout.num_inference_steps, device=self.device)
        self.vae_scale = 8
        if keep_vae:
            self.vae = pipe.vae
        unet = pipe.unet
        unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder_2.requires_grad_(False)
        lora = cfg.learner.lora
        self.ref_unet = None
        if lora.enabled:
            from peft import LoraConfig

            torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn from the global RNG: make runs repeatable
            unet.add_adapter(
                LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian", target_modules=list(lora.target_modules))
            )
        else:
            # full fine-tuning: the reference is a frozen copy (LoRA avoids this second UNet)
            self.ref_unet = copy.deepcopy(unet).eval()
            unet.requires_grad_(True)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32; DeepSpeed bf16 keeps its own copy
        if cfg.learner.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: check learner.lora.target_modules against the UNet's module names")
        self.num_trainable = sum(p.numel() for p in params)
        optimizer = None
        if not cfg.learner.offload_optimizer:
            optimizer = torch.optim.AdamW(
                params, lr=cfg.learner.lr, betas=tuple(cfg.learner.adam_betas), weight_decay=cfg.learner.weight_decay
            )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=unet, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg)
        )
        self.ema = None
        if cfg.learner.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=cfg.learner.ema_decay)
        self.unet = self.engine.module
        self.global_step = 0  # optimizer steps
        self.policy_version = 0
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)

    # ------------------------------------------------------------------ conditioning
    def _condition(self, prompts: list[str], h: int, w: int):
        from rollouts.sampler import sdxl_conditioning

        return sdxl_conditioning(self.pipe, prompts, h, w, self.device)

    def _target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type {kind!r}")

    # ------------------------------------------------------------------ one micro-batch
    def _draw_noise(self, count: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ U{0..T-1} and eps ~ N(0, I) for ``count`` items, from the learner's generator."""
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (count,), generator=self.generator)
        return t, torch.randn((count, *shape), generator=self.generator)

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, prompts: list[str]):
        """x_t, the training target and the conditioning, in the UNet's dtype."""
        h, w = x0.shape[-2] * self.vae_scale, x0.shape[-1] * self.vae_scale
        enc, added = self._condition(prompts, h, w)
        t, eps = t.to(self.device), eps.to(self.device)
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        dtype = self.unet.dtype
        return x_t.to(dtype), t, self._target(x0, eps, t), enc.to(dtype), {k: v.to(dtype) for k, v in added.items()}

    def _pair_step(self, lat_w, lat_l, prompts, masks_w, masks_l, t, eps) -> dict[str, float]:
        b = lat_w.shape[0]
        # w and l in one batch of 2B with the same t and eps for both halves
        x_t, t2, target, enc, added = self._noised(torch.cat([lat_w, lat_l]), torch.cat([t, t]), torch.cat([eps, eps]),
                                                   prompts + prompts)
        pred = self._forward(x_t, t2, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        with torch.no_grad():
            ref = self._reference(x_t, t2, enc, added)
        lc = self.cfg.learner
        objectives, metrics = pairwise_objectives(
            lc.loss, lc.beta, pred[:b], pred[b:], ref[:b], ref[b:], target[:b], masks_w, masks_l,
            list(lc.regions), lc.region_scale,
        )
        return self._combine_and_step(objectives, metrics, pred)

    def _weighted_step(self, lat, prompts, weights, masks, t, eps) -> dict[str, float]:
        x_t, t, target, enc, added = self._noised(lat, t, eps, prompts)
        pred = self._forward(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        lc = self.cfg.learner
        objectives, metrics = weighted_objectives(lc.loss, pred, target, weights, masks, list(lc.regions), lc.region_scale)
        return self._combine_and_step(objectives, metrics, pred)

    @property
    def _forward(self):
        # Per-region gradients (torch.autograd.grad) are refused on outputs of the engine's forward,
        # so MPD / MGDA call the wrapped module; ZeRO <= 2 keeps its gradient hooks on the parameters.
        lc = self.cfg.learner
        return self.unet if len(lc.regions) > 1 and lc.fairness.rule in ("mpd", "mgda") else self.engine

    def _combine_and_step(self, objectives: dict[str, torch.Tensor], metrics: dict[str, float], pred) -> dict[str, float]:
        """Back-propagate sum_r c_r L_r through the engine; c from the fairness rule."""
        from rlfh.losses import fairness

        lc = self.cfg.learner
        names = list(objectives)
        if not names:
            loss = pred.sum() * 0.0  # keeps DeepSpeed's micro-step bookkeeping when nothing applies
            coefs = []
        elif len(lc.regions) == 1:
            loss, coefs = objectives[names[0]], [1.0]
        else:
            rule = lc.fairness.rule
            if rule == "sum":
                coefs = [float(lc.fairness.weights.get(n, 1.0)) for n in names]
            elif rule == "equal":
                coefs = [1.0 / len(names)] * len(names)
            else:
                params = [p for p in self.unet.parameters() if p.requires_grad]
                grads = fairness.objective_gradients([objectives[n] for n in names], params)
                gram = fairness.gram_matrix(grads)
                fw = fairness.combine_weights(gram, rule, alpha=lc.fairness.alpha)
                coefs = [float(c) for c in fw.coefficients]
                metrics.update({f"mpd/weight/{n}": float(w) for n, w in zip(names, fw.weights)})
                metrics["mpd/ridge"] = float(fw.ridge)
                metrics.update({f"mpd/grad_norm/{n}": math.sqrt(max(float(gram[i, i]), 0.0)) for i, n in enumerate(names)})
            loss = sum(c * objectives[n] for c, n in zip(coefs, names))
            metrics.update({f"mpd/coef/{n}": c for n, c in zip(names, coefs)})
        for region in lc.regions:
            metrics[f"regions/{region}/present"] = float(region in objectives)
        self.engine.backward(loss)
        self.engine.step()
        return metrics

    def _reference(self, x_t, t, enc, added) -> torch.Tensor:
        if self.ref_unet is not None:
            return self.ref_unet(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        self.unet.disable_adapters()
        try:
            return self.unet(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        finally:
            self.unet.enable_adapters()

    # ------------------------------------------------------------------ public API
    def _masks(self, masks: dict[str, np.ndarray], idx: list[int]) -> dict[str, torch.Tensor]:
        return {r: _tensor(m, idx, self.device) for r, m in masks.items()}

    def _run(self, n: int, epochs: int, draw, micro) -> dict[str, float]:
        """``epochs`` shuffled passes over n items in optimizer steps; a remainder < one step is dropped.

        Every rank walks the same shuffled order and draws the same randomness for a whole optimizer
        step (``draw(bs)``: noise per item, or DDPO's timesteps), then trains on its own share of the
        step's items. W ranks with micro-batch m thus take the same update as one rank accumulating
        W micro-batches of m, and the draws do not depend on the number of ranks.
        """
        bs, mb = self.cfg.learner.train_batch_size, self.cfg.learner.micro_batch_size_per_gpu
        share = bs // self.world_size
        n_use = (n // bs) * bs
        if n_use == 0:
            return {"learner/steps": float(self.global_step), "learner/items": float(n), "learner/skipped": 1.0}
        self.engine.train()
        history: list[dict[str, float]] = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.generator)[:n_use].tolist()
            for step_start in range(0, n_use, bs):
                draws = draw(bs)
                lo = self.rank * share
                for start in range(lo, lo + share, mb):
                    history.append(micro(order[step_start + start : step_start + start + mb], draws, slice(start, start + mb)))
                if self.ema is not None:  # an optimizer step just happened
                    self.ema.step([p for p in self.unet.parameters() if p.requires_grad])
            self.global_step += n_use // bs
        keys = sorted({k for h in history for k in h})
        # region metrics average over the micro-batches where the region was present
        metrics = {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}
        metrics.update({"learner/steps": float(self.global_step), "learner/items": float(n),
                        "learner/lr": float(self.optimizer.param_groups[0]["lr"])})
        self.policy_version += 1
        return metrics

    def train(self, batch, epochs: int = 1) -> dict[str, float]:
        """One round's training on what ``rlfh.data.pairs.learner_batch`` built: pairs (DPO family),
        trajectories (DDPO) or weighted samples (RWR / filtered)."""
        if isinstance(batch, PairBatch):
            return self.train_on_pairs(batch, epochs)
        if isinstance(batch, TrajectoryBatch):
            return self.train_on_trajectories(batch, epochs)
        return self.train_on_samples(batch, epochs)

    def train_on_pairs(self, pairs: PairBatch, epochs: int = 1) -> dict[str, float]:
        """DPO-family training on preference pairs; returns averaged metrics."""
        if not self.cfg.learner.loss.startswith("dpo"):
            raise ValueError(f"learner.loss={self.cfg.learner.loss} trains on weighted samples, not pairs")
        dev = self.device
        return self._run(len(pairs), epochs, lambda k: self._draw_noise(k, pairs.latents_w.shape[1:]),
                         lambda idx, d, sl: self._pair_step(
            _tensor(pairs.latents_w, idx, dev), _tensor(pairs.latents_l, idx, dev), [pairs.prompts[i] for i in idx],
            self._masks(pairs.masks_w, idx), self._masks(pairs.masks_l, idx), d[0][sl], d[1][sl]))

    def train_on_trajectories(self, tb: TrajectoryBatch, epochs: int = 1) -> dict[str, float]:
        """DDPO: clipped-ratio policy gradient over recorded trajectories (``rlfh.learner.ddpo_step``)."""
        from rlfh.learner.ddpo_step import train_on_trajectories

        return train_on_trajectories(self, tb, epochs)

    def train_on_samples(self, samples: SampleBatch, epochs: int = 1) -> dict[str, float]:
        """RWR / filtered training on weighted samples; returns averaged metrics."""
        if self.cfg.learner.loss.startswith("dpo"):
            raise ValueError(f"learner.loss={self.cfg.learner.loss} trains on pairs, not weighted samples")
        dev = self.device
        return self._run(len(samples), epochs, lambda k: self._draw_noise(k, samples.latents.shape[1:]),
                         lambda idx, d, sl: self._weighted_step(
            _tensor(samples.latents, idx, dev), [samples.prompts[i] for i in idx],
            _tensor(samples.weights, idx, dev), self._masks(samples.masks, idx), d[0][sl], d[1][sl]))

    def _gathered(self, params):
        """A context in which ``params`` hold their whole values: ZeRO-3 keeps only each rank's
        slice and gathers them here (collective: every rank enters); other stages need nothing."""
        if self.cfg.learner.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def policy_weight_buckets(self, bucket_bytes: int):
        """What rollout actors need to sample from the current policy, in buckets of at most
        ``bucket_bytes`` (CPU tensors): the LoRA weights (usually one bucket), or every UNet weight
        for full fine-tuning (``rlfh.learner.weight_sync``). Under ZeRO-3 every rank must iterate it."""
        from rlfh.learner.weight_sync import iter_state_buckets

        if self.ref_unet is None:
            with self._gathered([p for p in self.unet.parameters() if p.requires_grad]):
                state = self.lora_state_dict()
            return iter_state_buckets(state, bucket_bytes)
        return iter_state_buckets(self.unet.state_dict(keep_vars=True), bucket_bytes, self._gathered)

    @torch.no_grad()
    def unet_output(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """The policy's eps prediction for one input (sync checks: the rollout actor must agree exactly)."""
        h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
        enc, added = self._condition([prompt] * x.shape[0], h, w)
        return self.unet(x.to(self.device, self.unet.dtype), t, encoder_hidden_states=enc,
                         added_cond_kwargs=added).sample.float().cpu()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained LoRA weights as a peft state dict on CPU (what rollout actors load)."""
        from peft import get_peft_model_state_dict

        if self.ref_unet is not None:
            raise RuntimeError("full-UNet training has no LoRA state; sync full weights instead")
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(self.unet).items()}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path, extra_state: dict | None = None) -> Path:
        """Write ``directory`` atomically (every rank calls it); see :func:`rlfh.run.checkpoints.save_learner`."""
        from rlfh.run.checkpoints import save_learner

        return save_learner(self, Path(directory), extra_state or {})

    def load_checkpoint(self, directory: str | Path) -> dict:
        """Restore engine, optimizer, step counters and RNG (every rank calls it)."""
        from rlfh.run.checkpoints import load_learner

        return load_learner(self, Path(directory))
