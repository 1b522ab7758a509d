"""HTTP client of the reward server (``rewards.server``): JSON in, ScoredBatch out.

    client = RewardClient("http://127.0.0.1:8000", timeout=30, retries=3)
    client.health()                                  # {"status": "ok", "rewards": [...], ...}
    batch = client.score(images, prompts)            # images uint8 (B, H, W, 3) -> ScoredBatch

Only the standard library does the transport (urllib); nothing is pickled. Transient failures
(connection refused or reset, timeouts, 502/503/504) are retried ``retries`` times with exponential
backoff; a 4xx, a 422 (the rewards could not score this input) or a 500 is not, because the same
request would fail the same way.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from rewards.base import RewardError, check_images
from rewards.wire import encode_array, encode_png, scored_batch_from_json

_TRANSIENT_STATUS = {502, 503, 504}


class RewardServerError(RewardError):
    """The reward server answered with an error; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RewardServerUnavailable(RewardServerError):
    """No answer from the reward server after every retry."""


class RewardClient:
    """Client of one reward server.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000`` (plus the app's route prefix, if any).
        timeout: seconds per HTTP attempt.
        retries: extra attempts after the first for transient failures (0 = try once).
        backoff_s: wait before the first retry; doubled for each further retry.
        encoding: ``raw`` (uint8 bytes in base64: ~8x cheaper to build than PNG, see
            bench/results/rewards_cpu.json) or ``png`` (lossless, smaller bodies for slow links).

    Raises:
        ValueError: on bad arguments.
    """

    def __init__(
        self, url: str, timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.2, encoding: str = "raw"
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff_s >= 0; got {timeout}, {retries}, {backoff_s}")
        if encoding not in ("png", "raw"):
            raise ValueError(f"encoding must be 'png' or 'raw', got {encoding!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.encoding = encoding
        self._meta: dict[str, Any] | None = None

    def health(self) -> dict[str, Any]:
        """``GET /health``: status, reward names, weights, regions, limits."""
        self._meta = self._request("GET", "/health")
        return self._meta

    def score_json(self, images: np.ndarray, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """``POST /score``; returns the per-image result objects as the server sent them."""
        images = check_images(images)
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
        if self.encoding == "png":
            body = {"images": [encode_png(im) for im in images], "prompts": list(prompts)}
        else:
            body = {"arrays": [encode_array(im) for im in images], "prompts": list(prompts)}
        out = self._request("POST", "/score", json.dumps(body).encode())
        results = out.get("results") if isinstance(out, dict) else None
        if not isinstance(results, list) or len(results) != len(images):
            raise RewardServerError(f"malformed /score answer for {len(images)} images: {str(out)[:200]}")
        return results

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> Any:
        """Score uint8 (B, H, W, 3) images; returns a ScoredBatch equal to in-process scoring."""
        results = self.score_json(images, prompts)
        meta = self._meta or self.health()  # weights and regions are per server: fetched once
        return scored_batch_from_json(results, meta["weights"], meta["regions_of"])

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        url = self.url + path
        headers = {"Content-Type": "application/json"} if body is not None else {}
        started, last = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                reason = _error_reason(e)
                if e.code in _TRANSIENT_STATUS:
                    last = f"HTTP {e.code}: {reason}"
                    continue
                raise RewardServerError(f"{method} {url} -> HTTP {e.code}: {reason}", e.code) from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
            except json.JSONDecodeError as e:
                raise RewardServerError(f"{method} {url}: answer is not JSON ({e})") from None
        raise RewardServerUnavailable(
            f"reward server at {self.url} unreachable: {method} {path} failed {self.retries + 1} time(s) "
            f"over {time.monotonic() - started:.1f}s; last error: {last}. Is `rlfh serve-rewards` running there?"
        )


def _error_reason(e: urllib.error.HTTPError) -> str:
    raw = e.read()
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace") or e.reason
