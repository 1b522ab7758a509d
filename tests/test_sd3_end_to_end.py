"""The SD3 family through the whole product on its tiny model: `rlfh train configs/tiny.yaml
model.path=<tiny SD3>` unchanged (real Ray, real DeepSpeed over gloo) with Diffusion-DPO on the velocity
error and, with only `learner.loss=ddpo rollout.eta=1.0` added, DDPO on the Flow-GRPO SDE sampler; the
LoRA the DPO run exports in the stock ``StableDiffusion3Pipeline``; `rlfh offline-dpo` from its log.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_end_to_end import rlfh

pytestmark = pytest.mark.slow

ROUNDS = 2


def train(run_dir, model_dir, *extra):
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={model_dir}",
        f"num_rounds={ROUNDS}",
        "logging.wandb=false",
        "logging.progress=false",
        *extra,
    )
    return run_dir


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3_dir, tmp_path_factory):
    return train(tmp_path_factory.mktemp("sd3") / "run", tiny_sd3_dir)


def test_online_dpo_runs_on_sd3(sd3_run):
    from rlfh.config.schema import load_config
    from rlfh.run.metrics import read_metrics
    from rollouts.log import RolloutLog

    cfg = load_config(sd3_run / "config.yaml")
    rows = read_metrics(sd3_run)
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert all(np.isfinite(r["reward/jpeg_compressibility/mean"]) and np.isfinite(r["loss/dpo"]) for r in rows)
    records = RolloutLog(sd3_run / "rollouts").records(["rollout_id", "round"])
    assert len(records) == ROUNDS * cfg.rollout.samples_per_round


def test_online_ddpo_runs_on_sd3_with_only_eta(tiny_sd3_dir, tmp_path):
    from rlfh.run.metrics import read_metrics

    run = train(
        tmp_path / "ddpo", tiny_sd3_dir, "learner.loss=ddpo", "rollout.eta=1.0", "rollout.num_inference_steps=4"
    )
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert all(np.isfinite(r["loss/ddpo"]) for r in rows)
    assert rows[0]["ddpo/recorded_logprob_max_diff"] < 1e-4  # the learner scores the sampler's SDE steps


def test_the_runs_lora_loads_in_the_stock_pipeline_and_changes_its_output(sd3_run, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    ckpt = sd3_run / "checkpoints" / (sd3_run / "checkpoints" / "latest").read_text()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    def latents():
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a photo of a person", generator=g, num_inference_steps=4, height=64, width=64, output_type="latent"
        )

    base = latents().images
    pipe.load_lora_weights(str(ckpt))
    assert (latents().images - base).abs().max() > 1e-3


def test_offline_dpo_from_the_sd3_log(sd3_run, tiny_sd3_dir, tmp_path):
    from rlfh.run.metrics import read_metrics

    run_dir = tmp_path / "offline"
    r = rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={sd3_run / 'rollouts'}",
        f"run_dir={run_dir}",
        f"model.path={tiny_sd3_dir}",
        "num_rounds=1",
        "logging.progress=false",
    )
    assert "offline DPO finished" in r.stdout
    rows = read_metrics(run_dir)
    assert len(rows) == 1 and rows[0]["pairs/count"] > 0 and np.isfinite(rows[-1]["loss/dpo"])
