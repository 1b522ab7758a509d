"""On-policy SDXL sampler: the denoising loop written out over a diffusers SDXL pipeline.

Same computation as ``StableDiffusionXLPipeline.__call__`` for the settings rlfh uses (CFG as one
batch, per-sample seeds, negative prompts, SDXL micro-conditioning ``add_time_ids``), returning the
final latents besides the images so the learner trains on exactly what was sampled. The loop is
ours, not the pipeline's, because later losses need its internals (per-step log-probs for DDPO).
The UNet carries the current LoRA adapter; :meth:`Sampler.load_lora` swaps its weights in place.

Notation: ``x_t`` latents (B, 4, h, w), ``eps`` noise prediction, ``w`` guidance scale.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from rollouts.models import sdxl_conditioning
from rollouts.types import RolloutBatch, SamplerSettings


def ddim_scheduler(config):
    """DDIM with the model's noise schedule: the stochastic (eta > 0) Gaussian steps DDPO scores.

    Pinned like SDXL's published scheduler config: no x0 clipping (latents are not in [-1, 1]) and
    set_alpha_to_one=False, so the last step keeps a non-zero variance and a log-prob.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)


def guided_eps(unet, scheduler, x, t, enc, pooled, time_ids, guidance_scale: float) -> torch.Tensor:
    """eps_hat for x (B, 4, h, w) with classifier-free guidance as one batch of 2B.

    ``enc``, ``pooled`` and ``time_ids`` stack (unconditional, conditional) when guided (w > 1):
    eps = eps_u + w (eps_c - eps_u). The learner's DDPO step calls this with the trained UNet.
    """
    guided = guidance_scale > 1.0
    x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
    eps = unet(x_in, t, encoder_hidden_states=enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    if guided:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
    return eps


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class Sampler:
    """Samples images and final latents from an SDXL pipeline.

    Args:
        pipe: a ``StableDiffusionXLPipeline`` (any UNet with ``text_time`` conditioning).
        model_id: recorded with every sample.
    """

    def __init__(self, pipe, model_id: str = "", scheduler: str = "default"):
        if scheduler == "ddim":
            pipe.scheduler = ddim_scheduler(pipe.scheduler.config)
        elif scheduler != "default":
            raise ValueError(f"unknown scheduler {scheduler!r}; use 'default' or 'ddim'")
        self.pipe = pipe
        self.model_id = model_id
        self.policy_version = 0

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str]) -> None:
        """Give the UNet the LoRA adapter the learner trains (one builder for both: ``add_lora``)."""
        from rollouts.models import add_lora

        add_lora(self.pipe.unet, rank, alpha, target_modules)

    def load_lora(self, state_dict: dict[str, torch.Tensor], policy_version: int) -> None:
        """Copy the learner's LoRA weights (peft state dict, no adapter name) into the UNet."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.pipe.unet, state_dict)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA weights do not match the rollout UNet: unexpected keys {unexpected[:5]}")
        self.policy_version = policy_version

    @torch.no_grad()
    def load_full(self, buckets: Iterable[dict[str, torch.Tensor]], policy_version: int) -> None:
        """Copy every UNet weight from the learner (full fine-tuning), bucket by bucket, in place.

        Until the last bucket is in, the UNet is a mix of two policies: the version reads -1 then,
        and the fleet refuses samples of a version older than the one it synced.
        """
        own = self.pipe.unet.state_dict()
        self.policy_version = -1
        seen: set[str] = set()
        for bucket in buckets:
            unknown = sorted(set(bucket) - set(own))
            if unknown:
                raise RuntimeError(f"UNet weights do not match the rollout UNet: unexpected keys {unknown[:5]}")
            for k, v in bucket.items():
                if v.shape != own[k].shape:
                    raise RuntimeError(f"UNet weight {k}: shape {tuple(v.shape)} from the learner, {tuple(own[k].shape)} here")
                own[k].copy_(v)
            seen.update(bucket)
        missing = sorted(set(own) - seen)
        if missing:
            raise RuntimeError(f"the learner's weights miss {len(missing)} UNet keys, e.g. {missing[:5]}")
        self.policy_version = policy_version

    @torch.no_grad()
    def unet_output(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """The policy's (unguided) eps prediction for one input, as the learner computes it."""
        pipe, dev = self.pipe, self.device
        enc, added = sdxl_conditioning(pipe, [prompt] * x.shape[0], x.shape[-2] * 8, x.shape[-1] * 8, dev)
        return pipe.unet(x.to(dev, pipe.unet.dtype), t, encoder_hidden_states=enc, added_cond_kwargs=added
                         ).sample.float().cpu()

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings,
               record: bool = False) -> RolloutBatch:
        """Sample one image per (prompt, seed).

        Args:
            record: keep the trajectory (x_T..x_0, the per-step log-probs of a DDIM eta > 0 sampler,
                the timesteps) for policy-gradient losses (DDPO).

        Returns:
            A :class:`RolloutBatch` with images uint8 (B, H, W, 3) and latents float32 (B, 4, H/8, W/8).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        pipe, dev = self.pipe, self.device
        b = len(prompts)
        cfg = settings.guidance_scale > 1.0
        gens = seeded_generators(seeds)
        pos, added = sdxl_conditioning(pipe, prompts, settings.height, settings.width, dev,
                                       settings.negative_prompt if cfg else None)
        pooled, time_ids = added["text_embeds"], added["time_ids"]

        scheduler = pipe.scheduler
        scheduler.set_timesteps(settings.num_inference_steps, device=dev)
        x = pipe.prepare_latents(
            b, pipe.unet.config.in_channels, settings.height, settings.width, pos.dtype, dev, gens
        )  # (B, 4, h, w), already scaled by init_noise_sigma
        step_kwargs = pipe.prepare_extra_step_kwargs(gens, settings.eta)
        if record and not (settings.eta > 0 and type(scheduler).__name__ == "DDIMScheduler"):
            raise ValueError("recording log-probs needs the DDIM scheduler with eta > 0 (rollout.scheduler=ddim)")
        xs, log_probs = [x], []
        for t in scheduler.timesteps:
            eps = guided_eps(pipe.unet, scheduler, x, t, pos, pooled, time_ids, settings.guidance_scale)
            if record:
                from rollouts.ddim_logprob import scheduler_step_with_logprob

                # the same per-sample noise draws as DDIMScheduler.step with these generators
                z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in gens]).to(dev)
                out = scheduler_step_with_logprob(scheduler, eps, t, x, eta=settings.eta, noise=z)
                x = out.prev_sample
                xs.append(x)
                log_probs.append(out.log_prob)
            else:
                x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
        trajectory = None
        if record:
            trajectory = {
                "latents": torch.stack(xs, 1).float().cpu().numpy(),  # (B, T+1, 4, h, w)
                "log_probs": torch.stack(log_probs, 1).float().cpu().numpy(),  # (B, T)
                "timesteps": scheduler.timesteps.cpu().numpy().astype(np.int64),  # (T,)
            }
        return RolloutBatch(
            images=self.decode(x),
            latents=x.float().cpu().numpy(),
            prompts=list(prompts),
            seeds=[int(s) for s in seeds],
            settings=settings,
            policy_version=self.policy_version,
            model_id=self.model_id,
            trajectory=trajectory,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """UNet-space latents (B, 4, h, w) -> uint8 images (B, H, W, 3)."""
        vae = self.pipe.vae
        # fp16 SDXL VAEs overflow; diffusers upcasts them the same way.
        orig = vae.dtype
        dtype = torch.float32 if orig == torch.float16 and vae.config.force_upcast else orig
        if dtype != orig:
            vae.to(dtype)
        img = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if dtype != orig:
            vae.to(orig)
        img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (img * 255).round().astype(np.uint8)
