"""The reward server under slow clients, on real Ray Serve over loopback.

A slow client sends its headers, then its body a byte a second. Serve hands such a request to the
replica at once, so before the body bounds 32 of them (the replica's in-flight slots) made
``/health`` and every other request wait until they closed. The slow clients here connect from
other loopback addresses (127.0.0.2, ...): Linux routes all of 127/8 to the loopback interface,
so the server sees them as different client hosts, like clients on other machines.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rewards.wire import encode_array

pytestmark = pytest.mark.slow

JPEG = [{"target": "jpeg_compressibility", "weight": 1.0}]
BODY_TIMEOUT_S = 4.0
PER_CLIENT = 4
IMAGES = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
GOOD_BODY = json.dumps({"arrays": [encode_array(im) for im in IMAGES], "prompts": ["a", "b"]}).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port():
    import ray
    from ray import serve

    from rewards.server import ServerConfig, build_app
    from rlfh.env import worker_runtime_env
    from rlfh.recipes.cluster import start_private_ray

    started = not ray.is_initialized()
    if started:
        start_private_ray(num_cpus=2, runtime_env=worker_runtime_env())
    port = _free_port()
    # Defaults otherwise: max_batch_size 16 gives the replica 32 in-flight slots.
    cfg = ServerConfig(port=port, num_cpus_per_replica=0.5)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(JPEG, cfg, body_timeout_s=BODY_TIMEOUT_S, max_body_reads_per_client=PER_CLIENT),
            name="rewards",
            route_prefix="/",
        )
        yield port
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _http(port, method, path, body=None, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


class SlowClients:
    """``n`` connections that declare a 100 kB JSON body and send it at one byte per second."""

    def __init__(self, port: int, n: int, source: callable):
        self.socks = []
        for i in range(n):
            s = socket.socket()
            s.bind((source(i), 0))
            s.settimeout(BODY_TIMEOUT_S + 20)
            s.connect(("127.0.0.1", port))
            s.sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            )
            self.socks.append(s)
        self._stop = threading.Event()
        self._trickle = threading.Thread(target=self._drip, daemon=True)
        self._trickle.start()

    def _drip(self):
        while not self._stop.wait(1.0):
            for s in self.socks:
                try:
                    s.send(b" ")
                except OSError:  # answered and closed by the server
                    pass

    def statuses(self) -> list[int | None]:
        """Each connection's HTTP status (None: no answer before the socket timeout)."""
        out = []
        for s in self.socks:
            try:
                head = s.recv(64)
                out.append(int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None)
            except OSError:
                out.append(None)
        return out

    def close(self):
        self._stop.set()
        self._trickle.join()
        for s in self.socks:
            s.close()


def _served_while_slow_clients_connected(port: int) -> list[float]:
    """/health and a good /score answer while the slow clients hold their connections; latencies."""
    latencies = []
    for _ in range(3):
        t0 = time.monotonic()
        status, body = _http(port, "GET", "/health", timeout=5.0)
        latencies.append(time.monotonic() - t0)
        assert status == 200 and body["status"] == "ok", body
    return latencies


def test_one_slow_host_is_capped_and_others_keep_being_served(port):
    slow = SlowClients(port, 60, lambda i: "127.0.0.2")
    try:
        time.sleep(1.5)  # every slow request has reached the replica (or been turned away)
        latencies = _served_while_slow_clients_connected(port)
        t0 = time.monotonic()
        status, body = _http(port, "POST", "/score", GOOD_BODY, timeout=10.0)
        assert status == 200 and len(body["results"]) == 2, body
        latencies.append(time.monotonic() - t0)
        assert max(latencies) < 3.0, latencies
        t0 = time.monotonic()
        statuses = slow.statuses()
        # PER_CLIENT bodies are read until the deadline cuts them off; the rest were turned away.
        assert sorted(statuses) == [408] * PER_CLIENT + [503] * (60 - PER_CLIENT), statuses
        assert time.monotonic() - t0 < BODY_TIMEOUT_S + 3
    finally:
        slow.close()


def test_slow_clients_from_many_hosts_leave_health_answering(port):
    from rewards.client import RewardClient

    slow = SlowClients(port, 60, lambda i: f"127.0.1.{i + 1}")
    try:
        time.sleep(1.5)
        latencies = _served_while_slow_clients_connected(port)
        assert max(latencies) < 3.0, latencies
        # Half the replica's slots read bodies at most: a good request is told 503 (never left
        # hanging) until the deadline frees them; the client retries 503 with backoff.
        t0 = time.monotonic()
        got = RewardClient(f"http://127.0.0.1:{port}", timeout=10, retries=6, backoff_s=0.5).score(IMAGES, ["a", "b"])
        assert len(got.results["jpeg_compressibility"]) == 2
        assert time.monotonic() - t0 < BODY_TIMEOUT_S + 10
        statuses = slow.statuses()
        assert set(statuses) <= {408, 503} and statuses.count(408) == 16, statuses
    finally:
        slow.close()


def test_half_sent_headers_take_no_replica_slot(port):
    """A client stuck in its headers never reaches the replica: nothing to bound there."""
    socks = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Le")
            socks.append(s)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _http(port, "GET", "/health"), range(8)))
        assert all(status == 200 for status, _ in answers)
    finally:
        for s in socks:
            s.close()
