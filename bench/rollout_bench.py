"""Rollout throughput: rlfh's Sampler against the stock diffusers pipeline call (StableDiffusionXLPipeline, or
the ``--family``'s own: StableDiffusionPipeline for sd15, StableDiffusion3Pipeline for sd3).

    python bench/rollout_bench.py                       # auto: GPU -> SDXL-arch 1024 px, CPU -> tiny 64 px
    python bench/rollout_bench.py --model sdxl-arch-random --batch-sizes 1,2,4,8,16 --steps 30 --no-compile
    python bench/rollout_bench.py --smoke               # seconds: tiny model, batch 1, 2 steps
    python bench/rollout_bench.py --family sd15         # another family: its stock pipeline, its tiny model

(a) ``pipe(prompt=..., negative_prompt=..., generator=[...], num_inference_steps, guidance_scale)``
as a user calls it (default PIL output); (b) ``Sampler.sample`` on the SAME pipeline object, same
device, dtype, prompts, seeds, steps and CFG; (c) the Sampler as rollout actors ran it before the
LoRA was merged: an unmerged peft LoRA adapter (rank --lora-rank) and prompts encoded every batch;
(d) the Sampler as they run it now: the same LoRA state merged into the weights
(``Sampler.add_lora(merge=True)``, on a copy of the UNet; text encoders and VAE shared) and the
prompt embeddings cached. Runs alternate a, b, c, d after a warm-up. Headlines, median paired ratios
at the largest batch (>1: ours faster): ``rollout_ratio`` = t_a / t_b and ``rollout_lora_ratio`` =
t_a / t_d (the LoRA policy's sampling against the stock pipeline without any LoRA). Side checks: the
outputs of a and b pixel by pixel; eps and images of c vs d (merged vs unmerged). --compile adds
``Sampler.compile`` (torch.compile of UNet and VAE decoder; CUDA graphs on GPU) on the merged
sampler with the compile time reported apart and images compared to eager (GPU default).

MFU: UNet FLOPs per forward (FlopCounterMode, CFG batch of 2 per image) x steps, plus one VAE decode,
times images/s, over the dense matmul peak measured in this process (bf16 GPU / fp32 CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

PROMPTS = ["a photo of a person", "a portrait of a woman", "a man waving his hand", "two people talking"]


def defaults(device: torch.device, smoke: bool, family: common.BenchFamily) -> dict:
    tiny = family.tiny_model
    if smoke:
        return dict(model=tiny, size=64, steps=2, batch_sizes=[1], repeats=1, dtype="float32")
    if device.type == "cuda" and family.name == "sdxl":
        # [1, 4, 16] x 3 variants x (1 warm-up + 2) calls fits a 10-minute per-command limit
        return dict(model="sdxl-arch-random", size=1024, steps=30, batch_sizes=[1, 4, 16], repeats=2, dtype="bfloat16")
    return dict(model=tiny, size=64, steps=10, batch_sizes=[1, 4, 8, 16], repeats=7, dtype="float32")


def unet_flops_per_image(pipe, size: int, cfg: bool, device, dtype, family: common.BenchFamily) -> dict[str, int]:
    """FLOPs of one UNet forward for one image (2 rows with CFG) and of one VAE decode."""
    unet, h = family.denoiser(pipe), size // pipe.vae_scale_factor
    rows = 2 if cfg else 1
    x = torch.randn(rows, unet.config.in_channels, h, h, device=device, dtype=dtype)
    cond = family.random_conditioning(pipe, rows, device, dtype)
    t = torch.tensor([500] * rows, device=device)
    with torch.no_grad():
        f_unet = common.count_flops(lambda: family.call(unet, x, t, cond))
        z = torch.randn(1, pipe.vae.config.latent_channels, h, h, device=device, dtype=dtype)
        f_vae = common.count_flops(lambda: pipe.vae.decode(z))
    return {"unet_forward_per_image": f_unet, "vae_decode_per_image": f_vae}


def compile_phase(sampler, settings, row: dict, device, repeats: int) -> dict:
    """channels_last + ``Sampler.compile`` (UNet and VAE decoder; CUDA: reduce-overhead, i.e. CUDA
    graphs) on the given sampler, at the headline batch size, against its eager times in ``row``.

    The first call's time minus a steady call is the compile cost, reported apart from throughput.
    """
    bs = row["batch_size"]
    prompts, seeds = [PROMPTS[i % len(PROMPTS)] for i in range(bs)], list(range(1000, 1000 + bs))
    eager = sampler.sample(prompts, seeds, settings)
    sampler.family.model(sampler.pipe).to(memory_format=torch.channels_last)
    sampler.compile()
    first = common.timed(lambda: sampler.sample(prompts, seeds, settings), device)
    ts = [common.timed(lambda: sampler.sample(prompts, seeds, settings), device) for _ in range(max(repeats, 2))]
    steady = common.summary(ts)
    compiled = sampler.sample(prompts, seeds, settings)
    eager_row = row.get("sampler_lora_merged", row["rlfh_sampler"])
    return {
        "what": "unet.to(channels_last); Sampler.compile() (UNet + VAE decoder; "
        + ("reduce-overhead: CUDA graphs" if device.type == "cuda" else "default mode")
        + ")",
        "batch_size": bs,
        "first_call_s": first,
        "compile_s_estimate": first - steady["median_s"],
        "steady": steady,
        "images_per_s": bs / steady["median_s"],
        "speedup_over_eager_sampler": eager_row["median_s"] / steady["median_s"],
        "images_max_abs_diff_uint8_vs_eager": int(np.abs(eager.images.astype(np.int16) - compiled.images).max()),
        "latents_max_abs_diff_vs_eager": float(np.abs(eager.latents - compiled.latents).max()),
    }


def random_lora_state(lora, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A peft-format LoRA state (A (r, in), B (out, r)) with a non-zero delta, so the merge is real."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in lora.modules.items():
        out, inp = m.weight.shape[:2]
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        sd[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
    return sd


def profile_sampler(sampler, prompts, seeds, settings, top: int = 15) -> list[dict]:
    """torch.profiler top ops (self CPU time) of one Sampler.sample call; where rollout time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        sampler.sample(prompts, seeds, settings)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    rows = sorted(
        prof.key_averages(),
        key=lambda e: getattr(e, key.replace("cuda", "device"), 0) or getattr(e, key, 0),
        reverse=True,
    )
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
            "self_cpu_share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
        }
        for e in rows[:top]
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default=None, help="sdxl-arch-random | sd35m-arch-random | rlfh:tiny-sdxl | path or hub id"
    )
    ap.add_argument(
        "--family",
        default="sdxl",
        help=f"the model family, one of {sorted(common.BENCH_FAMILIES)}: its tiny model by default (CPU; "
        "GPU: SDXL's architecture for sdxl), results named after it (cpu_tiny_<family>_rollout.json)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--size", type=int, default=None, help="image height = width in px")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch-sizes", default=None, help="comma list, e.g. 1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=None, help="timed a/b rounds per batch size")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (CPU default 1, see common.set_threads)"
    )
    ap.add_argument("--profile", action="store_true", help="add torch.profiler top ops of one Sampler call")
    ap.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="also time the Sampler with a LoRA of this rank, "
        "unmerged (c, before) and merged (d, as rollout actors run) (0: skip; default 8)",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the a/b runs: channels_last + Sampler.compile on the merged-LoRA sampler (or the "
        "plain one), compile time reported apart (default: on for GPU)",
    )
    ap.add_argument("--smoke", action="store_true", help="seconds-long run of every code path")
    ap.add_argument("--out", default=None, help="result name under bench/results (default by device)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)

    common.quiet()
    device = common.pick_device(args.device)
    common.set_threads(args.threads, device)
    family = common.bench_family(args.family)
    d = defaults(device, args.smoke, family)
    model = args.model or d["model"]
    size, steps = args.size or d["size"], args.steps or d["steps"]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else d["batch_sizes"]
    repeats = args.repeats or d["repeats"]
    dtype = common.DTYPES[args.dtype or d["dtype"]]
    args.lora_rank = 8 if args.lora_rank is None else args.lora_rank
    args.compile = device.type == "cuda" and not args.smoke if args.compile is None else args.compile

    from rollouts.sampler import Sampler, seeded_generators
    from rollouts.types import SamplerSettings

    record = common.machine(device)
    pipes = []
    print(f"[rollout] {record['device']}; model {model}, {size} px, {steps} steps, CFG {args.guidance}, {dtype}")
    t_load = common.timed(lambda: pipes.append(common.load_model(model, device, dtype)), device)
    pipe = pipes[0]
    sampler = Sampler(pipe, model_id=model)
    settings = SamplerSettings(steps, args.guidance, "", size, size)
    targets = family.lora_targets()  # the UNets' to_q/k/v/out.0; SD3's joint-attention projections
    denoiser = family.denoiser(pipe)
    den_name = sampler.family.denoiser
    merged = unmerged = None
    if args.lora_rank:
        import copy

        # (d) the rollout actors' sampler: the LoRA merged into a UNet of its own, the rest shared
        pipe_m = type(pipe)(
            **{**pipe.components, den_name: copy.deepcopy(denoiser), "scheduler": copy.deepcopy(pipe.scheduler)}
        )
        pipe_m.set_progress_bar_config(disable=True)
        merged = Sampler(pipe_m, model_id=model)
        merged.add_lora(args.lora_rank, args.lora_rank, targets)
        lora_state = random_lora_state(merged.lora, args.lora_rank)
        merged.load_lora(lora_state, 1)
        # (c) before: an unmerged peft adapter on the shared UNet (toggled off for a and b), no prompt cache
        unmerged = Sampler(pipe, model_id=model, cache_prompts=False)
        unmerged.add_lora(args.lora_rank, args.lora_rank, targets, merge=False)
        unmerged.load_lora(lora_state, 1)

    def adapters(on: bool):
        if args.lora_rank:
            (denoiser.enable_adapters if on else denoiser.disable_adapters)()

    peak = common.matmul_peak(device, seconds=1.0 if args.smoke else 3.0)

    rows = []
    for bs in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
        seeds = list(range(1000, 1000 + bs))

        def stock():  # the user's call; fresh generators each call, as the Sampler makes them
            return pipe(
                prompt=prompts,
                negative_prompt=[""] * bs,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                height=size,
                width=size,
                generator=seeded_generators(seeds),
            ).images

        def ours():
            return sampler.sample(prompts, seeds, settings)

        fns = {"stock": lambda: (adapters(False), stock()), "sampler": lambda: (adapters(False), ours())}
        if args.lora_rank:
            fns["sampler_lora"] = lambda: (adapters(True), unmerged.sample(prompts, seeds, settings))
            fns["sampler_lora_merged"] = lambda: merged.sample(prompts, seeds, settings)
        times = common.alternate(fns, device, repeats=repeats, warmup=1)
        a, b = common.summary(times["stock"]), common.summary(times["sampler"])
        row = {
            "batch_size": bs,
            "stock_pipeline": a,
            "rlfh_sampler": b,
            "stock_images_per_s": bs / a["median_s"],
            "sampler_images_per_s": bs / b["median_s"],
            "ratio": common.paired_ratio(times["stock"], times["sampler"]),
        }
        row["ratio_sampler_over_stock"] = row["ratio"]["paired_median"]
        if args.lora_rank:  # what the LoRA costs a rollout: unmerged (before), merged (now)
            for k in ("sampler_lora", "sampler_lora_merged"):
                row[k] = common.summary(times[k])
                row[f"{k}_images_per_s"] = bs / row[k]["median_s"]
            row["ratio_sampler_lora_over_stock"] = common.paired_ratio(times["stock"], times["sampler_lora"])[
                "paired_median"
            ]
            row["lora_ratio"] = common.paired_ratio(times["stock"], times["sampler_lora_merged"])
            row["ratio_sampler_lora_merged_over_stock"] = row["lora_ratio"]["paired_median"]
            row["ratio_merged_over_unmerged"] = common.paired_ratio(
                times["sampler_lora"], times["sampler_lora_merged"]
            )["paired_median"]
        print(
            f"[rollout] batch {bs:>2}: stock {row['stock_images_per_s']:.3f} img/s, sampler "
            f"{row['sampler_images_per_s']:.3f} img/s, ratio {row['ratio_sampler_over_stock']:.3f}"
            + (
                f"; LoRA{args.lora_rank} unmerged {row['ratio_sampler_lora_over_stock']:.3f}, merged "
                f"{row['ratio_sampler_lora_merged_over_stock']:.3f}"
                if args.lora_rank
                else ""
            )
        )
        rows.append(row)

    adapters(False)
    # Same computation? One more pair at the first batch size, outputs compared as uint8 pixels.
    bs0 = batch_sizes[0]
    pr, sd = [PROMPTS[i % len(PROMPTS)] for i in range(bs0)], list(range(1000, 1000 + bs0))
    img_a = pipe(
        prompt=pr,
        negative_prompt=[""] * bs0,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        height=size,
        width=size,
        generator=seeded_generators(sd),
        output_type="np",
    ).images
    img_b = sampler.sample(pr, sd, settings).images
    diff = int(np.abs((img_a * 255).round().astype(np.int16) - img_b.astype(np.int16)).max())
    merge_check = None
    if args.lora_rank:  # merged vs unmerged: the same policy up to rounding?
        adapters(True)
        c = denoiser.config.in_channels
        x = torch.randn(2, c, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        e_u, e_m = unmerged.denoiser_output(x, 500, pr[0]), merged.denoiser_output(x, 500, pr[0])
        e_0 = (adapters(False), sampler.denoiser_output(x, 500, pr[0]))[1]
        adapters(True)
        out_u, out_m = unmerged.sample(pr, sd, settings), merged.sample(pr, sd, settings)
        adapters(False)
        merge_check = {
            "eps_max_abs_diff": float((e_u - e_m).abs().max()),
            "eps_max_abs": float(e_u.abs().max()),
            "eps_moved_by_lora": float((e_u - e_0).abs().max()),
            "latents_max_abs_diff": float(np.abs(out_u.latents - out_m.latents).max()),
            "images_max_abs_diff_uint8": int(np.abs(out_u.images.astype(np.int16) - out_m.images).max()),
            "images_differing_values": int((out_u.images != out_m.images).sum()),
            "images_values": int(out_u.images.size),
            "base_copy_bytes": merged.lora.base_bytes,
            "unet_bytes": sum(p.numel() * p.element_size() for p in family.denoiser(merged.pipe).parameters()),
        }

    flops = unet_flops_per_image(pipe, size, args.guidance > 1.0, device, dtype, family)
    per_image = flops["unet_forward_per_image"] * steps + flops["vae_decode_per_image"]
    best = max(rows, key=lambda r: r["sampler_images_per_s"])
    headline_row = rows[-1]  # the largest batch: the setting rollouts run at
    result = {
        "benchmark": "rollout",
        **record,
        "settings": {
            "family": family.name,
            "model": model,
            "dtype": str(dtype).replace("torch.", ""),
            "size": size,
            "steps": steps,
            "guidance_scale": args.guidance,
            "batch_sizes": batch_sizes,
            "repeats": repeats,
            "order": "alternating stock, sampler[, sampler_lora (unmerged, no prompt cache), "
            "sampler_lora_merged] after 1 warm-up call each",
            "sampler_lora_rank": args.lora_rank,
            "smoke": args.smoke,
            "stock_call": "pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, height, "
            "width, generator=[per-sample]) -> PIL (default output)",
            "load_s": t_load,
        },
        "rollout_ratio": headline_row["ratio_sampler_over_stock"],  # paired median at the largest batch
        "rollout_ratio_all_batches": float(np.median([x for r in rows for x in r["ratio"]["pairs"]])),
        "rollout_ratio_by_batch": {r["batch_size"]: r["ratio_sampler_over_stock"] for r in rows},
        # the LoRA policy's sampling (merged, prompts cached) against the stock pipeline without a LoRA
        "rollout_lora_ratio": headline_row.get("ratio_sampler_lora_merged_over_stock"),
        "rollout_lora_ratio_by_batch": {r["batch_size"]: r.get("ratio_sampler_lora_merged_over_stock") for r in rows},
        "rollout_lora_ratio_before": headline_row.get("ratio_sampler_lora_over_stock"),  # unmerged, uncached
        "merged_vs_unmerged": merge_check,
        "rollout_mfu": per_image * best["sampler_images_per_s"] / peak["median_flops"],
        "stock_mfu": per_image * max(r["stock_images_per_s"] for r in rows) / peak["median_flops"],
        "mfu_basis": "FlopCounterMode UNet forward (CFG rows) x steps + VAE decode, at the best batch size, over "
        "the measured matmul peak; text encoders and scheduler excluded",
        "flops": {**flops, "per_image": per_image},
        "matmul_peak": peak,
        "outputs_max_abs_diff_uint8": diff,
        "rows": rows,
    }
    if args.compile:
        result["compile"] = compile_phase(merged or sampler, settings, headline_row, device, repeats)
    if args.profile:
        pr = [PROMPTS[i % len(PROMPTS)] for i in range(headline_row["batch_size"])]
        result["profile_sampler_top_ops"] = profile_sampler(sampler, pr, list(range(len(pr))), settings)
    if args.lora_rank:
        print(
            f"[rollout] rollout_lora_ratio (merged LoRA sampler / stock without LoRA) "
            f"{result['rollout_lora_ratio']:.3f} "
            f"(unmerged before: {result['rollout_lora_ratio_before']:.3f}); merged vs unmerged {merge_check}"
        )
    print(
        f"[rollout] headline ratio (batch {headline_row['batch_size']}) {result['rollout_ratio']:.3f}; "
        f"rollout_mfu {result['rollout_mfu']:.4f}; max pixel diff stock vs sampler {diff}"
    )
    kind = "rollout_compile" if args.compile else "rollout"
    name = args.out or common.result_name(kind, device, model, d["model"], args.smoke, family.name)
    common.write_result(name, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
