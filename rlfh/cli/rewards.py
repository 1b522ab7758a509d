"""Reward commands of the ``rlfh`` CLI (wired in by ``rlfh.cli.main.build_parser``).

    rlfh serve-rewards CONFIG [key=value ...] [--host 127.0.0.1] [--port 8000] [...]
        serve the config's ``rewards:`` over HTTP and by handle (Ray Serve) until Ctrl-C
    rlfh score CONFIG IMAGE... [key=value ...] [--batch-size 8]
        score image files in-process; prints one JSON object per image (one per line)

``score`` prints, per image, the server's per-image result object (see ``rewards.wire``) plus
``"image": PATH``, in the order the images were given; an image that cannot be scored prints
``{"image": PATH, "error": REASON}`` in its place and the others are still scored. Images are read
by the server's decoder with the server's limits (``reward_server.max_image_side`` /
``max_image_pixels`` of the config, overridable like any key), in any format Pillow reads.
Exit status: 0 when every image was scored, 1 when some image got an error line, 2 when nothing
was scored (bad config, no image given). Among the positional arguments after CONFIG, one
containing ``=`` that is not an existing file is a config override; the rest are images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
from typing import Any

# ServerConfig field -> (flag, type, help); flags left unset keep the config's value.
_SERVER_FLAGS = {
    "host": ("--host", str, "interface to bind (default 127.0.0.1: this machine only)"),
    "port": ("--port", int, "HTTP port (default 8000)"),
    "route_prefix": ("--route-prefix", str, "URL prefix of the app (default /)"),
    "max_batch_size": ("--max-batch-size", int, "most images per batched reward call"),
    "batch_wait_timeout_s": ("--batch-wait-timeout-s", float, "longest wait for a batch to fill"),
    "max_request_bytes": ("--max-request-bytes", int, "largest HTTP body accepted"),
    "max_images": ("--max-images", int, "most images per HTTP request"),
    "max_image_side": ("--max-image-side", int, "largest image height or width"),
    "max_image_pixels": ("--max-image-pixels", int, "largest H*W per image"),
    "num_replicas": ("--num-replicas", int, "server replicas"),
    "num_cpus_per_replica": ("--num-cpus-per-replica", float, "Ray CPUs per replica"),
}


def _fail(e: Exception) -> int:
    print(f"rlfh: error: {e}", file=sys.stderr)
    return 2


def server_config(cfg: Any, args: argparse.Namespace) -> Any:
    """ServerConfig from the run config's ``reward_server:`` section (when the schema has one) + flags."""
    from rewards.server import ServerConfig

    values: dict[str, Any] = {}
    if "reward_server" in {f.name for f in dataclasses.fields(cfg)}:
        section = cfg.reward_server
        values = {
            f.name: getattr(section, f.name) for f in dataclasses.fields(ServerConfig) if hasattr(section, f.name)
        }
    for field in _SERVER_FLAGS:
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return ServerConfig(**values)


_STOP = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    # Remember the request: a Ctrl-C that lands inside Ray Serve's start-up is swallowed there,
    # and the server must still stop once start-up returns.
    _STOP.set()
    raise KeyboardInterrupt


def cmd_serve_rewards(args: argparse.Namespace) -> int:
    """Start the reward server and block until Ctrl-C (or SIGTERM)."""
    import signal

    from rewards.base import RewardError
    from rlfh.config.schema import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        scfg = server_config(cfg, args)
    except (ValueError, OSError) as e:
        return _fail(e)
    import ray
    from ray import serve

    from rewards.server import start_reward_server
    from rlfh.env import worker_runtime_env
    from rlfh.recipes.cluster import start_private_ray

    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    _STOP.clear()
    signal.signal(signal.SIGINT, _interrupt)
    try:
        if started_ray:  # on loopback like the HTTP port, and gone with this process
            start_private_ray(runtime_env=worker_runtime_env(), log_to_driver=True)
        start_reward_server(cfg.rewards, scfg, name=args.name, runtime_env=worker_runtime_env())
        # SIGTERM (kill, a job scheduler) stops the server as cleanly as Ctrl-C does. Set after
        # ray.init, which installs its own SIGTERM handler (stack dump, exit without cleanup).
        signal.signal(signal.SIGTERM, _interrupt)
        if _STOP.is_set():
            raise KeyboardInterrupt
        print(
            f"[rlfh] reward server {args.name!r} ready at {scfg.url} (GET /health, POST /score); Ctrl-C stops it",
            flush=True,
        )
        while not _STOP.wait(1.0):
            pass
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("[rlfh] stopping the reward server", flush=True)
    except (RewardError, RuntimeError) as e:  # e.g. a reward that cannot be built fails the deployment
        return _fail(e)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        elif ray.is_initialized():
            serve.delete(args.name)  # a shared cluster keeps Serve and the other apps running
    return 0


def load_image(path: str, limits: Any) -> Any:
    """An image file -> :class:`rewards.wire.DecodedImage`, through the server's decoder and limits.

    Raises:
        rewards.wire.RequestError: naming the file and why (missing, unreadable, too large, ...).
    """
    from rewards.wire import RequestError, open_image

    try:
        with open(path, "rb") as f:
            return open_image(f, f"image {path!r}", limits, formats=None)
    except FileNotFoundError:
        raise RequestError(f"image {path!r} does not exist") from None
    except OSError as e:
        raise RequestError(f"image {path!r} cannot be read: {e.strerror or e}") from None


def _score_chunk(rewards: Any, images: list[Any]) -> Any:
    """Score decoded images of one size together; the per-image result objects."""
    import numpy as np

    from rewards.composite import ScoredBatch
    from rewards.wire import check_finite, image_result

    pixels = np.stack([im.rgb for im in images])
    prompts = [""] * len(images)  # prompts are not known for files: rewards that read prompts see ""
    sources = [im.source for im in images]
    results = {}
    for r in rewards.rewards:
        # A reward that preprocesses like the references reads RGBA / LA / palette files in their
        # own mode (see rewards.wire.SOURCE_MODES); the others score the RGB pixels.
        if any(s is not None for s in sources) and getattr(r.reward, "reads_sources", False):
            results[r.name] = r.reward(pixels, prompts, sources=sources)
        else:
            results[r.name] = r.reward(pixels, prompts)
    batch = ScoredBatch(
        results=results,
        weights={r.name: r.weight for r in rewards.rewards},
        regions_of={r.name: r.region for r in rewards.rewards},
    )
    objs = [image_result(batch, i) for i in range(len(images))]
    for obj in objs:
        check_finite(obj, "result")
    return objs


def score_files(rewards: Any, paths: list[str], batch_size: int, limits: Any) -> list[dict[str, Any]]:
    """Score image files with a RewardSet; one result object or error object per path, in order.

    Same-size images are batched together. An image that cannot be read gets
    ``{"image": path, "error": reason}``; a batch whose scoring fails is retried image by image,
    so one bad image never costs the others their results.
    """
    from rewards.wire import RequestError

    out: list[dict[str, Any] | None] = [None] * len(paths)
    images: dict[int, Any] = {}
    for k, p in enumerate(paths):
        try:
            images[k] = load_image(p, limits)
        except RequestError as e:
            out[k] = {"image": p, "error": str(e)}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, im in images.items():
        by_shape.setdefault(im.rgb.shape, []).append(k)
    for members in by_shape.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            _score_group(rewards, paths, images, chunk, out)
            for k in chunk:
                images[k] = None  # decoded pixels are not needed once scored
    return out  # type: ignore[return-value]


def _score_group(
    rewards: Any, paths: list[str], images: dict[int, Any], group: list[int], out: list[dict[str, Any] | None]
) -> None:
    try:
        objs = _score_chunk(rewards, [images[k] for k in group])
    except (RuntimeError, ValueError) as e:  # RewardError is a RuntimeError, as are torch's failures
        if len(group) == 1:
            out[group[0]] = {"image": paths[group[0]], "error": f"cannot score: {e}"}
        else:  # find the image that fails: the others keep their results
            for k in group:
                _score_group(rewards, paths, images, [k], out)
        return
    for k, obj in zip(group, objs):
        out[k] = {"image": paths[k], **obj}


def cmd_score(args: argparse.Namespace) -> int:
    """Score image files in-process and print one JSON object per image (see the module docstring)."""
    from rewards.base import RewardError
    from rewards.composite import RewardSet
    from rewards.wire import check_reward_names
    from rlfh.config.schema import load_config

    overrides = [x for x in args.items if "=" in x and not os.path.exists(x)]
    paths = [x for x in args.items if x not in overrides]
    try:
        if not paths:
            raise ValueError("no image given: rlfh score CONFIG IMAGE... [key=value ...]")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        cfg = load_config(args.config, overrides)
        limits = server_config(cfg, argparse.Namespace(**dict.fromkeys(_SERVER_FLAGS))).limits
        rewards = RewardSet.from_config(cfg.rewards)
    except (RewardError, ValueError, OSError) as e:
        return _fail(e)
    try:
        check_reward_names(rewards.names)
    except (RewardError, ValueError) as e:
        rewards.close()
        return _fail(e)
    failed = 0
    with rewards:  # closes the rewards' detectors
        for obj in score_files(rewards, paths, args.batch_size, limits):
            failed += "error" in obj
            print(json.dumps(obj, allow_nan=False), flush=True)
    if failed:
        print(f"rlfh: {failed} of {len(paths)} image(s) could not be scored (see their \"error\")", file=sys.stderr)
        return 1
    return 0


def add_reward_commands(subparsers: Any) -> None:
    """Add ``serve-rewards`` and ``score`` to the ``rlfh`` subcommand parsers."""
    s = subparsers.add_parser("serve-rewards", help="serve the config's rewards over HTTP and by Ray handle")
    s.add_argument("config", help="YAML config whose `rewards:` are served")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    for field, (flag, typ, help_) in _SERVER_FLAGS.items():
        s.add_argument(flag, dest=field, type=typ, default=None, help=help_)
    s.add_argument("--name", default="rewards", help="Serve application name (for get_reward_handle)")
    s.set_defaults(fn=cmd_serve_rewards)

    s = subparsers.add_parser("score", help="score image files in-process; one JSON object per image")
    s.add_argument("config", help="YAML config whose `rewards:` score the images")
    s.add_argument("items", nargs="+", metavar="IMAGE_OR_OVERRIDE", help="image files and key=value overrides")
    s.add_argument("--batch-size", type=int, default=8, help="images per reward call (default 8)")
    s.set_defaults(fn=cmd_score)
