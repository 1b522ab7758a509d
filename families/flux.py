"""The FLUX.1 family: ``FluxPipeline`` (FLUX.1 [dev] and [schnell]: an MMDiT ``FluxTransformer2DModel`` of
double- and single-stream blocks predicting the flow velocity on 2x2-packed latents, a CLIP text encoder
for the pooled embedding and T5 for the tokens), as diffusers runs it.

Black Forest Labs, FLUX.1 (reference: black-forest-labs/flux, src/flux/sampling.py and model.py; diffusers'
pipeline_flux.py). rlfh keeps a FLUX latent as the VAE gives it, (B, C, h, w); only the transformer sees it
packed: :meth:`Flux.predict` packs x_t into (B, h/2 * w/2, 4C) patch tokens and unpacks the velocity with
the pipeline's own static ``_pack_latents`` / ``_unpack_latents``. Packing is a permutation, so the Euler
and SDE steps, the noise schedule and the learner's losses (all elementwise or means over elements) are
those of :mod:`families.flow` unchanged. The positions the transformer's rotary embedding reads are the
pipeline's: ``txt_ids`` zeros (L, 3) and ``img_ids`` (row, column) of each patch
(``_prepare_latent_image_ids``), rebuilt from x_t's shape at every call.

Conditioning. The prompt rows are ``encode_prompt``'s: the T5 tokens (L, D_T5), L = ``max_sequence_length``
(the T5 tokenizer's ``model_max_length``, at most 512 as the pipeline allows), and CLIP's pooled output
(D_CLIP,). FLUX.1-dev is guidance-distilled (``transformer.config.guidance_embeds``): the guidance scale
w is an input of the transformer (embedded like the timestep) that stands in for classifier-free guidance
at scale w, and the stock pipeline runs no CFG (``true_cfg_scale`` = 1). So here ``rollout.guidance_scale``
is that input: one transformer batch of B rows per step, the negative prompt unused; a model without the
embedding (FLUX.1 [schnell]) ignores the scale, as the stock pipeline does. The learner predicts at the
rollouts' scale (:meth:`Flux.with_guidance_input`); where no scale is given (the tiny model's pretraining,
the sync checks) it is 1, the conditional velocity plain flow-matching training fits.

Timesteps. The sampler's sigmas are the pipeline's: linspace(1, 1/n, n), shifted by the scheduler's
dynamic shift exp(mu) with mu = ``calculate_shift`` of the image's token count (h/2 * w/2): linear from
``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``. Training
timesteps are the scheduler's training sigmas, as diffusers' train_dreambooth_lora_flux.py draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from families.base import Conditioning, PromptRows
from families.flow import FlowFamily
from families.tiny import tiny_clip_config, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae

NO_CROSS_ATTENTION = (
    "HcP keys on the UNet's cross-attention layers (per block, over the text tokens); the FLUX MMDiT has joint "
    "attention over text and image tokens instead"
)
EPS_ONLY = (
    "it steers the sampler through the DDPM alpha-bar of an epsilon-prediction model; FLUX predicts the flow velocity"
)
NO_CFG = (
    "FLUX.1 samples without classifier-free guidance (FLUX.1-dev is guidance-distilled: its guidance scale is an "
    "input of the transformer, transformer.config.guidance_embeds), so there is no guided teacher to distil"
)
MAX_SEQUENCE_LENGTH = 512  # the most T5 tokens FluxPipeline takes


class Flux(FlowFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    # diffusers' train_dreambooth_lora_flux.py default: the attention projections of the double-stream blocks
    # (the single-stream blocks' attn.to_q/k/v match the same names) and both streams' feed-forwards
    lora_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    refused = {
        "hcp": NO_CROSS_ATTENTION,
        "score_guidance": f"FaceScore's sampling guidance (rollout.score_guidance): {EPS_ONLY}",
        "guidance": f"the guidance loss's winner-noise target: {EPS_ONLY}",
        "guidance_free": f"CFG-free training distils the reference's classifier-free guidance: {NO_CFG}",
    }
    notes = {
        "cfg": "the scale is FLUX.1-dev's guidance embedding (no CFG batch, the negative prompt unused), as "
        "FluxPipeline's guidance_scale; ignored by a model without one (schnell)"
    }
    # as the tiny SD3: 100 steps of batch 32 give samples that respond to a policy update
    tiny_pretrain_steps = 100
    tiny_sequence_length = 32  # the tiny T5 tokenizer's model_max_length: the rows' length

    # ------------------------------------------------------------------ loading
    def check(self, pipe: Any, path: str) -> None:
        """The transformer's inputs must be the packed VAE latents, CLIP's pooled output and T5's tokens."""
        tr = pipe.transformer.config
        widths = (4 * pipe.vae.config.latent_channels if pipe.vae is not None else tr.in_channels,)
        widths += (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.d_model)
        if (tr.in_channels, tr.pooled_projection_dim, tr.joint_attention_dim) != widths:
            raise ValueError(
                f"model.path={path}: the transformer takes packed latents of {tr.in_channels} channels, pooled "
                f"projections of {tr.pooled_projection_dim} and tokens of {tr.joint_attention_dim}, but the VAE, "
                f"CLIP and T5 give {widths}"
            )

    def tiny_pipeline(self, tokenizer_dir: Path) -> Any:
        """Same classes and wiring as FLUX.1-dev (double- and single-stream blocks on 2x2 packed latents with a
        3-axis rotary embedding, the guidance embedding, CLIP's pooled output and T5's tokens, a VAE with a
        latent shift and scale and without quant convs, the flow-matching Euler scheduler with dynamic shift)
        at about 0.2 million transformer parameters, with 4 latent channels (FLUX's VAE has 16) and 32 T5
        tokens (FLUX.1-dev takes 512)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        tokenizer_2 = tiny_t5_tokenizer(self.tiny_sequence_length)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,  # T5's width
            pooled_projection_dim=32,  # CLIP's width
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),  # FLUX's (16, 56, 56) at a head width of 8
        )
        # FLUX's latent scale and shift; its VAE has no quant convs
        vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=CLIPTextModel(tiny_clip_config(tokenizer.vocab_size, hidden_act="quick_gelu")),
            tokenizer=tokenizer,
            text_encoder_2=tiny_t5_encoder(len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )

    # ------------------------------------------------------------------ latents and timesteps
    def latent_channels(self, pipe: Any) -> int:
        return pipe.transformer.config.in_channels // 4  # the transformer reads 2x2 patches of the latents

    def initial_latents(self, pipe, batch, height, width, dtype, device, generators) -> Tensor:
        """The pipeline's draw (one (C, h, w) normal per generator), unpacked."""
        packed, _ = pipe.prepare_latents(batch, self.latent_channels(pipe), height, width, dtype, device, generators)
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)

    def set_timesteps(self, scheduler: Any, num_steps: int, height: int, width: int, device: Any) -> None:
        """FluxPipeline's sigmas: linspace(1, 1/n, n) shifted by mu = ``calculate_shift`` of the token count."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        c = scheduler.config
        sigmas = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        tokens = (height // (self.latent_factor * 2)) * (width // (self.latent_factor * 2))
        mu = calculate_shift(
            tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)

    # ------------------------------------------------------------------ conditioning
    def sequence_length(self, pipe: Any) -> int:
        """The T5 tokens per prompt: the tokenizer's own length (512 on FLUX.1), at most the pipeline's 512."""
        return min(int(pipe.tokenizer_2.model_max_length), MAX_SEQUENCE_LENGTH)

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: Sequence[str], device: str | torch.device) -> PromptRows:
        enc, pooled, _ = pipe.encode_prompt(
            list(prompts), None, device=device, num_images_per_prompt=1, max_sequence_length=self.sequence_length(pipe)
        )
        return enc, pooled

    def conditioning(self, rows: PromptRows, height: int, width: int) -> Conditioning:
        enc, pooled = rows
        return Conditioning(enc, {"pooled_projections": pooled})

    @staticmethod
    def takes_guidance(model: Any) -> bool:
        """Whether the transformer (a module; the learner's wrapped callables carry the flag in their
        conditioning instead) has the distilled guidance embedding."""
        return bool(getattr(getattr(model, "config", None), "guidance_embeds", False))

    def with_guidance_input(self, pipe: Any, cond: Conditioning, guidance_scale: float) -> Conditioning:
        if not self.takes_guidance(pipe.transformer):
            return cond
        guidance = torch.full((cond.embeds.shape[0],), float(guidance_scale), device=cond.embeds.device)
        return Conditioning(cond.embeds, {**cond.added, "guidance": guidance.to(cond.embeds.dtype)})

    # ------------------------------------------------------------------ the denoiser
    def guided_prediction(
        self, model: Any, scheduler: Any, x: Tensor, t: Any, cond: Conditioning, guidance_scale: float
    ) -> Tensor:
        """One batch of B rows with ``guidance_scale`` in the guidance embedding, as FluxPipeline with
        ``true_cfg_scale`` = 1: under w > 1 the callers stack negative rows first (classifier-free guidance
        elsewhere), which FLUX does not use."""
        b = x.shape[0]
        if cond.embeds.shape[0] == 2 * b:
            cond = Conditioning(cond.embeds[b:], {k: v[b:] for k, v in cond.added.items()})
        if "guidance" in cond.added or self.takes_guidance(model):
            guidance = torch.full((b,), float(guidance_scale), device=x.device, dtype=cond.embeds.dtype)
            cond = Conditioning(cond.embeds, {**cond.added, "guidance": guidance})
        return self.predict(model, x, t, cond)

    def predict(self, model: Any, x_t: Tensor, t: Any, cond: Conditioning) -> Tensor:
        """The velocity at x_t (B, C, h, w); t = 1000 sigma, a number or (B,). The transformer reads x_t as
        (B, h/2 * w/2, 4C) patch tokens and sigma itself (FluxPipeline passes timestep / 1000)."""
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        t = torch.as_tensor(t, device=x_t.device).to(x_t.dtype)
        t = t.expand(b) if t.ndim == 0 else t
        guidance = cond.added.get("guidance")
        if guidance is None and self.takes_guidance(model):
            guidance = torch.ones(b, device=x_t.device)  # scale 1: the conditional velocity
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        out = model(
            hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond.added["pooled_projections"],
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # _unpack_latents takes pixels: h latents are h * vae_scale_factor pixels
        return FluxPipeline._unpack_latents(out, h * self.latent_factor, w * self.latent_factor, self.latent_factor)
