"""Ray placement groups for the run's actors (rollout actors, learner ranks)."""

from __future__ import annotations

import ray


def reserve(bundles: list[dict], strategy: str, what: str, timeout_s: float = 600.0):
    """A placement group for ``bundles``, ready; a clear error when the cluster cannot hold it."""
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"could not reserve {len(bundles)} x {bundles[0]} ({strategy}) for {what} within "
            f"{timeout_s:.0f} s; the cluster has {ray.cluster_resources()}"
        ) from None
    return pg
