"""The model boundary: what a model family (a diffusers pipeline class) implements for rlfh.

Both sides of a run call a model only through a :class:`ModelFamily`: the rollout sampler
(rollouts/sampler.py) to condition, predict and take stochastic steps with their log-probs, the
learner (rlfh/learner/) to condition, noise, predict and score the same steps. Written for the
pipelines of diffusers:

    family   pipeline                      denoiser                    text encoders     target
    sd15     StableDiffusionPipeline       UNet2DConditionModel        CLIP              eps or v
    sdxl     StableDiffusionXLPipeline     UNet2DConditionModel        CLIP + CLIP/proj  eps or v
    sd3      StableDiffusion3Pipeline      SD3Transformer2DModel       CLIP x2 (+ T5)    velocity
    flux     FluxPipeline                  FluxTransformer2DModel      CLIP + T5         velocity

A family's text conditioning has two parts. The per-prompt part (:data:`PromptRows`: the text
encoders' outputs, one row per prompt, e.g. SDXL's token embeddings and pooled embedding) is what
:class:`PromptCache` keeps, what the rollout actors send the learner with a batch, and what a
learner without text encoders trains from. :meth:`ModelFamily.conditioning` adds what depends on the
batch only (SDXL's micro-conditioning time ids) and returns a :class:`Conditioning`, the denoiser's
inputs besides x_t and t (FLUX's position ids follow from x_t's and the tokens' shapes: its ``predict``
builds them).

Classifier-free guidance stacks (unconditional, conditional) rows in one batch of 2B, as diffusers
does (:func:`with_negative`, :meth:`ModelFamily.guided_prediction`); a guidance-distilled model (FLUX.1-dev)
takes the scale as an input instead (:meth:`ModelFamily.with_guidance_input`).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Hashable, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor

PromptRows = tuple[Tensor, ...]
"""The text encoders' outputs for B prompts, each field (B, ...) in a family's fixed order
(SDXL: token embeddings (B, 77, 2048), pooled embedding (B, 1280))."""


class Conditioning(NamedTuple):
    """The denoiser's conditioning for a batch of rows (B, or 2B under guidance: unconditional first).

    Unpacks as ``enc, added = cond``.

    Attributes:
        embeds: the token embeddings the denoiser attends to, (rows, L, D).
        added: the family's other per-batch inputs, by the name its denoiser takes them under
            (SDXL: ``text_embeds`` (rows, 1280) and ``time_ids`` (rows, 6), the UNet's
            ``added_cond_kwargs``; SD3: ``pooled_projections``; FLUX: ``pooled_projections`` and, for the
            learner of a guidance-distilled model, ``guidance`` (rows,)).
    """

    embeds: Tensor
    added: dict[str, Tensor]

    def to(self, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(self.embeds.to(dtype), {k: v.to(dtype) for k, v in self.added.items()})


class ModelSource(Protocol):
    """Where a model comes from: ``rlfh.config.schema.ModelConfig`` (any object with these fields)."""

    path: str
    family: Optional[str]
    revision: Optional[str]
    variant: Optional[str]
    vae_path: Optional[str]
    dtype: str


class NoiseSchedule(Protocol):
    """The forward process the denoiser was trained on, and its training target.

    UNets (DDPM): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps or v
    (:class:`families.schedule.DDPMSchedule`). Flow matching (SD3, FLUX): x_t = (1 - s_t) x0 + s_t eps,
    target eps - x0.
    """

    num_train_timesteps: int
    prediction_type: str

    def draw_timesteps(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` training timesteps t, the denoiser's own timestep input (a DDPM step index, or a
        flow model's 1000 sigma)."""
        ...

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...

    def x0_scale(self, t: Tensor, device: torch.device) -> Tensor: ...

    def flow_time(self, t: Tensor, device: torch.device) -> Tensor:
        """sigma_t per sample (B,), float32: the noise share of x_t on the flow-matching path
        x_t / (a + b) = (1 - sigma) x0 + sigma eps (AWM's generalised Huber)."""
        ...


class StepOutput(NamedTuple):
    """One stochastic sampler step x_t -> x_{t-1} with the log-probability of x_{t-1}.

    Attributes:
        prev_sample: x_{t-1}, (B, C, H, W), dtype of the sample.
        log_prob: log pi(x_{t-1} | x_t), mean over the non-batch dims, (B,).
        mean: the step's Gaussian mean, (B, C, H, W).
        std_dev: its standard deviation, (B,).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std_dev: Tensor


class ModelFamily(abc.ABC):
    """One diffusers pipeline class as rlfh uses it. Adapters are stateless: one instance per family
    (the registry in ``families/__init__.py``); the pipeline and its modules are passed in.

    Class attributes:
        name: the family's key (``sdxl``).
        pipeline_class: the diffusers pipeline class name, as ``model_index.json``'s ``_class_name``.
        denoiser: the pipeline attribute holding the trained model (``unet`` or ``transformer``).
        text_encoders: the pipeline attributes of the text encoders (dropped together by a learner
            that trains from the rollouts' prompt embeddings).
        lora_targets: the denoiser's module names diffusers' LoRA training scripts adapt.
        latent_factor: pixels per latent along each side (the VAE's scale factor).
        refused: the rlfh methods that do not apply to this family, each with the reason
            (``{"hcp": "HcP keys on UNet cross-attention"}``); a config asking for one is refused
            before a run starts (rlfh/config/rules.py: ``family_rules``).
        notes: the methods that run on this family but mean something else there, each with how
            (FLUX: ``rollout.guidance_scale`` is the distilled guidance embedding, not CFG); README's
            families table shows them.
        tiny_pretrain_steps: how long ``rlfh:tiny-<name>`` is trained on its synthetic latents.
        last_step_untrainable: why reward back-propagation through the last sampling step alone trains
            nothing on this family (None where it does); a ``learner.loss=draft`` config whose steps with
            gradient are the last one only is refused with it.
    """

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser: ClassVar[str]
    text_encoders: ClassVar[tuple[str, ...]]
    lora_targets: ClassVar[tuple[str, ...]]
    latent_factor: ClassVar[int] = 8
    refused: ClassVar[dict[str, str]] = {}
    notes: ClassVar[dict[str, str]] = {}
    tiny_pretrain_steps: ClassVar[int] = 300  # the tiny model's training steps (families/tiny.py)
    last_step_untrainable: ClassVar[str | None] = None

    def decoder_input(self, vae: Any, latents: Tensor) -> Tensor:
        """The VAE decoder's input for denoiser-space latents: z / scaling_factor, plus the VAE's
        ``shift_factor`` where it has one (SD3, FLUX), as the pipelines decode."""
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        return z if shift is None else z + shift

    def model(self, pipe: Any) -> Any:
        """The pipeline's denoiser (``pipe.unet``, ``pipe.transformer``)."""
        return getattr(pipe, self.denoiser)

    def latent_channels(self, pipe: Any) -> int:
        """The channels of the latents the pipeline's ``prepare_latents`` draws."""
        return self.model(pipe).config.in_channels

    def initial_latents(
        self, pipe: Any, batch: int, height: int, width: int, dtype: torch.dtype, device: Any, generators: Any
    ) -> Tensor:
        """x_T (batch, C, h, w) as the pipeline's ``prepare_latents`` draws it with ``generators`` (one per
        row), scaled by the scheduler's ``init_noise_sigma``."""
        return pipe.prepare_latents(batch, self.latent_channels(pipe), height, width, dtype, device, generators)

    def set_timesteps(self, scheduler: Any, num_steps: int, height: int, width: int, device: Any) -> None:
        """Set the sampler scheduler's ``num_steps`` timesteps for images of (height, width) pixels, as the
        pipeline's ``__call__`` sets them (FLUX shifts its sigmas by the image's token count)."""
        scheduler.set_timesteps(num_steps, device=device)

    # ------------------------------------------------------------------ loading
    @abc.abstractmethod
    def load(self, source: ModelSource, path: str, device: str | torch.device) -> Any:
        """The pipeline at ``path`` (a resolved folder, hub id or single file) with ``source``'s
        dtype, variant, revision and VAE, on ``device``, progress bars off."""

    @abc.abstractmethod
    def tiny_pipeline(self, tokenizer_dir: Path) -> Any:
        """A pipeline of this family's exact classes and wiring at a tiny size, random weights drawn
        from torch's global RNG (the caller seeds it); its tokenizers from ``tokenizer_dir``."""

    # ------------------------------------------------------------------ conditioning
    @abc.abstractmethod
    def encode_prompts(self, pipe: Any, prompts: Sequence[str], device: str | torch.device) -> PromptRows:
        """The text encoders' outputs for ``prompts``, one row each, in one encoder call."""

    @abc.abstractmethod
    def conditioning(self, rows: PromptRows, height: int, width: int) -> Conditioning:
        """The denoiser's conditioning for images of (height, width) pixels from per-prompt rows."""

    def with_guidance_input(self, pipe: Any, cond: Conditioning, guidance_scale: float) -> Conditioning:
        """``cond`` with ``guidance_scale`` as the denoiser's own guidance input where it has one (FLUX.1-dev's
        distilled guidance embedding), so the learner predicts at the scale the rollouts sample with; a model
        guided by classifier-free guidance alone has none (``cond`` unchanged)."""
        return cond

    def has_text_encoders(self, pipe: Any) -> bool:
        return getattr(pipe, self.text_encoders[0], None) is not None

    def drop_text_encoders(self, pipe: Any) -> None:
        for name in self.text_encoders:
            setattr(pipe, name, None)

    # ------------------------------------------------------------------ the denoiser
    @abc.abstractmethod
    def predict(self, model: Any, x_t: Tensor, t: Any, cond: Conditioning) -> Tensor:
        """The denoiser's raw output (eps, v or velocity) at x_t (B, C, h, w), timestep t."""

    def guided_prediction(
        self, model: Any, scheduler: Any, x: Tensor, t: Any, cond: Conditioning, guidance_scale: float
    ) -> Tensor:
        """The prediction under classifier-free guidance w as one batch of 2B (w > 1; ``cond`` then
        stacks unconditional rows first): pred = pred_u + w (pred_c - pred_u). ``scheduler`` scales
        the input as the sampler's scheduler does (:meth:`model_input`)."""
        guided = guidance_scale > 1.0
        x_in = self.model_input(scheduler, torch.cat([x, x]) if guided else x, t)
        out = self.predict(model, x_in, t, cond)
        if guided:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        return out

    def model_input(self, scheduler: Any, x: Tensor, t: Any) -> Tensor:
        """The denoiser's input at the sampler's x_t (``scale_model_input`` of a UNet's scheduler: x
        itself for DDIM, x / sqrt(sigma^2 + 1) for Euler)."""
        return scheduler.scale_model_input(x, t)

    def renoise(self, scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x0 noised to the sampler scheduler's timesteps t (B,) (SDEdit's start, inpainting's known
        region): ``add_noise`` of a DDPM-family scheduler."""
        return scheduler.add_noise(x0, noise, t)

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def noise_schedule(self, scheduler_config: Any) -> NoiseSchedule:
        """The training forward process and target for a pipeline's scheduler config."""

    # ------------------------------------------------------------------ stochastic sampling
    @abc.abstractmethod
    def stochastic_scheduler(self, scheduler_config: Any) -> Any:
        """A scheduler whose steps are Gaussian with a log-prob (DDIM with eta for UNets; the
        Flow-GRPO SDE step for flow models), with the model's noise schedule."""

    def sampler_scheduler(self, scheduler: Any, setting: str) -> Any:
        """The scheduler the rollout sampler runs for ``rollout.scheduler`` = ``setting`` (``default``:
        the pipeline's own; ``ddim``: :meth:`stochastic_scheduler`)."""
        if setting == "ddim":
            return self.stochastic_scheduler(scheduler.config)
        if setting != "default":
            raise ValueError(f"unknown scheduler {setting!r}; use 'default' or 'ddim'")
        return scheduler

    def logprob_sampler_problems(self, setting: str, eta: float, loss: str) -> list[str]:
        """Why ``rollout.scheduler`` = ``setting`` and ``rollout.eta`` = ``eta`` cannot record the step
        log-probs ``learner.loss`` = ``loss`` trains on (empty: they can)."""
        if setting != "ddim" or eta <= 0:
            return [
                f"learner.loss={loss} needs a stochastic DDIM sampler with log-probs: set rollout.scheduler=ddim "
                f"and rollout.eta > 0 (1.0 in DDPO); got scheduler={setting}, eta={eta}"
            ]
        return []

    def check_recordable(self, scheduler: Any, eta: float) -> None:
        """Refuse to record log-probs with a sampler scheduler whose steps have none."""
        if not (eta > 0 and type(scheduler).__name__ == "DDIMScheduler"):
            raise ValueError("recording log-probs needs the DDIM scheduler with eta > 0 (rollout.scheduler=ddim)")

    def deterministic_step(self, scheduler: Any, model_output: Tensor, t: Any, sample: Tensor) -> Tensor:
        """The noise-free step of :meth:`stochastic_scheduler` (outside a DDPO SDE window): DDIM with eta = 0."""
        return scheduler.step(model_output, t, sample, eta=0.0, return_dict=False)[0]

    def step_and_x0(self, scheduler: Any, model_output: Tensor, t: Any, sample: Tensor) -> tuple[Tensor, Tensor]:
        """(the noise-free step's x_{t'}, the x_0 prediction at x_t), differentiable in ``model_output``:
        DDIM with eta = 0 and its ``pred_original_sample`` (reward back-propagation, rlfh/losses/draft.py)."""
        out = scheduler.step(model_output, t, sample, eta=0.0, return_dict=True)
        return out.prev_sample, out.pred_original_sample

    def step_kwargs(self, pipe: Any, generators: Any, eta: float) -> dict[str, Any]:
        """The extra keyword arguments of the sampler scheduler's ``step`` (eta and the generators), as the
        pipeline passes them."""
        return pipe.prepare_extra_step_kwargs(generators, eta)

    @abc.abstractmethod
    def step_coefficients(self, scheduler: Any, t: Any, eta: float) -> tuple[Tensor, Tensor]:
        """(k_t, s_t) of the stochastic step from timestep t, float64 scalars: the step's mean moves by
        k_t per unit of the prediction (d mu / d pred) and its standard deviation is s_t. Two policies'
        steps from one x_t then differ by KL = k_t^2 / (2 s_t^2) mean (pred - pred')^2 per element."""

    @abc.abstractmethod
    def step_with_logprob(
        self,
        scheduler: Any,
        model_output: Tensor,
        t: Any,
        sample: Tensor,
        eta: float,
        prev_sample: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One step of :meth:`stochastic_scheduler` with the log-prob of x_{t-1}: drawn with ``noise``
        or ``generator``, or ``prev_sample`` scored as recorded."""

    # ------------------------------------------------------------------ export
    @abc.abstractmethod
    def save_lora(self, directory: str | Path, peft_state: dict[str, Tensor], adapter: dict) -> None:
        """Write the denoiser's LoRA (peft keys) where the stock pipeline's ``load_lora_weights``
        reads it, with ``adapter`` ({"r", "lora_alpha", "target_modules"}) in the file's metadata:
        ``load_lora_weights`` scales by alpha / rank only when the file states alpha (without it
        diffusers assumes alpha = rank, the wrong strength for a LoRA trained with another alpha)."""


def with_negative(rows: PromptRows, negative: PromptRows) -> PromptRows:
    """Per-prompt rows for guidance: the one negative prompt's row repeated B times, then the B rows."""
    b = rows[0].shape[0]
    return tuple(torch.cat([n.expand(b, *n.shape[1:]), r]) for r, n in zip(rows, negative))


class PromptCache:
    """Per-prompt text-encoder outputs, each prompt encoded once until :meth:`clear`.

    The text encoders are frozen (only the denoiser trains), so a prompt's rows never change within a
    policy version. Prompts missing from the cache are encoded together, distinct ones once, in order
    of first appearance. Rows may also be put in from elsewhere (:meth:`put`: the rollouts' embeddings
    a learner trains from).

    Args:
        family: whose encoders and conditioning to use.
        enabled: False keeps nothing between calls (every call encodes its distinct prompts).
    """

    def __init__(self, family: ModelFamily, enabled: bool = True):
        self.family = family
        self.enabled = enabled
        self.rows_of: dict[str, PromptRows] = {}  # prompt -> one row per field, without the batch dim

    def clear(self) -> None:
        self.rows_of.clear()

    def put(self, prompt: str, rows: PromptRows) -> None:
        self.rows_of[prompt] = rows

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self.rows_of]

    def rows(self, pipe: Any, prompts: Sequence[str], device: str | torch.device) -> PromptRows:
        """Each field stacked over ``prompts`` (B, ...), missing prompts encoded with ``pipe``."""
        cache = self.rows_of if self.enabled else {}
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            encoded = self.family.encode_prompts(pipe, missing, device)
            cache.update({p: tuple(f[i] for f in encoded) for i, p in enumerate(missing)})
        fields = len(cache[prompts[0]])
        return tuple(torch.stack([cache[p][k] for p in prompts]) for k in range(fields))

    def conditioning(
        self,
        pipe: Any,
        prompts: Sequence[str],
        height: int,
        width: int,
        device: str | torch.device,
        negative_prompt: str | None = None,
    ) -> Conditioning:
        """The denoiser's conditioning for ``prompts``; with ``negative_prompt``, its rows first
        (classifier-free guidance)."""
        rows = self.rows(pipe, prompts, device)
        if negative_prompt is not None:
            rows = with_negative(rows, self.rows(pipe, [negative_prompt], device))
        return self.family.conditioning(rows, height, width)


def first_of_each(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """The index of each distinct key's first occurrence, in order of appearance, and for every key
    the position of its distinct key in that list (trajectory branching's groups of rows sharing a
    prefix, in the sampler and in the learner)."""
    first: dict = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    position = {k: n for n, k in enumerate(first)}
    return list(first.values()), [position[k] for k in keys]
