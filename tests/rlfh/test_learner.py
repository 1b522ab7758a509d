"""The DPO learner inside a real DeepSpeed engine (gloo, one process) on the tiny model."""

import math

import numpy as np
import pytest
import torch

from rlfh.data.batches import PairBatch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train


def pairs(n=4, seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    return PairBatch(lat[0], lat[1], ["a photo of a person"] * n)


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    from rlfh.config.schema import load_config
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"model.path={tiny_model_dir}", "learner.train_batch_size=2", "learner.micro_batch_size_per_gpu=1"],
    )
    return LearnerEngine(cfg)


def test_first_step_is_log2_because_lora_starts_at_the_reference(tiny_model_dir):
    # peft's LoRA B matrices start at zero, so policy == reference and inside == 0 on the first micro-batch
    from rlfh.config.schema import load_config
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"model.path={tiny_model_dir}", "learner.train_batch_size=1", "learner.micro_batch_size_per_gpu=1"],
    )
    m = train(LearnerEngine(cfg), pairs(1), epochs=1)
    assert m["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["dpo/mse_theta_w"] == pytest.approx(m["dpo/mse_ref_w"], abs=1e-7)


def test_reference_is_the_unet_with_adapters_disabled(learner):
    unet = learner.denoiser
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    enc, added = learner.condition(["a photo"], 64, 64)
    train(learner, pairs(2, seed=3), epochs=1)  # one step: the adapter now moves the policy off the base
    assert learner.global_step >= 1
    with torch.no_grad():
        ref = learner.reference(x, t, enc, added)
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        unet.enable_adapters()
        policy = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
    assert torch.equal(ref, base)
    assert not torch.equal(policy, base)


def test_training_updates_only_lora_and_counts_steps(learner):
    frozen = {n: p.detach().clone() for n, p in learner.denoiser.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in learner.denoiser.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    step0, v0 = learner.global_step, learner.policy_version
    m = train(learner, pairs(4), epochs=1)
    assert learner.global_step == step0 + 2 and learner.policy_version == v0 + 1  # 4 pairs / batch 2
    assert m["learner/steps"] == learner.global_step and np.isfinite(m["loss/dpo"])
    assert all(torch.equal(p, frozen[n]) for n, p in learner.denoiser.named_parameters() if n in frozen)
    assert any(not torch.equal(p, lora[n]) for n, p in learner.denoiser.named_parameters() if n in lora)


def test_remainder_smaller_than_a_batch_is_not_trained(learner):
    step0 = learner.global_step
    m = train(learner, pairs(1), epochs=1)
    assert m["learner/skipped"] == 1.0 and learner.global_step == step0


def test_checkpoint_round_trip_and_stock_diffusers_load(learner, tiny_model_dir, tmp_path):
    train(learner, pairs(2, seed=1), epochs=1)
    ckpt = learner.save_checkpoint(tmp_path / "round-000001", {"round": 1})
    assert not list(tmp_path.glob(".round-*"))  # no temporary folder left behind
    saved = {k: v.clone() for k, v in learner.lora_state_dict().items()}
    step, version = learner.global_step, learner.policy_version
    train(learner, pairs(2, seed=2), epochs=1)  # move away, then restore
    state = learner.load_checkpoint(ckpt)
    assert state["round"] == 1 and learner.global_step == step and learner.policy_version == version
    restored = learner.lora_state_dict()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(ckpt))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.unet.active_adapters()[0])
    assert len(loaded) == len(saved)
    assert all(torch.allclose(a, b) for a, b in zip(sorted_values(loaded), sorted_values(saved)))


def sorted_values(sd):
    return [sd[k].float() for k in sorted(sd)]


def test_load_checkpoint_rejects_non_checkpoint(learner, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an rlfh checkpoint"):
        learner.load_checkpoint(tmp_path)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train(tiny_model_dir, stage):
    from rlfh.config.schema import load_config
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", f"learner.engine.zero_stage={stage}"]
    )
    lrn = LearnerEngine(cfg)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, pairs(4), epochs=1)
    assert np.isfinite(m["loss/dpo"]) and lrn.global_step == 2
    after = lrn.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
