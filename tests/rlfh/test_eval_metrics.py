"""Region size drift, FairHuman's detection-weighted mean, per-style means, styled prompt files,
and FaceScore's SDXL-Neg baseline (`--baseline-negative-prompt`) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rewards.base import Detection, RewardResult
from tests.rlfh.eval_helpers import MISSING_WORD, PROMPTS, SEEDS, tiny_eval


def test_size_stats_and_drift_worked_numbers():
    from rlfh.eval.region_metrics import size_drift, size_stats

    # 100 x 200 image: a 10 x 20 box is 1% of it, a 50 x 40 box 10%; a box half outside counts its inside half
    small, big, edge = Detection((0, 0, 20, 10), 0.9), Detection((10, 10, 50, 60), 0.9), Detection((190, 0, 210, 10), 1)
    st = size_stats([[small, big], [], [edge]], (100, 200))
    assert st["n_images"] == 3 and st["n_detections"] == 3 and st["per_image"] == 1.0
    assert st["images_with_detection_rate"] == pytest.approx(2 / 3)
    assert st["area_share"] == pytest.approx((0.01 + 0.10 + 0.005) / 3)
    assert st["largest_share"] == pytest.approx((0.10 + 0.005) / 2)
    none = size_stats([[], []], (100, 200))
    assert none["area_share"] is None and none["largest_share"] is None and none["per_image"] == 0.0
    drift = size_drift(
        {"model": [{"face": [big]}, {"face": [big]}], "baseline": [{"face": [small]}, {"face": []}]}, (100, 200)
    )
    c = drift["face"]["change"]
    # the model draws one face per image at 10%; the baseline half a face per image at 1%
    assert c["per_image"] == pytest.approx(0.5) and c["area_share"] == pytest.approx(0.09)
    assert c["largest_share"] == pytest.approx(0.09) and c["images_with_detection_rate"] == pytest.approx(0.5)


def test_detection_weighted_mean_weighs_each_face():
    from rlfh.eval.region_metrics import detection_weighted_mean

    # FairHuman's mean over faces: an image with three faces weighs three times (image-weighted: (2 + 5) / 2)
    results = [
        RewardResult(2.0, info={"face_scores": [1.0, 2.0, 3.0]}),
        RewardResult(5.0, info={"face_scores": [5.0, None]}),  # None: a detection that was not scored
        RewardResult.missing("no face", info={"face_scores": []}),
    ]
    dw = detection_weighted_mean(results, "face")
    assert dw == {"mean": pytest.approx(11.0 / 4), "n_detections": 4, "reason": None}
    assert (
        detection_weighted_mean([RewardResult(1.0)], "face")["reason"]
        == "the reward reports no per-detection 'face_scores'"
    )
    assert detection_weighted_mean(results[2:], "face")["reason"] == "no face was scored"


def test_by_style_means_and_win_rates():
    from rlfh.eval.evaluate import value_stats, win_rate
    from rlfh.eval.region_metrics import by_style

    styles = ["anime", "photo", "anime", "photo"]
    values = {"model": {"r": [1.0, 2.0, 3.0, None]}, "baseline": {"r": [0.0, 3.0, 3.0, 1.0]}}
    out = by_style(styles, values, lambda v: value_stats(v, ["x" if a is None else None for a in v]), win_rate)
    assert list(out) == ["anime", "photo"] and out["anime"]["n_images"] == 2
    assert out["anime"]["rewards"]["r"]["model"]["mean"] == 2.0 and out["photo"]["rewards"]["r"]["model"]["mean"] == 2.0
    assert out["anime"]["rewards"]["r"]["win_rate"]["win_rate"] == 0.75  # a win and a tie
    assert out["photo"]["rewards"]["r"]["win_rate"]["n_compared"] == 1  # the missing one is excluded


def test_prompt_tables(tmp_path):
    from rlfh.eval.prompt_sets import load_prompt_table

    (tmp_path / "p.csv").write_text('prompt,style\n"a man, smiling",photo\na girl,anime\nan old woman,photo\n')
    t = load_prompt_table(str(tmp_path / "p.csv"))
    assert t.prompts == ["a man, smiling", "a girl", "an old woman"] and t.styles == ["photo", "anime", "photo"]
    assert t.head(1).prompts == ["a man, smiling", "a girl"]  # the first of EACH style
    (tmp_path / "p.tsv").write_text("prompt\na\nb\n")
    assert load_prompt_table(str(tmp_path / "p.tsv")).styles is None
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "style": "x"}\n\n{"prompt": "b", "style": "y"}\n')
    assert load_prompt_table(str(tmp_path / "p.jsonl")).styles == ["x", "y"]
    bench = tmp_path / "benchmark"  # HPSv2's layout: one JSON list per style
    bench.mkdir()
    (bench / "photo.json").write_text(json.dumps(["p1", "p2"]))
    (bench / "anime.json").write_text(json.dumps(["a1"]))
    t = load_prompt_table(str(bench))
    assert t.prompts == ["a1", "p1", "p2"] and t.styles == ["anime", "photo", "photo"]
    (tmp_path / "half.jsonl").write_text('{"prompt": "a", "style": "x"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match="prompt 2 has no 'style'"):
        load_prompt_table(str(tmp_path / "half.jsonl"))
    (tmp_path / "bad.csv").write_text("text,style\na,b\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        load_prompt_table(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.jsonl").write_text('{"style": "x"}\n')
    with pytest.raises(ValueError, match="line 1 needs a non-empty string 'prompt'"):
        load_prompt_table(str(tmp_path / "bad.jsonl"))


def test_tiny_eval_region_size_and_detection_weighted(tiny_model_dir):
    from rlfh.eval.evaluate import format_summary

    out, summary = tiny_eval(tiny_model_dir)
    n = len(PROMPTS) * len(SEEDS)
    n_face = n - sum(MISSING_WORD in p for p in PROMPTS) * len(SEEDS)
    size = summary["region_size"]
    assert size["face"]["source"] == size["hand"]["source"] == "brightest_box"
    for side in ("model", "baseline"):
        face = size["face"][side]
        # BrightestBox: one 16 x 16 face box per image with a face, on 64 x 64 images
        assert face["n_detections"] == n_face and face["per_image"] == pytest.approx(n_face / n)
        assert face["area_share"] == pytest.approx(16 * 16 / (64 * 64))
        box = summary["rewards"]["brightest_box"][side]
        # one face per image: the detection-weighted mean is the image-weighted one
        assert box["detection_weighted"]["n_detections"] == n_face
        assert box["detection_weighted"]["mean"] == pytest.approx(box["mean"])
        assert "detection_weighted" not in summary["rewards"]["jpeg_compressibility"][side]
    assert set(size) == {"face", "hand"} and size["face"]["change"] == {
        "per_image": 0.0,
        "images_with_detection_rate": 0.0,
        "area_share": pytest.approx(0.0),
        "largest_share": pytest.approx(0.0),
    }
    assert json.loads((out / "eval.json").read_text())["region_size"] == summary["region_size"]
    page = (out / "index.html").read_text()
    assert "Region count and size" in page and "(boxes of brightest_box)" in page
    assert "Region rewards: per image and per detection" in page and f"({n_face})" in page
    text = format_summary(summary)
    assert f"model: {n_face / n:.4g} faces per image, mean face area share 0.0625" in text
    assert "change vs baseline: faces per image 0" in text


def test_negative_prompt_baseline_and_styles(tiny_model_dir, tmp_path):
    """FaceScore's SDXL-Neg: the same model, seeds and prompts; only the baseline's negative prompt differs."""
    from PIL import Image

    from rlfh.config.schema import load_config
    from rlfh.eval.evaluate import ModelSpec, evaluate
    from tests.conftest import REPO
    from tests.rlfh.eval_helpers import eval_overrides

    over = eval_overrides(tiny_model_dir) + ["rollout.num_inference_steps=1"]
    neg = ModelSpec(tiny_model_dir, negative_prompt="blurry, deformed face")
    kw = dict(baseline=neg, progress=False, report=False)
    with pytest.raises(ValueError, match="classifier-free guidance.*guidance_scale is 1.0"):
        evaluate(
            load_config(REPO / "configs" / "tiny.yaml", over),
            ModelSpec(tiny_model_dir),
            PROMPTS[:1],
            [3],
            tmp_path,
            **kw,
        )
    cfg = load_config(REPO / "configs" / "tiny.yaml", over + ["rollout.guidance_scale=3.0"])
    s = evaluate(cfg, ModelSpec(tiny_model_dir), PROMPTS, [3], tmp_path, styles=["photo", "photo", "art"], **kw)
    assert s["models"]["baseline"]["negative_prompt"] == "blurry, deformed face"
    assert "negative prompt 'blurry, deformed face'" in s["models"]["baseline"]["label"]
    a = np.asarray(Image.open(tmp_path / "images" / "model" / "0000.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "images" / "baseline" / "0000.png"), dtype=float)
    # the negative prompt replaced the empty one under guidance (the tiny model's text conditioning is weak:
    # 0.03 of 255 on average after one step; equal models and prompts give identical images, see test_evaluate)
    assert np.abs(a - b).max() > 0
    assert [r["style"] for r in s["samples"]] == ["photo", "photo", "art"]
    photo = s["styles"]["photo"]
    assert photo["n_images"] == 2
    jpeg = [r["model"]["scores"]["jpeg_compressibility"] for r in s["samples"][:2]]
    assert photo["rewards"]["jpeg_compressibility"]["model"]["mean"] == pytest.approx(np.mean(jpeg))
    assert s["styles"]["art"]["rewards"]["combined"]["win_rate"]["n_pairs"] == 1
    from rlfh.eval.report import render_html

    page = render_html(s, [], {}, None, 0)
    mean = photo["rewards"]["jpeg_compressibility"]["model"]["mean"]
    assert (
        "<h2>Per style</h2>" in page and f"<td>photo</td><td>2</td><td>jpeg_compressibility</td><td>{mean:.4g}" in page
    )


def test_eval_cli_negative_prompt_and_styled_prompts(tiny_model_dir, tmp_path, capsys):
    """The flags reach evaluate: a negative-prompt-only baseline at guidance 1 is refused before sampling,
    and a styled prompt file's unknown column layout is named."""
    import argparse

    from rlfh.cli.eval import add_eval_commands
    from tests.conftest import REPO

    p = argparse.ArgumentParser(prog="rlfh")
    add_eval_commands(p.add_subparsers(dest="command", required=True))
    cfg = str(REPO / "configs" / "tiny.yaml")
    args = p.parse_args(["eval", cfg, "--model", tiny_model_dir, "--baseline-negative-prompt", "ugly", "--out", "x"])
    assert args.baseline_negative_prompt == "ugly" and args.baseline_model is None
    args.out = str(tmp_path)
    assert args.fn(args) == 2
    assert "negative prompt ('ugly') acts only under classifier-free guidance" in capsys.readouterr().err
    (tmp_path / "p.csv").write_text("caption,style\na,b\n")
    args = p.parse_args(["eval", cfg, "--model", tiny_model_dir, "--prompts", str(tmp_path / "p.csv")])
    assert args.fn(args) == 2 and "'prompt' column" in capsys.readouterr().err
