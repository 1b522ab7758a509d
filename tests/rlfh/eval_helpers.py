"""Shared pieces of the evaluation/report tests: a cheap reward that reports regions, a quick
"trained" LoRA, and one tiny evaluation computed once per test session."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from rewards.base import Detection, Reward, RewardResult

# Tiny sizes: 3 prompts x 2 seeds, 64 px, 2 denoising steps (a few seconds per model on 2 cores).
PROMPTS = ["a portrait of a woman", "a man waving his hand", "a mountain landscape"]
SEEDS = [11, 12]
TRAIN_PROMPTS = PROMPTS[:1]  # "trained on" for the held-out reward gap: the same images as eval samples 0, 1
MISSING_WORD = "landscape"  # BrightestBox's "not computable" trigger: 1 prompt of 3 above


class BrightestBox(Reward):
    """Test reward with regions: a "face" box on the brightest 16x16 block, a "hand" box on the darkest.

    The value is the face block's mean brightness in [0, 1] (also its one per-detection score).
    Images whose prompt contains ``missing_word`` get "no face detected" (with an empty face list), so
    not-computable handling is exercised with a rate the tests know exactly.
    """

    name = "brightest_box"
    region = "face"

    def __init__(self, block: int = 16, missing_word: str = MISSING_WORD):
        self.block = block
        self.missing_word = missing_word

    def _boxes(self, gray: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], float, float]:
        b = self.block
        h, w = (gray.shape[0] // b) * b, (gray.shape[1] // b) * b
        means = gray[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
        (fy, fx), (hy, hx) = (
            np.unravel_index(means.argmax(), means.shape),
            np.unravel_index(means.argmin(), means.shape),
        )
        box = lambda y, x: (float(x * b), float(y * b), float(x * b + b), float(y * b + b))  # noqa: E731
        return box(fy, fx), box(hy, hx), float(means.max()) / 255.0, float(means.min()) / 255.0

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> list[RewardResult]:
        out = []
        for im, p in zip(images, prompts):
            face, hand, bright, dark = self._boxes(im.astype(np.float64).mean(axis=-1))
            if self.missing_word in p:
                out.append(RewardResult.missing("no face detected", regions={"face": []}))
                continue
            regions = {"face": [Detection(face, bright)], "hand": [Detection(hand, 1.0 - dark, "Right")]}
            out.append(RewardResult(bright, regions=regions, info={"face_scores": [bright]}))
        return out


def make_lora(model_dir: str, out_dir: Path, scale: float = 0.5, seed: int = 0) -> Path:
    """A perturbed LoRA on the tiny model's denoiser (any family: its LoRA targets, written by the family's
    ``save_lora`` as the stock pipeline's ``load_lora_weights`` reads it; no training needed)."""
    import torch
    from peft import get_peft_model_state_dict

    from families import add_lora, family_of, load_pipeline
    from rlfh.config.schema import ModelConfig

    pipe = load_pipeline(ModelConfig(path=model_dir))
    family = family_of(pipe)
    denoiser = family.model(pipe)
    add_lora(denoiser, 4, 4.0, family.lora_targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:  # lora_B starts at zero: perturbing it makes the adapter act
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = {"r": 4, "lora_alpha": 4.0, "target_modules": sorted(family.lora_targets)}
    family.save_lora(out_dir, get_peft_model_state_dict(denoiser), adapter)
    return out_dir


def eval_overrides(model_dir: str) -> list[str]:
    return [
        f"model.path={model_dir}",
        "rollout.num_inference_steps=2",
        "rollout.height=64",
        "rollout.width=64",
        "rollout.sample_batch_size_per_actor=8",
        "rollout.prompts_per_round=1",
        "rollout.rollouts_per_prompt=8",
        "learner.train_batch_size=1",
        "learner.micro_batch_size_per_gpu=1",
        "rewards=[{target: jpeg_compressibility}, "
        "{target: 'tests.rlfh.eval_helpers:BrightestBox', name: brightest_box, weight: 0.5}]",
    ]


@functools.lru_cache(maxsize=None)
def tiny_eval(model_dir: str) -> tuple[Path, dict]:
    """One tiny comparison (perturbed LoRA vs the base tiny model), computed once per session."""
    import atexit
    import shutil

    from rlfh.config.schema import load_config
    from rlfh.eval.evaluate import ModelSpec, evaluate
    from tests.conftest import REPO

    root = Path(tempfile.mkdtemp(prefix="rlfh-eval-"))
    atexit.register(shutil.rmtree, root, True)  # lru_cache outlives any pytest tmp_path fixture
    lora = make_lora(model_dir, root / "lora")
    cfg = load_config(REPO / "configs" / "tiny.yaml", eval_overrides(model_dir))
    summary = evaluate(
        cfg,
        ModelSpec(model_dir, str(lora)),
        PROMPTS,
        SEEDS,
        root / "eval",
        baseline=ModelSpec(model_dir),
        prompt_set="test",
        progress=False,
        train_prompts=TRAIN_PROMPTS,
    )
    return root / "eval", summary
