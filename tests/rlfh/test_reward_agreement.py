"""`rlfh eval-rewards`: agreement of rewards with human rankings and pairs (FaceScore's Tables 2 and 6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlfh.eval.reward_agreement import Comparison, agreement, load_comparisons


def _cmp(ranks, prompt="p", names=None):
    names = names or [f"{prompt}{i}.png" for i in range(len(ranks))]
    return Comparison(prompt, tuple(Path(n) for n in names), tuple(ranks), 1)


def test_agreement_worked_numbers():
    right = _cmp([1, 2, 3], "a")  # a person ranks a0 > a1 > a2
    half = _cmp([1, 2, 3], "b")
    tie = _cmp([1, 1], "c")  # a pairwise line with "tie": true
    pair = _cmp([1, 2], "d")
    values = {
        **{(f"a{i}.png", "a"): v for i, v in enumerate([3.0, 2.0, 1.0])},  # the human order: 3 of 3 pairs
        **{(f"b{i}.png", "b"): v for i, v in enumerate([3.0, 1.0, 2.0])},  # b1 < b2 reversed: 2 of 3
        ("c0.png", "c"): 1.0,
        ("c1.png", "c"): 5.0,
        ("d0.png", "d"): 4.0,
        ("d1.png", "d"): 4.0,  # the reward ties a pair a person ordered: half a point
    }
    m = agreement([right, half, tie, pair], values)
    assert m["n_pairs"] == 7 and m["human_ties"] == 1 and m["pairs_excluded"] == 0
    assert m["pair_accuracy"] == pytest.approx((3 + 2 + 0.5) / 7)
    assert m["ranking_accuracy"] == pytest.approx(1 / 3) and m["n_rankings"] == 3  # the tied pair is left out
    # human scores: (k - rank) / (k - 1): triplets 1, 0.5, 0; pairs 1, 0; a tie 0.5, 0.5
    h = [1, 0.5, 0, 1, 0.5, 0, 0.5, 0.5, 1, 0]
    s = [3, 2, 1, 3, 1, 2, 1, 5, 4, 4]
    assert m["pearson"] == pytest.approx(np.corrcoef(s, h)[0, 1]) and m["n_images"] == 10
    missing = agreement([right], {**values, ("a1.png", "a"): None})
    assert missing["pairs_excluded"] == 2 and missing["n_pairs"] == 1 and missing["ranking_accuracy"] is None
    flat = agreement([pair], values)
    assert flat["pearson"] is None and flat["pearson_reason"] == "the reward's values do not vary"
    # tied places share their mean: ranks [1, 1, 2] are places 1.5, 1.5, 3 -> scores 0.75, 0.75, 0
    assert _cmp([1, 1, 2]).human_scores() == [0.75, 0.75, 0.0]


def test_label_file_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")

    def bad(line, match, exc=ValueError):
        f = tmp_path / "labels.jsonl"
        f.write_text(line + "\n")
        with pytest.raises(exc, match=match):
            load_comparisons(f)

    bad('{"images": ["a.png", "b.png"], "ranking": [1, 2]}', "labels.jsonl:1: 'prompt'")
    bad('{"prompt": "", "images": ["a.png", "b.png"], "ranking": [1]}', "one rank per image")
    bad('{"prompt": "", "images": ["a.png", "b.png"], "ranking": [0, 1]}', "integers >= 1")
    bad('{"prompt": "", "images": ["a.png"], "ranking": [1]}', "at least two")
    bad('{"prompt": "", "chosen": "a.png", "rejected": "b.png", "tie": "yes"}', "'tie' is true or false")
    bad('{"prompt": "", "winner": "a.png"}', "give 'images' \\+ 'ranking', or 'chosen' \\+ 'rejected'")
    bad('{"prompt": "", "chosen": "a.png", "rejected": "c.png"}', "image .*c.png not found", FileNotFoundError)
    bad("not json", "labels.jsonl:1: not JSON")
    bad("", "holds no comparisons")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_comparisons(tmp_path / "absent.jsonl")


def test_eval_rewards_cli_on_images(tmp_path, capsys):
    """Smooth images compress better than noisy ones: a person who prefers smooth images agrees with
    jpeg_compressibility on every pair and with jpeg_incompressibility on none."""
    import argparse

    from PIL import Image

    from rlfh.cli.eval import add_eval_commands
    from tests.conftest import REPO

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for k in range(3):  # noise level k: smooth (0) to noisy (2); two sizes, scored in separate batches
        for size in (64, 48):
            noisy = (128 + rng.normal(0.0, 40.0 * k, (size, size, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(tmp_path / "img" / f"n{k}_{size}.png")
    lines = [
        {"prompt": "a face", "images": ["img/n2_64.png", "img/n0_64.png", "img/n1_64.png"], "ranking": [3, 1, 2]},
        {"prompt": "a face", "chosen": "img/n0_48.png", "rejected": "img/n2_48.png", "labeler": "ann"},
        {"prompt": "a face", "chosen": "img/n1_48.png", "rejected": "img/n2_48.png", "tie": True},
    ]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    p = argparse.ArgumentParser(prog="rlfh")
    add_eval_commands(p.add_subparsers(dest="command", required=True))
    argv = ["eval-rewards", str(REPO / "configs" / "tiny.yaml"), str(labels), "--out", str(tmp_path / "r.json")]
    argv.append("rewards=[{target: jpeg_compressibility}, {target: jpeg_incompressibility}]")
    args = p.parse_args(argv)
    assert args.fn(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_comparisons"] == 3 and report["n_images"] == 6
    comp, incomp = report["rewards"]["jpeg_compressibility"], report["rewards"]["jpeg_incompressibility"]
    assert comp["pair_accuracy"] == 1.0 and comp["n_pairs"] == 4 and comp["human_ties"] == 1
    assert comp["ranking_accuracy"] == 1.0 and comp["pearson"] > 0.5
    assert incomp["pair_accuracy"] == 0.0 and incomp["pearson"] == pytest.approx(-comp["pearson"])
    assert "jpeg_compressibility: pair accuracy 1.0000 over 4 pairs" in capsys.readouterr().out
    args = p.parse_args(["eval-rewards", str(REPO / "configs" / "tiny.yaml"), str(tmp_path / "none.jsonl")])
    assert args.fn(args) == 2 and "no such file" in capsys.readouterr().err
