"""Reward gain per 1,000 sampled images: DRaFT-K and AlignProp against DPO and DDPO on the same budget.

    python bench/sample_efficiency.py                 # tiny model, writes bench/results/cpu_tiny_sample_efficiency.json
    python bench/sample_efficiency.py --smoke         # seconds; writes smoke_sample_efficiency.json

The tiny task: the seeded tiny SDXL at 32 x 32 px, 3 denoising steps, no guidance, and one reward every loss
can train on, the mean brightness of a fixed "face" box (tests/fixture_rewards.py: ``BrightFace``; its uint8
``score`` for the rollouts of DPO and DDPO, its differentiable ``score_tensor`` for the direct reward losses).
Each method gets the same budget of sampled images (``--images``) and spends it in rounds:

    dpo        a round samples P prompts x G seeds (deterministic DDIM), ranks them by the reward, best vs worst
               pair per prompt, ``--epochs`` passes (rlfh/losses/dpo.py)
    ddpo       the same rounds sampled with DDIM eta = 1 and recorded, per-prompt advantages, one epoch of the
               clipped-ratio policy gradient over every step (rlfh/losses/ddpo.py)
    draft_k    the learner samples P G images itself per round (K = 1), back-propagates the reward (draft.py)
    alignprop  the same with K' ~ U{1 .. 3} per micro-batch

An image counts once whether the rollouts or the learner sampled it. The reward is measured before and after,
on 8 images at fixed seeds that no round samples (deterministic DDIM, the policy's LoRA merged), and the gain
is reported per 1,000 sampled images: (after - before) / images * 1000. Each method runs from ``--seeds``
training seeds (the LoRA initialisation, the learner's noise, the rounds' seeds); the json holds each seed's
gain, their mean and spread. Learning rates: each method's from the repository's learning tests
(dpo 1e-3 with beta 100, as configs/tiny.yaml; ddpo 1e-3; the direct losses 5e-2), not tuned here; dpo and ddpo
run at 1e-2 too (``dpo_lr1e-2``, ``ddpo_lr1e-2``), to see whether their gap is the learning rate's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

BOX = (4.0, 4.0, 20.0, 20.0)  # the "face" box of a 32 x 32 image
TASK = [
    "rollout.height=32",
    "rollout.width=32",
    "rollout.num_inference_steps=3",
    "rollout.guidance_scale=1.0",
    "rewards.0.target=tests.fixture_rewards:BrightFace",
    "rewards.0.name=bright_face",
    f"rewards.0.options.box=[{','.join(str(v) for v in BOX)}]",
]
METHODS = {
    "draft_k": ["learner.loss=draft", "learner.draft.variant=draft_k", "learner.draft.k=1", "learner.lr=5e-2"],
    "alignprop": [
        "learner.loss=draft",
        "learner.draft.variant=alignprop",
        "learner.draft.k_range=[1,3]",
        "learner.lr=5e-2",
    ],
    "dpo": ["learner.loss=dpo", "learner.lr=1e-3", "learner.dpo.beta=100"],
    "ddpo": ["learner.loss=ddpo", "rollout.scheduler=ddim", "rollout.eta=1.0", "learner.lr=1e-3"],
    # the baselines at the direct losses' higher learning rate: is their gap a learning-rate artefact?
    "dpo_lr1e-2": ["learner.loss=dpo", "learner.lr=1e-2", "learner.dpo.beta=100"],
    "ddpo_lr1e-2": ["learner.loss=ddpo", "rollout.scheduler=ddim", "rollout.eta=1.0", "learner.lr=1e-2"],
}
PROMPTS = ["a photo of a person", "a portrait of a woman"]
EVAL_SEEDS = [900_001 + i for i in range(8)]


def mean_reward(sampler, settings) -> float:
    from rollouts.types import SamplerSettings
    from tests.fixture_rewards import BrightFace

    st = SamplerSettings(settings.num_inference_steps, 1.0, "", settings.height, settings.width, 0.0, "ddim")
    b = sampler.sample([PROMPTS[i % 2] for i in range(len(EVAL_SEEDS))], EVAL_SEEDS, st)
    return float(np.mean([r.value for r in BrightFace(BOX)(b.images, b.prompts)]))


def run(model: str, method: str, seed: int, images: int, group: int, epochs: int) -> dict:
    """One method from one seed: the reward before and after ``images`` sampled images, and the time."""
    from families import load_pipeline
    from rlfh.config.schema import load_config
    from rlfh.data.batches import PromptBatch, ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from rlfh.losses.registry import PROMPTS as PROMPT_BATCH
    from rlfh.losses.registry import TRAJECTORIES, loss_spec
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings
    from tests.fixture_rewards import BrightFace

    per_round = len(PROMPTS) * group
    cfg = load_config(
        common.REPO / "configs" / "tiny.yaml",
        [
            f"model.path={model}",
            f"seed={seed}",
            f"rollout.rollouts_per_prompt={group}",
            f"rollout.prompts_per_round={len(PROMPTS)}",
            f"rollout.sample_batch_size_per_actor={per_round}",
            "learner.train_batch_size=2",
            "learner.micro_batch_size_per_gpu=2",
            *TASK,
            *METHODS[method],
        ],
    )
    rc = cfg.rollout
    lrn = LearnerEngine(cfg)
    eval_sampler = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    lc = cfg.model.lora
    eval_sampler.add_lora(lc.rank, lc.alpha, lc.target_modules)
    spec = loss_spec(cfg.learner.loss)
    ddpo = spec.batch == TRAJECTORIES
    direct = spec.batch == PROMPT_BATCH
    sampler = None
    if not direct:  # the rollouts: on-policy, the LoRA merged
        sampler = Sampler(load_pipeline(cfg.model), scheduler="ddim")
        sampler.add_lora(lc.rank, lc.alpha, lc.target_modules)
    st = SamplerSettings(rc.num_inference_steps, 1.0, "", rc.height, rc.width, rc.eta if ddpo else 0.0, "ddim")
    before = mean_reward(eval_sampler, st)
    t0, sampled, rnd = time.perf_counter(), 0, 0
    prompts = [p for p in PROMPTS for _ in range(group)]
    while sampled + per_round <= images:
        if direct:
            train(lrn, PromptBatch(list(prompts)), epochs=1)
        else:
            seeds = [10_000 * seed + rnd * per_round + i for i in range(per_round)]
            b = sampler.sample(prompts, seeds, st, record=ddpo)
            scores = [r.value for r in BrightFace(BOX)(b.images, b.prompts)]
            batch, _ = learner_batch(
                cfg.learner,
                ScoredSamples(
                    b.latents, prompts, prompts, scores, [{}] * per_round, (rc.height, rc.width), b.trajectory, st
                ),
            )
            train(lrn, batch, epochs=1 if ddpo else epochs)
            sampler.load_lora(lrn.lora_state_dict(), lrn.policy_version)
        sampled += per_round
        rnd += 1
    seconds = time.perf_counter() - t0
    eval_sampler.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    after = mean_reward(eval_sampler, st)
    return {
        "before": before,
        "after": after,
        "images": sampled,
        "rounds": rnd,
        "seconds": seconds,
        "gain_per_1000_images": (after - before) / sampled * 1000,
    }


def ratios(results: dict) -> None:
    """``vs_<baseline>``: a direct loss's mean gain per image over a baseline's, only where the baseline's mean gain
    is more than two standard errors above 0 (a ratio over a gain within its noise says nothing); in place."""
    for base in ("dpo", "ddpo", "dpo_lr1e-2", "ddpo_lr1e-2"):
        b = results.get(base)
        if b is None:
            continue
        gains = [r["gain_per_1000_images"] for r in b["runs"].values()]
        se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("inf")
        b["significantly_positive"] = b["gain_per_1000_images_mean"] > 2 * se
        for name in ("draft_k", "alignprop"):
            if name in results:
                results[name].pop(f"vs_{base}", None)
                if b["significantly_positive"]:
                    results[name][f"vs_{base}"] = (
                        results[name]["gain_per_1000_images_mean"] / b["gain_per_1000_images_mean"]
                    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="sampled images per method and seed")
    ap.add_argument("--group", type=int, default=4, help="images per prompt per round (2 prompts a round)")
    ap.add_argument("--epochs", type=int, default=4, help="dpo's passes over a round's pairs (configs/tiny.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.images, args.group, args.seeds = 4, 2, [0]
    common.quiet()
    device = common.pick_device("auto")
    common.set_threads(1, device)
    from families import resolve_model_path

    model = resolve_model_path("rlfh:tiny-sdxl")
    results = {}
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            runs.append(run(model, method, seed, args.images, args.group, args.epochs))
            print(
                f"[bench] {method:10s} seed {seed}: gain/1k {runs[-1]['gain_per_1000_images']:+.4f} "
                f"({runs[-1]['before']:.4f} -> {runs[-1]['after']:.4f}, {runs[-1]['seconds']:.0f} s)",
                flush=True,
            )
        gains = [r["gain_per_1000_images"] for r in runs]
        results[method] = {
            "overrides": METHODS[method],
            "runs": dict(zip(map(str, args.seeds), runs)),
            "gain_per_1000_images_mean": statistics.mean(gains),
            "gain_per_1000_images_sd": statistics.stdev(gains) if len(gains) > 1 else None,
            "gain_per_1000_images_min": min(gains),
        }
    ratios(results)
    out = {
        **common.machine(device),
        "settings": {
            "model": "rlfh:tiny-sdxl",
            "task": TASK,
            "images_per_method_and_seed": args.images,
            "group": args.group,
            "dpo_epochs": args.epochs,
            "seeds": args.seeds,
            "eval_seeds": EVAL_SEEDS,
            "threads": 1,
        },
        "methods": results,
    }
    common.write_result(
        "smoke_sample_efficiency"
        if args.smoke
        else f"{'gpu' if device.type == 'cuda' else 'cpu'}_tiny_sample_efficiency",
        out,
        args.out_dir,
    )


if __name__ == "__main__":
    main()
