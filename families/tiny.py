"""The seeded tiny models: ``rlfh:tiny-<family>``, a family's exact classes and wiring at about two
million parameters, trained briefly on a synthetic latent distribution so that its samples respond
to a policy update. Written once to the cache (``RLFH_CACHE``, default ~/.cache/rlfh) by
:func:`resolve_model_path` and loaded like any diffusers folder; ``rlfh make-tiny-model DIR`` writes
one anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from families.base import Conditioning, ModelFamily

TINY_PREFIX = "rlfh:tiny-"
TINY_ID = "rlfh:tiny-sdxl"


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


def tiny_vae(scaling_factor: float, **family: Any):
    """The tiny models' VAE (64 px images, 8 x 8 latents of 4 channels), with the family's latent scale and
    its other latent keys (SD3's ``shift_factor``) in ``family``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **family,
    )


def tiny_clip_config(vocab_size: int, **family: Any):
    """The tiny models' CLIP text-encoder config (2 layers of width 32), with the family's own keys
    (activation, projection) in ``family``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
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
        **family,
    )


def tiny_t5_tokenizer(model_max_length: int):
    """A real T5 tokenizer (a Unigram model, as T5's SentencePiece vocabulary) over printable ASCII: every
    character alone and after the word-start marker is a piece, so any prompt tokenizes and words split into
    characters. Built in memory (no vocabulary file to download); saved and loaded like a published one."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    # ids 0, 1, 2 are T5's pad, eos and unk; longer pieces score higher, as a trained vocabulary ranks them
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int):
    """The tiny models' T5 encoder (2 layers of width 32, T5 v1.1's gated-GELU feed-forward)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


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


def pretrain_tiny(
    family: ModelFamily, pipe, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 1e-3
) -> float:
    """Fit the tiny denoiser to :func:`synthetic_latents` (its plain training loss); returns the last loss.

    Random weights do not denoise, so their samples barely depend on the policy; a few hundred
    steps of ordinary diffusion training give a real (if simple) generative model to fine-tune.
    """
    g = torch.Generator().manual_seed(seed)
    schedule = family.noise_schedule(pipe.scheduler.config)
    model = getattr(pipe, family.denoiser)
    size = pipe.vae.config.sample_size // family.latent_factor  # the latents of the tiny VAE's 64 px images
    cond = family.conditioning(
        family.encode_prompts(pipe, TINY_PROMPTS, "cpu"), size * family.latent_factor, size * family.latent_factor
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x0 = synthetic_latents(batch_size, size, g)
        idx = torch.randint(0, len(TINY_PROMPTS), (batch_size,), generator=g)
        t = schedule.draw_timesteps(batch_size, g)
        eps = torch.randn(x0.shape, generator=g)
        rows = Conditioning(cond.embeds[idx], {k: v[idx] for k, v in cond.added.items()})
        pred = family.predict(model, schedule.add_noise(x0, eps, t), t, rows)
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, eps, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def make_tiny_model(
    directory: str | Path, seed: int = 0, pretrain_steps: int | None = None, family: str = "sdxl"
) -> Path:
    """Write a seeded tiny pipeline of ``family`` (:meth:`ModelFamily.tiny_pipeline`) in the diffusers
    folder format, its denoiser trained for ``pretrain_steps`` steps on :func:`synthetic_latents`
    (0 keeps the random weights; None: the family's ``tiny_pretrain_steps``)."""
    from families import get_family

    adapter = get_family(family)
    directory = Path(directory)
    tok_dir = directory / "_tokenizer_src"
    write_tiny_clip_tokenizer(tok_dir)
    torch.manual_seed(seed)
    pipe = adapter.tiny_pipeline(tok_dir)
    if pretrain_steps is None:
        pretrain_steps = adapter.tiny_pretrain_steps
    if pretrain_steps > 0:
        pretrain_tiny(adapter, pipe, pretrain_steps, seed)
    pipe.save_pretrained(directory)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return directory


def resolve_model_path(path: str) -> str:
    """Map ``rlfh:tiny-<family>`` to its cached folder (written on first use); other paths unchanged."""
    if not path.startswith(TINY_PREFIX):
        return path
    from families import get_family

    name = path[len(TINY_PREFIX) :]
    get_family(name)  # an unknown family is an error naming the known ones
    target = cache_dir() / f"tiny-{name}"
    if (target / "model_index.json").is_file():
        return str(target)
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    # One process builds, the others wait for it: several processes starting at once (the test
    # process and its Ray actors, a run's rollout and learner actors) would otherwise each spend
    # minutes of CPU pretraining the same model.
    with open(target.with_name(f"tiny-{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").is_file():
            tmp = target.with_name(f"tiny-{name}.tmp{os.getpid()}")
            make_tiny_model(tmp, family=name)
            try:
                tmp.rename(target)
            except OSError:  # a process without the lock (an older rlfh) won the race; same seed, same model
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
