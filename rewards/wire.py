"""The reward server's JSON wire format: request decoding, per-image result objects.

Shared by the server (``rewards.server``), its client (``rewards.client``) and ``rlfh score`` so
the three agree byte for byte. Only numpy, Pillow and the standard library are imported here: no
Ray, no torch. Nothing is ever unpickled; a request is JSON, images are PNG or raw uint8 bytes.

Request body of ``POST /score`` (a JSON object, exactly one of ``images`` / ``arrays``)::

    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...]}
    {"arrays": [{"shape": [H, W, 3], "dtype": "uint8", "data": "<base64 of H*W*3 bytes, C order>"}, ...],
     "prompts": ["...", ...]}

Standard base64 (RFC 4648 section 4, with padding). PNGs may be 8-bit RGB, RGBA, L, LA or P
(palette) and are converted to RGB; 16-bit PNGs and other modes are rejected. All images of one
request must have the same height and width. ``prompts`` has one string per image.

Image decoding (:func:`open_image`) is the one path of the server and of ``rlfh score``, with the
same limits: the size is read from the header before any pixel is decoded, and an image over
``max_image_side`` / ``max_image_pixels`` -- including one so large that Pillow itself calls it a
decompression bomb -- is a 413 "too large" error; an undecodable file or an unsupported mode or
bit depth is a 400.

Per-image result object (one per image, in request order)::

    {"<reward name>": {"value": float | null, "reason": str | null,
                       "regions": {"face": [{"box": [x1, y1, x2, y2], "confidence": c, "label"?: s}]},
                       "info": {...}},
     ...,
     "regions": {"face": [...], "hand": [...]}}    # union over the rewards, as ScoredBatch.regions(i)

The per-reward object is exactly :meth:`rewards.base.RewardResult.to_json`, so a client rebuilds
the :class:`rewards.composite.ScoredBatch` without loss. Hence no reward may be named ``regions``
(nor ``image``, the key ``rlfh score`` adds).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from dataclasses import dataclass
from typing import IO, Any, Sequence

import numpy as np

from rewards.base import RewardError, RewardResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESERVED_NAMES = frozenset({"regions", "image"})
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P")
# Modes whose reference preprocessing differs from resizing their RGB conversion: the references
# resize the PIL image in its own mode (alpha premultiplied, a palette by nearest neighbour) and
# convert to RGB after. L resizes exactly like its RGB conversion, so it needs no source.
SOURCE_MODES = frozenset({"RGBA", "LA", "P"})


class RequestError(ValueError):
    """A malformed or oversized request; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Input limits applied while decoding a request (see ``rewards.server.ServerConfig``)."""

    max_images: int
    max_image_side: int
    max_image_pixels: int


def check_reward_names(names: Sequence[str]) -> None:
    """Raise RewardError if a reward name collides with a key of the per-image object."""
    bad = sorted(set(names) & RESERVED_NAMES)
    if bad:
        raise RewardError(f"reward name(s) {bad} are reserved by the result format; set another `name:` in the config")


def _b64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise RequestError(f"{what}: expected a base64 string, got {type(s).__name__}")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{what}: invalid base64 ({e})") from None


def _check_size(h: int, w: int, what: str, limits: Limits) -> None:
    if h < 1 or w < 1:
        raise RequestError(f"{what}: empty image ({h}x{w})")
    if max(h, w) > limits.max_image_side:
        raise RequestError(f"{what}: {h}x{w} exceeds max_image_side={limits.max_image_side}", 413)
    if h * w > limits.max_image_pixels:
        raise RequestError(f"{what}: {h}x{w} = {h * w} pixels exceeds max_image_pixels={limits.max_image_pixels}", 413)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image.

    Attributes:
        rgb: uint8 (H, W, 3) RGB pixels (what detectors and rewards see).
        source: for RGBA, LA and P files, the loaded PIL image in its own mode, so that rewards
            that preprocess like the references (resize in the file's mode, then convert to RGB)
            can do so; None otherwise.
    """

    rgb: np.ndarray
    source: Any = None


def _png_ihdr(head: bytes, what: str) -> tuple[int, int, int]:
    """(width, height, bit depth) from a PNG's first 26 bytes: IHDR is always the first chunk."""
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise RequestError(f"{what}: not a PNG (no IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24]


def open_image(fp: IO[bytes], what: str, limits: Limits, formats: Sequence[str] | None = ("PNG",)) -> DecodedImage:
    """Decode an image file object (PNG only by default; ``formats=None``: any Pillow format).

    Raises:
        RequestError: 413 when the image exceeds ``limits`` (checked from the header, before
            decoding), 400 when it is not an image of ``formats``, cannot be decoded, is a 16-bit
            PNG or has a mode other than :data:`IMAGE_MODES`.
    """
    from PIL import Image

    head = fp.read(26)
    fp.seek(0)
    if head.startswith(PNG_MAGIC):
        w, h, depth = _png_ihdr(head, what)
        _check_size(h, w, what, limits)
        if depth == 16:
            # Pillow opens 16-bit RGB(A) as 8-bit "RGB(A)" (dropping the low bytes) but 16-bit gray
            # as "I;16": the bit depth is checked here so both are rejected alike.
            raise RequestError(
                f"{what}: 16-bit PNG is not supported (8 bits per channel only); convert it to 8-bit RGB"
            )
    elif formats is not None and tuple(formats) == ("PNG",):
        raise RequestError(f"{what}: not a PNG (bad signature)")
    try:
        im = Image.open(fp, formats=None if formats is None else list(formats))
    except Image.DecompressionBombError as e:
        # Pillow refuses the header before our own size check could run: the same "too large" class.
        raise RequestError(f"{what}: too large: {e}", 413) from None
    except Exception as e:  # UnidentifiedImageError, or a corrupt header (SyntaxError, struct.error...)
        raise RequestError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None
    try:
        w, h = im.size
        _check_size(h, w, what, limits)  # before load(): a small file can inflate to gigabytes
        if im.mode not in IMAGE_MODES:
            raise RequestError(f"{what}: image mode {im.mode!r} is not supported; use 8-bit {', '.join(IMAGE_MODES)}")
        im.load()
        rgb = np.asarray(im.convert("RGB"))
    except RequestError:
        im.close()
        raise
    except Exception as e:  # PIL raises many types on corrupt data (OSError, SyntaxError, ValueError...)
        im.close()
        raise RequestError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None
    if im.mode in SOURCE_MODES:
        return DecodedImage(rgb, im)
    im.close()
    return DecodedImage(rgb)


def decode_png(data: bytes, what: str, limits: Limits) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3) RGB (:func:`open_image`)."""
    return open_image(io.BytesIO(data), what, limits).rgb


def encode_png(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> base64 PNG string (lossless, so the server sees the same pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # speed over size: loopback
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_array(spec: Any, what: str, limits: Limits) -> np.ndarray:
    """``{"shape": [H, W, 3], "dtype": "uint8", "data": base64}`` -> uint8 (H, W, 3)."""
    if not isinstance(spec, dict):
        raise RequestError(f"{what}: expected an object with shape, dtype, data; got {type(spec).__name__}")
    extra = set(spec) - {"shape", "dtype", "data"}
    if extra:
        raise RequestError(f"{what}: unknown keys {sorted(extra)}; allowed: shape, dtype, data")
    shape, dtype = spec.get("shape"), spec.get("dtype")
    if dtype != "uint8":
        raise RequestError(f"{what}: dtype must be 'uint8', got {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
        or shape[2] != 3
    ):
        raise RequestError(f"{what}: shape must be [H, W, 3] integers, got {shape!r}")
    h, w, _ = shape
    _check_size(h, w, what, limits)
    data = _b64(spec.get("data"), what + ".data")
    if len(data) != h * w * 3:
        raise RequestError(f"{what}: data has {len(data)} bytes, shape {shape} needs {h * w * 3}")
    return np.frombuffer(data, np.uint8).reshape(h, w, 3)


def encode_array(image: np.ndarray) -> dict[str, Any]:
    """uint8 (H, W, 3) -> the ``arrays`` entry for it."""
    image = np.ascontiguousarray(image)
    return {"shape": list(image.shape), "dtype": "uint8", "data": base64.b64encode(image.tobytes()).decode("ascii")}


def _reject_constant(name: str) -> None:
    raise RequestError(f"non-finite number {name} is not valid JSON")


def parse_score_request(body: bytes, limits: Limits) -> tuple[np.ndarray, list[str]]:
    """Decode a ``POST /score`` body into uint8 (B, H, W, 3) images and B prompts.

    Raises:
        RequestError: with the status (400 malformed, 413 too large) and a reason naming the problem.
    """
    if not body:
        raise RequestError("empty body; send a JSON object with 'images' (or 'arrays') and 'prompts'")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"body is not UTF-8 text: {e}") from None
    try:
        req = json.loads(text, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as e:
        raise RequestError(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(f"body must be a JSON object, got {type(req).__name__}")
    extra = set(req) - {"images", "arrays", "prompts"}
    if extra:
        raise RequestError(f"unknown keys {sorted(extra)}; allowed: images or arrays, prompts")
    if ("images" in req) == ("arrays" in req):
        raise RequestError("give exactly one of 'images' (base64 PNGs) or 'arrays' (raw uint8)")
    key = "images" if "images" in req else "arrays"
    items, prompts = req[key], req.get("prompts")
    if not isinstance(items, list):
        raise RequestError(f"'{key}' must be a list, got {type(items).__name__}")
    if not items:
        raise RequestError(f"'{key}' is empty; send at least one image")
    if len(items) > limits.max_images:
        raise RequestError(f"{len(items)} images exceed max_images={limits.max_images} per request", 413)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompts' must be a list of strings (one per image)")
    if len(prompts) != len(items):
        raise RequestError(f"{len(items)} images but {len(prompts)} prompts; send one prompt per image")
    if key == "images":
        arrays = [decode_png(_b64(s, f"images[{i}]"), f"images[{i}]", limits) for i, s in enumerate(items)]
    else:
        arrays = [decode_array(s, f"arrays[{i}]", limits) for i, s in enumerate(items)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise RequestError(f"all images of one request must have the same size, got {sorted(s[:2] for s in shapes)}")
    return np.stack(arrays), list(prompts)


def image_result(batch: Any, i: int) -> dict[str, Any]:
    """The per-image result object of image ``i`` of a :class:`ScoredBatch`."""
    out: dict[str, Any] = {name: res[i].to_json() for name, res in batch.results.items()}
    out["regions"] = {k: [d.to_json() for d in v] for k, v in batch.regions(i).items()}
    return out


def check_finite(obj: Any, where: str) -> None:
    """Raise RewardError if a result holds NaN/inf anywhere (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise RewardError(f"{where}: non-finite number {obj!r} in a reward result")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for j, v in enumerate(obj):
            check_finite(v, f"{where}[{j}]")


def scored_batch_from_json(results: list[dict[str, Any]], weights: dict[str, float], regions_of: dict[str, str]) -> Any:
    """Rebuild a ScoredBatch from per-image result objects (the inverse of :func:`image_result`)."""
    from rewards.composite import ScoredBatch

    names = list(weights)
    per_reward: dict[str, list[RewardResult]] = {n: [] for n in names}
    for i, obj in enumerate(results):
        missing = [n for n in names if n not in obj]
        if missing:
            raise RewardError(f"result {i} lacks rewards {missing}; got keys {sorted(obj)}")
        for n in names:
            per_reward[n].append(RewardResult.from_json(obj[n]))
    return ScoredBatch(results=per_reward, weights=dict(weights), regions_of=dict(regions_of))


@dataclass(frozen=True)
class ServerConfig:
    """Reward server settings (the ``reward_server:`` section of a run config).

    Attributes:
        host: interface the HTTP proxy binds; loopback by default, so nothing off-host can reach it.
        port: HTTP port.
        route_prefix: URL prefix of the app (``/`` gives ``/health`` and ``/score``).
        max_batch_size: most images per RewardSet call; concurrent requests are merged up to it.
        batch_wait_timeout_s: longest a request waits for others to fill its batch.
        max_request_bytes: largest HTTP body accepted (413 beyond it).
        max_images: most images per HTTP request (413 beyond it).
        max_image_side: largest height or width accepted.
        max_image_pixels: largest H*W per image; decoded memory per request is at most
            ``max_images * max_image_pixels * 3`` bytes.
        num_replicas: server replicas (each holds its own copy of the rewards).
        num_cpus_per_replica: Ray CPUs reserved per replica.
    """

    remote_url: str | None = None  # rlfh train scores through the reward server at this URL (else an in-cluster actor)
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_request_bytes: int = 64 * 1024 * 1024
    max_images: int = 32
    max_image_side: int = 2048
    max_image_pixels: int = 2048 * 2048
    num_replicas: int = 1
    num_cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for key in (
            "max_batch_size",
            "max_request_bytes",
            "max_images",
            "max_image_side",
            "max_image_pixels",
            "num_replicas",
        ):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"reward_server.{key}={v!r}: must be an integer >= 1")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            problems.append(f"reward_server.port={self.port!r}: must be an integer in [0, 65535]")
        if not isinstance(self.host, str) or not self.host:
            problems.append(f"reward_server.host={self.host!r}: must be a host name or IP, e.g. 127.0.0.1")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            problems.append(f"reward_server.route_prefix={self.route_prefix!r}: must start with '/'")
        if not self.batch_wait_timeout_s >= 0:
            problems.append(f"reward_server.batch_wait_timeout_s={self.batch_wait_timeout_s!r}: must be >= 0")
        if not self.num_cpus_per_replica >= 0:
            problems.append(f"reward_server.num_cpus_per_replica={self.num_cpus_per_replica!r}: must be >= 0")
        if problems:
            raise ValueError("invalid reward server config:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def limits(self) -> Limits:
        return Limits(self.max_images, self.max_image_side, self.max_image_pixels)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"
