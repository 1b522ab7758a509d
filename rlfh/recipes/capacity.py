"""Refuse, before anything starts, a run whose Ray resource requests the cluster cannot satisfy.

Ray queues an actor it cannot place and waits for resources forever: a config asking for six GPUs
on a one-GPU machine would start, load nothing and hang. :func:`check_cluster_fits` adds up what
the online recipe will ask for (rollout actors, learner ranks, reward actors; the same numbers the
recipe passes to Ray) and compares it with the cluster's totals, and each single actor with the
largest node, then says what was asked and what is there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class ClusterTooSmall(ValueError):
    """The config asks for more than the cluster has."""


@dataclass(frozen=True)
class Request:
    role: str  # what asks: "rollout actors", "learner ranks", "reward actor", ...
    count: int  # how many actors
    each: dict[str, float]  # Ray resources of one actor: CPU, GPU, custom

    def describe(self) -> str:
        per = ", ".join(f"{_fmt(v)} {k}" for k, v in self.each.items() if v)
        return f"{self.count} x {self.role} ({per or 'nothing'})"


def _fmt(x: float) -> str:
    return f"{x:g}"


def requests(cfg) -> list[Request]:
    """What the online recipe asks Ray for, per role (rlfh/recipes/cluster.py, rlfh/learner/group.py,
    rlfh/recipes/online.py place the actors with these numbers)."""
    res = cfg.resources
    cpu = res.num_cpus_per_actor
    out: list[Request] = []
    if not res.colocate:
        out.append(
            Request(
                "rollout actors",
                res.num_rollout_actors,
                {"CPU": cpu, "GPU": res.gpus_per_rollout_actor, **res.rollout_actor_resources},
            )
        )
    learner_gpu = 1 if res.num_learner_gpus or (res.colocate and res.gpus_per_rollout_actor) else 0
    out.append(
        Request(
            "learner ranks" + (" (sampling too: colocate)" if res.colocate else ""),
            cfg.learner_world_size,
            {"CPU": cpu, "GPU": learner_gpu, **res.learner_resources},
        )
    )
    reward = {"CPU": cpu, "GPU": res.gpus_per_reward_actor, **res.reward_resources}
    if not cfg.reward_server.remote_url:
        out.append(Request("reward actor", 1, reward))
    if cfg.guards.every and cfg.guards.heldout_rewards:
        out.append(Request("held-out reward actor", 1, dict(reward)))
    return [r for r in out if r.count > 0]


def total(reqs: list[Request]) -> Counter:
    t: Counter = Counter()
    for r in reqs:
        for k, v in r.each.items():
            t[k] += r.count * v
    return t


def check_cluster_fits(
    cfg, cluster: dict[str, float] | None = None, nodes: list[dict[str, float]] | None = None
) -> None:
    """Raise :class:`ClusterTooSmall` when the run's requests exceed the cluster's total resources,
    or one actor's exceed every node's. ``cluster``/``nodes`` default to the running Ray's."""
    if cluster is None or nodes is None:
        import ray

        cluster = ray.cluster_resources() if cluster is None else cluster
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] if nodes is None else nodes
    reqs = requests(cfg)
    need = total(reqs)
    eps = 1e-9
    short = [k for k, v in need.items() if v > cluster.get(k, 0.0) + eps]
    too_big = [r for r in reqs if not any(all(v <= n.get(k, 0.0) + eps for k, v in r.each.items() if v) for n in nodes)]
    if not short and not too_big:
        return
    keys = sorted(set(need) | {"CPU", "GPU"})
    asked = ", ".join(f"{_fmt(need[k])} {k}" for k in keys if need.get(k))
    has = ", ".join(f"{_fmt(cluster.get(k, 0.0))} {k}" for k in keys)
    lines = [
        f"the config asks Ray for {asked} ({'; '.join(r.describe() for r in reqs)}), "
        f"but the cluster has {has}" + (f" across {len(nodes)} nodes" if len(nodes) > 1 else "")
    ]
    if too_big:
        lines.append("no single node can hold " + "; ".join(r.describe() for r in too_big))
    lines.append(
        "Ray would wait for them forever. Lower resources.num_rollout_actors, "
        "resources.gpus_per_rollout_actor, resources.num_learner_gpus, resources.gpus_per_reward_actor or "
        "resources.num_cpus_per_actor, or "
        "start a config for this hardware (configs/sdxl_1gpu_24gb.yaml: one GPU, colocated, the reward "
        "actor on the same GPU with resources.gpus_per_reward_actor=0; docs/hardware.md)"
    )
    raise ClusterTooSmall("; ".join(lines[:-1]) + ". " + lines[-1])
