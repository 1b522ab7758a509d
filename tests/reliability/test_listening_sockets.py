"""What a private Ray cluster and the reward server expose, and what is left of them after a SIGKILL.

Each test runs the driver in a subprocess (its own Ray), lists the listening sockets of every
process of that cluster with psutil, then SIGKILLs the driver and watches the cluster's processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

# A driver like `rlfh train`'s: setup_ray on a config without a cluster address, one actor.
TRAIN_DRIVER = """
import os, types, time, ray
from rlfh.recipes.cluster import setup_ray
assert setup_ray(types.SimpleNamespace(resources=types.SimpleNamespace(ray_address=None)))
@ray.remote
class Probe:
    def pid(self):
        return os.getpid()
p = Probe.remote()
ray.get(p.pid.remote())
print("READY", flush=True)
time.sleep(600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if text in line:
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"the driver never printed {text!r} (exit code {proc.poll()})")


def _cluster(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    names = {p.pid: p.name() for p in procs}
    return [
        (c.laddr.ip, c.laddr.port, names[c.pid])
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in names
    ]


def _sigkill_and_outlivers(proc: subprocess.Popen, procs: list[psutil.Process], within: float) -> list[str]:
    """SIGKILL the driver; the cluster processes still running ``within`` seconds later."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(procs, timeout=within)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:  # leave nothing behind for the next test, whatever the verdict
        p.kill()
    return names


def _run(proc_args: list[str], ready: str, check) -> None:
    proc = subprocess.Popen(
        proc_args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    procs: list[psutil.Process] = []
    try:
        _wait_for(proc, ready)
        time.sleep(2)  # the agents and workers started after the driver's first answer
        procs = _cluster(proc)
        check(procs)
        outlivers = _sigkill_and_outlivers(proc, procs, within=6.0)
        assert not outlivers, f"processes of the killed driver's cluster still running 6 s later: {outlivers}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in procs:
            if p.is_running():
                p.kill()


def _assert_loopback_only(procs, expect_names):
    socks = _listening(procs)
    names = {n for _, _, n in socks}
    assert expect_names <= names, f"expected listeners of {expect_names}, got {socks}"
    exposed = [s for s in socks if s[0] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_private_cluster_listens_on_loopback_only_and_dies_with_its_driver():
    _run(
        [sys.executable, "-c", TRAIN_DRIVER],
        "READY",
        lambda procs: _assert_loopback_only(
            procs, {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Probe"}
        ),
    )


def test_serve_rewards_listens_on_loopback_only_and_dies_with_its_driver():
    port = _free_port()

    def check(procs):
        _assert_loopback_only(procs, {"gcs_server", "raylet", "ray::ProxyActor"})
        assert ("127.0.0.1", port, "ray::ProxyActor") in _listening(procs)

    _run(
        [
            os.path.join(os.path.dirname(sys.executable), "rlfh"),
            "serve-rewards",
            "configs/tiny.yaml",
            "--port",
            str(port),
        ],
        "ready at",
        check,
    )


def test_private_cluster_reruns_cleanly_after_a_sigkill():
    """The run after a killed one starts its own cluster without meeting the old one's ports."""
    first = subprocess.Popen(
        [sys.executable, "-c", TRAIN_DRIVER],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs: list[psutil.Process] = []
    try:
        _wait_for(first, "READY")
        procs = _cluster(first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        code = TRAIN_DRIVER.replace(
            "time.sleep(600)",
            "print('SESSION', ray._private.worker._global_node.get_session_dir_path(), flush=True); ray.shutdown()",
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and "READY" in out.stdout, out.stdout + out.stderr
        session = out.stdout.split("SESSION ")[1].split()[0]
        # The old run's dashboard agent holds its HTTP port until the watcher ends it; Ray's fixed
        # default (52365) made the new agent meet it there, so each private cluster's agent takes a
        # port of the OS's choosing.
        with open(os.path.join(session, "logs", "dashboard_agent.log")) as f:
            log = f.read()
        assert "address already in use" not in log, [ln for ln in log.splitlines() if "in use" in ln][:3]
        address = [ln for ln in log.splitlines() if "Dashboard agent http address" in ln]
        assert address and not address[-1].endswith(":52365"), address
    finally:
        for p in procs:
            if p.is_running():
                p.kill()


def _readme_ray_block() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### On a Ray cluster (`ray job submit`)") :]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("\n```", start)]
    return [ln.split("   #")[0].strip() for ln in block.splitlines()]


def test_readme_ray_job_submit_example_works_under_token_auth(tmp_path):
    """The README's head + submit commands as written, in an isolated home (its own token) and Ray
    temp dir, on free ports, with a short entrypoint: the submitted job joins the head (so token
    auth passes) and the head listens on loopback only."""
    export, token, start, submit = _readme_ray_block()
    assert export.startswith("export ") and start.startswith("ray start --head") and submit.startswith("ray job submit")
    assert token.startswith("ray get-auth-token --generate")
    env = {**_env(), "HOME": str(tmp_path)}
    env.update(kv.split("=", 1) for kv in export.split()[1:])
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    ray_tmp = f"/tmp/rlfh-readme-{os.getpid()}"  # Ray's socket paths must stay short
    port, dash = _free_port(), _free_port()
    start_args = start.split() + [
        f"--port={port}",
        f"--dashboard-port={dash}",
        f"--temp-dir={ray_tmp}",
        "--num-cpus=1",
        "--disable-usage-stats",
    ]
    head: list[psutil.Process] = []
    try:
        r = subprocess.run(token, shell=True, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and (tmp_path / ".ray" / "auth_token").is_file(), r.stderr[-2000:]
        r = subprocess.run(start_args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        roots = [p for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
        head = list({p.pid: p for r_ in roots for p in [r_, *r_.children(recursive=True)]}.values())
        job = (
            "import ray; ray.init(); print('JOB', ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()))"
        )
        cmd = submit.split(" -- ")[0].replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dash}").split()
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
            r = subprocess.run(
                cmd + ["--", sys.executable, "-c", job], env=env, capture_output=True, text=True, timeout=120
            )
            if "No available agent to submit job" not in r.stdout + r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0 and "JOB 127.0.0.1" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        head = list({p.pid: p for r_ in roots if r_.is_running() for p in [r_, *r_.children(recursive=True)]}.values())
        exposed = [s for s in _listening(head) if s[0] not in LOOPBACK]
        assert not exposed, f"the README's loopback head listens beyond loopback: {exposed}"
    finally:  # only this head's processes: `ray stop` would stop every Ray on the machine
        for p in head:
            if p.is_running():
                p.kill()
        subprocess.run(["rm", "-rf", ray_tmp])
