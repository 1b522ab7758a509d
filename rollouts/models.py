"""SDXL pipelines: loading, conditioning (prompt embeddings + time ids), the policy's LoRA adapter,
and writing the seeded tiny SDXL-architecture model.

``load_pipeline(model_cfg)`` accepts what users have:
  * a local diffusers folder (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder*/``,
    ``tokenizer*/``), e.g. a download of stabilityai/stable-diffusion-xl-base-1.0;
  * a hub id (resolved by diffusers' ``from_pretrained``; offline by default, see ``rlfh.env``);
  * a single-file ``.safetensors`` checkpoint (``from_single_file``);
  * ``rlfh:tiny-sdxl``: the seeded tiny model, written once to the cache by
    :func:`make_tiny_model` and then loaded through the same ``from_pretrained`` path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from typing import Sequence

import torch

TINY_ID = "rlfh:tiny-sdxl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("RLFH_CACHE", Path.home() / ".cache" / "rlfh"))


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable unicode character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_tokenizer(directory: Path, model_max_length: int = 77) -> int:
    """Write a real CLIPTokenizer (byte-level BPE) with a byte-only vocabulary; returns its size.

    Every byte and every byte + ``</w>`` is a token, with no merges: any prompt tokenizes, words
    split into characters. Small enough for a tiny text encoder, and loaded by the stock
    ``CLIPTokenizer.from_pretrained`` exactly like a published tokenizer folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(alphabet + [a + "</w>" for a in alphabet])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    return len(vocab)


TINY_PROMPTS = ["a photo of a person", "a portrait of a woman", "a man waving his hand", "two people talking"]


def synthetic_latents(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """The tiny model's training distribution: (n, 4, size, size) latents.

    Each latent is a smooth field (bilinear upsampling of 2x2 noise) plus white noise of an
    amplitude drawn uniformly from [0, 1). The amplitude sets how much fine texture the decoded
    image carries, so rewards such as JPEG compressibility rank samples along it and a policy can
    shift its mass: a small, fast, real learning problem.
    """
    smooth = torch.nn.functional.interpolate(torch.randn(n, 4, 2, 2, generator=generator), size=size, mode="bilinear")
    amp = torch.rand(n, 1, 1, 1, generator=generator)
    return smooth + amp * torch.randn(n, 4, size, size, generator=generator)


def pretrain_tiny_unet(pipe, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 1e-3) -> float:
    """Fit the tiny UNet to denoise :func:`synthetic_latents` (plain epsilon-MSE); returns the last loss.

    Random weights do not denoise, so their samples barely depend on the policy; a few hundred
    steps of ordinary diffusion training give a real (if simple) generative model to fine-tune.
    """
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(seed)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size
    h = size * 8
    enc, added = sdxl_conditioning(pipe, TINY_PROMPTS, h, h, "cpu")
    pooled, time_ids = added["text_embeds"], added["time_ids"][:1]
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x0 = synthetic_latents(batch_size, size, g)
        idx = torch.randint(0, len(TINY_PROMPTS), (batch_size,), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        pred = unet(sched.add_noise(x0, eps, t), t, encoder_hidden_states=enc[idx],
                    added_cond_kwargs={"text_embeds": pooled[idx], "time_ids": time_ids.repeat(batch_size, 1)}).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()
    return float(loss.detach())


def make_tiny_model(directory: str | Path, seed: int = 0, pretrain_steps: int = 300) -> Path:
    """Write a seeded tiny SDXL-architecture pipeline in the diffusers folder format.

    Same classes and wiring as SDXL base (UNet with ``text_time`` conditioning, two CLIP text
    encoders whose hidden states concatenate to the cross-attention width, the second with a
    projection for the pooled embedding, a 4-level VAE with scale factor 8), at about two million
    parameters. The UNet is then trained for ``pretrain_steps`` steps on
    :func:`synthetic_latents` (0 keeps the random weights).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    directory = Path(directory)
    tok_dir = directory / "_tokenizer_src"
    vocab_size = write_tiny_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    torch.manual_seed(seed)
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
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
    )
    text_cfg = dict(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    if pretrain_steps > 0:
        pretrain_tiny_unet(pipe, pretrain_steps, seed)
    pipe.save_pretrained(directory)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return directory


def resolve_model_path(path: str) -> str:
    """Map ``rlfh:tiny-sdxl`` to its cached folder (written on first use); other paths unchanged."""
    if path != TINY_ID:
        return path
    target = cache_dir() / "tiny-sdxl"
    if (target / "model_index.json").is_file():
        return str(target)
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    # One process builds, the others wait for it: several processes starting at once (the test
    # process and its Ray actors, a run's rollout and learner actors) would otherwise each spend
    # minutes of CPU pretraining the same model.
    with open(target.with_name("tiny-sdxl.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").is_file():
            tmp = target.with_name(f"tiny-sdxl.tmp{os.getpid()}")
            make_tiny_model(tmp)
            try:
                tmp.rename(target)
            except OSError:  # a process without the lock (an older rlfh) won the race; same seed, same model
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_pipeline(model_cfg, device: str | torch.device = "cpu"):
    """Load an SDXL pipeline from a folder, hub id, single file or ``rlfh:tiny-sdxl``.

    Args:
        model_cfg: a :class:`rlfh.config.schema.ModelConfig`.
        device: where to put the modules.

    Raises:
        FileNotFoundError: a local path that does not exist, with what was expected there.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # per-component loading bars from every actor drown the run's own progress bar
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtype = DTYPES[model_cfg.dtype]
    path = resolve_model_path(model_cfg.path)
    kwargs = {"dtype": dtype}
    if model_cfg.vae_path:
        kwargs["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae_path, dtype=dtype)
    p = Path(path)
    if p.suffix in (".safetensors", ".ckpt"):
        if not p.is_file():
            raise FileNotFoundError(f"model.path={path}: single-file checkpoint not found")
        pipe = StableDiffusionXLPipeline.from_single_file(str(p), **kwargs)
    else:
        looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
        if looks_local and not (p / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.path={path}: no diffusers pipeline there (expected model_index.json, unet/, vae/, "
                f"text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/). Write a tiny one with "
                f"`rlfh make-tiny-model {path}` or point model.path at an SDXL folder or hub id"
            )
        pipe = StableDiffusionXLPipeline.from_pretrained(
            path, revision=model_cfg.revision, variant=model_cfg.variant, **kwargs
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_lora(unet, rank: int, alpha: float, target_modules) -> None:
    """Give ``unet`` the policy's LoRA adapter (peft; B starts at zero, so the policy starts at the base).

    The one builder for the learner and the rollout actors: weight sync copies the learner's adapter
    into the actors' by name, so both sides must build it alike. A (the gaussian init) is drawn from
    torch's global RNG; the learner seeds it, an actor's is overwritten at the first sync.
    """
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))


@torch.no_grad()
def sdxl_conditioning(pipe, prompts: Sequence[str], height: int, width: int, device,
                      negative_prompt: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDXL conditioning: (encoder_hidden_states, added_cond_kwargs) for B prompts at (height, width).

    ``add_time_ids`` = (orig_h, orig_w, crop_top=0, crop_left=0, target_h, target_w) per sample.
    With ``negative_prompt`` (classifier-free guidance) the result is 2B rows, unconditional first,
    as diffusers stacks them; without it, B rows.
    """
    guided = negative_prompt is not None
    b = len(prompts)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
        negative_prompt=[negative_prompt] * b if guided else None,
    )
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=pos.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    ).to(device).repeat(b, 1)
    if guided:
        pos, pooled, time_ids = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled]), torch.cat([time_ids, time_ids])
    return pos, {"text_embeds": pooled, "time_ids": time_ids}
