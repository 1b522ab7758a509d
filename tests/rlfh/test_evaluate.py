"""`rlfh eval` on the tiny model: statistics by hand, a perturbed LoRA vs the base model, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.rlfh.eval_helpers import MISSING_WORD, PROMPTS, SEEDS, tiny_eval


def test_bootstrap_ci_and_value_stats():
    from rlfh.eval.evaluate import bootstrap_ci, value_stats

    x = np.random.default_rng(0).normal(2.0, 1.0, 400)
    lo, hi = bootstrap_ci(x)
    se = x.std(ddof=1) / np.sqrt(x.size)
    # the percentile bootstrap of a mean agrees with the normal interval to within a few percent
    assert abs(lo - (x.mean() - 1.96 * se)) < 0.1 * se * 1.96 and abs(hi - (x.mean() + 1.96 * se)) < 0.1 * se * 1.96
    assert bootstrap_ci([1.0]) is None
    st = value_stats([1.0, None, 3.0, None], [None, "no face detected", None, "no hand detected"])
    assert st["mean"] == 2.0 and st["n_valid"] == 2 and st["not_computable_rate"] == 0.5
    assert st["not_computable"] == {"no face detected": 1, "no hand detected": 1}


def test_win_rate_counts_ties_half_and_excludes_missing():
    from rlfh.eval.evaluate import win_rate

    w = win_rate([2.0, 1.0, 1.0, None, 5.0, None], [1.0, 1.0, 3.0, 1.0, None, None])
    assert (w["wins"], w["ties"], w["losses"], w["n_compared"]) == (1, 1, 1, 3)
    assert w["win_rate"] == pytest.approx(0.5)
    assert w["excluded"] == 3 and w["excluded_by_cause"] == {
        "model_missing": 1,
        "baseline_missing": 1,
        "both_missing": 1,
    }
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_prompt_sets():
    from rlfh.eval.evaluate import load_prompt_set

    human, general = load_prompt_set("human"), load_prompt_set("general")
    assert len(human) >= 50 and len(general) >= 50 and not set(human) & set(general)
    assert all(not p.startswith("#") for p in human + general)
    with pytest.raises(ValueError, match="unknown prompt set.*human"):
        load_prompt_set("humans")
    with pytest.raises(FileNotFoundError):
        load_prompt_set("missing/prompts.txt")


def test_tiny_eval_summary(tiny_model_dir):
    out, summary = tiny_eval(tiny_model_dir)
    n = len(PROMPTS) * len(SEEDS)
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["rewards"] == summary["rewards"]
    assert [(s["prompt"], s["seed"]) for s in summary["samples"]] == [(p, s) for p in PROMPTS for s in SEEDS]
    n_missing = sum(MISSING_WORD in p for p in PROMPTS) * len(SEEDS)
    for side in ("model", "baseline"):
        jpeg, box = summary["rewards"]["jpeg_compressibility"][side], summary["rewards"]["brightest_box"][side]
        assert jpeg["n_valid"] == n and jpeg["ci_low"] <= jpeg["mean"] <= jpeg["ci_high"]
        assert box["n_valid"] == n - n_missing and box["not_computable"] == {"no face detected": n_missing}
        # the summary's mean is the mean of the per-sample values it reports
        vals = [s[side]["scores"]["jpeg_compressibility"] for s in summary["samples"]]
        assert jpeg["mean"] == pytest.approx(np.mean(vals))
        assert summary["regions"][side]["face"] == {
            "checked": n,
            "no_detection": n_missing,
            "no_detection_rate": n_missing / n,
        }
        assert (out / "images" / side / f"{n - 1:04d}.png").is_file()
    w = summary["rewards"]["brightest_box"]["win_rate"]
    assert w["n_compared"] == n - n_missing and w["excluded_by_cause"]["both_missing"] == n_missing
    # same seeds: the LoRA changes the images, but not beyond recognition
    from PIL import Image

    a = np.asarray(Image.open(out / "images" / "model" / "0000.png"), dtype=float)
    b = np.asarray(Image.open(out / "images" / "baseline" / "0000.png"), dtype=float)
    assert 0 < np.abs(a - b).mean() < 40


def test_tiny_eval_collapse_metrics(tiny_model_dir):
    from PIL import Image

    from rewards.embeddings import NO_EMBEDDER
    from rlfh.eval.diversity import image_diversity

    out, summary = tiny_eval(tiny_model_dir)
    assert json.loads((out / "eval.json").read_text())["collapse"] == summary["collapse"]
    prompts = [s["prompt"] for s in summary["samples"]]
    for side in ("model", "baseline"):
        c = summary["collapse"][side]
        # no reward of this config has an embedding model: said, not invented
        assert c["face_identity_sim"]["value"] is None and c["face_identity_sim"]["reason"] == NO_EMBEDDER
        images = [np.asarray(Image.open(out / s[side]["image"])) for s in summary["samples"]]
        assert c["image_diversity"]["value"] == pytest.approx(image_diversity(images, prompts)["value"])
        assert c["image_diversity"]["value"] > 0 and c["image_diversity"]["n_prompts"] == len(PROMPTS)
        # gap = training-prompt mean - evaluated mean (the landscape has no combined score)
        comb = [s[side]["combined"] for s in summary["samples"]]
        scored = [v for v in comb if v is not None]
        gap = c["reward_gap"]
        assert gap["heldout_mean"] == pytest.approx(np.mean(scored), abs=1e-12)
        assert gap["value"] == pytest.approx(gap["train_mean"] - gap["heldout_mean"], abs=1e-12)
        # the training prompt at the same seeds redraws eval samples 0 and 1; sampled in another batch
        # the CPU kernels may round a pixel differently, moving the JPEG size by a byte or so
        assert gap["train_mean"] == pytest.approx(np.mean(comb[: len(SEEDS)]), abs=0.01)
        assert gap["n_train"] == len(SEEDS) and gap["n_heldout"] == len(scored) == len(comb) - len(SEEDS)
    from rlfh.eval.evaluate import format_summary

    text = format_summary(summary)
    assert f"model: image_diversity {summary['collapse']['model']['image_diversity']['value']:.4g}" in text
    assert f"baseline: face_identity_sim n/a ({NO_EMBEDDER})" in text


def test_same_seed_same_image_without_lora(tiny_model_dir, tmp_path):
    """Model == baseline: every pair ties, so each win rate is exactly 0.5 (the pairing is by seed)."""
    from rlfh.config.schema import load_config
    from rlfh.eval.evaluate import ModelSpec, evaluate
    from tests.conftest import REPO
    from tests.rlfh.eval_helpers import eval_overrides

    cfg = load_config(
        REPO / "configs" / "tiny.yaml", eval_overrides(tiny_model_dir) + ["rollout.num_inference_steps=1"]
    )
    s = evaluate(
        cfg,
        ModelSpec(tiny_model_dir),
        PROMPTS[:2],
        [3],
        tmp_path,
        baseline=ModelSpec(tiny_model_dir),
        progress=False,
        report=False,
    )
    assert all(e["win_rate"]["ties"] == e["win_rate"]["n_compared"] == 2 for e in s["rewards"].values())
    assert not (tmp_path / "index.html").exists()


def test_eval_cli_errors(tiny_model_dir, tmp_path, capsys):
    import argparse

    from rlfh.cli.eval import add_eval_commands
    from tests.conftest import REPO

    p = argparse.ArgumentParser(prog="rlfh")
    add_eval_commands(p.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = p.parse_args(list(argv))
        return args.fn(args)

    cfg = str(REPO / "configs" / "tiny.yaml")
    # overrides after options parse (plain argparse would reject them)
    args = p.parse_args(["eval", cfg, "--model", tiny_model_dir, "rollout.height=32", "--seeds", "2"])
    assert args.overrides == ["rollout.height=32"] and args.seeds == 2
    assert run("eval", cfg, "--model", tiny_model_dir, "--prompts", "faces", "--out", str(tmp_path)) == 2
    assert "'faces': unknown prompt set" in capsys.readouterr().err
    assert run("eval", cfg, "--model", tiny_model_dir, "--lora", str(tmp_path / "nope"), "--out", str(tmp_path)) == 2
    assert "no LoRA there" in capsys.readouterr().err
    assert run("eval", cfg, "--model", tiny_model_dir, "rollout.heigth=64", "--out", str(tmp_path)) == 2
    assert "did you mean rollout.height" in capsys.readouterr().err
    assert run("eval", cfg, "--model", tiny_model_dir, "--train-prompts", "-1", "--out", str(tmp_path)) == 2
    assert "--train-prompts -1" in capsys.readouterr().err
