"""configs/fs_dpo_sdxl.yaml, FS-DPO's recipe (FaceScore, arXiv 2406.17100): its numbers, and its two commands
(sample and log once, then offline DPO) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from rlfh.config.schema import load_config
from tests.conftest import REPO

CONFIG = REPO / "configs" / "fs_dpo_sdxl.yaml"


def test_fs_dpo_config_holds_the_papers_numbers():
    cfg = load_config(CONFIG)
    lc, r = cfg.learner, cfg.rollout
    assert (r.prompts_per_round, r.rollouts_per_prompt) == (400, 50)  # 400 human prompts x 50 images
    assert [e.target for e in cfg.rewards] == ["facescore"]  # ranked by FaceScore
    assert lc.loss == "dpo" and cfg.model.lora.enabled and lc.regions.names == ["global"]
    assert lc.lr == 6e-6 and lc.micro_batch_size_per_gpu == 8 and cfg.gradient_accumulation_steps == 2


def tiny(tiny_model_dir, run_dir) -> list[str]:
    """The recipe's tiny variant: the tiny model, a cheap reward, two prompts x four images."""
    return [
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "model.vae_path=null",
        "model.dtype=float32",
        "rollout.height=64",
        "rollout.width=64",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=4",
        "rollout.num_inference_steps=4",
        "rollout.guidance_scale=1.0",
        "rewards=[{target: jpeg_compressibility}]",
        "learner.train_batch_size=2",
        "learner.micro_batch_size_per_gpu=1",
        "learner.lr=1e-3",
        "learner.engine.zero_stage=0",
        "learner.engine.gradient_checkpointing=false",
        "resources.num_cpus_per_actor=0.5",
        "logging.wandb=false",
        "logging.progress=false",
    ]


@pytest.mark.slow
def test_fs_dpo_two_commands_on_the_tiny_model(tiny_model_dir, tmp_path):
    from rlfh.run.metrics import read_metrics
    from rollouts.log import RolloutLog
    from tests.test_end_to_end import rlfh

    samples = tmp_path / "samples"
    rlfh("train", str(CONFIG), "num_rounds=1", *tiny(tiny_model_dir, samples))
    records = RolloutLog(samples / "rollouts").records(["policy_version"])
    assert len(records) == 8 and {r["policy_version"] for r in records} == {0}  # the base model's samples
    off = tmp_path / "offline"
    rlfh("offline-dpo", str(CONFIG), f"rollouts={samples / 'rollouts'}", "num_rounds=2", *tiny(tiny_model_dir, off))
    rows = read_metrics(off)
    assert len(rows) == 2 and all(np.isfinite(r["loss/dpo"]) and r["pairs/count"] == 2 for r in rows)
