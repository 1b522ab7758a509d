"""The whole product on the tiny model: `rlfh train` (real Ray, real DeepSpeed over gloo), the run
directory it leaves, learning, `rlfh offline-dpo` from its rollout log, and `ray job submit`.

One online run (configs/tiny.yaml, as shipped) is shared by the module's tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from rlfh.learner.distributed import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow

EVAL_SEEDS = list(range(100_000, 100_032))
# Mean JPEG size of fresh samples must drop by at least this much (kB) after training. The tiny
# model's per-image std is about 0.15 kB; the shipped 30-round run gains 0.40 kB at these seeds
# (-3.507 -> -3.111, measured on CPU), so the margin is half the gain and above one std.
LEARNING_MARGIN_KB = 0.2


DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")


def clean_env(**extra: str) -> dict:
    """The environment of a fresh shell: no rendezvous variables left by in-process learner tests."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, **extra}


def rlfh(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=clean_env(**(env or {})),
    )
    if r.returncode != 0:
        raise AssertionError(f"rlfh {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def online_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("online") / "run"
    rlfh("train", "configs/tiny.yaml", f"run_dir={run_dir}", f"model.path={tiny_model_dir}", "logging.progress=false")
    return run_dir


def mean_reward(model_dir: str, lora_dir=None) -> float:
    """Mean JPEG compressibility of fresh samples at fixed seeds, with an optional LoRA loaded the stock way."""
    from families import load_pipeline
    from rewards.jpeg import JpegCompressibility
    from rlfh.config.schema import load_config
    from rlfh.data.prompts import load_prompts
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={model_dir}"])
    pipe = load_pipeline(cfg.model)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))  # the diffusers format any SDXL user loads
    rc = cfg.rollout
    prompts = load_prompts(rc)
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(EVAL_SEEDS))]
    settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width)
    batch = Sampler(pipe).sample(batch_prompts, EVAL_SEEDS, settings)
    return float(np.mean([r.value for r in JpegCompressibility()(batch.images, batch_prompts)]))


def test_run_directory_contents(online_run):
    from rlfh.config.schema import load_config
    from rlfh.run.metrics import read_metrics
    from rollouts.log import RolloutLog

    cfg = load_config(online_run / "config.yaml")  # the effective config reloads as is
    assert cfg.run_dir == str(online_run)
    rows = read_metrics(online_run)
    assert [r["round"] for r in rows] == list(range(cfg.num_rounds))
    assert all(np.isfinite(r["reward/jpeg_compressibility/mean"]) and np.isfinite(r["loss/dpo"]) for r in rows)
    assert [r["policy_version"] for r in rows] == list(range(1, cfg.num_rounds + 1))
    # samples of round k come from the policy after k updates: weights reached the actors
    assert [r["rollout/sampled_policy_version"] for r in rows] == list(range(cfg.num_rounds))
    records = RolloutLog(online_run / "rollouts").records(["rollout_id", "policy_version", "round"])
    assert len(records) == cfg.num_rounds * cfg.rollout.samples_per_round
    assert len({r["rollout_id"] for r in records}) == len(records)
    ckpt = online_run / "checkpoints" / (online_run / "checkpoints" / "latest").read_text()
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["round"] == cfg.num_rounds
    assert list((online_run / "wandb").glob("offline-run-*")), "wandb offline run missing"


def test_online_dpo_raises_reward_of_fresh_samples(online_run, tiny_model_dir):
    ckpt = online_run / "checkpoints" / (online_run / "checkpoints" / "latest").read_text()
    before = mean_reward(tiny_model_dir)
    after = mean_reward(tiny_model_dir, ckpt)
    print(f"mean jpeg compressibility at fixed seeds: base {before:.4f} kB -> trained {after:.4f} kB")
    assert after - before >= LEARNING_MARGIN_KB


def test_offline_dpo_from_logged_rollouts(online_run, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "offline"
    r = rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={online_run / 'rollouts'}",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=2",
        "logging.progress=false",
    )
    assert "offline DPO finished" in r.stdout
    from rlfh.run.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert len(rows) == 2 and rows[0]["pairs/count"] >= 30 and np.isfinite(rows[-1]["loss/dpo"])
    assert (run_dir / "checkpoints" / "round-000002" / "pytorch_lora_weights.safetensors").is_file()


def test_offline_dpo_rejects_unlogged_reward(online_run, tiny_model_dir, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlfh.cli.main",
            "offline-dpo",
            "configs/offline_dpo.yaml",
            f"rollouts={online_run / 'rollouts'}",
            f"run_dir={tmp_path}",
            f"model.path={tiny_model_dir}",
            "rewards=[jpeg_incompressibility]",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=clean_env(),
    )
    assert r.returncode == 2 and "not in the rollout log" in r.stderr


def test_ray_job_submit(tiny_model_dir, tmp_path):
    """`ray job submit -- rlfh train ...` against a head started with `ray start --head` on loopback."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    ray_tmp = tempfile.mkdtemp(prefix="rlfh-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    port, dash = str(free_port()), str(free_port())
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        run_dir = tmp_path / "run"
        t0 = time.time()
        r = subprocess.run(
            [
                ray_bin,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--",
                sys.executable,
                "-m",
                "rlfh.cli.main",
                "train",
                str(REPO / "configs" / "tiny.yaml"),
                f"run_dir={run_dir}",
                f"model.path={tiny_model_dir}",
                "num_rounds=2",
                "logging.wandb=false",
                "logging.progress=false",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout + r.stderr
        assert (run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert (run_dir / "checkpoints" / "latest").read_text() == "round-000002"
        print(f"ray job submit run: {time.time() - t0:.1f}s")
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_hgdpo_online_real_winners(tiny_model_dir, tmp_path):
    """HG-DPO through the real loop: real photos replace winners on the curriculum's schedule."""
    from tests.rlfh.test_hgdpo import write_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    write_photos(photos)
    run_dir = tmp_path / "run"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "logging.wandb=false",
        "logging.progress=false",
        f"data.hgdpo.real_images={photos}",
        "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0.0}, {until_round: 2, real_winner_fraction: 1.0}]",
    )
    from rlfh.run.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert [r["hgdpo/real_pairs"] for r in rows] == [0, 2]  # easy stage first, then real winners
    assert all(np.isfinite(r["loss/dpo"]) for r in rows)
    assert list(run_dir.glob("hgdpo-real-*.safetensors"))  # encoded once, cached for resumes


def test_hgdpo_online_normal_stage(tiny_model_dir, tmp_path):
    """HG-DPO's normal stage through the real loop: the rollout actor re-denoises real photos with the
    current policy (SDRecon winners), mixed with real winners in the next stage."""
    from tests.rlfh.test_hgdpo import write_photos

    run_dir = tmp_path / "run"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=2",
        "rollout.sample_batch_size_per_actor=4",
        "rollout.num_inference_steps=4",
        "logging.wandb=false",
        "logging.progress=false",
        f"data.hgdpo.real_images={write_photos(tmp_path / 'photos')}",
        "data.hgdpo.sdrecon_strength=0.5",
        "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0.0, sdrecon_winner_fraction: 1.0}, "
        "{until_round: 2, real_winner_fraction: 0.5, sdrecon_winner_fraction: 0.5}]",
    )
    from rlfh.run.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert [r["hgdpo/stage"] for r in rows] == [0, 1]
    assert [(r["hgdpo/sdrecon_pairs"], r["hgdpo/real_pairs"], r["hgdpo/generated_pairs"]) for r in rows] == [
        (2, 0, 0),
        (1, 1, 0),
    ]
    assert all(0 < r["hgdpo/sdrecon_real_rms"] < r["hgdpo/loser_real_rms"] for r in rows)
    assert all(np.isfinite(r["loss/dpo"]) and r["learner/steps"] > 0 for r in rows)


@pytest.mark.parametrize("branch", [[], ["learner.ddpo.window=2", "learner.ddpo.branch=true"]], ids=["full", "branch"])
def test_ddpo_online(tiny_model_dir, tmp_path, branch):
    """DDPO through the real loop: rollout actors record trajectories (with learner.ddpo.branch a group's
    branches from its shared prefix), the learner recomputes their log-probs."""
    run_dir = tmp_path / "run"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=4",
        "rollout.num_inference_steps=4",
        "rollout.scheduler=ddim",
        "rollout.eta=1.0",
        "learner.loss=ddpo",
        "learner.train_batch_size=4",
        "learner.micro_batch_size_per_gpu=4",
        "logging.wandb=false",
        "logging.progress=false",
        *branch,
    )
    from rlfh.run.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert len(rows) == 2 and all(np.isfinite(r["loss/ddpo"]) for r in rows)
    assert all(r["ddpo/recorded_logprob_max_diff"] < 1e-4 for r in rows)  # synced weights = sampling policy
    assert rows[-1]["learner/steps"] == 2 * 4 * (8 // 4)  # rounds x epochs_per_round x (samples / batch)
