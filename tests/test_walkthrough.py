"""docs/walkthrough.md's examples, run as written: the custom reward class and its config entry
through RewardSet.from_config, and the tiny-model `rlfh eval` / `rlfh compare` / `rlfh plot` block.

(`rlfh train` and `rlfh offline-dpo` on the tiny model, the walkthrough's first block, are the
commands tests/test_end_to_end.py runs.)
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

DOC = REPO / "docs" / "walkthrough.md"


def block(tag: str) -> str:
    """The fenced code block right after ``<!-- walkthrough-test: TAG -->``."""
    m = re.search(rf"<!-- walkthrough-test: {re.escape(tag)} -->\s*```\w*\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"walkthrough block {tag!r} not found in {DOC}"
    return m.group(1)


@pytest.fixture()
def my_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(block("my_rewards.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_custom_reward_example_through_the_config(my_rewards):
    from rewards.composite import RewardSet
    from rlfh.config.schema import config_from_dict

    entries = yaml.safe_load(block("rewards.yaml"))["rewards"]
    assert any(e["target"] == "my_rewards:Colourfulness" for e in entries)
    # the detector-backed rewards need real weights; the custom entry is built exactly as written
    cfg = config_from_dict({"rewards": [e for e in entries if e["target"].startswith("my_rewards:")]})
    rs = RewardSet.from_config(cfg.rewards)
    assert rs.names == ["colourfulness"] and rs.rewards[0].weight == 0.2 and rs.rewards[0].reward.min_std == 2.0

    rng = np.random.default_rng(0)
    grey = np.full((16, 16, 3), 128, np.uint8)
    grey_noise = np.repeat(rng.integers(0, 255, (16, 16, 1), dtype=np.uint8), 3, axis=-1)
    colour = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    scored = rs(np.stack([grey, grey_noise, colour]), ["a", "b", "c"])
    res = scored.results["colourfulness"]
    assert res[0].value is None and res[0].reason == "blank image"
    assert res[1].value == pytest.approx(0.0)  # textured but grey: no colour
    assert res[2].value > 0.5  # uniform random RGB: sigma_rgyb ~ 0.9 * 100 / 100


def test_tiny_eval_compare_plot_block(tiny_model_dir, tmp_path, monkeypatch):
    from rlfh.cli.eval import add_eval_commands
    from tests.rlfh.eval_helpers import make_lora

    # what `rlfh train` / `rlfh offline-dpo` leave behind: a checkpoint and metrics.jsonl
    runs = tmp_path / "runs"
    make_lora(tiny_model_dir, runs / "tiny" / "checkpoints" / "round-000030")
    (runs / "tiny" / "checkpoints" / "latest").write_text("round-000030")
    for name, rewards in (("tiny", [-3.7, -3.6, -3.5]), ("tiny_offline", [-3.7, -3.65, -3.66])):
        rows = [
            {"step": i, "reward/jpeg_compressibility/mean": r, "loss/dpo": 0.69 - 0.01 * i, "dpo/implicit_acc": 0.5}
            for i, r in enumerate(rewards)
        ]
        (runs / name).mkdir(exist_ok=True)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)

    parser = argparse.ArgumentParser(prog="rlfh")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    commands = [shlex.split(ln) for ln in block("tiny-eval").splitlines() if ln.strip()]
    assert [c[:2] for c in commands] == [["rlfh", "eval"], ["rlfh", "compare"], ["rlfh", "plot"]]
    for argv in commands:
        if argv[1] == "eval":  # as written, at 2 denoising steps to fit the test budget
            argv = argv + ["rollout.num_inference_steps=2", "--no-progress"]
        args = parser.parse_args(argv[1:])
        assert args.fn(args) == 0, argv

    summary = json.loads((runs / "tiny" / "eval" / "eval.json").read_text())
    assert summary["num_images_per_model"] == 8 and summary["prompt_set"] == "human"
    assert summary["models"]["model"]["lora"] == "runs/tiny"
    assert (runs / "tiny" / "eval" / "index.html").is_file()
    assert (runs / "compare" / "index.html").is_file() and (runs / "tiny" / "curves" / "index.html").is_file()
