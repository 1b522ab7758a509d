"""A non-finite loss or weight never trains: the learner stops before it reaches the weights (loss)
or before it goes any further (weights after a step), never checkpoints non-finite weights, and
an online run that hits one exits non-zero naming the round and the likely cause."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rlfh.config.schema import load_config
from rlfh.data.batches import PairBatch
from rlfh.learner.engine import LearnerEngine, NonFiniteError
from rlfh.learner.steps import train
from tests.conftest import REPO


def pairs(n=2, poison=False):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    if poison:
        lat[0, 0, 0, 0, 0] = np.nan  # one NaN latent, as a corrupt rollout would give
    return PairBatch(lat[0], lat[1], ["a photo"] * n)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"model.path={tiny_model_dir}", "learner.train_batch_size=2", "learner.micro_batch_size_per_gpu=2"],
    )
    return LearnerEngine(cfg)


def lora(engine):
    return [p.detach().clone() for p in engine.trainable_parameters()]


def test_nonfinite_loss_stops_before_the_weights(engine):
    train(engine, pairs(), 1)  # a normal step first: Adam has moments that a NaN step would spoil
    before, step = lora(engine), engine.global_step
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan at optimizer step .*Likely cause"):
        train(engine, pairs(poison=True), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, lora(engine)))
    assert engine.global_step == step


def test_nonfinite_weights_are_never_checkpointed(engine, tmp_path):
    p = engine.trainable_parameters()[0]
    saved = p.detach().clone()
    try:
        p.data[0] = float("inf")
        assert not engine.weights_finite()
        with pytest.raises(NonFiniteError, match="refusing to write"):
            engine.save_checkpoint(tmp_path / "round-000001", {"round": 1})
        assert not list(tmp_path.iterdir())
    finally:
        p.data.copy_(saved)
    assert engine.weights_finite()


def test_a_nonfinite_gradient_stops_the_round(tiny_model_dir):
    # a finite loss whose gradient is NaN (an overflow in the backward pass): the optimizer step
    # writes NaN, and the step is stopped there, before any later step or checkpoint uses it
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.train_batch_size=2",
            "learner.micro_batch_size_per_gpu=2",
            "learner.max_grad_norm=0",
        ],
    )
    lrn = LearnerEngine(cfg)
    lrn.trainable_parameters()[0].register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite weights after optimizer step 1"):
        train(lrn, pairs(), 1)


@pytest.mark.slow
def test_online_run_with_nonfinite_update_fails_and_writes_no_checkpoint(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlfh.cli.main",
            "train",
            "configs/tiny.yaml",
            f"run_dir={run_dir}",
            f"model.path={tiny_model_dir}",
            "num_rounds=2",
            "logging.checkpoint_every=1",
            # lr 1e37 passes validation (finite, > 0); its first Adam step scales the LoRA
            # weights to ~1e36, and the next forward overflows
            "rollout.prompts_per_round=2",
            "learner.lr=1e37",
            "learner.max_grad_norm=0",
            "logging.wandb=false",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "round 0" in out and "non-finite" in out and "Likely cause" in out, out[-3000:]
    assert not list((run_dir / "checkpoints").glob("round-*")) if (run_dir / "checkpoints").exists() else True
    rows = (
        [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if (run_dir / "metrics.jsonl").exists()
        else []
    )
    assert rows == []  # no round was reported as trained
    status = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert '"finished"' not in status.stdout
