"""Learner options: full-UNet training and export, EMA, ZeRO-Offload (real DeepSpeed on CPU)."""

import numpy as np
import pytest
import torch

from rlfh.data.batches import PairBatch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.run_config import deepspeed_config
from rlfh.learner.steps import train
from tests.conftest import REPO


def make(tiny_model_dir, *overrides):
    from rlfh.config.schema import load_config

    return LearnerEngine(load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *overrides]))


def pairs(n=2, seed=0):
    lat = np.random.default_rng(seed).standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    return PairBatch(lat[0], lat[1], ["a photo"] * n)


def test_full_unet_trains_and_exports_in_diffusers_format(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    lrn = make(tiny_model_dir, "model.lora.enabled=false", "learner.lr=1e-4")
    assert lrn.ref_denoiser is not None and lrn.num_trainable > 1_000_000  # every UNet weight trains
    before = lrn.denoiser.conv_in.weight.detach().clone()
    train(lrn, pairs(), epochs=1)
    assert not torch.equal(before, lrn.denoiser.conv_in.weight)
    assert torch.equal(before, lrn.ref_denoiser.conv_in.weight)  # the reference stays frozen
    ckpt = lrn.save_checkpoint(tmp_path / "round-000001", {"round": 1})
    exported = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    for (n, a), (_, b) in zip(exported.state_dict().items(), lrn.denoiser.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), n


def test_ema_tracks_and_round_trips(tiny_model_dir, tmp_path):
    lrn = make(tiny_model_dir, "learner.ema.decay=0.5")
    params = [p for p in lrn.denoiser.parameters() if p.requires_grad]
    train(lrn, pairs(), epochs=2)  # 2 optimizer steps
    assert lrn.ema.optimization_step == 2
    shadow = [s.clone() for s in lrn.ema.shadow_params]
    assert any(not torch.equal(s, p) for s, p in zip(shadow, params))
    ckpt = lrn.save_checkpoint(tmp_path / "round-000001", {"round": 1})
    train(lrn, pairs(seed=1), epochs=1)
    lrn.load_checkpoint(ckpt)
    assert lrn.ema.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(lrn.ema.shadow_params, shadow))


def test_offload_config(tiny_model_dir):
    from rlfh.config.schema import ConfigError, load_config

    cfg = load_config(
        REPO / "configs" / "tiny.yaml", ["learner.engine.zero_stage=2", "learner.engine.offload_optimizer=true"]
    )
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == cfg.learner.lr
    with pytest.raises(ConfigError, match="offload_optimizer=true needs learner.engine.zero_stage >= 1"):
        load_config(REPO / "configs" / "tiny.yaml", ["learner.engine.offload_optimizer=true"])


@pytest.mark.slow  # builds DeepSpeed's CPU Adam op on first use: 96 s beside another worker
def test_zero_offload_trains(tiny_model_dir):
    """ZeRO-2 with the optimizer offloaded to CPU (DeepSpeedCPUAdam; its C++ op builds on first use)."""
    lrn = make(tiny_model_dir, "learner.engine.zero_stage=2", "learner.engine.offload_optimizer=true")
    assert "CPUAdam" in type(lrn.engine.basic_optimizer).__name__
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, pairs(), epochs=1)
    assert np.isfinite(m["loss/dpo"]) and lrn.global_step == 1
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
