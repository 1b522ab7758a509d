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

    with _loopback_node():
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **init_kwargs)
    node = ray._private.worker._global_node
    if node.node_ip_address != "127.0.0.1":  # a Ray whose switch no longer works: say so, do not run exposed
        ray.shutdown()
        raise RuntimeError(f"the private Ray cluster came up on {node.node_ip_address}, not 127.0.0.1; "
                           f"this Ray version ignores {_LOOPBACK_SWITCH}=0")
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    _start_watcher(os.getpid(), roots)


def _start_watcher(owner: int, roots: list[int]) -> None:
    # Its own session: a Ctrl-C or kill sent to the driver's process group must not take the
    # watcher with it before it has done its job.
    subprocess.Popen([sys.executable, "-m", "rlfh.recipes.cluster", str(owner), *map(str, roots)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def watch_cluster(owner: int, roots: list[int], poll_s: float = 1.0) -> None:
    """While the owner lives and any of the cluster's root processes (GCS, raylet, ...) runs,
    remember every descendant of the roots; then end those still running. A process is known by
    (pid, start time), so a reused pid is never hit."""
    import psutil

    def proc(pid):
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    owner_p = proc(owner)
    live = [p for p in map(proc, roots) if p is not None]
    seen: dict[tuple[int, float], psutil.Process] = {}
    while owner_p is not None and alive(owner_p) and any(alive(p) for p in live):
        for root in live:
            try:
                for p in [root, *root.children(recursive=True)]:
                    seen[(p.pid, p.create_time())] = p
            except psutil.Error:
                pass
        time.sleep(poll_s)
    # The owner or the cluster is gone (a normal ray.shutdown ends here too, finding nothing left).
    time.sleep(0.5)  # let Ray's own shutdown and fate sharing go first
    left = [p for p in seen.values() if alive(p)]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, stubborn = psutil.wait_procs(left, timeout=2.0)
    for p in stubborn:
        with contextlib.suppress(psutil.Error):
            p.kill()


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


def start_rollout_actors(cfg: Config, threads: int, pgs: list) -> list:
    """``resources.num_rollout_actors`` rollout actors; with ``resources.placement`` their bundles
    are reserved at once (gang scheduling) in a placement group, appended to ``pgs``."""
    from rollouts.actor import RolloutActor

    res = cfg.resources
    opts = [dict(num_cpus=res.num_cpus_per_actor, num_gpus=res.gpus_per_rollout_actor,
                 resources=dict(res.rollout_actor_resources), max_restarts=res.max_actor_restarts)
            for _ in range(res.num_rollout_actors)]
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
    return [RolloutActor.options(**o).remote(cfg.model, cfg.model.lora, threads, rc.scheduler, compile=rc.compile,
                                             merge_lora=rc.merge_lora) for o in opts]


if __name__ == "__main__":  # the watcher of a private cluster: OWNER_PID ROOT_PID...
    watch_cluster(int(sys.argv[1]), [int(a) for a in sys.argv[2:]])
