"""Every `rlfh` command of the README's "Commands", run as a user runs it (a subprocess) on the tiny
model: none may print a Python traceback or an "Exception ignored" (a finalizer failing at
interpreter exit, e.g. a MediaPipe graph left for its ``__del__``). The rewards include the MediaPipe
face and hand detectors (weight 0: they are built, run and closed, and change no training signal).

One short `rlfh train` run is shared by status, rollouts inspect, offline-dpo, eval, compare and
plot. `serve-rewards` is started and SIGKILLed by tests/reliability/test_listening_sockets.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

BAD = ("Traceback", "Exception ignored")
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")
SMALL = ["logging.wandb=false", "logging.progress=false", "rollout.num_inference_steps=2"]
DETECTORS = "{target: face_detection_confidence, weight: 0}, {target: hand_confidence, weight: 0}"
FACE = "{target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}"


def rlfh(*args: str, code: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``rlfh ARGS`` in a fresh interpreter; check its exit code and that stderr is clean."""
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == code, f"rlfh {' '.join(args)}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    bad = [ln for ln in r.stderr.splitlines() if ln.startswith(BAD) or any(b in ln for b in BAD)]
    assert not bad, f"rlfh {' '.join(args)} printed on stderr:\n" + r.stderr[-5000:]
    return r


@pytest.fixture(scope="module")
def detector_rewards() -> str:
    """The MediaPipe detector rewards as config entries (the models fetched like tests/rewards/test_detectors.py)."""
    pytest.importorskip("mediapipe", reason="needs the 'detect' extra: pip install -e '.[detect]'")
    from rewards.base import RewardError
    from rewards.detectors import get_models

    if get_models.missing_models():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            try:
                wheel = get_models.download_wheel(Path(tmp))
            except RewardError as e:
                pytest.skip(f"package registry unreachable, cannot fetch the MediaPipe models: {e}")
            get_models.extract_models(wheel, get_models.models_dir())
    return DETECTORS


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four 64x64 noise images with a flat square (tests/rlfh/test_region_pairs_tiny.py's layout)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(4):
            a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            a[8:40, 8:40] = rng.integers(0, 255, 3)
            Image.fromarray(a).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a photo of person {i % 2}"}) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, detector_rewards, tmp_path_factory) -> tuple[Path, str]:
    """`rlfh train` for 2 small rounds; (its run dir, the rewards override it ran with)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    rewards = f"rewards=[{{target: jpeg_compressibility}}, {detector_rewards}]"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "rollout.rollouts_per_prompt=2",
        "rollout.sample_batch_size_per_actor=4",
        "learner.epochs_per_round=1",
        rewards,
        *SMALL,
    )
    return run_dir, rewards


def test_config_prints_the_validated_config():
    r = rlfh("config", "configs/tiny.yaml", "num_rounds=3")
    assert "num_rounds: 3" in r.stdout


def test_config_error_is_one_message_not_a_traceback():
    r = rlfh("config", "configs/tiny.yaml", "learner.betaa=100", code=2)
    assert "learner.betaa" in r.stderr


@pytest.mark.slow
def test_make_tiny_model(tmp_path):
    rlfh("make-tiny-model", str(tmp_path / "tiny"), "--pretrain-steps", "2")  # the default 300 take minutes
    assert (tmp_path / "tiny" / "model_index.json").is_file()


@pytest.mark.slow
def test_train_status_inspect_offline_eval_compare_plot(tiny_run, tiny_model_dir, tmp_path):
    run_dir, rewards = tiny_run
    assert json.loads(rlfh("status", str(run_dir), "--json").stdout)["state"] == "finished"
    rlfh("status", str(run_dir))
    assert json.loads(rlfh("rollouts", "inspect", str(run_dir / "rollouts")).stdout)["records"] == 8
    off = tmp_path / "offline"
    rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={run_dir / 'rollouts'}",
        f"run_dir={off}",
        f"model.path={tiny_model_dir}",
        "num_rounds=1",
        rewards,
        *SMALL[:2],
    )
    rlfh(
        "eval",
        "configs/tiny.yaml",
        rewards,
        *SMALL,
        "--model",
        tiny_model_dir,
        "--lora",
        str(run_dir),
        "--baseline-model",
        tiny_model_dir,
        "--seeds",
        "1",
        "--max-prompts",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "eval"),
    )
    assert (tmp_path / "eval" / "index.html").is_file()
    rlfh("compare", str(run_dir), str(off), "--out", str(tmp_path / "compare"))
    rlfh("plot", str(run_dir), "--out", str(tmp_path / "curves"))
    assert (tmp_path / "compare" / "index.html").is_file() and (tmp_path / "curves" / "index.html").is_file()


@pytest.mark.slow
def test_score_with_the_detectors(detector_rewards, images):
    r = rlfh(
        "score",
        "configs/tiny.yaml",
        str(images / "0.png"),
        str(images / "1.png"),
        f"rewards=[{{target: jpeg_compressibility}}, {detector_rewards}]",
    )
    objs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [o["image"] for o in objs] == [str(images / "0.png"), str(images / "1.png")]


@pytest.mark.slow
def test_make_region_pairs_and_train_reward(detector_rewards, images, tiny_model_dir, tmp_path):
    from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

    run = tmp_path / "pairs"
    base = [
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.regions.names=[global, face]",
        "data.region_pairs.region=face",
    ]
    r = rlfh(
        "make-region-pairs",
        "configs/tiny.yaml",
        str(images),
        f"run_dir={run}",
        *base,
        f"rewards=[{FACE}, {detector_rewards}]",
    )
    assert "4 of 4 images had the region" in r.stdout
    init = save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=0), TINY_MED_CONFIG, tmp_path / "init", "FS_model.pt"
    )
    rlfh(
        "train-reward",
        "configs/tiny.yaml",
        f"run_dir={tmp_path / 'scorer'}",
        "logging.wandb=false",
        "logging.progress=false",
        f"rewards=[{FACE}]",
        f"pairs={run / 'rollouts'}",
        f"init={init}",
        "region=face",
        "reward_training.vision_heads=2",
        "reward_training.epochs=1",
    )
    assert (tmp_path / "scorer" / "FS_model.pt").is_file()


@pytest.mark.slow
def test_make_region_pairs_without_the_region_exits_with_the_reason(detector_rewards, images, tiny_model_dir, tmp_path):
    """No face on noise images: exit 2, naming the images, the face rewards and the smallest face
    MediaPipe's short-range detector finds at 64x64 (0.148 of 64 px), and no log claimed."""
    run = tmp_path / "none"
    r = rlfh(
        "make-region-pairs",
        "configs/tiny.yaml",
        str(images),
        f"run_dir={run}",
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.regions.names=[global, face]",
        "data.region_pairs.region=face",
        f"rewards=[{{target: jpeg_compressibility}}, {detector_rewards}]",
        code=2,
    )
    assert "no image of" in r.stderr and "0 of 4 images at 64x64" in r.stderr
    assert "face_detection_confidence, whose detector finds a face of about 10 px or more" in r.stderr
    assert f"the rollout log {run / 'rollouts'} was not written" in r.stderr
    assert not (run / "rollouts").exists() and "rollout log:" not in r.stdout
