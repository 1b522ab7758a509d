"""The reward actor: the configured :class:`rewards.composite.RewardSet` behind a Ray handle."""

from __future__ import annotations

import ray


@ray.remote
class RewardActor:
    def __init__(self, reward_entries, num_threads: int = 1):
        # process-wide environment (offline hub, quiet libraries) comes with the job's runtime_env
        import torch

        from rewards.composite import RewardSet

        torch.set_num_threads(max(num_threads, 1))
        self.rewards = RewardSet.from_config(reward_entries)

    def score(self, images, prompts):
        return self.rewards(images, prompts)

    def face_embeddings(self, images, faces=None):
        """``RewardSet.face_embeddings``: faces embedded by a reward model this actor already holds."""
        return self.rewards.face_embeddings(images, faces)

    def names(self) -> list[str]:
        return self.rewards.names

    def close(self) -> None:
        """Release the rewards' detectors; the owner calls it before ``ray.kill``, which ends the
        process without running any finalizer (rlfh.recipes.cluster.release_actors)."""
        self.rewards.close()

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks, logs)."""
        return ray.get_runtime_context().get_node_id()


class RewardScorer:
    """Scores a batch with the in-cluster reward actor (restarted by Ray if it dies) or, when
    ``reward_server.remote_url`` is set, a running reward server over HTTP (retries with backoff in
    :class:`rewards.client.RewardClient`; an unreachable server fails the run with a clear error,
    so nothing is ever trained on missing rewards)."""

    def __init__(self, actor=None, url: str | None = None, retries: int = 3, timeout_s: float = 300.0):
        if (actor is None) == (url is None):
            raise ValueError("give exactly one of a reward actor or a reward server url")
        self.actor, self.retries, self.restart_wait_s = actor, retries, timeout_s
        self.client = None
        if url is not None:
            from rewards.client import RewardClient

            self.client = RewardClient(url, timeout=timeout_s, retries=retries)
            self.client.health()  # fail fast, before any sampling, when the server is not there

    def score(self, images, prompts):
        if self.client is not None:
            return self.client.score(images, prompts)
        return self._call("score", images, prompts)

    def face_embeddings(self, images, faces=None):
        """Face embeddings by the reward actor's models (``RewardSet.face_embeddings``); the reward
        server answers scores only, so through it the embeddings are None with that reason."""
        if self.client is not None:
            return {
                "embeddings": None,
                "owners": [],
                "source": None,
                "reason": "rewards are scored by a reward server (reward_server.remote_url), "
                "which serves no embeddings",
            }
        return self._call("face_embeddings", images, faces)

    def _call(self, method: str, *args):
        """The actor's ``method``. A death counts against ``retries`` (Ray restarts the actor up to
        ``resources.max_actor_restarts`` times, then every call fails at once); while Ray restarts it
        (ActorUnavailableError: a new process importing torch and loading the reward models, which
        on a busy machine takes far longer than a backoff of a few seconds) the call is retried
        without counting, for at most ``restart_wait_s``."""
        import time

        from ray.exceptions import ActorUnavailableError, RayActorError

        deaths, waiting_since = 0, None
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except ActorUnavailableError as e:
                if waiting_since is None:
                    print("[rlfh] reward actor unavailable (Ray is restarting it); waiting for it")
                    waiting_since = time.monotonic()
                if time.monotonic() - waiting_since > self.restart_wait_s:
                    raise RuntimeError(
                        f"the reward actor was not back {self.restart_wait_s:.0f} s after it became "
                        f"unavailable; last error: {e}"
                    ) from e
                time.sleep(1.0)
            except RayActorError as e:
                deaths += 1
                if deaths > self.retries:
                    raise RuntimeError(f"the reward actor died {deaths} times; last error: {e}") from e
                print(f"[rlfh] reward actor died ({type(e).__name__}); retrying on its restarted replica")
                time.sleep(2.0 ** (deaths - 1))  # Ray is restarting it
