"""The Ray cluster a recipe runs on: joining or starting it, and the rollout actors on it."""

from __future__ import annotations

import os

from rlfh.config.schema import Config


def setup_ray(cfg: Config):
    """Join the cluster named by resources.ray_address / RAY_ADDRESS (ray job submit sets it), else start one."""
    import ray

    from rlfh.env import worker_runtime_env

    if ray.is_initialized():
        return False
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env=worker_runtime_env(), log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:  # a private cluster for this run: on loopback, like everything rlfh serves by default
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
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
    return [RolloutActor.options(**o).remote(cfg.model, cfg.learner.lora, threads, cfg.rollout.scheduler) for o in opts]
