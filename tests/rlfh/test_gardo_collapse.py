"""GARDO's diversity-aware advantage on a tiny task built to collapse: the reward is maximized by one image (the
negative mean squared distance of the final latents to one fixed latent), so the policy that maximizes it samples
that image for every seed. With the mitigation on, the seeds of a prompt keep their images measurably more apart
while the reward still rises."""

from __future__ import annotations

import numpy as np

from families import load_pipeline
from rlfh.data.batches import ScoredSamples
from rlfh.data.pairs import learner_batch
from rlfh.data.sources import SourceContext
from rlfh.data.sources.gardo import Gardo
from rlfh.eval.diversity import image_diversity
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from rollouts.sampler import Sampler
from rollouts.types import SamplerSettings
from tests.rlfh.test_online_rl import config

PROMPTS = ["a"] * 4 + ["b"] * 4
EVAL_SEEDS = list(range(1000, 1008))


def one_image_reward(latents: np.ndarray, target: np.ndarray) -> list[float]:
    """-mean (x - x*)^2 per sample: a single image x* maximizes it."""
    return (-((latents - target[None]) ** 2).mean(axis=(1, 2, 3))).tolist()


def latent_spread(latents: np.ndarray) -> float:
    """Mean over prompts of the RMS distance between the final latents of two seeds of one prompt."""
    out = []
    for group in (latents[:4], latents[4:]):
        out += [float(np.sqrt(((group[i] - group[j]) ** 2).mean())) for i in range(4) for j in range(i + 1, 4)]
    return float(np.mean(out))


def evaluate(s, st, target) -> tuple[float, float]:
    """(mean reward, latent spread) of the policy at fixed seeds, 4 per prompt."""
    b = s.sample(PROMPTS, EVAL_SEEDS, st)
    print(f"image diversity {image_diversity(b.images, PROMPTS)['value']:.4f}")
    return float(np.mean(one_image_reward(b.latents, target))), latent_spread(b.latents)


def collapse_run(
    tiny_model_dir,
    mitigate: bool,
    seed: int = 0,
    rounds: int = 6,
    lr: str = "1e-2",
    epochs: int = 2,
    loss: str = "nft",
    extra: tuple = (),
    embed: str = "latents",
):
    """(reward gain, diversity at the end, diversity at the start) over ``rounds`` online rounds of ``loss``."""
    overrides = [f"learner.loss={loss}", "rollout.num_inference_steps=4", f"learner.lr={lr}", f"seed={seed}"]
    if mitigate:
        overrides += ["learner.gardo.diversity=pixels", *extra]
    cfg = config(tiny_model_dir, *overrides)
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model))
    lc = cfg.model.lora
    s.add_lora(lc.rank, lc.alpha, lc.target_modules)
    s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    rc = cfg.rollout
    st = SamplerSettings(rc.num_inference_steps, 1.0, "", rc.height, rc.width)
    target, other = s.sample(["a", "a"], [7, 8], st).latents  # two of the base model's own images
    source = Gardo(cfg, SourceContext(tiny_model_dir)) if mitigate else None
    r0, d0 = evaluate(s, st, target)
    for rnd in range(rounds):
        b = s.sample(PROMPTS, [10_000 * seed + rnd * 8 + i for i in range(8)], st)
        samples = ScoredSamples(
            b.latents,
            PROMPTS,
            PROMPTS,
            one_image_reward(b.latents, target),
            [{}] * 8,
            (64, 64),
            images=b.images,
            values={"other": one_image_reward(b.latents, other)},
        )
        if source is not None:
            source.annotate(samples)
            if embed == "latents":
                samples.embeddings = b.latents.reshape(len(b.latents), -1).astype(np.float64)
        batch, _ = learner_batch(cfg.learner, samples)
        train(lrn, batch, epochs=epochs)
        s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    r1, d1 = evaluate(s, st, target)
    print(f"mitigate={mitigate} seed {seed}: reward {r0:.4f} -> {r1:.4f}, diversity {d0:.4f} -> {d1:.4f}")
    return r1 - r0, d1, d0
