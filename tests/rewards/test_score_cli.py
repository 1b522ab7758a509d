"""``rlfh score`` (in-process scoring of image files) and ``rlfh serve-rewards`` (real process, SIGINT).

The commands are reached through a parser built with ``add_reward_commands``, as ``rlfh.cli.main`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from rewards.composite import RewardSet
from rewards.wire import image_result
from rlfh.cli.rewards import add_reward_commands

REPO = Path(__file__).resolve().parents[2]
CONFIG = """\
rewards:
  - jpeg_compressibility
  - target: jpeg_incompressibility
    name: big
    weight: 0.5
"""


def rlfh(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlfh")
    add_reward_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        np.full((24, 16, 3), 9, np.uint8),
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ]
    paths = []
    for k, im in enumerate(images):
        p = tmp_path / f"img{k}.png"
        Image.fromarray(im).save(p)
        paths.append(str(p))
    cfg = tmp_path / "rewards.yaml"
    cfg.write_text(CONFIG)
    return str(cfg), paths, images


def _expected(entries, image):
    rs = RewardSet.from_config([SimpleNamespace(**{"name": None, "weight": 1.0, "options": {}, **e}) for e in entries])
    return image_result(rs(image[None], [""]), 0)


def test_score_prints_one_json_object_per_image_in_order(files, capsys):
    cfg, paths, images = files
    assert rlfh(["score", cfg, *paths, "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    entries = [{"target": "jpeg_compressibility"}, {"target": "jpeg_incompressibility", "name": "big", "weight": 0.5}]
    for line, path, image in zip(lines, paths, images):
        obj = json.loads(line)
        assert obj.pop("image") == path
        assert obj == _expected(entries, image)  # exactly the in-process numbers
    assert json.loads(lines[0])["big"]["value"] != json.loads(lines[2])["big"]["value"]


def test_score_overrides_and_batching_do_not_change_numbers(files, capsys):
    cfg, paths, images = files
    assert rlfh(["score", cfg, *paths, "rewards=[jpeg_incompressibility]"]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["image"] for o in objs] == paths
    for obj, image in zip(objs, images):
        assert set(obj) == {"image", "jpeg_incompressibility", "regions"}
        assert (
            obj["jpeg_incompressibility"]
            == _expected([{"target": "jpeg_incompressibility"}], image)["jpeg_incompressibility"]
        )


def test_score_with_the_committed_tiny_config(files, capsys):
    _, paths, images = files
    assert rlfh(["score", str(REPO / "configs" / "tiny.yaml"), paths[1]]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    obj = json.loads(line)
    assert obj["image"] == paths[1] and obj["jpeg_compressibility"]["value"] < 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing image", "does not exist"),
        ("not an image", "cannot decode image"),
    ],
)
def test_unreadable_images_get_an_error_line_and_exit_1(files, tmp_path, capsys, case, message):
    cfg, paths, images = files
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    bad = {"missing image": str(tmp_path / "absent.png"), "not an image": str(junk)}[case]
    assert rlfh(["score", cfg, paths[0], bad, paths[1]]) == 1
    captured = capsys.readouterr()
    objs = [json.loads(line) for line in captured.out.splitlines()]
    assert [o["image"] for o in objs] == [paths[0], bad, paths[1]]
    assert set(objs[1]) == {"image", "error"} and message in objs[1]["error"]
    assert "error" not in objs[0] and "error" not in objs[2]  # the good files are still scored
    assert "1 of 3 image(s) could not be scored" in captured.err


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown reward", "unknown reward 'nope'"),
        ("bad override", "rewards[0].wieght"),
        ("reserved name", "reserved"),
        ("no image", "no image given"),
    ],
)
def test_score_errors_exit_2_with_a_reason(files, tmp_path, capsys, case, message):
    cfg, paths, _ = files
    argv = {
        "unknown reward": [cfg, paths[0], "rewards=[nope]"],
        "bad override": [cfg, paths[0], "rewards=[{target: jpeg_compressibility, wieght: 2}]"],
        "reserved name": [cfg, paths[0], "rewards=[{target: jpeg_compressibility, name: regions}]"],
        "no image": [cfg, "seed=1"],
    }[case]
    assert rlfh(["score", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.slow
def test_serve_rewards_serves_until_sigint(files):
    from rewards.client import RewardClient, RewardServerError

    cfg, paths, images = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import argparse, sys; from rlfh.env import apply_env_defaults; apply_env_defaults(); "
        "from rlfh.cli.rewards import add_reward_commands; p = argparse.ArgumentParser(); "
        "add_reward_commands(p.add_subparsers(required=True)); a = p.parse_args(sys.argv[1:]); sys.exit(a.fn(a))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(Path(cfg).parent / "serve.log", "w+")  # a file, not a pipe: Ray's output can never block it
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve-rewards", cfg, "--port", str(port), "--max-images", "2"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        probe = RewardClient(f"http://127.0.0.1:{port}", timeout=5, retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                probe.health()
                break
            except RewardServerError as e:  # unreachable, or 404 from the proxy before the app is routed
                if e.status not in (None, 404):
                    raise
                log.seek(0)
                assert proc.poll() is None, "serve-rewards exited before it was ready:\n" + log.read()
                assert time.monotonic() < deadline, "serve-rewards not ready after 120 s:\n" + log.read()
                time.sleep(0.5)
        client = RewardClient(f"http://127.0.0.1:{port}", timeout=30, retries=2)
        assert client.health()["rewards"] == ["jpeg_compressibility", "big"]
        assert client.health()["limits"]["max_images"] == 2
        batch = client.score(np.stack([images[0], images[2]]), ["x", "y"])
        assert image_result(batch, 0) == _expected(
            [{"target": "jpeg_compressibility"}, {"target": "jpeg_incompressibility", "name": "big", "weight": 0.5}],
            images[0],
        )
        # the proxy answers as soon as the replica is up, while serve-rewards may still be inside its
        # start-up call: Ctrl-C is the user's once the CLI says so
        while True:
            log.seek(0)
            if "Ctrl-C stops it" in log.read():
                break
            assert proc.poll() is None and time.monotonic() < deadline, "serve-rewards never said it was ready"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        log.seek(0)
        assert "stopping the reward server" in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
