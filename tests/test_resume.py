"""Exact resume: an online run killed with SIGKILL mid-run, restarted with the same command,
reproduces the uninterrupted run's losses and rewards exactly, and its rollout log holds every round
once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_end_to_end import clean_env, rlfh

pytestmark = pytest.mark.slow

ARGS = [
    "num_rounds=4",
    "logging.checkpoint_every=2",
    "logging.wandb=false",
    "logging.progress=false",
    "rollout.prompts_per_round=2",
    "learner.train_batch_size=2",
]


def rows(run_dir):
    out = {}
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        out[r["round"]] = r
    return out


# nft with DiffusionNFT's EMA sampler and an EMA reference refreshed every 3 rounds (so round 2 uses the
# one saved in the round-2 checkpoint) and the KL term: the kept copies come back exactly too
EMA_ARGS = [
    "learner.loss=nft",
    "learner.ema.decay=0.5",
    "learner.ema.sampling_policy=ema",
    "learner.reference.model=ema",
    "learner.reference.refresh_rounds=3",
    "learner.reference.kl_coef=1",
]
VARIANTS = {
    "dpo": ([], ("loss/dpo", "dpo/implicit_acc")),
    "nft_ema": (EMA_ARGS, ("loss/nft", "loss/kl", "nft/old_eps_mse")),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kill_and_resume_reproduces_losses(tiny_model_dir, tmp_path, variant):
    extra, keys = VARIANTS[variant]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    rlfh("train", "configs/tiny.yaml", f"run_dir={ref_dir}", f"model.path={tiny_model_dir}", *ARGS, *extra)

    cmd = [
        sys.executable,
        "-m",
        "rlfh.cli.main",
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        *ARGS,
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        # kill once round 2 (after the round-2 checkpoint) is logged, before the run ends
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and 2 in rows(run_dir):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    finally:
        proc.wait(timeout=60)
    assert (run_dir / "checkpoints" / "latest").read_text() == "round-000002"

    r = rlfh("train", "configs/tiny.yaml", f"run_dir={run_dir}", f"model.path={tiny_model_dir}", *ARGS, *extra)
    assert "resuming from" in r.stdout and "round 2" in r.stdout

    ref, got = rows(ref_dir), rows(run_dir)
    assert sorted(got) == [0, 1, 2, 3]
    for k in (2, 3):
        for key in (*keys, "reward/jpeg_compressibility/mean", "policy_version"):
            assert got[k][key] == ref[k][key], (k, key, got[k][key], ref[k][key])

    from rollouts.log import RolloutLog

    recs = RolloutLog(run_dir / "rollouts").records(["rollout_id", "round"])
    per_round = [sum(1 for x in recs if x["round"] == k) for k in range(4)]
    assert per_round == [16, 16, 16, 16]  # no round lost, none duplicated
    assert len({x["rollout_id"] for x in recs}) == len(recs)
