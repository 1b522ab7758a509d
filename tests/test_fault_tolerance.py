"""The online system under stress: async rollouts within their staleness bound, a rollout actor and
the reward actor killed mid-run (restarted, their work re-issued, no rollout lost or duplicated),
and an unreachable reward server (the run fails with a clear error and trains on nothing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from rlfh.learner.distributed import free_port
from tests.conftest import REPO
from tests.test_end_to_end import clean_env, rlfh

pytestmark = pytest.mark.slow

SMALL = ["rollout.prompts_per_round=2", "logging.wandb=false", "logging.progress=false"]


def metric_rows(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def assert_log_complete(run_dir, rounds, per_round):
    from rollouts.log import RolloutLog

    recs = RolloutLog(run_dir / "rollouts").records(["rollout_id", "round"])
    assert [sum(1 for r in recs if r["round"] == k) for k in range(rounds)] == [per_round] * rounds
    assert len({r["rollout_id"] for r in recs}) == len(recs)


def test_async_rollouts_stay_within_staleness_and_log_grids(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=3",
        "rollout.max_staleness=1",
        "logging.sample_grid_every=2",
        *SMALL,
    )
    rows = metric_rows(run_dir)
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1]  # round k+1 sampled while round k trained
    assert [r["rollout/sampled_policy_version"] for r in rows] == [0, 0, 1]
    assert_log_complete(run_dir, 3, 16)
    from rollouts.log import RolloutLog

    recs = RolloutLog(run_dir / "rollouts").records(["round", "policy_version", "staleness"])
    assert [r["staleness"] for r in recs] == [0] * 16 + [1] * 32  # per sample, as logged
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["round-000000.png", "round-000002.png"]


def test_unreachable_reward_server_fails_clearly(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlfh.cli.main",
            "train",
            "configs/tiny.yaml",
            f"run_dir={run_dir}",
            f"model.path={tiny_model_dir}",
            f"reward_server.remote_url={url}",
            *SMALL,
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "unreachable" in r.stderr and url in r.stderr
    assert metric_rows(run_dir) == [] and not (run_dir / "checkpoints").exists()


# one run, two crashes: the rollout actor after round 0, the reward actor after round 2
KILLS = (("RolloutActor", 1), ("RewardActor", 3))


def test_killed_actors_are_restarted_without_losing_rollouts(tiny_model_dir, tmp_path):
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    ray_tmp = tempfile.mkdtemp(prefix="rlfh-ray-", dir="/tmp")
    port, dash = free_port(), free_port()
    env = clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_dir = tmp_path / "run"
    driver = None
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while (
            time.time() < deadline
            and subprocess.run([ray_bin, "status", f"--address={address}"], env=env, capture_output=True).returncode
            != 0
        ):
            time.sleep(1)
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlfh.cli.main",
                "train",
                "configs/tiny.yaml",
                f"run_dir={run_dir}",
                f"model.path={tiny_model_dir}",
                "num_rounds=6",
                f"resources.ray_address={address}",
                *SMALL,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        from ray.util.state import list_actors

        state_api = f"http://127.0.0.1:{dash}"
        for victim, rounds_done in KILLS:
            while time.time() < deadline + 180 and len(metric_rows(run_dir)) < rounds_done:
                assert driver.poll() is None, driver.stdout.read()[-3000:]
                time.sleep(0.2)
            alive = list_actors(address=state_api, filters=[("class_name", "=", victim), ("state", "=", "ALIVE")])
            assert len(alive) == 1 and driver.poll() is None
            os.kill(alive[0].pid, signal.SIGKILL)  # the worker process crashes mid-run
        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, out[-3000:]
        for victim, _ in KILLS:
            (after,) = list_actors(address=state_api, filters=[("class_name", "=", victim)], detail=True)
            assert after.num_restarts >= 1  # Ray restarted it and the run went on
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", ray_tmp], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = metric_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    # a rollout actor killed while idle is caught by the policy-version check, mid-call by the error
    assert rows[-1]["rollout/actor_restarts"] >= 1 and "[rlfh] rollout actor 0 " in out
    assert all(np.isfinite(r["loss/dpo"]) for r in rows)
    assert_log_complete(run_dir, 6, 16)


def test_guards_log_heldout_reward_and_stop_early(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=4",
        "guards.every=1",
        "guards.heldout_prompts=[a dancer mid-jump]",
        "guards.heldout_rewards=[jpeg_incompressibility]",
        "guards.max_reference_mse=1e-9",
        *SMALL,
    )
    rows = metric_rows(run_dir)
    assert len(rows) == 1 and rows[0]["guards/stopped"] == 1.0  # the policy moves off the reference at once
    assert "early stop after round 0" in r.stdout and "guards.max_reference_mse" in r.stdout
    assert np.isfinite(rows[0]["heldout/jpeg_incompressibility/mean"]) and rows[0]["ref/eps_mse"] > 1e-9
    assert (run_dir / "checkpoints" / "latest").read_text() == "round-000001"


def test_rollout_actors_in_a_placement_group(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=2",
        "resources.num_rollout_actors=2",
        "resources.placement=PACK",
        *SMALL,
    )
    assert "2 rollout actors reserved in a PACK placement group" in r.stdout
    assert_log_complete(run_dir, 2, 16)  # both actors' shares arrive, in order, every round
