"""The SDXL family: ``StableDiffusionXLPipeline`` (a UNet with ``text_time`` conditioning, two CLIP
text encoders, eps- or v-prediction on a DDPM schedule), as diffusers runs it.

Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", arXiv
2307.01952, sec. 2.2 (micro-conditioning on the original size and the crop). The prompt rows are
the penultimate hidden states of both encoders concatenated, (77, 768 + 1280), and the second
encoder's projected pooled output, (1280,). The time ids are (orig_h, orig_w, crop_top, crop_left,
target_h, target_w) = (H, W, 0, 0, H, W): the image as generated, uncropped, as the pipeline's
defaults give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from families.base import Conditioning, PromptRows
from families.tiny import tiny_clip_config, tiny_vae
from families.unet import DTYPES, UNetFamily

__all__ = ["DTYPES", "SDXL"]


class SDXL(UNetFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    # the attention projections, as diffusers' train_dreambooth_lora_sdxl.py adapts them
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    # ------------------------------------------------------------------ loading
    def check(self, pipe: Any, path: str) -> None:
        """The UNet's added-embedding width must be 6 time ids plus the pooled text (diffusers checks
        this on every call of its private ``_get_add_time_ids``; once at load is enough)."""
        unet = pipe.unet
        passed = unet.config.addition_time_embed_dim * 6 + pipe.text_encoder_2.config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"model.path={path}: the UNet expects an added embedding of {expected} but 6 time ids "
                f"and the pooled text give {passed}: not an SDXL UNet with text_time conditioning"
            )

    def tiny_pipeline(self, tokenizer_dir: Path) -> Any:
        """Same classes and wiring as SDXL base (UNet with ``text_time`` conditioning, two CLIP text
        encoders whose hidden states concatenate to the cross-attention width, the second with a
        projection for the pooled embedding, a 4-level VAE with scale factor 8), at about two million
        parameters."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled text 32
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        vae = tiny_vae(scaling_factor=0.13025)  # SDXL's latent scale
        vocab_size = tokenizer.vocab_size
        text_cfg = tiny_clip_config(vocab_size, hidden_act="gelu", projection_dim=32)
        text_encoder = CLIPTextModel(text_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: Sequence[str], device: str | torch.device) -> PromptRows:
        enc, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return enc, pooled

    def conditioning(self, rows: PromptRows, height: int, width: int) -> Conditioning:
        enc, pooled = rows
        time_ids = self.time_ids(height, width, enc.dtype).to(enc.device).repeat(enc.shape[0], 1)
        return Conditioning(enc, {"text_embeds": pooled, "time_ids": time_ids})

    @staticmethod
    def time_ids(height: int, width: int, dtype: torch.dtype) -> Tensor:
        """(1, 6): original size, crop top-left, target size (what the pipeline's ``_get_add_time_ids``
        builds for its defaults)."""
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)

    # ------------------------------------------------------------------ the denoiser
    def predict(self, model: Any, x_t: Tensor, t: Any, cond: Conditioning) -> Tensor:
        return model(x_t, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added).sample
