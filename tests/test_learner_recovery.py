"""A learner rank killed mid-run is recovered inside the run (rlfh/recipes/rounds.py): the group
restarts, reloads the run's last checkpoint and replays the rounds since, ending with the metrics and
the LoRA of an undisturbed run; once ``resources.max_learner_restarts`` are spent the run stops with
one line naming what died and the command that resumes it."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_end_to_end import clean_env, rlfh
from tests.test_resume import ARGS, rows

pytestmark = pytest.mark.slow

KEYS = ("loss/dpo", "dpo/implicit_acc", "reward/jpeg_compressibility/mean", "policy_version")


def learner_pids(root: int) -> list[int]:
    """The learner actors' worker processes among ``root``'s descendants (this run's private Ray cluster)."""
    import psutil

    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "ray::LearnerActor" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def run_and_kill_learner(cmd: list[str], run_dir, after_round: int) -> subprocess.CompletedProcess:
    """Run ``cmd``; once round ``after_round`` is in metrics.jsonl, SIGKILL the learner actor's process."""
    import os

    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and after_round in rows(run_dir):
                break
            time.sleep(0.1)
        pids = learner_pids(proc.pid)
        assert proc.poll() is None and len(pids) == 1, ("the run ended (or has no learner) before the kill", pids)
        os.kill(pids[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def lora(run_dir, rounds: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"round-{rounds:06d}" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def undisturbed(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    rlfh("train", "configs/tiny.yaml", f"run_dir={run_dir}", f"model.path={tiny_model_dir}", *ARGS)
    return run_dir


def test_killed_learner_is_restarted_and_the_run_ends_as_undisturbed(undisturbed, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "rlfh.cli.main",
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        *ARGS,
    ]
    r = run_and_kill_learner(cmd, run_dir, after_round=2)  # in round 3, after the round-2 checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    assert "learner rank 0 died in round" in r.stdout and "restarting the learner (1 of 2)" in r.stdout
    assert "replaying from" in r.stdout and "round-000002" in r.stdout
    ref, got = rows(undisturbed), rows(run_dir)
    assert sorted(got) == [0, 1, 2, 3]
    for k in range(4):
        for key in KEYS:
            assert got[k][key] == ref[k][key], (k, key, got[k][key], ref[k][key])
    final, final_ref = lora(run_dir, 4), lora(undisturbed, 4)
    assert sorted(final) == sorted(final_ref) and all(np.array_equal(final[n], final_ref[n]) for n in final)
    from rollouts.log import RolloutLog

    recs = RolloutLog(run_dir / "rollouts").records(["rollout_id", "round"])
    assert [sum(1 for x in recs if x["round"] == k) for k in range(4)] == [16] * 4  # replayed rounds once
    assert len({x["rollout_id"] for x in recs}) == len(recs)


def test_spent_restarts_end_the_run_with_one_line_and_the_resume_command(undisturbed, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "spent"
    args = [
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        *ARGS,
        "resources.max_learner_restarts=0",
    ]
    r = run_and_kill_learner([sys.executable, "-m", "rlfh.cli.main", *args], run_dir, after_round=2)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("rlfh: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    (line,) = errors
    assert "learner rank 0 died in round 3" in line and "resources.max_learner_restarts=0" in line
    resume = line.split("resume with: ", 1)[1]
    assert resume == shlex.join(["rlfh", *args])
    # the command it names resumes the run, which ends as the undisturbed one
    done = rlfh(*shlex.split(resume)[1:])
    assert "resuming from" in done.stdout and "round 2" in done.stdout
    ref, got = rows(undisturbed), rows(run_dir)
    assert sorted(got) == [0, 1, 2, 3] and all(got[k][key] == ref[k][key] for k in range(4) for key in KEYS)
