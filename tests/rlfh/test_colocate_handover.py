"""The colocated device handover leaves training exactly as it was (in-process, real DeepSpeed)."""

import numpy as np
import pytest
import torch

from rlfh.data.batches import PairBatch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from tests.conftest import REPO


def batch(seed):
    lat = np.random.default_rng(seed).standard_normal((2, 4, 4, 8, 8)).astype(np.float32)
    return PairBatch(lat[0], lat[1], ["a photo of a person"] * 4)


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
@pytest.mark.parametrize("stage,lora", [(0, True), (2, True), (2, False)], ids=["zero0", "zero2", "zero2-full"])
def test_handover_between_rounds_changes_nothing(tiny_model_dir, stage, lora):
    from rlfh.config.schema import load_config
    from rlfh.learner.colocate import Handover

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"learner.engine.zero_stage={stage}",
            "learner.lr=1e-3",
            f"model.lora.enabled={lora}",
        ],
    )
    plain, handed = LearnerEngine(cfg), LearnerEngine(cfg, keep_vae=True)
    handover = Handover(handed, offload_optimizer=True)  # the full-UNet path, on a LoRA learner
    for rnd in range(2):
        train(plain, batch(rnd), 1)
        handover.to_training()
        train(handed, batch(rnd), 1)
        handover.to_sampling()  # optimizer states out (ZeRO: DeepSpeed offload_states), VAE in
        assert not handed.denoiser.training and handover.phase == "sampling"
        handover.to_sampling()  # idempotent
    handover.to_training()
    train(plain, batch(2), 1)
    train(handed, batch(2), 1)  # Adam moments came back intact: same update as never moved
    a, b = ([p for p in lrn.denoiser.parameters() if p.requires_grad] for lrn in (plain, handed))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_optimizer_states_move_only_for_full_unet_training_by_default(tiny_model_dir):
    from rlfh.config.schema import load_config
    from rlfh.learner.colocate import Handover

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}"])
    assert not Handover(LearnerEngine(cfg, keep_vae=True)).offload_optimizer
