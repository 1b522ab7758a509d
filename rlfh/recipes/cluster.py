"""The Ray cluster a recipe runs on: joining or starting it, and the rollout actors on it.

A private cluster (one this process starts) listens on 127.0.0.1 only, every port of it, and
does not outlive this process: ``python -m rlfh.recipes.cluster`` is the watcher that removes
what is left of it when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlfh.config.schema import Config

# Ray >= 2.4x turns a loopback node address into the machine's routable one ("Make sure localhost
# isn't resolved to the loopback ip"), and then the GCS, raylet, driver, worker and agent servers
# listen on it or on every interface. This switch is the one that keeps the node on loopback: Ray
# reads it where it resolves the node address (in this process) and the child processes inherit it.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_node():
    import ray._private.parameter as parameter
    import ray._private.ray_constants as ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    saved_params = parameter.RayParams
    os.environ[_LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; the env var only at import
    parameter.RayParams = _dynamic_agent_port(saved_params)
    try:
        yield
    finally:
        parameter.RayParams = saved_params
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = saved_env


def _dynamic_agent_port(params_cls: type) -> type:
    """RayParams whose dashboard agent listens on a port the OS picks. ray.init has no argument for
    it and defaults to the fixed 52365: a run started right after a SIGKILLed one would meet the
    dead run's agent there (it holds the port until the watcher ends it) and retry its bind."""

    class PrivateParams(params_cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    return PrivateParams


def start_private_ray(**init_kwargs: Any) -> None:
    """Start a Ray cluster for this process alone: every port on 127.0.0.1, no dashboard, and a
    watcher that removes its processes once this process has gone (ray.init's children die with
    it, but the dashboard and runtime-env agents linger a minute on a SIGKILL, holding ports)."""
    import ray

    mark = f"{os.getpid()}-{time.time_ns()}"
    with _loopback_node(), _cluster_mark(mark):
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **init_kwargs)
    node = ray._private.worker._global_node
    if node.node_ip_address != "127.0.0.1":  # a Ray whose switch no longer works: say so, do not run exposed
        ray.shutdown()
        raise RuntimeError(
            f"the private Ray cluster came up on {node.node_ip_address}, not 127.0.0.1; "
            f"this Ray version ignores {_LOOPBACK_SWITCH}=0"
        )
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    _start_watcher(os.getpid(), mark, roots)


# Set in the environment of the processes ray.init starts (GCS, raylet, agents), and so inherited by
# everything they start later: workers, restarted actors and whatever those spawn, even a process
# that has left the tree (a daemon, the orphan of a killed actor). The watcher finds the cluster by
# it when the owner dies, not by a list taken while it ran.
CLUSTER_MARK = "RLFH_PRIVATE_CLUSTER"


@contextlib.contextmanager
def _cluster_mark(mark: str):
    # only while ray.init spawns the cluster: a process the driver starts afterwards is not the cluster's
    saved = os.environ.get(CLUSTER_MARK)
    os.environ[CLUSTER_MARK] = mark
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(CLUSTER_MARK, None)
        else:
            os.environ[CLUSTER_MARK] = saved


def _start_watcher(owner: int, mark: str, roots: list[int]) -> None:
    # Its own session: a Ctrl-C or kill sent to the driver's process group must not take the
    # watcher with it before it has done its job.
    subprocess.Popen(
        [sys.executable, "-m", "rlfh.recipes.cluster", str(owner), mark, *map(str, roots)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _with_descendants(procs) -> dict:
    """{(pid, start time): process} of ``procs`` and their descendants; one that vanishes while
    listed is skipped, not the rest of its tree (a busy cluster starts and ends processes all along)."""
    import psutil

    out = {}
    for root in procs:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            try:
                out[(p.pid, p.create_time())] = p
            except psutil.Error:
                pass
    return out


def cluster_processes(mark: str, seen: dict) -> dict:
    """The running processes of the cluster marked ``mark``: every process with the mark in its
    environment, those of ``seen`` (a process may rewrite its environment), and the descendants of
    all of them; never this process."""
    import psutil

    marked = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(CLUSTER_MARK) == mark:
                marked.append(p)
        except psutil.Error:
            pass
    found = _with_descendants([*marked, *(p for p in seen.values() if _alive(p))])
    return {k: p for k, p in found.items() if p.pid != os.getpid() and _alive(p)}


def end_cluster(mark: str, seen: dict, sweeps: int = 10) -> None:
    """SIGTERM, then after 2 s SIGKILL, what :func:`cluster_processes` finds, again until a sweep
    finds nothing: a dying raylet or worker may still start a process after the first sweep."""
    import psutil

    for _ in range(sweeps):
        left = list(cluster_processes(mark, seen).values())
        if not left:
            return
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, stubborn = psutil.wait_procs(left, timeout=2.0)
        for p in stubborn:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(stubborn, timeout=1.0)


def watch_cluster(owner: int, mark: str, roots: list[int], poll_s: float = 1.0) -> None:
    """Wait while the owner lives and any of the cluster's root processes (GCS, raylet, ...) runs;
    then end what is left of the cluster (:func:`end_cluster`), found then, by its mark. While
    waiting, the roots' descendants are remembered too, for one that clears its environment. A
    process is known by (pid, start time), so a reused pid is never hit."""
    import psutil

    def proc(pid):
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    owner_p = proc(owner)
    live = [p for p in map(proc, roots) if p is not None]
    seen: dict[tuple[int, float], psutil.Process] = {}
    while owner_p is not None and _alive(owner_p) and any(_alive(p) for p in live):
        seen.update(_with_descendants([p for p in live if _alive(p)]))
        time.sleep(poll_s)
    # The owner or the cluster is gone (a normal ray.shutdown ends here too, finding nothing left).
    time.sleep(0.5)  # let Ray's own shutdown and fate sharing go first
    end_cluster(mark, seen)


def setup_ray(cfg: Config):
    """Join the cluster named by resources.ray_address / RAY_ADDRESS (ray job submit sets it), else
    start a private one (:func:`start_private_ray`). Returns True when this call started Ray."""
    import ray

    from rlfh.env import worker_runtime_env

    if ray.is_initialized():
        return False
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env=worker_runtime_env(), log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        start_private_ray(**kwargs)
    return True


def release_actors(actors: list, timeout_s: float = 30.0) -> None:
    """End the actors a run owns: first each one's ``close()`` where it has one (the reward actor's
    detectors), waited for at most ``timeout_s`` and skipped for an actor that died, then ``ray.kill``,
    which ends the process without running any finalizer."""
    import ray

    closing = []
    for a in actors:
        if hasattr(a, "close"):
            with contextlib.suppress(Exception):  # a dead or restarting actor: nothing left to close
                closing.append(a.close.remote())
    if closing:
        with contextlib.suppress(Exception):
            ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
    for a in actors:
        ray.kill(a)


def start_rollout_actors(cfg: Config, threads: int, pgs: list) -> list:
    """``resources.num_rollout_actors`` rollout actors; with ``resources.placement`` their bundles
    are reserved at once (gang scheduling) in a placement group, appended to ``pgs``."""
    from rollouts.actor import RolloutActor

    res = cfg.resources
    opts = [
        dict(
            num_cpus=res.num_cpus_per_actor,
            num_gpus=res.gpus_per_rollout_actor,
            resources=dict(res.rollout_actor_resources),
            max_restarts=res.max_actor_restarts,
        )
        for _ in range(res.num_rollout_actors)
    ]
    if res.placement != "none":
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rlfh.learner.placement import reserve

        bundle = {"CPU": res.num_cpus_per_actor, **res.rollout_actor_resources}
        if res.gpus_per_rollout_actor:
            bundle["GPU"] = res.gpus_per_rollout_actor
        pg = reserve([dict(bundle) for _ in range(res.num_rollout_actors)], res.placement, "the rollout actors")
        pgs.append(pg)
        print(f"[rlfh] {res.num_rollout_actors} rollout actors reserved in a {res.placement} placement group")
        for i, o in enumerate(opts):
            o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
    rc = cfg.rollout
    return [
        RolloutActor.options(**o).remote(
            cfg.model, cfg.model.lora, threads, rc.scheduler, compile=rc.compile, merge_lora=rc.merge_lora
        )
        for o in opts
    ]


if __name__ == "__main__":  # the watcher of a private cluster: OWNER_PID MARK ROOT_PID...
    watch_cluster(int(sys.argv[1]), sys.argv[2], [int(a) for a in sys.argv[3:]])
