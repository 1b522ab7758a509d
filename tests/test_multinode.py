"""`rlfh train` on a two-node Ray cluster: rollout actor and learner placed on different nodes.

Both nodes run on this machine (node IP 127.0.0.1), each from its own `ray start --block` process in
its own session and its own temp dir, so the test stops exactly the processes it started and never
touches other Ray clusters on the machine (no `ray stop`):

    head:   --num-cpus=1 --resources='{"learner": 1}'   (+ dashboard, for the state API)
    worker: --num-cpus=2 --resources='{"rollout": 2}'

The run asks for those node resources through ``resources.rollout_actor_resources`` /
``resources.learner_resources`` / ``resources.reward_resources``; the test skips until the config
schema has these fields. Placement is read back from the cluster's state API (the actors are dead
by then, but GCS keeps their records).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlfh.learner.distributed import free_port
from tests.conftest import REPO
from tests.test_end_to_end import clean_env

pytestmark = pytest.mark.slow

# The schema fields this test needs (proposed in issue 5): custom Ray resources per actor role.
PLACEMENT_FIELDS = ("rollout_actor_resources", "learner_resources", "reward_resources")
NODE_START_TIMEOUT_S = 60
TRAIN_TIMEOUT_S = 300
# Loopback only, no token: a throwaway development cluster (Ray 2.60 otherwise enables token auth).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def missing_placement_fields() -> list[str]:
    from rlfh.config.schema import ResourcesConfig

    have = {f.name for f in dataclasses.fields(ResourcesConfig)}
    return [f for f in PLACEMENT_FIELDS if f not in have]


def ray_bin() -> str:
    found = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` executable is not on PATH next to this Python; install ray[default]")
    return found


def _pids_using(temp_dir: str) -> list[int]:
    """Pids of processes whose command line names ``temp_dir`` (ours alone: the dir is unique)."""
    named = re.compile(re.escape(temp_dir) + r"(/|\s|$)")  # not a longer name that starts the same
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if named.search(cmdline):
            pids.append(int(entry.name))
    return pids


class LocalNode:
    """One Ray node from a ``ray start --block`` process in its own session and temp dir.

    ``--block`` keeps the node's lifetime tied to a process we own: SIGTERM to its process group
    stops its raylet, GCS (head) and workers; stragglers are found by their unique temp dir.
    """

    def __init__(self, name: str, args: list[str]):
        # Ray's socket paths must stay under ~107 bytes: a short dir straight under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix=f"rlfh-{name}-", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        ports = {  # fixed defaults (e.g. the agent's 52365) would collide between the two nodes
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [
            ray_bin(),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items()),
            *args,
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=clean_env(**RAY_ENV), start_new_session=True
        )

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""

    def wait_started(self, timeout: float = NODE_START_TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in self.log_tail(100_000):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"ray start did not come up in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        finally:
            for pid in _pids_using(self.temp_dir):  # e.g. workers that left the process group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._log.close()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def alive_nodes(gcs_address: str) -> list:
    from ray.util.state import list_nodes

    return [
        n for n in list_nodes(address=gcs_address, detail=True, raise_on_missing_output=False) if n.state == "ALIVE"
    ]


def wait_for_nodes(gcs_address: str, count: int, timeout: float = NODE_START_TIMEOUT_S) -> list:
    deadline, err = time.time() + timeout, None
    while time.time() < deadline:
        try:
            nodes = alive_nodes(gcs_address)
            if len(nodes) >= count:
                return nodes
        except Exception as e:  # the dashboard (state API server) comes up after the GCS
            err = e
        time.sleep(1.0)
    raise TimeoutError(f"{count} alive Ray nodes not seen at {gcs_address} within {timeout}s (last error: {err})")


@pytest.fixture()
def two_nodes(monkeypatch):
    """(gcs address, {role: node id}) of a head node holding `learner` and a worker holding `rollout`."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the state API client in this process
    nodes: list[LocalNode] = []
    try:
        port = free_port()
        head = LocalNode(
            "head",
            [
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                '--resources={"learner": 1}',
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        nodes.append(head)
        head.wait_started()
        gcs = f"127.0.0.1:{port}"
        worker = LocalNode("wrk", [f"--address={gcs}", "--num-cpus=2", '--resources={"rollout": 2}'])
        nodes.append(worker)
        worker.wait_started()
        by_role = {}
        for n in wait_for_nodes(gcs, 2):
            for role in ("learner", "rollout"):
                if role in n.resources_total:
                    by_role[role] = n.node_id
        assert set(by_role) == {"learner", "rollout"} and by_role["learner"] != by_role["rollout"], by_role
        yield gcs, by_role
    finally:
        for node in reversed(nodes):  # worker first, so it does not linger looking for its head
            node.stop()


def actor_nodes(gcs_address: str, class_name: str) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=gcs_address, filters=[("class_name", "=", class_name)], detail=True, raise_on_missing_output=False
    )
    return [a.node_id for a in actors]


@pytest.mark.skipif(
    bool(missing_placement_fields()),
    reason=f"rlfh.config.schema.ResourcesConfig has no {missing_placement_fields()} yet: a run cannot ask "
    f"for node resources, so its actors cannot be placed on chosen nodes",
)
def test_rollout_and_learner_on_different_nodes(two_nodes, tiny_model_dir, tmp_path):
    gcs, by_role = two_nodes
    run_dir = tmp_path / "run"
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlfh.cli.main",
            "train",
            "configs/tiny.yaml",
            f"run_dir={run_dir}",
            f"model.path={tiny_model_dir}",
            "num_rounds=2",
            "rollout.prompts_per_round=2",
            "rollout.rollouts_per_prompt=4",
            "rollout.sample_batch_size_per_actor=4",
            "learner.epochs_per_round=1",
            "logging.wandb=false",
            "logging.progress=false",
            "resources.rollout_actor_resources={rollout: 1}",
            "resources.learner_resources={learner: 1}",
            # the reward actor goes with the rollout actor: the head's single CPU is the learner's
            "resources.reward_resources={rollout: 1}",
        ],
        cwd=REPO,
        env=clean_env(RAY_ADDRESS=gcs, **RAY_ENV),
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    elapsed = time.time() - t0
    assert r.returncode == 0, f"rlfh train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(f"two-node rlfh train (2 rounds): {elapsed:.1f}s")

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [row["round"] for row in rows] == [0, 1]
    assert (run_dir / "checkpoints" / "latest").read_text() == "round-000002"

    rollout_nodes = actor_nodes(gcs, "RolloutActor")
    learner_nodes = actor_nodes(gcs, "LearnerActor")
    reward_nodes = actor_nodes(gcs, "RewardActor")
    assert rollout_nodes and learner_nodes and reward_nodes, (rollout_nodes, learner_nodes, reward_nodes)
    assert set(rollout_nodes) == {by_role["rollout"]}, f"rollout actor on {rollout_nodes}, expected the worker node"
    assert set(learner_nodes) == {by_role["learner"]}, f"learner on {learner_nodes}, expected the head node"
    assert set(reward_nodes) == {by_role["rollout"]}, f"reward actor on {reward_nodes}, expected the worker node"
