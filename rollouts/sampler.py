"""On-policy sampler: the denoising loop written out over a diffusers pipeline of a model family.

Same computation as the family's pipeline's ``__call__`` (``StableDiffusionXLPipeline``,
``StableDiffusionPipeline``) for the settings rlfh uses (CFG as one
batch, per-sample seeds, negative prompts, the family's conditioning: :mod:`families`), returning the
final latents besides the images so the learner trains on exactly what was sampled. The loop is
ours, not the pipeline's, because later losses need its internals (per-step log-probs for DDPO).
The policy's LoRA is merged into the UNet's weights (:class:`MergedLora`, rebuilt from a kept copy of
the base weights at every :meth:`Sampler.load_lora`), so sampling costs what the bare UNet costs; the
prompt embeddings are computed once per prompt and policy version, not once per batch.

Notation: ``x_t`` latents (B, 4, h, w), ``eps`` noise prediction, ``w`` guidance scale.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from families import PromptCache, add_lora, family_of, first_of_each, with_negative
from families.base import Conditioning
from rollouts.guidance import ScoreGuidance
from rollouts.types import RolloutBatch, SamplerSettings, SDEWindow


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class MergedLora:
    """The policy's LoRA merged into the UNet's weights: ``W = W_base + (alpha / r) B A`` per targeted layer.

    An unmerged peft adapter adds two small matmuls (and their launches) to every targeted layer on
    every denoising step: 15-20% of the tiny model's sampling time on CPU (bench/NOTES.md). Merged, a
    step costs what the bare UNet costs. ``W_base`` of the targeted layers is kept, and every
    :meth:`load` rebuilds ``W`` from it rather than unmerging the previous delta, so rounding does
    not accumulate over hundreds of syncs: the weights after any number of loads are bit-identical to
    one merge of the last state. The copy holds only the targeted layers (attention projections by
    default): 20% of the tiny UNet's bytes (1.6 of 7.9 MB), 37% of SDXL's parameters (955 M: 1.78 GiB
    in bf16, on the UNet's device; ~2% of an 80 GB GPU beside the 5.1 GB UNet).

    Targeting follows peft's own rule (``check_target_module_exists``) so the keys are exactly those
    of the learner's adapter built by ``families.add_lora``; a state dict with other keys is
    refused. The merged product is formed in float32 and rounded once to the weights' dtype; the
    unmerged adapter instead adds ``s B (A x)`` to ``W x`` in the activations' dtype. The two agree
    within float32 rounding on CPU (tests/rollouts/test_sampler_fast.py); in bf16 the merged
    weight rounds ``s B A`` to bf16's 8 bits relative to ``W``, which the rollout bench measures.
    """

    def __init__(self, model, rank: int, alpha: float, target_modules: Sequence[str]):
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules))
        self.scale = alpha / rank  # peft's scaling without rslora
        self.modules: dict[str, torch.nn.Module] = {}
        self.base: dict[str, torch.Tensor] = {}
        for name, m in model.named_modules():
            if not name or not check_target_module_exists(config, name):
                continue
            if not (isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)):
                raise ValueError(
                    f"LoRA target {name} is a {type(m).__name__}; the merged LoRA supports Linear and Conv2d"
                )
            self.modules[name] = m
            self.base[name] = m.weight.detach().clone()
        if not self.modules:
            raise ValueError(f"no denoiser module matches the LoRA target_modules {list(target_modules)}")
        self.keys = {f"{n}.lora_{ab}.weight" for n in self.modules for ab in "AB"}

    @property
    def base_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.base.values())

    def delta(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``s B A`` in float32, shaped like the layer's weight (peft's ``get_delta_weight``)."""
        w = self.base[name]
        a = a.to(w.device, torch.float32)
        b = b.to(w.device, torch.float32)
        # Linear: A (r, in), B (out, r). Conv2d: A (r, in, kh, kw), B (out, r, 1, 1).
        return (b.flatten(1) @ a.flatten(1)).view(w.shape) * self.scale

    @torch.no_grad()
    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Set every targeted weight to ``W_base + s B A`` from ``state_dict`` (peft keys, no adapter name)."""
        unexpected, missing = sorted(set(state_dict) - self.keys), sorted(self.keys - set(state_dict))
        if unexpected or missing:
            raise RuntimeError(
                f"LoRA weights do not match the rollout UNet: unexpected keys {unexpected[:5]}, "
                f"missing keys {missing[:5]}"
            )
        for name, m in self.modules.items():
            d = self.delta(name, state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"])
            m.weight.copy_(self.base[name].float() + d)  # copy_ rounds once to the weight's dtype


class Sampler:
    """Samples images and final latents from a pipeline of a model family (:func:`families.family_of`).

    Prompt embeddings: the text encoders are frozen (only the UNet trains), so each prompt (and the
    negative prompt) is encoded once and its embeddings kept (:class:`families.PromptCache`); the
    cache is emptied whenever the policy version changes, which bounds it to the prompts of about one
    round (a prompt costs 77 x 2048 + 1280 floats on SDXL, ~0.3 MB in bf16) and keeps a colocated
    learner's encoders honest should they ever train.

    Args:
        pipe: a diffusers pipeline of a family :mod:`families` implements.
        model_id: recorded with every sample.
        compile: ``torch.compile`` the UNet and the VAE decoder in place (:meth:`compile`).
        cache_prompts: keep prompt embeddings across calls (False: encode every batch, as before).
    """

    def __init__(
        self, pipe, model_id: str = "", scheduler: str = "default", compile: bool = False, cache_prompts: bool = True
    ):
        self.family = family_of(pipe)
        pipe.scheduler = self.family.sampler_scheduler(pipe.scheduler, scheduler)
        self.pipe = pipe
        self.model_id = model_id
        self.policy_version = 0
        self.lora: MergedLora | None = None  # set by add_lora(merge=True)
        self.cache_prompts = cache_prompts
        self.prompt_cache = PromptCache(self.family, enabled=cache_prompts)  # prompt -> the family's rows
        self._numpy_cache: dict[str, tuple[np.ndarray, ...]] = {}  # the same as float32 arrays
        self._cache_version = self.policy_version
        if compile:
            self.compile()

    @property
    def denoiser(self):
        """The pipeline's denoiser (the family's: UNet or transformer)."""
        return self.family.model(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str] | None, merge: bool = True) -> None:
        """Prepare the UNet for the learner's LoRA: merged into the weights (default; :class:`MergedLora`)
        or as an unmerged peft adapter (``merge=False``; one builder with the learner: ``families.add_lora``).
        Either way the policy is the base model until the first :meth:`load_lora`. ``target_modules`` None:
        the family's (``model.lora.target_modules`` unset)."""
        target_modules = list(target_modules or self.family.lora_targets)
        if merge:
            self.lora = MergedLora(self.denoiser, rank, alpha, target_modules)
            return
        add_lora(self.denoiser, rank, alpha, target_modules)

    def load_lora(self, state_dict: dict[str, torch.Tensor], policy_version: int) -> None:
        """Take the learner's LoRA weights (peft state dict, no adapter name): merged into the UNet's
        weights from the kept base copy, or copied into the peft adapter."""
        if self.lora is not None:
            self.lora.load(state_dict)
            self.policy_version = policy_version
            return
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.denoiser, state_dict)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA weights do not match the rollout UNet: unexpected keys {unexpected[:5]}")
        self.policy_version = policy_version

    def compile(self) -> None:
        """``torch.compile`` the UNet and the VAE decoder, in place (``Module.compile``: parameter names,
        ``state_dict`` keys and in-place weight loads stay as they are; the compiled graphs read the
        parameters as inputs, so a merged LoRA loaded later is used without recompiling).

        On CUDA the mode is ``reduce-overhead`` (CUDA graphs): within a round the shapes are static
        (batch, resolution and steps fixed), so each shape is captured once and replayed; a last,
        smaller batch compiles and captures its own graph. On CPU the default mode (no graphs).
        Images equal eager ones within 1 uint8 level (tests/rollouts/test_sampler_fast.py).
        """
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.denoiser.compile(mode=mode, dynamic=False)
        self.pipe.vae.decoder.compile(mode=mode, dynamic=False)

    def prompt_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """The family's per-prompt rows (SDXL: prompt_embeds (B, 77, D), pooled (B, P); SD1.5: prompt_embeds
        (B, 77, D)) for ``prompts``, each distinct prompt encoded once per policy version (see the class
        docstring)."""
        if self._cache_version != self.policy_version:
            self.prompt_cache.clear()
            self._numpy_cache.clear()
            self._cache_version = self.policy_version
        return self.prompt_cache.rows(self.pipe, prompts, self.device)

    def conditioning(
        self, prompts: Sequence[str], height: int, width: int, negative_prompt: str | None = None
    ) -> tuple[Conditioning, dict]:
        """The family's conditioning (negative rows first when guided) from the prompt cache, and the
        batch's per-prompt rows as float32 arrays, {prompt: (field (77, D), ...)}."""
        rows = self.prompt_embeddings(prompts)
        # one device-to-host copy per prompt and policy version; read-only, as the cache shares them
        numpy_cache = self._numpy_cache if self.cache_prompts else {}
        for i, p in enumerate(prompts):
            if p not in numpy_cache:
                numpy_cache[p] = tuple(f[i].float().cpu().numpy() for f in rows)
                for a in numpy_cache[p]:
                    a.setflags(write=False)
        arrays = {p: numpy_cache[p] for p in dict.fromkeys(prompts)}
        if negative_prompt is not None:
            rows = with_negative(rows, self.prompt_embeddings([negative_prompt]))
        return self.family.conditioning(rows, height, width), arrays

    @torch.no_grad()
    def load_full(self, buckets: Iterable[dict[str, torch.Tensor]], policy_version: int) -> None:
        """Copy every UNet weight from the learner (full fine-tuning), bucket by bucket, in place.

        Until the last bucket is in, the UNet is a mix of two policies: the version reads -1 then,
        and the fleet refuses samples of a version older than the one it synced.
        """
        if self.lora is not None:
            raise RuntimeError(
                "this sampler merges a LoRA into kept base weights; full weights would be overwritten "
                "at the next LoRA load (build it without add_lora for full fine-tuning)"
            )
        own = self.denoiser.state_dict()
        self.policy_version = -1
        seen: set[str] = set()
        for bucket in buckets:
            unknown = sorted(set(bucket) - set(own))
            if unknown:
                raise RuntimeError(f"UNet weights do not match the rollout UNet: unexpected keys {unknown[:5]}")
            for k, v in bucket.items():
                if v.shape != own[k].shape:
                    raise RuntimeError(
                        f"UNet weight {k}: shape {tuple(v.shape)} from the learner, {tuple(own[k].shape)} here"
                    )
                own[k].copy_(v)
            seen.update(bucket)
        missing = sorted(set(own) - seen)
        if missing:
            raise RuntimeError(f"the learner's weights miss {len(missing)} UNet keys, e.g. {missing[:5]}")
        self.policy_version = policy_version

    @torch.no_grad()
    def denoiser_output(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """The policy's (unguided) eps prediction for one input, as the learner computes it (the prompt
        encoded afresh for every row, not from the cache)."""
        pipe, dev, f = self.pipe, self.device, self.family
        rows = f.encode_prompts(pipe, [prompt] * x.shape[0], dev)
        cond = f.conditioning(rows, x.shape[-2] * f.latent_factor, x.shape[-1] * f.latent_factor)
        return f.predict(self.denoiser, x.to(dev, self.denoiser.dtype), t, cond).float().cpu()

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplerSettings,
        record: bool | SDEWindow = False,
        branch_seeds: Sequence[int] | None = None,
        guidance: ScoreGuidance | None = None,
    ) -> RolloutBatch:
        """Sample one image per (prompt, seed).

        Args:
            record: keep the trajectory (x_T..x_0, the per-step log-probs of a DDIM eta > 0 sampler,
                the timesteps) for policy-gradient losses (DDPO). An :class:`SDEWindow` samples with
                eta > 0 only inside the window and with eta = 0 (deterministic DDIM) elsewhere, and
                keeps only the window: x_j..x_{j+W}, its W log-probs and timesteps, and j.
            branch_seeds: trajectory branching (needs an :class:`SDEWindow` ``record``; TempFlow-GRPO,
                arXiv 2508.04324): sample b starts from the x_T of seed ``branch_seeds[b]`` instead of
                its own, and the samples of one (prompt, branch seed) share the deterministic prefix
                x_T..x_j and the UNet's eps at x_j, computed once for them (a UNet batch of one row per
                distinct pair: j + 1 of the T steps); at the window each continues from x_j with its own noise, the
                draws its own seed's generator
                makes after x_T, exactly as the unbranched window sampler draws them, so a sample whose
                branch seed is its seed is the unbranched sample. ``None``: every sample its own x_T.
            guidance: a differentiable score guiding every step (FaceScore's sampling guidance,
                :mod:`rollouts.guidance`; epsilon-prediction models, not with ``record``).

        Returns:
            A :class:`RolloutBatch` with images uint8 (B, H, W, 3) and latents float32 (B, 4, H/8, W/8).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if branch_seeds is not None and not isinstance(record, SDEWindow):
            raise ValueError("branch_seeds share the deterministic prefix before an SDE window: pass record=SDEWindow")
        if branch_seeds is not None and len(branch_seeds) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds but {len(branch_seeds)} branch seeds")
        if guidance is not None and record:
            raise ValueError("score guidance changes the steps: a guided sample has no policy log-probs to record")
        pipe, dev = self.pipe, self.device
        b = len(prompts)
        cfg = settings.guidance_scale > 1.0
        negative = settings.negative_prompt if cfg else None
        gens = seeded_generators(seeds)
        cond, conditioning = self.conditioning(prompts, settings.height, settings.width, negative)
        pos = cond.embeds

        scheduler = pipe.scheduler
        self.family.set_timesteps(scheduler, settings.num_inference_steps, settings.height, settings.width, dev)
        # (B, 4, h, w), already scaled by init_noise_sigma; drawn even when branching, so that each
        # generator stands where the unbranched sampler's does when the window draws its noise
        x = self.family.initial_latents(pipe, b, settings.height, settings.width, pos.dtype, dev, gens)
        step_kwargs = self.family.step_kwargs(pipe, gens, settings.eta)
        if record:
            self.family.check_recordable(scheduler, settings.eta)
        n_steps = len(scheduler.timesteps)
        window = record if isinstance(record, SDEWindow) else SDEWindow(0, n_steps)
        if record:
            window.check(n_steps)
        rows = None  # branching: which prefix row (prompt, branch seed) each sample continues from
        if branch_seeds is not None:
            keys = list(zip(prompts, (int(s) for s in branch_seeds)))
            firsts, group = first_of_each(keys)
            heads = [keys[i] for i in firsts]  # the distinct (prompt, branch seed), in order of appearance
            rows = torch.tensor(group, device=dev)
            x = self.family.initial_latents(
                pipe,
                len(heads),
                settings.height,
                settings.width,
                pos.dtype,
                dev,
                seeded_generators([s for _, s in heads]),
            )
            prefix_cond, _ = self.conditioning([p for p, _ in heads], settings.height, settings.width, negative)
        xs, log_probs = [], []
        for i, t in enumerate(scheduler.timesteps):
            if rows is not None and i <= window.start:  # the shared prefix, and eps at x_j, the window's first input
                eps = self.family.guided_prediction(
                    self.denoiser, scheduler, x, t, prefix_cond, settings.guidance_scale
                )
                if i == window.start:
                    x, eps = x[rows], eps[rows]  # the branches: a copy of the group's x_j (and eps) per sample
            else:
                eps = self.family.guided_prediction(self.denoiser, scheduler, x, t, cond, settings.guidance_scale)
            if guidance is not None:
                eps = self.score_guided(guidance, x, t, eps)
            if record and window.start <= i < window.start + window.size:
                if i == window.start:
                    xs.append(x)  # x_j: where the window's first action starts
                # the same per-sample noise draws as DDIMScheduler.step with these generators
                z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in gens]).to(dev)
                out = self.family.step_with_logprob(scheduler, eps, t, x, eta=settings.eta, noise=z)
                x = out.prev_sample
                xs.append(x)
                log_probs.append(out.log_prob)
            elif record:
                # outside the SDE window: the deterministic step (DDIM eta = 0), not a policy action, not recorded
                x = self.family.deterministic_step(scheduler, eps, t, x)
            else:
                x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
        trajectory = None
        if record:
            trajectory = {
                "latents": torch.stack(xs, 1).float().cpu().numpy(),  # (B, W+1, 4, h, w)
                "log_probs": torch.stack(log_probs, 1).float().cpu().numpy(),  # (B, W)
                # (W,): int64 steps (DDPM), float32 1000 sigma (flow)
                "timesteps": scheduler.timesteps[window.start : window.start + window.size].cpu().numpy(),
                "window_start": np.int64(window.start),
            }
        return self.rollout_batch(x, prompts, seeds, settings, conditioning, trajectory)

    def score_guided(self, guidance: ScoreGuidance, x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """eps at the sampler's x_t with the score's guidance (:mod:`rollouts.guidance`, eqs. 5-6): the
        gradient taken at the variance-preserving latent the UNet reads (``scale_model_input``)."""
        scheduler = self.pipe.scheduler
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"score guidance needs an epsilon-prediction model; this scheduler predicts "
                f"{scheduler.config.prediction_type!r}"
            )
        z_t = scheduler.scale_model_input(x, t)
        abar = scheduler.alphas_cumprod[int(t)].item()
        return guidance.apply(z_t, eps, abar, self.decode_float).to(eps.dtype)

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space latents (B, 4, h, w) -> images (B, 3, H, W) float32 in [0, 1], differentiable."""
        vae = self.pipe.vae
        dtype = torch.float32 if vae.dtype == torch.float16 and vae.config.force_upcast else vae.dtype
        if dtype != vae.dtype:
            raise ValueError("score guidance through an fp16 VAE that needs upcasting: load the VAE in float32")
        img = vae.decode(self.family.decoder_input(vae, latents.to(dtype)), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def refine(
        self,
        latents,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplerSettings,
        strength: float,
        masks=None,
    ) -> RolloutBatch:
        """Re-noise final latents part-way and denoise them again with the policy (SDEdit, img2img);
        with ``masks``, only inside the masks (inpainting).

        ``strength`` s in (0, 1] picks where the schedule starts, as diffusers' img2img pipelines do:
        of ``settings.num_inference_steps`` = n steps, the last int(n s) run, from
        x_t0 = sqrt(abar_t0) x_0 + sqrt(1 - abar_t0) eps (the family's ``renoise``: (1 - sigma) x_0 + sigma eps
        on a flow model; eps from ``seeds``).
        With ``masks`` (B, 1, h, w) in [0, 1] at latent resolution, after every step the latents
        outside the mask are replaced by x_0 noised to the next step's t, and by x_0 itself after the
        last, as diffusers' SDXL inpainting pipeline does for a 4-channel UNet: the result equals
        x_0 wherever the mask is 0.

        Args:
            latents: (B, 4, h, w) UNet-space x_0 (a rollout's ``latents``, or an image's VAE latents
                times the scaling factor).

        Returns:
            A :class:`RolloutBatch` of the refined images and latents (no trajectory).
        """
        if len(prompts) != len(seeds) or len(prompts) != len(latents):
            raise ValueError(f"got {len(latents)} latents, {len(prompts)} prompts and {len(seeds)} seeds")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        pipe, dev = self.pipe, self.device
        n = settings.num_inference_steps
        n_run = min(int(n * float(strength)), n)
        if n_run < 1:
            raise ValueError(
                f"strength {strength} of {n} denoising steps runs no step; raise the strength "
                f"or rollout.num_inference_steps"
            )
        cfg = settings.guidance_scale > 1.0
        gens = seeded_generators(seeds)
        cond, conditioning = self.conditioning(
            prompts, settings.height, settings.width, settings.negative_prompt if cfg else None
        )
        pos = cond.embeds
        scheduler = pipe.scheduler
        self.family.set_timesteps(scheduler, n, settings.height, settings.width, dev)
        start = (n - n_run) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        x0 = torch.as_tensor(np.asarray(latents), dtype=pos.dtype).to(dev)
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g, dtype=torch.float32) for g in gens])
        noise = noise.to(dev, pos.dtype)
        m = None if masks is None else torch.as_tensor(np.asarray(masks), dtype=pos.dtype).to(dev)
        if m is not None and (
            m.ndim != 4 or m.shape[0] != x0.shape[0] or m.shape[1] != 1 or m.shape[-2:] != x0.shape[-2:]
        ):
            raise ValueError(
                f"masks must be (B, 1, h, w) = ({x0.shape[0]}, 1, {x0.shape[-2]}, {x0.shape[-1]}), got {tuple(m.shape)}"
            )
        x = self.family.renoise(scheduler, x0, noise, timesteps[:1].repeat(x0.shape[0]))
        step_kwargs = self.family.step_kwargs(pipe, gens, settings.eta)
        for i, t in enumerate(timesteps):
            eps = self.family.guided_prediction(self.denoiser, scheduler, x, t, cond, settings.guidance_scale)
            x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
            if m is not None:
                known = (
                    x0
                    if i == len(timesteps) - 1
                    else self.family.renoise(scheduler, x0, noise, timesteps[i + 1 : i + 2].repeat(x0.shape[0]))
                )
                x = (1 - m) * known + m * x
        return self.rollout_batch(x, prompts, seeds, settings, conditioning)

    def rollout_batch(
        self, x: torch.Tensor, prompts, seeds, settings: SamplerSettings, conditioning, trajectory: dict | None = None
    ) -> RolloutBatch:
        """Final latents x (B, 4, h, w) as a RolloutBatch of this policy version, images decoded."""
        return RolloutBatch(
            images=self.decode(x),
            latents=x.float().cpu().numpy(),
            prompts=list(prompts),
            seeds=[int(s) for s in seeds],
            settings=settings,
            policy_version=self.policy_version,
            model_id=self.model_id,
            trajectory=trajectory,
            conditioning=conditioning,
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
        img = vae.decode(self.family.decoder_input(vae, latents.to(dtype)), return_dict=False)[0]
        if dtype != orig:
            vae.to(orig)
        img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (img * 255).round().astype(np.uint8)
