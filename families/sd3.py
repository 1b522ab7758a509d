"""The SD3 family: ``StableDiffusion3Pipeline`` (SD3 and SD3.5: an MMDiT ``SD3Transformer2DModel`` predicting
the flow velocity, two CLIP text encoders with projections and an optional T5), as diffusers runs it.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv 2403.03206,
sec. 4 (the MMDiT: the token embeddings and the latent patches attend jointly; the pooled CLIP embeddings
and the timestep modulate every block). The prompt rows are the pipeline's own ``encode_prompt`` outputs:
the token embeddings (the two CLIP encoders' penultimate hidden states concatenated, zero-padded to the T5
width, then the T5 tokens: (77 + max_sequence_length, 4096) on SD3; zeros where the pipeline has no T5, as
diffusers allows) and the pooled embedding (the two CLIP projections concatenated, (2048,)). The
denoiser's other input is ``pooled_projections``; its training target is the velocity eps - x0 on the
shifted flow schedule of :mod:`families.flow`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from families.base import Conditioning, PromptRows
from families.flow import FlowFamily
from families.tiny import tiny_clip_config, tiny_vae

NO_CROSS_ATTENTION = (
    "HcP keys on the UNet's cross-attention layers (per block, over the text tokens); the SD3 MMDiT has joint "
    "attention over text and image tokens instead"
)
EPS_ONLY = (
    "it steers the sampler through the DDPM alpha-bar of an epsilon-prediction model; SD3 predicts the flow velocity"
)


class SD3(FlowFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # the joint-attention projections, as diffusers' train_dreambooth_lora_sd3.py adapts them by default
    lora_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    refused = {
        "hcp": NO_CROSS_ATTENTION,
        "score_guidance": f"FaceScore's sampling guidance (rollout.score_guidance): {EPS_ONLY}",
        "guidance": f"the guidance loss's winner-noise target: {EPS_ONLY}",
    }
    # Its 333 text tokens (77 CLIP + 256 T5 zeros) make a step ~6x the 16 image tokens' cost on CPU: fewer
    # steps than the UNets' 300 (batch 32) still give samples that respond to a policy update.
    tiny_pretrain_steps = 100
    max_sequence_length = 256  # the pipeline's default T5 length (the rows' length: 77 + this)

    # ------------------------------------------------------------------ loading
    def load_kwargs(self, path: str) -> dict[str, Any]:
        """A folder saved without T5 (``text_encoder_3`` null in its ``model_index.json``) loads with
        ``text_encoder_3=None, tokenizer_3=None``, as diffusers documents for dropping T5."""
        index = Path(path) / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("text_encoder_3", [None])[0] is None:
            return {"text_encoder_3": None, "tokenizer_3": None}
        return {}

    def check(self, pipe: Any, path: str) -> None:
        """The transformer's pooled input must be the two CLIP projections together (the pipeline
        concatenates them), and its joint-attention width at least the CLIP tokens' (it pads them to it)."""
        tr = pipe.transformer.config
        pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
        clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        if tr.pooled_projection_dim != pooled or tr.joint_attention_dim < clip_width:
            raise ValueError(
                f"model.path={path}: the transformer takes pooled projections of {tr.pooled_projection_dim} and "
                f"tokens of {tr.joint_attention_dim}, but the CLIP encoders give {pooled} and {clip_width}"
            )

    def tiny_pipeline(self, tokenizer_dir: Path) -> Any:
        """Same classes and wiring as SD3.5 medium (an MMDiT with patch size 2, RMS-normed q/k and a dual-
        attention first layer, two CLIP text encoders with projections whose pooled outputs concatenate to
        the pooled projection, a VAE with a latent shift and scale, the flow-matching Euler scheduler with
        shift 3) at about a million parameters, with 4 latent channels (SD3's VAE has 16) and without the
        T5 encoder (``text_encoder_3=None``, which the pipeline supports: zeros in its place; no T5
        vocabulary can be built offline)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # the two CLIP widths together, 32 + 32
            caption_projection_dim=32,
            pooled_projection_dim=64,  # the two CLIP projections together
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae = tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's latent scale and shift
        text_cfg = tiny_clip_config(tokenizer.vocab_size, hidden_act="gelu", projection_dim=32)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(text_cfg),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(text_cfg),
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: Sequence[str], device: str | torch.device) -> PromptRows:
        enc, _, pooled, _ = pipe.encode_prompt(
            list(prompts),
            None,
            None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return enc, pooled

    def conditioning(self, rows: PromptRows, height: int, width: int) -> Conditioning:
        enc, pooled = rows
        return Conditioning(enc, {"pooled_projections": pooled})

    # ------------------------------------------------------------------ the denoiser
    def predict(self, model: Any, x_t: Tensor, t: Any, cond: Conditioning) -> Tensor:
        """The velocity at x_t; t = 1000 sigma, a number or (B,)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return model(
            hidden_states=x_t,
            timestep=t,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.added["pooled_projections"],
            return_dict=False,
        )[0]
