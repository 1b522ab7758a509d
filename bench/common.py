"""Shared pieces of the performance benchmarks (issue 6): machine record, timing, memory, FLOPs, models.

Every result file the benchmarks write carries :func:`machine` (CPU model, cores, RAM, load, GPU or
null, versions, date) next to its settings and raw timings, so numbers from different machines are
never compared blind. Timings are medians of alternating runs (a, b, a, b, ...) after a warm-up:
on a shared 2-core machine the load drifts, and alternating puts the same drift on both sides.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the repo, on sys.path
    sys.path.insert(0, str(REPO))

# The published SDXL base UNet, stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
# (diffusers-format keys; unlisted keys are diffusers defaults, equal to the published values).
SDXL_UNET_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SDXL_UNET_PARAMS = 2_567_463_684  # parameter count of the published unet/diffusion_pytorch_model.safetensors
SDXL_VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    force_upcast=True,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=1024,
    scaling_factor=0.13025,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
# text_encoder (CLIP ViT-L/14 text tower) and text_encoder_2 (OpenCLIP ViT-bigG/14 text tower, projected)
SDXL_TEXT_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    vocab_size=49408,
    max_position_embeddings=77,
)
SDXL_TEXT2_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
    vocab_size=49408,
    max_position_embeddings=77,
)


# ------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class BenchFamily:
    """What the benchmarks need of a model family (``--family``) beyond rlfh's own adapter (families/):
    the model they run by default on CPU, and the denoiser's conditioning as the family's reference
    training script builds it, for the reference loop and for random inputs (FLOP counts, breakdowns).

    Attributes:
        name: the family's key (families.FAMILIES).
        tiny_model: the seeded tiny model of the family (CPU default).
        reference_conditioning: ``(pipe, prompts, pixels, device) -> denoiser kwargs`` for one row per
            prompt, computed as the family's diffusers training script computes them every step.
        random_conditioning: ``(pipe, rows, device, dtype) -> denoiser kwargs`` of random inputs.
        reference_noising: ``scheduler config -> ((latents, noise, generator) -> (x_t, t, target))``, the
            reference script's forward process and training target.
        sample_arg: the denoiser's keyword for the latents.
    """

    name: str
    tiny_model: str
    reference_conditioning: Callable[..., dict[str, Any]]
    random_conditioning: Callable[..., dict[str, Any]]
    reference_noising: Callable[[Any], Callable]
    sample_arg: str = "sample"  # the denoiser's latent argument (a UNet's sample, a transformer's hidden_states)

    def denoiser(self, pipe) -> Any:
        """The pipeline's denoiser (``pipe.unet``, ``pipe.transformer``), as rlfh's family names it."""
        from families import get_family

        return getattr(pipe, get_family(self.name).denoiser)

    def lora_targets(self) -> list[str]:
        """The modules the family's diffusers LoRA script adapts (rlfh's default ``model.lora.target_modules``)."""
        from families import get_family

        return list(get_family(self.name).lora_targets)

    def call(self, module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The denoiser's output at (x, t) with the conditioning kwargs ``cond``."""
        return module(**{self.sample_arg: x}, timestep=t, **cond, return_dict=False)[0]


def _ddpm_noising(scheduler_config) -> Callable:
    """The UNet scripts' forward process (train_diffusion_dpo*.py): t ~ U{0..T-1}, DDPMScheduler.add_noise, target
    eps; returns ``(latents, noise, generator) -> (x_t, t, target)``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler_config)

    def noising(latents, noise, gen):
        b = latents.shape[0] // 2
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(latents.device).repeat(2)
        return sched.add_noise(latents, noise, t), t, noise

    return noising


def _flow_noising(scheduler_config) -> Callable:
    """diffusers' train_dreambooth_lora_sd3.py forward process: a training sigma of the shifted schedule
    (uniform over its N, weighting_scheme "none"), x_t = (1 - sigma) x0 + sigma eps, timestep N sigma, target
    the velocity eps - x0; the same ``(latents, noise, generator) -> (x_t, t, target)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def noising(latents, noise, gen):
        b = latents.shape[0] // 2
        i = torch.randint(0, len(sched.timesteps), (b,), generator=gen).repeat(2)
        sigma = sched.sigmas[i].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        return (1 - sigma) * latents + sigma * noise, sched.timesteps[i].to(latents.device), noise - latents

    return noising


def _sdxl_reference_conditioning(pipe, prompts: list[str], pixels: int, device) -> dict[str, Any]:
    # diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py: both text encoders
    # every step, and the micro-conditioning time ids of the (square, uncropped) image
    enc, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    time_ids = pipe._get_add_time_ids(
        (pixels, pixels),
        (0, 0),
        (pixels, pixels),
        dtype=enc.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    added = {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)}
    return {"encoder_hidden_states": enc, "added_cond_kwargs": added}


def _sdxl_random_conditioning(pipe, rows: int, device, dtype) -> dict[str, Any]:
    unet = pipe.unet
    added = {
        "text_embeds": torch.randn(rows, pipe.text_encoder_2.config.projection_dim, device=device, dtype=dtype),
        "time_ids": torch.randn(rows, 6, device=device, dtype=dtype),
    }
    enc = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    return {"encoder_hidden_states": enc, "added_cond_kwargs": added}


def _sd15_reference_conditioning(pipe, prompts: list[str], pixels: int, device) -> dict[str, Any]:
    # diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py: the text encoder's last
    # hidden state, every step
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return {"encoder_hidden_states": pipe.text_encoder(ids.to(device))[0]}


def _sd15_random_conditioning(pipe, rows: int, device, dtype) -> dict[str, Any]:
    enc = torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    return {"encoder_hidden_states": enc}


def _sd3_reference_conditioning(pipe, prompts: list[str], pixels: int, device) -> dict[str, Any]:
    # diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py: encode_prompt (the CLIP pair and T5, or zeros
    # without it) and the pooled projections, every step for per-image captions
    enc, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return {"encoder_hidden_states": enc, "pooled_projections": pooled}


def _sd3_random_conditioning(pipe, rows: int, device, dtype) -> dict[str, Any]:
    cfg = pipe.transformer.config
    tokens = 77 + 256  # the CLIP tokens and the pipeline's default T5 length
    return {
        "encoder_hidden_states": torch.randn(rows, tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
        "pooled_projections": torch.randn(rows, cfg.pooled_projection_dim, device=device, dtype=dtype),
    }


# A family the CPU benchmarks measure is one entry here (FLUX joins with its transformer's inputs).
BENCH_FAMILIES: dict[str, BenchFamily] = {
    f.name: f
    for f in (
        BenchFamily("sdxl", "rlfh:tiny-sdxl", _sdxl_reference_conditioning, _sdxl_random_conditioning, _ddpm_noising),
        BenchFamily("sd15", "rlfh:tiny-sd15", _sd15_reference_conditioning, _sd15_random_conditioning, _ddpm_noising),
        BenchFamily(
            "sd3",
            "rlfh:tiny-sd3",
            _sd3_reference_conditioning,
            _sd3_random_conditioning,
            _flow_noising,
            sample_arg="hidden_states",
        ),
    )
}


def bench_family(name: str) -> BenchFamily:
    """The benchmarks' entry of ``--family name``; a clear error naming the ones there are otherwise."""
    if name not in BENCH_FAMILIES:
        raise SystemExit(f"--family {name}: the benchmarks know {sorted(BENCH_FAMILIES)}")
    return BENCH_FAMILIES[name]


def repeat_rows(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Denoiser kwargs with every tensor's rows repeated ``n`` times (the winners', then the losers')."""
    return {
        k: repeat_rows(v, n) if isinstance(v, dict) else v.repeat(n, *[1] * (v.dim() - 1)) for k, v in kwargs.items()
    }


# ------------------------------------------------------------------------------------ machine
def machine(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import deepspeed
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    ram_gib = None
    try:
        cpu = next(
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        )
        kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        ram_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    gpu = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda,
        }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu,
            "logical_cores": os.cpu_count(),
            "ram_gib": ram_gib,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_avg_1_5_15_at_start": list(os.getloadavg()),
        },
        "gpu": gpu,
        "device": gpu["name"] if gpu else f"cpu: {cpu}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__,
            "peft": peft.__version__,
        },
    }


def write_result(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.setdefault("machine_load_avg_at_end", list(os.getloadavg()))
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"[bench] wrote {path}")
    return path


def set_threads(n: int | None, device: torch.device) -> None:
    """CPU default 1 thread: the tiny config's actors each run 1 thread, and on a shared 2-core machine
    2 OpenMP threads stall for seconds whenever another process takes a core (seen: 0.9 s -> 30 s)."""
    if n or device.type == "cpu":
        torch.set_num_threads(n or 1)


def result_name(
    kind: str, device: torch.device, model: str, default_model: str, smoke: bool, family: str = "sdxl"
) -> str:
    """smoke_<kind> | gpu_<kind> | cpu_tiny_<kind> for the default model, else <dev>_<model slug>_<kind>;
    a family other than SDXL after the prefix (smoke_sd15_<kind>, cpu_tiny_sd15_<kind>, ...)."""
    kind = kind if family == "sdxl" else f"{family}_{kind}"
    if smoke:
        return f"smoke_{kind}"
    dev = "gpu" if device.type == "cuda" else "cpu"
    if model == default_model:
        return f"{dev}_{kind}" if dev == "gpu" else f"cpu_tiny_{kind}"
    slug = "".join(c if c.isalnum() else "-" for c in Path(model).name or model).strip("-")
    return f"{dev}_{slug}_{kind}"


def pick_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


# ------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    between: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Run each fn ``warmup`` times, then ``repeats`` rounds of a, b, a, b, ...; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
            if between:
                between()
    return times


def paired_ratio(base: list[float], new: list[float]) -> dict[str, float]:
    """Speed of ``new`` over ``base`` (>1: new is faster), three ways.

    ``paired_median`` (the headline): the median over rounds of base_i / new_i, each pair measured
    back to back, so load drifting between rounds cancels. ``of_medians`` and ``of_mins`` for
    reference; the min is the least-contended run of each.
    """
    pairs = [a / b for a, b in zip(base, new)]
    return {
        "paired_median": statistics.median(pairs),
        "of_medians": statistics.median(base) / statistics.median(new),
        "of_mins": min(base) / min(new),
        "pairs": pairs,
    }


def summary(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts), "all_s": ts}


# ------------------------------------------------------------------------------------ memory
def rss_bytes(private: bool = False) -> int:
    """Resident memory of this process; ``private``: without shared pages (e.g. Ray object-store
    pages the process wrote or mapped, one copy on the node however many processes read them)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    pages = int(fields[1]) - (int(fields[2]) if private else 0)
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` on GPU, sampled RSS (every 2 ms) on CPU.

    CPU: ``ru_maxrss`` cannot be reset between variants run in one process, and tracemalloc misses
    torch's allocator, so a thread samples /proc/self/statm; ``peak_delta_bytes`` is the peak above
    the RSS at entry (what the step itself allocates), ``peak_bytes`` the absolute peak.
    """

    def __init__(self, device: torch.device, private: bool = False):
        self.device, self.peak, self.base, self.private = device, 0, 0, private

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = rss_bytes(self.private)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes(self.private))

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes(self.private))

    def result(self) -> dict[str, Any]:
        how = (
            "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "sampled RSS (/proc/self/statm, 2 ms)"
        )
        return {"method": how, "peak_bytes": self.peak, "peak_delta_bytes": self.peak - self.base}


def tensor_bytes(*objs) -> int:
    """Bytes held by the distinct tensors (params, buffers, optimizer state) of modules/optimizers."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in [*o.parameters(), *o.buffers()]:
                add(t)
                add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
    return total


# ------------------------------------------------------------------------------------ FLOPs and peak
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` dispatches (forward and backward), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def matmul_peak(device: torch.device, seconds: float = 3.0) -> dict[str, Any]:
    """Dense matmul FLOP/s on this device: bf16 on GPU, fp32 on CPU; the denominator of MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 5:
        dt = timed(lambda: a @ b, device)
        rates.append(2 * n**3 / dt)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "median_flops": statistics.median(rates),
        "max_flops": max(rates),
        "samples": len(rates),
    }


# ------------------------------------------------------------------------------------ models
def build_sdxl_arch_random(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The published SDXL base architecture with seeded random weights, as a StableDiffusionXLPipeline.

    Tokenizers: the published CLIP BPE files are not available offline, so both use the byte-level
    tokenizer of families.tiny (514 ids, a subset of the real 49408-row embedding tables, which keep
    their published size). Prompts become longer token sequences than with the real BPE, but the
    text encoders always run on 77 padded positions, so FLOPs are unchanged.
    """
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from families.tiny import write_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        n_tok = write_tiny_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    ids = dict(bos_token_id=n_tok - 2, eos_token_id=n_tok - 1, pad_token_id=n_tok - 1)  # EOS pooling finds them
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: 3.5B params initialise in seconds on a GPU
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIG, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT2_CONFIG, **ids))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )  # the published scheduler config
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


# stabilityai/stable-diffusion-3.5-medium transformer/config.json: the MMDiT-X, 24 blocks of 24 heads x 64, dual
# (self + joint) attention in blocks 0-12, RMS-normed q/k, 16 latent channels
SD35M_TRANSFORMER_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# its vae/config.json: SDXL's VAE layout with 16 latent channels, no quant convs, SD3's scale and shift
SD3_VAE_CONFIG = dict(
    SDXL_VAE_CONFIG,
    latent_channels=16,
    force_upcast=True,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def build_sd35m_arch_random(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD3.5 medium's architecture with seeded random weights, as a StableDiffusion3Pipeline: the MMDiT-X, its VAE,
    CLIP-L and CLIP-G with projections (SDXL's two text towers' configs). Without T5 (``text_encoder_3=None``, as
    diffusers allows: its 256 token rows are zeros): no T5 tokenizer can be built offline. The transformer still
    attends over the 77 + 256 token rows, so its FLOPs are the real model's; the T5 encoder's own cost (once per
    prompt in rlfh's cached sampler, every call in the stock pipeline) is left out of both sides."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from families.tiny import write_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        n_tok = write_tiny_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    ids = dict(bos_token_id=n_tok - 2, eos_token_id=n_tok - 1, pad_token_id=n_tok - 1)
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**SD3_VAE_CONFIG)
        te1 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_CONFIG, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT2_CONFIG, **ids))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # the published config
        vae=vae,
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


# the random-weight models of the published architectures: name -> (builder, latent channels)
ARCH_RANDOM = {
    "sdxl-arch-random": (build_sdxl_arch_random, SDXL_UNET_CONFIG["in_channels"]),
    "sd35m-arch-random": (build_sd35m_arch_random, SD35M_TRANSFORMER_CONFIG["in_channels"]),
}


def check_sdxl_arch() -> dict[str, Any]:
    """Parameter counts of the SDXL-arch modules, built on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        mods = {
            "unet": UNet2DConditionModel(**SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT2_CONFIG)),
        }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}
    counts["unet_published"] = SDXL_UNET_PARAMS
    counts["unet_matches_published"] = counts["unet"] == SDXL_UNET_PARAMS
    return counts


def latent_channels(name: str) -> int:
    """The latent channels of model ``name`` (an ``*-arch-random`` name, or what families.load_pipeline loads)."""
    if name in ARCH_RANDOM:
        return ARCH_RANDOM[name][1]
    from families import detect_family, resolve_model_path

    path = resolve_model_path(name)
    family = detect_family(path)
    return json.loads((Path(path) / family.denoiser / "config.json").read_text())["in_channels"]


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """``sdxl-arch-random`` | ``sd35m-arch-random`` | ``rlfh:tiny-sdxl`` | a path or hub id (through
    families.load_pipeline)."""
    if name in ARCH_RANDOM:
        return ARCH_RANDOM[name][0](device, dtype)
    from families import load_pipeline
    from rlfh.config.schema import ModelConfig

    inv = {v: k for k, v in DTYPES.items()}
    return load_pipeline(ModelConfig(path=name, dtype=inv[dtype]), device)


def quiet() -> None:
    """Offline defaults and no per-call deprecation chatter (as rlfh's CLI does)."""
    from rlfh.env import apply_env_defaults

    apply_env_defaults()
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    dl.set_verbosity_error()
    tl.set_verbosity_error()
