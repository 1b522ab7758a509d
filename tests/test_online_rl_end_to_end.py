"""DiffusionNFT and AWM learn on the embedded default, as DPO does (tests/test_end_to_end.py):
`rlfh train configs/tiny.yaml learner.loss=nft` (and `awm`) with every loss-specific setting at its
default, then fresh samples at fixed seeds with the trained LoRA beat the base model's.
"""

from __future__ import annotations

import pytest

from tests.test_end_to_end import mean_reward, rlfh

pytestmark = pytest.mark.slow

# Rounds of configs/tiny.yaml, and the gain (kB of JPEG, at tests/test_end_to_end.py's EVAL_SEEDS) the
# trained LoRA must reach over the base model (-3.508 kB). After 10 rounds over seeds 0, 1, 2
# (`python -m tests.learning_sweep e2e_nft`, 2 cores, 2026-12-07): nft (beta 0.1, eps_mse) +0.1907, +0.1288,
# +0.1924; awm (clip range 0.2) +0.1493, +0.1227, +0.2946. Each margin is half the smallest gain. After
# 30 rounds: nft +0.283, awm +0.203, DPO +0.40 (tests/test_end_to_end.py). nft after 10 rounds with the
# reference's beta 1 and adaptive weighting: +0.017; beta 1 eps_mse +0.051; beta 0.1 adaptive +0.067.
LEARNING = {"nft": (10, 0.06), "awm": (10, 0.06)}


def e2e_gain(model_dir: str, run_dir, loss: str, rounds: int, seed: int = 0) -> float:
    """`rlfh train configs/tiny.yaml learner.loss=LOSS seed=SEED num_rounds=ROUNDS`, then the gain of fresh
    samples at fixed seeds with the trained LoRA over the base model (kB of JPEG)."""
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"learner.loss={loss}",
        f"seed={seed}",
        f"num_rounds={rounds}",
        f"run_dir={run_dir}",
        f"model.path={model_dir}",
        f"logging.checkpoint_every={rounds}",
        "logging.wandb=false",
        "logging.progress=false",
    )
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    before = mean_reward(model_dir)
    after = mean_reward(model_dir, ckpt)
    print(f"{loss}, {rounds} rounds: mean jpeg compressibility at fixed seeds {before:.4f} kB -> {after:.4f} kB")
    return after - before


@pytest.mark.parametrize("loss", sorted(LEARNING))
def test_online_loss_raises_reward_of_fresh_samples(tiny_model_dir, tmp_path, loss):
    rounds, margin = LEARNING[loss]
    assert e2e_gain(tiny_model_dir, tmp_path / "run", loss, rounds) >= margin
