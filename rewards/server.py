"""The reward server: the configured RewardSet as a Ray Serve deployment with dynamic batching.

Two ways in, one batching queue (requests from both are batched together):

* in-cluster, by handle: ``start_reward_server(entries, cfg)`` (or ``get_reward_handle()`` for a
  running one) returns a ``DeploymentHandle``; ``handle.score.remote(images, prompts).result()``
  returns a :class:`rewards.composite.ScoredBatch`, as ``RewardSet(images, prompts)`` would;
* over HTTP (JSON only, nothing is unpickled; format in :mod:`rewards.wire`):

  ``GET /health``  -> 200 ``{"status": "ok", "rewards": [names], "weights": {name: w},
  "regions_of": {name: region}, "limits": {...}}``

  ``POST /score``  -> 200 ``{"results": [per-image object, ...]}``

  Errors are JSON ``{"error": reason}``: 400 malformed request (bad JSON, wrong types, bad base64,
  not a PNG, wrong shape, count mismatch, empty), 404 unknown path, 405 wrong method, 413 too large
  (body, image count, image side or pixels), 415 Content-Type not JSON, 422 the rewards could not
  score a well-formed request (a reward raised RewardError, or produced NaN/inf: never a made-up
  number; deterministic, so do not retry), 500 an unexpected server fault, 408 the body did not
  arrive within ``body_timeout_s``, 503 too many bodies being read at once (per client or in
  all; retry later, ``Retry-After`` says when).

Slow clients: Serve hands a request to the replica before its body has arrived, so a body trickling
in holds one of the replica's ``max_ongoing_requests`` slots. Bodies are read under a deadline
(408 after it), and at most ``max_body_reads_per_client`` per client address and half the replica's
slots in all are read at once (503 beyond), so ``/health`` and well-behaved clients keep a slot
however many slow connections are open.

Batching: requests queue in ``@serve.batch``; a batch holds up to ``max_batch_size`` *images*
(counted by ``batch_size_fn``) and waits at most ``batch_wait_timeout_s`` to fill. Same-size
images of different requests are concatenated into one RewardSet call. If that call fails, each
request of the group is rescored alone so one bad request cannot fail its neighbours. Numbers
equal in-process scoring exactly for rewards whose per-image result does not depend on the other
images of the batch (jpeg, the detector rewards); torch models may differ in the last float bits
when batch composition changes BLAS blocking, exactly as they do in-process across batch sizes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import types
from typing import Any, Sequence

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from rewards.base import RewardError, check_images
from rewards.wire import RequestError, ServerConfig, check_finite, check_reward_names, image_result, parse_score_request

logger = logging.getLogger("rlfh.reward_server")

# A 64 MB body (the default max_request_bytes) takes ~6 s at 10 MB/s: 30 s only cuts off stalled
# or deliberately slow senders.
BODY_TIMEOUT_S = 30.0
# Legitimate bodies arrive in milliseconds, so a client reading more than a few at once is
# either stalled or hostile; 8 leaves room for a host running several rollout actors.
MAX_BODY_READS_PER_CLIENT = 8


def entries_to_dicts(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """Config reward entries (objects or dicts) -> plain dicts, the form shipped to the replicas."""
    out = []
    for e in entries:
        d = dict(e) if isinstance(e, dict) else {k: getattr(e, k) for k in ("target", "name", "weight", "options")}
        out.append(
            {
                "target": d["target"],
                "name": d.get("name"),
                "weight": float(d.get("weight", 1.0)),
                "options": dict(d.get("options") or {}),
            }
        )
    return out


def _images_in(items: list[tuple[np.ndarray, list[str]]]) -> int:
    return sum(len(images) for images, _ in items)


def _json(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(payload, allow_nan=False), status_code=status, media_type="application/json", headers=headers
    )


def _concat(parts: list[Any]) -> Any:
    from rewards.composite import ScoredBatch

    first = parts[0]
    return ScoredBatch(
        {n: [r for p in parts for r in p.results[n]] for n in first.results},
        dict(first.weights),
        dict(first.regions_of),
    )


def _keep_replica_grpc_on_loopback() -> None:
    """On a loopback-only node, bind the replica's inter-deployment gRPC port to 127.0.0.1.

    Ray Serve 2.60 starts it on ``[::]:0`` (every interface) whatever the node's address, right
    after this constructor returns; on a node whose address is 127.0.0.1 nothing off-host can use
    it, so only exposure is lost by binding it to loopback. Nodes of a real cluster are untouched.
    """
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != "127.0.0.1" or not hasattr(replica, "add_port_to_grpc_server"):
        return
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback_only", False):
        return

    def loopback_bind(server: Any, address: str) -> int:
        return bind(server, "127.0.0.1:" + address[len("[::]:") :] if address.startswith("[::]:") else address)

    loopback_bind.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback_bind


@serve.deployment
class RewardServer:
    """One replica: the RewardSet, a batching queue in front of it, and the HTTP routes."""

    def __init__(
        self,
        entries: list[dict[str, Any]],
        config: dict[str, Any],
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_body_reads_per_client: int = MAX_BODY_READS_PER_CLIENT,
        max_body_reads: int = 16,
    ):
        from rewards.composite import RewardSet

        _keep_replica_grpc_on_loopback()
        self.cfg = ServerConfig(**config)
        self.body_timeout_s = body_timeout_s
        self.max_body_reads_per_client = max_body_reads_per_client
        self.max_body_reads = max_body_reads
        # Bodies being read now, per client host. Plain counters: every request of this replica
        # runs on one event loop.
        self._reading: dict[str, int] = {}
        self.rewards = RewardSet.from_config([types.SimpleNamespace(**e) for e in entries])
        check_reward_names(self.rewards.names)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def __del__(self) -> None:
        # Serve calls a replica's __del__ on a graceful shutdown (serve.delete, serve.shutdown):
        # the rewards' detectors are released there, before the interpreter's own teardown.
        rewards = getattr(self, "rewards", None)
        if rewards is not None:
            rewards.close()

    # ---- scoring -------------------------------------------------------------------------

    async def score(self, images: np.ndarray, prompts: Sequence[str]) -> Any:
        """Score uint8 (B, H, W, 3) images; returns a ScoredBatch. The handle entry point."""
        images = check_images(images)
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise RewardError(f"got {len(images)} images but prompts {prompts!r:.80}; give one prompt per image")
        if len(images) == 0:
            raise RewardError("empty batch: send at least one image")
        n = self.cfg.max_batch_size
        # A request larger than a batch is split; its chunks may share batches with other requests.
        chunks = [(images[i : i + n], list(prompts[i : i + n])) for i in range(0, len(images), n)]
        outcomes = await asyncio.gather(*[self._batched(c) for c in chunks])
        for ok, value in outcomes:
            if not ok:
                raise value
        return _concat([value for _, value in outcomes])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _batched(self, items: list[tuple[np.ndarray, list[str]]]) -> list[tuple[bool, Any]]:
        """Score queued requests together; returns (True, ScoredBatch) or (False, exception) each."""
        out: list[tuple[bool, Any] | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, (images, _) in enumerate(items):
            groups.setdefault(images.shape[1:], []).append(k)
        for members in groups.values():
            try:
                for k, sb in zip(members, await asyncio.to_thread(self._score_group, [items[k] for k in members])):
                    out[k] = (True, sb)
            except Exception as e:
                if len(members) == 1:
                    out[members[0]] = (False, e)
                    continue
                for k in members:  # isolate the failing request(s)
                    try:
                        out[k] = (True, (await asyncio.to_thread(self._score_group, [items[k]]))[0])
                    except Exception as e2:
                        out[k] = (False, e2)
        return out

    def _score_group(self, items: list[tuple[np.ndarray, list[str]]]) -> list[Any]:
        """One RewardSet call on same-size requests, split back per request. Runs in a thread."""
        from rewards.composite import ScoredBatch

        images = items[0][0] if len(items) == 1 else np.concatenate([im for im, _ in items])
        batch = self.rewards(images, [p for _, ps in items for p in ps])
        for name, res in batch.results.items():
            for i, r in enumerate(res):
                check_finite(r.to_json(), f"reward {name!r}, image {i}")
        parts, start = [], 0
        for im, _ in items:
            stop = start + len(im)
            parts.append(
                ScoredBatch(
                    {n: r[start:stop] for n, r in batch.results.items()}, dict(batch.weights), dict(batch.regions_of)
                )
            )
            start = stop
        return parts

    # ---- HTTP ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "rewards": self.rewards.names,
            "weights": {r.name: r.weight for r in self.rewards.rewards},
            "regions_of": {r.name: r.region for r in self.rewards.rewards},
            "limits": {
                k: getattr(self.cfg, k)
                for k in ("max_batch_size", "max_request_bytes", "max_images", "max_image_side", "max_image_pixels")
            },
        }

    async def __call__(self, request: Request) -> Response:
        try:
            root = request.scope.get("root_path", "") or ""
            path = request.url.path
            path = (path[len(root) :] if root and path.startswith(root) else path).rstrip("/") or "/"
            routes = {"/health": "GET", "/score": "POST"}
            if path not in routes:
                return _json(404, {"error": f"no route {path!r}; use GET /health or POST /score"})
            if request.method != routes[path]:
                return _json(405, {"error": f"{request.method} {path} is not allowed; use {routes[path]} {path}"})
            if path == "/health":
                return _json(200, self.health())
            images, prompts = parse_score_request(await self._read_body_bounded(request), self.cfg.limits)
            batch = await self.score(images, prompts)
            return _json(200, {"results": [image_result(batch, i) for i in range(len(images))]})
        except RequestError as e:
            headers = {"Retry-After": "1"} if e.status == 503 else None
            return _json(e.status, {"error": str(e)}, headers)
        except RewardError as e:
            return _json(422, {"error": f"reward failed: {e}"})
        except Exception as e:  # the server must answer, not crash, whatever a reward or a request does
            logger.exception("unexpected error while serving %s", request.url.path)
            return _json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    async def _read_body_bounded(self, request: Request) -> bytes:
        """The body, read under the per-client and total caps and the body deadline."""
        client = request.client.host if request.client else "?"
        mine = self._reading.get(client, 0)
        if mine >= self.max_body_reads_per_client:
            raise RequestError(
                f"client {client} already has {mine} request bodies being read "
                f"(max_body_reads_per_client={self.max_body_reads_per_client}); retry later",
                503,
            )
        total = sum(self._reading.values())
        if total >= self.max_body_reads:
            raise RequestError(
                f"{total} request bodies are being read (max_body_reads={self.max_body_reads}); retry later", 503
            )
        self._reading[client] = mine + 1
        try:
            return await asyncio.wait_for(self._read_body(request), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(
                f"request body not received within body_timeout_s={self.body_timeout_s:g}; "
                f"send it faster or in smaller requests",
                408,
            ) from None
        finally:
            left = self._reading[client] - 1
            if left:
                self._reading[client] = left
            else:
                del self._reading[client]

    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            raise RequestError(f"Content-Type must be application/json, got {ctype!r}", 415)
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise RequestError(f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                raise RequestError(f"body of {int(declared)} bytes exceeds max_request_bytes={limit}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: chunked bodies have no length
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body exceeds max_request_bytes={limit}", 413)
            chunks.append(chunk)
        return b"".join(chunks)


def build_app(
    entries: Sequence[Any],
    config: ServerConfig,
    body_timeout_s: float = BODY_TIMEOUT_S,
    max_body_reads_per_client: int = MAX_BODY_READS_PER_CLIENT,
) -> Any:
    """The Serve application for these reward entries (not yet running).

    ``body_timeout_s``: longest a request body may take to arrive (408 after it);
    ``max_body_reads_per_client``: most bodies read at once for one client address (503 beyond).
    """
    named = [e["name"] for e in entries_to_dicts(entries) if e["name"]]
    check_reward_names(named)
    if not body_timeout_s > 0 or max_body_reads_per_client < 1:
        raise ValueError(
            f"body_timeout_s={body_timeout_s!r} must be > 0 and "
            f"max_body_reads_per_client={max_body_reads_per_client!r} >= 1"
        )
    # Enough in flight per replica for a full batch to queue while the previous one runs.
    max_ongoing = max(2 * config.max_batch_size, 8)
    return RewardServer.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": config.num_cpus_per_replica},
    ).bind(
        entries_to_dicts(entries),
        dataclasses.asdict(config),
        body_timeout_s,
        max_body_reads_per_client,
        # Bodies in flight take at most half the slots: the rest stay free for /health and for
        # requests whose body has arrived, whoever holds connections open.
        max(max_ongoing // 2, 1),
    )


def start_reward_server(
    entries: Sequence[Any], config: ServerConfig | None = None, name: str = "rewards", runtime_env: dict | None = None
) -> Any:
    """Start (or update) the reward server app; returns its DeploymentHandle.

    Joins the running Ray cluster (``RAY_ADDRESS`` or one started by this process) or starts a local
    one, starts Serve's HTTP proxy on ``config.host:config.port`` if Serve is not running yet (an
    already running Serve keeps its own host/port), and deploys the app at ``config.route_prefix``.
    """
    import ray

    config = config or ServerConfig()
    if not ray.is_initialized():
        import os

        kwargs: dict[str, Any] = {"runtime_env": runtime_env or {}, "log_to_driver": True}
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["include_dashboard"] = False  # only valid when starting a local cluster
        ray.init(**kwargs)
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(build_app(entries, config), name=name, route_prefix=config.route_prefix)


def get_reward_handle(name: str = "rewards") -> Any:
    """The DeploymentHandle of a running reward server app (``handle.score.remote(images, prompts)``)."""
    return serve.get_app_handle(name)
