"""The reward server on real Ray Serve (CPU, loopback only): contract, equality, batching, robustness.

One Ray + Serve start for the module (~10 s). Two apps share the proxy: ``rewards`` at ``/`` (the
jpeg rewards, small input limits for the fuzz cases) and ``counter`` at ``/counter`` (the
:class:`BatchCounter` reward below, loaded by its ``module:callable`` target, which reports the
batch size each RewardSet call saw, so the test can see dynamic batching happen).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rewards.base import Detection, Reward, RewardResult
from rewards.client import RewardClient, RewardServerError, RewardServerUnavailable
from rewards.composite import RewardSet
from rewards.wire import encode_array, encode_png, image_result

pytestmark = pytest.mark.slow

JPEG = [
    {"target": "jpeg_compressibility", "weight": 1.0},
    {"target": "jpeg_incompressibility", "name": "jpeg_big", "weight": 0.5},
]
COUNTER = [{"target": "tests.rewards.test_server:BatchCounter", "name": "batch_counter"}]
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
IMAGES[1, :16] = 7  # flatter image: a different JPEG size
PROMPTS = ["a", "b", "c", "d"]


class BatchCounter(Reward):
    """Test reward: value = mean pixel; info records how many images its call got.

    The prompts ``nan`` / ``nan-info`` / ``raise`` make it misbehave on purpose.
    """

    name = "batch_counter"
    region = "face"

    def score(self, images, prompts):
        out = []
        for im, p in zip(images, prompts):
            if p == "raise":
                raise RuntimeError("counter reward exploded on purpose")
            h, w = im.shape[:2]
            regions = {"face": [Detection((0.0, 0.0, float(w), float(h)), 0.5)]}
            value = float("nan") if p == "nan" else float(im.mean())  # RewardResult rejects the NaN
            info = {"batch_size": len(images), "x": float("nan") if p == "nan-info" else 1.0}
            out.append(RewardResult(value, regions=regions, info=info))
        return out


def _entries(dicts):
    from types import SimpleNamespace

    return [SimpleNamespace(**{"name": None, "weight": 1.0, "options": {}, **d}) for d in dicts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from rewards.server import ServerConfig, build_app
    from rlfh.env import worker_runtime_env

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, runtime_env=worker_runtime_env())
    port = _free_port()
    small = ServerConfig(
        port=port,
        max_batch_size=8,
        max_request_bytes=300_000,
        max_images=4,
        max_image_side=128,
        max_image_pixels=64 * 100,
        num_cpus_per_replica=0.5,
    )
    counter = ServerConfig(
        port=port, route_prefix="/counter", max_batch_size=8, batch_wait_timeout_s=0.5, num_cpus_per_replica=0.5
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rewards = serve.run(build_app(JPEG, small), name="rewards", route_prefix="/")
        counted = serve.run(build_app(COUNTER, counter), name="counter", route_prefix="/counter")
        yield {"port": port, "rewards": rewards, "counter": counted}
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _http(port, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


def _expected(dicts, images, prompts):
    return RewardSet.from_config(_entries(dicts))(images, prompts)


def test_health(server):
    status, body = _http(server["port"], "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["rewards"] == ["jpeg_compressibility", "jpeg_big"]
    assert body["weights"] == {"jpeg_compressibility": 1.0, "jpeg_big": 0.5}
    assert body["limits"]["max_images"] == 4
    status, body = _http(server["port"], "GET", "/counter/health")
    assert status == 200 and body["rewards"] == ["batch_counter"]


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_http_scores_equal_in_process(server, encoding):
    expected = _expected(JPEG, IMAGES, PROMPTS)
    key, items = (
        ("images", [encode_png(im) for im in IMAGES])
        if encoding == "png"
        else ("arrays", [encode_array(im) for im in IMAGES])
    )
    status, body = _http(server["port"], "POST", "/score", {key: items, "prompts": PROMPTS})
    assert status == 200, body
    # Exact: the JSON the server sent is the JSON of the in-process ScoredBatch.
    assert body["results"] == [image_result(expected, i) for i in range(len(IMAGES))]
    assert body["results"][0]["jpeg_compressibility"]["value"] != body["results"][1]["jpeg_compressibility"]["value"]
    client = RewardClient(f"http://127.0.0.1:{server['port']}", timeout=30, encoding=encoding)
    got = client.score(IMAGES, PROMPTS)
    assert got == expected and got.combined() == expected.combined() and got.means() == expected.means()


def test_handle_scores_equal_in_process(server):
    from rewards.server import get_reward_handle

    expected = _expected(JPEG, IMAGES, PROMPTS)
    assert server["rewards"].score.remote(IMAGES, PROMPTS).result() == expected
    assert get_reward_handle("rewards").score.remote(IMAGES[:1], PROMPTS[:1]).result() == _expected(
        JPEG, IMAGES[:1], PROMPTS[:1]
    )


def test_regions_are_merged_in_http_results(server):
    status, body = _http(
        server["port"], "POST", "/counter/score", {"images": [encode_png(IMAGES[0][:, :20])], "prompts": ["p"]}
    )
    assert status == 200, body
    res = body["results"][0]
    assert res["regions"] == {"face": [{"box": [0.0, 0.0, 20.0, 32.0], "confidence": 0.5}]}
    assert res["batch_counter"]["value"] == float(IMAGES[0][:, :20].mean())


def test_dynamic_batching_merges_concurrent_requests(server):
    port, n = server["port"], 8
    bodies = [{"images": [encode_png(IMAGES[i % 4])], "prompts": [f"p{i}"]} for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda b: _http(port, "POST", "/counter/score", b), bodies))
    assert all(s == 200 for s, _ in answers), answers
    sizes = [b["results"][0]["batch_counter"]["info"]["batch_size"] for _, b in answers]
    assert max(sizes) >= 2, f"no request was batched with another: batch sizes {sizes}"
    assert all(s <= 8 for s in sizes)
    for i, (_, b) in enumerate(answers):  # batching never mixes up whose image is whose
        assert b["results"][0]["batch_counter"]["value"] == float(IMAGES[i % 4].mean())
    # By handle: concurrent calls batch too, and a 20-image call is split into <= 8-image batches.
    handle = server["counter"]
    responses = [handle.score.remote(IMAGES[i : i + 1], [f"h{i}"]) for i in range(4)]
    sizes = [r.result().results["batch_counter"][0].info["batch_size"] for r in responses]
    assert max(sizes) >= 2, f"handle calls were not batched: {sizes}"
    big = np.concatenate([IMAGES] * 5)
    got = handle.score.remote(big, ["q"] * 20).result()
    assert [r.value for r in got.results["batch_counter"]] == [float(im.mean()) for im in big]
    assert max(r.info["batch_size"] for r in got.results["batch_counter"]) <= 8


def test_bad_reward_output_is_an_error_and_does_not_hurt_batch_neighbours(server):
    port = server["port"]
    cases = [("nan", 422, "not finite"), ("nan-info", 422, "non-finite"), ("raise", 500, "exploded"), ("ok", 200, "")]
    bodies = [{"images": [encode_png(IMAGES[0])], "prompts": [p]} for p, _, _ in cases]
    with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: they share a batch, then get isolated
        answers = list(pool.map(lambda b: _http(port, "POST", "/counter/score", b), bodies))
    for (prompt, code, text), (status, body) in zip(cases, answers):
        assert status == code, (prompt, status, body)
        if code != 200:
            assert text in body["error"], body
    assert answers[-1][1]["results"][0]["batch_counter"]["value"] == float(IMAGES[0].mean())


def _png(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # uint16 (H, W) -> a 16-bit grey PNG
    return base64.b64encode(buf.getvalue()).decode()


def _malformed_cases():
    from PIL import Image

    ok = encode_png(IMAGES[0])
    raw_png = base64.b64decode(ok)
    jpeg = io.BytesIO()
    Image.fromarray(IMAGES[0]).save(jpeg, format="JPEG")
    arr = encode_array(IMAGES[0])
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    cases = {
        "empty body": b"",
        "not json": b"{bad",
        "invalid utf8": b"\xff\xfe\x00",
        "json null": b"null",
        "json list": b"[]",
        "json string": b'"images"',
        "json number": b"123",
        "NaN literal": b'{"images": NaN, "prompts": []}',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "no images": {"prompts": ["a"]},
        "images and arrays": {"images": [ok], "arrays": [arr], "prompts": ["a"]},
        "images not a list": {"images": ok, "prompts": ["a"]},
        "images empty": {"images": [], "prompts": []},
        "prompts a string": {"images": [ok], "prompts": "a"},
        "prompts not strings": {"images": [ok], "prompts": [1]},
        "prompts null": {"images": [ok], "prompts": None},
        "prompts missing": {"images": [ok]},
        "count mismatch": {"images": [ok], "prompts": ["a", "b"]},
        "unknown key": {"images": [ok], "prompts": ["a"], "seed": 1},
        "image not a string": {"images": [123], "prompts": ["a"]},
        "bad base64": {"images": ["!!not base64!!"], "prompts": ["a"]},
        "base64 not png": {"images": [b64(b"hello world")], "prompts": ["a"]},
        "jpeg not png": {"images": [b64(jpeg.getvalue())], "prompts": ["a"]},
        "truncated png": {"images": [b64(raw_png[:60])], "prompts": ["a"]},
        "corrupt png body": {"images": [b64(raw_png[:40] + b"\x00" * 200 + raw_png[-12:])], "prompts": ["a"]},
        "16-bit png": {"images": [_png(np.zeros((8, 8), np.uint16))], "prompts": ["a"]},
        "side too large": {"images": [_png(np.zeros((8, 200, 3), np.uint8))], "prompts": ["a"]},
        "too many pixels": {"images": [_png(np.zeros((100, 100, 3), np.uint8))], "prompts": ["a"]},
        "too many images": {"images": [ok] * 5, "prompts": ["a"] * 5},
        "mixed sizes": {"images": [ok, _png(IMAGES[0][:16])], "prompts": ["a", "b"]},
        "array wrong dtype": {"arrays": [{**arr, "dtype": "float32"}], "prompts": ["a"]},
        "array 2-d shape": {"arrays": [{**arr, "shape": [32, 96]}], "prompts": ["a"]},
        "array 4 channels": {"arrays": [{**arr, "shape": [32, 24, 4]}], "prompts": ["a"]},
        "array zero side": {"arrays": [{**arr, "shape": [0, 32, 3]}], "prompts": ["a"]},
        "array bool shape": {"arrays": [{**arr, "shape": [True, 32, 3]}], "prompts": ["a"]},
        "array short data": {"arrays": [{**arr, "data": b64(b"\x00" * 100)}], "prompts": ["a"]},
        "array not object": {"arrays": [[1, 2, 3]], "prompts": ["a"]},
        "array unknown key": {"arrays": [{**arr, "order": "F"}], "prompts": ["a"]},
        "array data not str": {"arrays": [{**arr, "data": 5}], "prompts": ["a"]},
    }
    out = [("POST", "/score", body, None) for body in cases.values()]
    names = list(cases)
    extra = [
        ("body over max_request_bytes", ("POST", "/score", b"{" + b" " * 400_000 + b"}", None)),
        (
            "content-type text/plain",
            ("POST", "/score", {"images": [ok], "prompts": ["a"]}, {"Content-Type": "text/plain"}),
        ),
        ("GET /score", ("GET", "/score", None, None)),
        ("POST /health", ("POST", "/health", b"{}", None)),
        ("unknown path", ("GET", "/nope", None, None)),
    ]
    return names + [n for n, _ in extra], out + [c for _, c in extra]


def test_malformed_requests_get_4xx_and_server_keeps_serving(server):
    names, cases = _malformed_cases()
    assert len(set(names)) >= 30
    for name, (method, path, body, headers) in zip(names, cases):
        status, answer = _http(server["port"], method, path, body, headers)
        assert 400 <= status < 500, (name, status, answer)
        assert isinstance(answer, dict) and answer.get("error"), (name, answer)
    status, _ = _http(server["port"], "GET", "/health")
    assert status == 200
    status, body = _http(
        server["port"], "POST", "/score", {"images": [encode_png(im) for im in IMAGES], "prompts": PROMPTS}
    )
    assert status == 200
    expected = _expected(JPEG, IMAGES, PROMPTS)
    assert body["results"] == [image_result(expected, i) for i in range(len(IMAGES))]


def test_client_errors_are_clear(server):
    client = RewardClient(f"http://127.0.0.1:{server['port']}", timeout=30, retries=3)
    with pytest.raises(RewardServerError, match="413.*max_images") as e:
        client.score(np.concatenate([IMAGES, IMAGES]), PROMPTS * 2)
    assert e.value.status == 413  # not retried, not an "unavailable"
    assert not isinstance(e.value, RewardServerUnavailable)


def test_client_unreachable_port_fails_after_bounded_retries():
    port = _free_port()  # bound then closed: nothing listens there
    client = RewardClient(f"http://127.0.0.1:{port}", timeout=2, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardServerUnavailable, match=r"unreachable.*3 time\(s\).*refused"):
        client.health()
    elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 5, elapsed  # waited 0.05 + 0.1 between the 3 attempts, then gave up


def test_server_config_validation():
    from rewards.server import ServerConfig

    with pytest.raises(ValueError, match=r"max_images=0.*\n.*port=70000"):
        ServerConfig(max_images=0, port=70000)
    with pytest.raises(ValueError, match="route_prefix"):
        ServerConfig(route_prefix="score")
    assert ServerConfig().host == "127.0.0.1" and ServerConfig(port=9000).url == "http://127.0.0.1:9000"
