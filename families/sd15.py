"""The SD1.5 family: ``StableDiffusionPipeline`` (a UNet conditioned on one CLIP text encoder's
token embeddings, eps- or v-prediction on a DDPM schedule), as diffusers runs it.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752
(SD1.x: CLIP ViT-L/14, eps-prediction; the same pipeline class runs SD2.x: OpenCLIP ViT-H/14 and, for
the 768 px models, v-prediction). The prompt row is the text encoder's last hidden state, (77, 768)
on SD1.5; there is no pooled embedding and no micro-conditioning, so the conditioning is the token
embeddings alone. The training target follows the scheduler config's ``prediction_type``
(:class:`families.schedule.DDPMSchedule`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from families.base import Conditioning, PromptRows
from families.tiny import tiny_clip_config, tiny_vae
from families.unet import UNetFamily


class SD15(UNetFamily):
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders = ("text_encoder",)
    # the attention projections, as diffusers' train_text_to_image_lora.py adapts them
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    # ------------------------------------------------------------------ loading
    def load_kwargs(self, path: str) -> dict[str, Any]:
        # rlfh never runs the safety checker (its sampler decodes the latents itself): not loaded
        return {"safety_checker": None, "requires_safety_checker": False}

    def check(self, pipe: Any, path: str) -> None:
        """A UNet conditioned on the token embeddings only, of the text encoder's width (a UNet with
        added embeddings belongs to another pipeline, e.g. SDXL's)."""
        unet, width = pipe.unet, pipe.text_encoder.config.hidden_size
        if unet.config.addition_embed_type is not None or unet.config.class_embed_type is not None:
            raise ValueError(
                f"model.path={path}: the UNet takes added embeddings ({unet.config.addition_embed_type or ''}"
                f"{unet.config.class_embed_type or ''}), which StableDiffusionPipeline never passes"
            )
        if unet.config.cross_attention_dim != width:
            raise ValueError(
                f"model.path={path}: the UNet attends to {unet.config.cross_attention_dim}-wide tokens but the "
                f"text encoder gives {width}"
            )

    def tiny_pipeline(self, tokenizer_dir: Path) -> Any:
        """Same classes and wiring as SD1.5 (a UNet with cross-attention in its high-resolution blocks
        and none in the lowest, no added embeddings, one CLIP text encoder whose last hidden state
        is the cross-attention input, a 4-level VAE with scale factor 8 and SD1.5's latent scaling,
        SD1.5's PNDM scheduler config, no safety checker), at about two million parameters."""
        from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
            cross_attention_dim=32,
            norm_num_groups=8,
        )
        vae = tiny_vae(scaling_factor=0.18215)  # SD1.5's latent scale
        vocab_size = tokenizer.vocab_size
        text_encoder = CLIPTextModel(tiny_clip_config(vocab_size, hidden_act="quick_gelu"))  # CLIP ViT-L/14's
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: Sequence[str], device: str | torch.device) -> PromptRows:
        enc, _ = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return (enc,)

    def conditioning(self, rows: PromptRows, height: int, width: int) -> Conditioning:
        (enc,) = rows
        return Conditioning(enc, {})

    # ------------------------------------------------------------------ the denoiser
    def predict(self, model: Any, x_t: Tensor, t: Any, cond: Conditioning) -> Tensor:
        return model(x_t, t, encoder_hidden_states=cond.embeds).sample
