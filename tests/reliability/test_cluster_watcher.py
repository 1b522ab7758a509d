"""The watcher of a private Ray cluster ends every process of it once the driver is SIGKILLed,
including those started after the cluster came up: a restarted actor, and a daemon (double fork)
the restarted actor started, which has left Ray's process tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# A driver like `rlfh train`'s, whose actor is killed once and restarted by Ray; the restarted
# incarnation starts a double-forked daemon.
DRIVER = """
import os, signal, subprocess, sys, time, types, ray
from rlfh.recipes.cluster import setup_ray
assert setup_ray(types.SimpleNamespace(resources=types.SimpleNamespace(ray_address=None)))
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
@ray.remote(max_restarts=1)
class Probe:
    def pid(self):
        return os.getpid()
    def daemon(self):
        r, w = os.pipe()
        if os.fork() == 0:  # the middle process exits at once: its child is reparented out of the tree
            os.close(r)
            pid = subprocess.Popen(SLEEP, start_new_session=True).pid
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        return int(os.read(r, 64))
p = Probe.remote()
first = ray.get(p.pid.remote())
os.kill(first, signal.SIGKILL)
deadline = time.monotonic() + 120
while True:
    try:
        second = ray.get(p.pid.remote(), timeout=10)
        break
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        assert time.monotonic() < deadline, "the actor was not restarted"
        time.sleep(0.5)
assert second != first
daemon = ray.get(p.daemon.remote())
print("READY", first, second, daemon, flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_watcher_ends_processes_started_after_the_cluster_came_up():
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs: list[psutil.Process] = []
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                break
        assert lines and lines[-1].startswith("READY"), "".join(lines)[-3000:]
        _, first, second, daemon = lines[-1].split()
        time.sleep(1.5)  # a poll of the watcher, which a process born just now could have missed before
        outside = psutil.Process(int(daemon))
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert outside.pid not in {p.pid for p in tree}
        assert int(second) in {p.pid for p in tree} and not psutil.pid_exists(int(first))
        procs = [*tree, outside]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(procs, timeout=10.0)
        alive = [p for p in alive if _running(p)]
        left = [f"{p.pid} {p.name()}" for p in alive]
        assert not left, f"still running {time.monotonic() - t0:.0f} s after the driver's SIGKILL: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in procs:
            if _running(p):
                p.kill()
