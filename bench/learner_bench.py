"""Diffusion-DPO learner throughput and memory: rlfh's LearnerEngine against a plain reference loop.

    python bench/learner_bench.py                       # auto: GPU -> SDXL-arch 1024 px, CPU -> tiny 64 px
    python bench/learner_bench.py --modes lora8,lora64,full --pairs 1 --size 1024
    python bench/learner_bench.py --smoke               # seconds: tiny model, lora8, 2 steps
    python bench/learner_bench.py --family sd15         # another family: its tiny model and reference script

(a) ``reference_loop``: the loss and step written inline as diffusers'
examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py (``--family sd15``:
train_diffusion_dpo.py, the same loss on SD1.5's one text encoder) writes them (per-sample MSE,
w/l chunks, -logsigmoid(-beta/2 (model_diff - ref_diff)), clip, AdamW), in plain PyTorch with no
compile, but with the reference as a SECOND frozen UNet copy (the original DiffusionDPO training
scripts' full fine-tuning set-up; the diffusers LoRA example itself disables the adapters instead).
On GPU: weights bf16, trainable params fp32, autocast bf16, as that example does with accelerate.
(b) ``rlfh``: rlfh.learner.steps.train_pairs (DeepSpeed engine, LoRA via peft, reference =
adapters disabled; full mode keeps a frozen copy too). One call = one optimizer step on --pairs pairs.
(c) with ``--rlfh-compile``: (b) with ``learner.engine.compile=true`` (inductor; the first step pays the
compile), timed in the same alternation; the headline ratio then uses (c) and (b) stays as the
``_eager`` ratio. The reference loop stays eager, as the example runs it.

Modes: lora8, lora64 (LoRA rank 8 / 64 on to_q, to_k, to_v, to_out.0) and full (whole UNet).
Memory: GPU torch.cuda.max_memory_allocated; CPU sampled RSS (see common.PeakMemory).
MFU: FlopCounterMode FLOPs of one rlfh step (forward, backward, reference forward) per pair x pairs/s
over the matmul peak measured in this process.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

PROMPTS = ["a photo of a person", "a portrait of a woman", "a man waving his hand", "two people talking"]


class ReferenceLoop:
    """The reference-style Diffusion-DPO step: a second frozen UNet, loss inline, plain AdamW."""

    def __init__(
        self, model: str, device, dtype, rank: int | None, beta: float, family: common.BenchFamily, lr: float = 1e-5
    ):
        self.device, self.dtype, self.beta, self.family = device, dtype, beta, family
        self.pipe = common.load_model(model, device, dtype)
        self.pipe.vae = None  # trains on latents, like the learner
        self.noising = family.reference_noising(self.pipe.scheduler.config)
        unet = family.denoiser(self.pipe)  # the UNet, or SD3's transformer
        unet.requires_grad_(False)
        self.ref_unet = copy.deepcopy(unet).eval()  # the second denoiser this loop is about
        if rank:
            from peft import LoraConfig

            targets = family.lora_targets()
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        else:
            unet.requires_grad_(True)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # cast_training_params(unet, torch.float32), as the example does
        self.unet = unet.train()
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.gen = torch.Generator().manual_seed(1)

    def step(self, lat_w: np.ndarray, lat_l: np.ndarray, prompts: list[str]) -> float:
        dev = self.device
        latents = torch.cat([torch.from_numpy(lat_w), torch.from_numpy(lat_l)]).to(dev)  # (2B, 4, h, w)
        noise = torch.randn(lat_w.shape, generator=self.gen).to(dev).repeat(2, 1, 1, 1)
        x_t, t, target = self.noising(latents, noise, self.gen)  # eps for the UNets, eps - x0 for SD3
        with torch.no_grad():
            cond = common.repeat_rows(
                self.family.reference_conditioning(self.pipe, prompts, lat_w.shape[-1] * 8, dev), 2
            )
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        with amp:
            pred = self.family.call(self.unet, x_t.to(self.dtype), t, cond)
        model_losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        lw, ll = model_losses.chunk(2)
        with torch.no_grad(), amp:
            ref = self.family.call(self.ref_unet, x_t.to(self.dtype), t, cond)
            ref_losses = F.mse_loss(ref.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        rw, rl = ref_losses.chunk(2)
        loss = -F.logsigmoid(-0.5 * self.beta * ((lw - ll) - (rw - rl))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def modules(self):
        return [self.unet, self.ref_unet, self.opt]


class RlfhLearner:
    """rlfh.learner.engine.LearnerEngine behind the same ``step`` signature."""

    def __init__(
        self,
        model: str,
        device,
        dtype,
        rank: int | None,
        beta: float,
        pairs: int,
        checkpointing: bool,
        compile: bool = False,
    ):
        import families
        from rlfh.config.schema import load_config
        from rlfh.data.batches import PairBatch
        from rlfh.learner.engine import LearnerEngine
        from rlfh.learner.steps import train

        if model in common.ARCH_RANDOM:
            # LearnerEngine loads through families.load_pipeline(cfg.model); build in memory instead of
            # writing ~10 GB of random weights to disk and reading them back. Nothing else changes.
            families.load_pipeline = lambda model_cfg, dev: common.load_model(
                model, torch.device(dev), common.DTYPES[model_cfg.dtype]
            )
        name = {v: k for k, v in common.DTYPES.items()}[dtype]
        ov = [
            f"model.path={model}",
            f"model.dtype={name}",
            f"learner.dpo.beta={beta}",
            "learner.lr=1e-5",
            f"learner.train_batch_size={pairs}",
            f"learner.micro_batch_size_per_gpu={pairs}",
            f"learner.engine.gradient_checkpointing={str(checkpointing).lower()}",
            f"learner.engine.compile={str(compile).lower()}",
        ]
        ov += [f"model.lora.rank={rank}", f"model.lora.alpha={rank}"] if rank else ["model.lora.enabled=false"]
        self.cfg = load_config(common.REPO / "configs" / "tiny.yaml", ov)
        self.learner = LearnerEngine(self.cfg, device=str(device))
        self.PairBatch, self.train = PairBatch, train
        # what the rollout actors send with their samples (RolloutBatch.conditioning): the prompts
        # encoded once, in one call, as a sampler batch does; the learner then runs no text encoder
        rows = families.PromptCache(self.learner.family, enabled=False).rows(self.learner.pipe, PROMPTS, device)
        self.conditioning = {p: tuple(f[i].float().cpu().numpy() for f in rows) for i, p in enumerate(PROMPTS)}

    def step(self, lat_w, lat_l, prompts) -> float:
        batch = self.PairBatch(lat_w, lat_l, prompts, conditioning=self.conditioning)
        return self.train(self.learner, batch, epochs=1)["loss/dpo"]

    def modules(self):
        opt = self.learner.optimizer
        inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
        return [m for m in (self.learner.denoiser, self.learner.ref_denoiser, inner) if m is not None]


def resident(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else common.rss_bytes()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_mode(mode: str, args, device, dtype, peak) -> dict:
    rank = int(mode[4:]) if mode.startswith("lora") else None
    h, c = args.size // 8, args.latent_channels
    g = np.random.default_rng(0)
    lat_w = g.standard_normal((args.pairs, c, h, h), dtype=np.float32)
    lat_l = g.standard_normal((args.pairs, c, h, h), dtype=np.float32)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.pairs)]
    builders = {
        "reference_loop": lambda: ReferenceLoop(args.model, device, dtype, rank, args.beta, args.bench_family),
        "rlfh": lambda: RlfhLearner(
            args.model, device, dtype, rank, args.beta, args.pairs, args.gradient_checkpointing
        ),
    }
    if (
        args.rlfh_compile
    ):  # learner.engine.compile=true: the same step through inductor; its first step pays the compile
        builders["rlfh_compiled"] = lambda: RlfhLearner(
            args.model, device, dtype, rank, args.beta, args.pairs, args.gradient_checkpointing, compile=True
        )
    # Both variants stay resident and alternate when they fit; full SDXL x 2 variants does not fit a GPU.
    sequential = args.sequential or (device.type == "cuda" and rank is None)
    out: dict = {"mode": mode, "lora_rank": rank, "order": "sequential" if sequential else "alternating"}
    variants, times, mem = {}, {k: [] for k in builders}, {}

    def build(k):
        base = resident(device)
        v = builders[k]()
        v.step(lat_w, lat_l, prompts)  # warm-up step also allocates optimizer state
        common.sync(device)
        with common.PeakMemory(device) as pm:
            v.step(lat_w, lat_l, prompts)
        mem[k] = {
            "resident_after_build_bytes": resident(device) - base,
            "tensor_bytes": common.tensor_bytes(*v.modules()),
            **pm.result(),
        }
        return v

    try:
        if sequential:
            for k in builders:
                v = build(k)
                times[k] = common.alternate(
                    {k: lambda v=v: v.step(lat_w, lat_l, prompts)}, device, args.repeats, warmup=0
                )[k]
                if k == "rlfh":
                    variants[k] = v
                else:
                    del v
                    free(device)
        else:
            variants = {k: build(k) for k in builders}
            times = common.alternate(
                {k: (lambda v=v: v.step(lat_w, lat_l, prompts)) for k, v in variants.items()},
                device,
                args.repeats,
                warmup=0,
            )
    except Exception as e:  # noqa: BLE001 -- a one-shot GPU run records the failure and goes on
        import traceback

        kind = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        out["error"] = f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"
        out["traceback_tail"] = traceback.format_exc().splitlines()[-8:]
        print(f"[learner] {mode}: FAILED {out['error']}")
        variants.clear()
        free(device)
        return out
    rl = variants["rlfh"]
    flops_step = common.count_flops(lambda: rl.step(lat_w, lat_l, prompts))
    a, b = common.summary(times["reference_loop"]), common.summary(times["rlfh"])
    out.update(
        {
            "trainable_params": rl.learner.num_trainable,
            "reference_loop": {**a, "pairs_per_s": args.pairs / a["median_s"], "memory": mem["reference_loop"]},
            "rlfh": {**b, "pairs_per_s": args.pairs / b["median_s"], "memory": mem["rlfh"]},
            "ratio": common.paired_ratio(times["reference_loop"], times["rlfh"]),
            "flops_per_pair": flops_step / args.pairs,
            "learner_mfu": flops_step / b["median_s"] / peak["median_flops"],
            "reference_mfu": flops_step / a["median_s"] / peak["median_flops"],
        }
    )
    key = "of_medians" if sequential else "paired_median"
    out["ratio_rlfh_eager_over_reference"] = out["ratio_rlfh_over_reference"] = out["ratio"][key]
    if "rlfh_compiled" in times:  # the headline is rlfh as run for speed; the eager row stays beside it
        c = common.summary(times["rlfh_compiled"])
        out["rlfh_compiled"] = {**c, "pairs_per_s": args.pairs / c["median_s"], "memory": mem["rlfh_compiled"]}
        out["ratio_compiled"] = common.paired_ratio(times["reference_loop"], times["rlfh_compiled"])
        out["ratio_compiled_over_eager"] = common.paired_ratio(times["rlfh"], times["rlfh_compiled"])
        out["ratio_rlfh_over_reference"] = out["ratio_compiled"][key]
        out["learner_mfu_compiled"] = flops_step / c["median_s"] / peak["median_flops"]
    if args.profile:
        out["profile_rlfh_step_top_ops"] = profile_step(lambda: rl.step(lat_w, lat_l, prompts))
        if "reference_loop" in variants:
            rf = variants["reference_loop"]
            out["profile_reference_step_top_ops"] = profile_step(lambda: rf.step(lat_w, lat_l, prompts))
    if "reference_loop" in variants:  # both resident (alternating mode): time the pieces that differ
        out["breakdown"] = breakdown(
            variants["reference_loop"],
            rl,
            args.pairs,
            args.size,
            device,
            dtype,
            n=3 if args.smoke or args.size >= 256 else 10,
        )
        print(
            f"[learner] {mode:>6} breakdown: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out["breakdown"].items())
        )
    print(
        f"[learner] {mode:>6}: reference {out['reference_loop']['pairs_per_s']:.3f} pairs/s, rlfh "
        f"{out['rlfh']['pairs_per_s']:.3f} pairs/s (ratio {out['ratio_rlfh_eager_over_reference']:.3f})"
        + (
            f", rlfh compiled {out['rlfh_compiled']['pairs_per_s']:.3f} pairs/s (ratio "
            f"{out['ratio_rlfh_over_reference']:.3f})"
            if "rlfh_compiled" in out
            else ""
        )
        + f", mfu {out['learner_mfu']:.4f}"
    )
    variants.clear()
    free(device)
    return out


def breakdown(ref: ReferenceLoop, rl: RlfhLearner, pairs: int, size: int, device, dtype, n: int = 10) -> dict:
    """Median seconds of the pieces where the two steps differ: the reference forward (plain copy vs
    adapters disabled, plus the toggle itself) and backward + optimizer step (plain vs DeepSpeed engine)."""
    import statistics

    unet, lrn, fam = ref.unet, rl.learner, ref.family
    cfgu, b2, h = unet.config, 2 * pairs, size // 8
    x = torch.randn(b2, cfgu.in_channels, h, h, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (b2,), device=device)
    cond = fam.random_conditioning(ref.pipe, b2, device, dtype)
    med = lambda fn: statistics.median(common.timed(fn, device) for _ in range(n))  # noqa: E731
    out = {}
    with torch.no_grad():
        out["ref_forward_plain_copy_s"] = med(lambda: fam.call(ref.ref_unet, x, t, cond))
        # rlfh's added conditioning: SDXL's added_cond_kwargs, SD3's pooled projections, SD1.5's none
        enc = cond["encoder_hidden_states"]
        added = cond.get("added_cond_kwargs", {k: v for k, v in cond.items() if k != "encoder_hidden_states"})
        out["ref_forward_rlfh_s"] = med(lambda: lrn.reference(x, t, enc, added))
        if lrn.ref_denoiser is None:

            def toggle():
                with lrn.adapters_off():
                    pass

            out["adapter_toggle_s"] = med(toggle)

    def plain():
        loss = fam.call(ref.unet, x, t, cond).float().square().mean()
        t0 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.params, 1.0)
        ref.opt.step()
        ref.opt.zero_grad(set_to_none=True)
        common.sync(device)
        return time.perf_counter() - t0

    def engine():
        loss = fam.call(lrn.engine, x, t, cond).float().square().mean()
        t0 = time.perf_counter()
        lrn.backward(loss)  # DeepSpeed's backward and step, as rlfh takes them
        common.sync(device)
        return time.perf_counter() - t0

    out["backward_step_plain_s"] = statistics.median(plain() for _ in range(n))
    out["backward_step_deepspeed_s"] = statistics.median(engine() for _ in range(n))
    return out


def profile_step(fn, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    ev = list(prof.key_averages())
    dev_time = (lambda e: getattr(e, "self_device_time_total", 0)) if torch.cuda.is_available() else None
    ev.sort(key=dev_time or (lambda e: e.self_cpu_time_total), reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
            "self_cpu_share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
            **({"self_device_ms": round(dev_time(e) / 1e3, 2)} if dev_time else {}),
        }
        for e in ev[:top]
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--family",
        default="sdxl",
        help=f"the model family, one of {sorted(common.BENCH_FAMILIES)}: its tiny model by default (CPU; "
        "GPU: SDXL's architecture for sdxl) and its reference script's conditioning; results named after it",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=list(common.DTYPES))
    ap.add_argument("--size", type=int, default=None, help="image size in px (latents are size/8)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per optimizer step")
    ap.add_argument("--modes", default=None, help="comma list of lora<rank> and full")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="build, time and free one variant at a time")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--rlfh-compile",
        action="store_true",
        help="also time rlfh with learner.engine.compile=true (the headline ratio then uses it; the eager "
        "rlfh row stays as ratio_rlfh_eager_over_reference); each size pays one compile",
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--large-size",
        type=int,
        default=None,
        help="also time lora8 at this image size (px), the compute-bound point: learner_ratio_large "
        "(CPU default 256: the tiny SDXL-architecture UNet on 32x32 latents; with --large-pairs 4, >= 1 s per step)",
    )
    ap.add_argument("--large-repeats", type=int, default=5)
    ap.add_argument("--large-pairs", type=int, default=None, help="pairs per step at --large-size (default --pairs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)

    common.quiet()
    device = common.pick_device(args.device)
    common.set_threads(args.threads, device)
    gpu = device.type == "cuda"
    args.bench_family = family = common.bench_family(args.family)
    tiny = family.tiny_model
    d = d_all = (
        dict(model=tiny, size=64, pairs=2, modes="lora8", repeats=2, dtype="float32")
        if args.smoke
        else dict(model="sdxl-arch-random", size=1024, pairs=1, modes="lora8,lora64,full", repeats=5, dtype="bfloat16")
        if gpu and family.name == "sdxl"
        else dict(model=tiny, size=64, pairs=2, modes="lora8,lora64,full", repeats=10, dtype="float32")
    )
    default_model = d_all["model"]
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dtype = common.DTYPES[args.dtype]
    args.latent_channels = common.latent_channels(args.model)
    record = common.machine(device)
    print(f"[learner] {record['device']}; model {args.model}, {args.size} px, {args.pairs} pair(s)/step, {dtype}")
    peak = common.matmul_peak(device, seconds=1.0 if args.smoke else 3.0)
    rows = [bench_mode(m, args, device, dtype, peak) for m in args.modes.split(",")]
    if args.large_size is None:
        args.large_size = 0 if (gpu or args.smoke) else 256
    large = None
    if args.large_size:
        small = (args.size, args.repeats, args.pairs)
        args.size, args.repeats, args.pairs = args.large_size, args.large_repeats, args.large_pairs or args.pairs
        print(f"[learner] compute-bound point: {args.size} px, {args.pairs} pair(s)/step")
        large = bench_mode("lora8", args, device, dtype, peak)
        large_pairs = args.pairs
        args.size, args.repeats, args.pairs = small
    ok = [r for r in rows if "error" not in r]
    head = next((r for r in ok if r["mode"] == "lora8"), ok[0] if ok else None)
    result = {
        "benchmark": "learner",
        **record,
        "settings": {
            "family": family.name,
            "model": args.model,
            "dtype": args.dtype,
            "size": args.size,
            "pairs_per_step": args.pairs,
            "modes": args.modes,
            "repeats": args.repeats,
            "beta": args.beta,
            "gradient_checkpointing": args.gradient_checkpointing,
            "smoke": args.smoke,
            "rlfh_compile": args.rlfh_compile,
            "timing": "median of per-step times after 1 warm-up step each; one step = one optimizer step",
        },
        "learner_ratio": head["ratio_rlfh_over_reference"] if head else None,
        "learner_ratio_eager": head["ratio_rlfh_eager_over_reference"] if head else None,
        "learner_compiled": bool(args.rlfh_compile),
        "learner_ratio_mode": head["mode"] if head else None,
        "learner_mfu": head["learner_mfu"] if head else None,
        "matmul_peak": peak,
        "rows": rows,
    }
    if large is not None:
        result["settings"]["large_size"] = args.large_size
        result["settings"]["large_pairs_per_step"] = large_pairs
        result["learner_ratio_large"] = large.get("ratio_rlfh_over_reference")
        result["learner_ratio_large_eager"] = large.get("ratio_rlfh_eager_over_reference")
        result["learner_mfu_large"] = large.get("learner_mfu")
        result["row_large"] = large
    if head:
        print(
            f"[learner] headline ({head['mode']}): ratio {result['learner_ratio']:.3f}, mfu {result['learner_mfu']:.4f}"
        )
    name = args.out or common.result_name("learner", device, args.model, default_model, args.smoke, family.name)
    common.write_result(name, result, args.out_dir)
    if large is not None and not args.out:
        common.write_result(
            name.replace("tiny", "large") if "tiny" in name else f"{name}_large",
            {k: v for k, v in result.items() if k not in ("rows",)},
            args.out_dir,
        )
    return result


if __name__ == "__main__":
    main()
