"""`rlfh compare` and `rlfh plot` on metrics.jsonl files shaped like `rlfh train` writes them."""

from __future__ import annotations

import argparse
import json
import re

import pytest


def write_run(path, rewards, losses, acc=None):
    path.mkdir(parents=True)
    rows = []
    for i, (r, l) in enumerate(zip(rewards, losses)):
        row = {
            "step": i,
            "round": i,
            "reward/jpeg_compressibility/mean": r,
            "reward/jpeg_compressibility/std": 0.1,
            "loss/dpo": l,
            "time/round_s": 3.0,
        }
        if acc is not None:
            row["dpo/implicit_acc"] = acc[i]
        rows.append(row)
    rows[1]["loss/dpo"] = None  # a non-finite value is logged as null and skipped
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli():
    from rlfh.cli.eval import add_eval_commands

    p = argparse.ArgumentParser(prog="rlfh")
    add_eval_commands(p.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = p.parse_args([str(a) for a in argv])
        return args.fn(args)

    return run


def test_compare_two_runs(tmp_path):
    a = write_run(tmp_path / "a", [-3.0, -2.9, -2.7, -2.8], [0.69, 0.6, 0.5, 0.55], acc=[0.5, 0.6, 0.7, 0.65])
    b = write_run(tmp_path / "b", [-3.0, -3.1, -3.05, -3.2], [0.69, 0.7, 0.68, 0.66])
    out = tmp_path / "cmp"
    assert cli()("compare", a, b, "--out", out) == 0
    for key in ("reward_jpeg_compressibility_mean", "loss_dpo", "dpo_implicit_acc"):
        assert (out / "plots" / f"{key}.png").stat().st_size > 5000
    assert not (out / "plots" / "time_round_s.png").exists()  # only reward means, losses, implicit acc
    md = (out / "summary.md").read_text()
    # final and best side by side: reward best = max, loss best = min (the null at step 1 skipped)
    assert "| reward/jpeg_compressibility/mean | max | -2.8 | -2.7 | -3.2 | -3 |" in md
    assert "| loss/dpo | min | 0.55 | 0.5 | 0.66 | 0.66 |" in md
    assert "| dpo/implicit_acc | max | 0.65 | 0.7 | - | - |" in md
    html = (out / "index.html").read_text()
    assert all((out / s).is_file() for s in re.findall(r"src='([^']+)'", html))


def test_plot_one_run(tmp_path):
    run = write_run(tmp_path / "run", [-3.0, -2.9], [0.69, 0.6])
    assert cli()("plot", run) == 0
    assert (run / "curves" / "index.html").is_file() and (run / "curves" / "plots" / "loss_dpo.png").is_file()


def test_clear_errors(tmp_path, capsys):
    run = cli()
    assert run("plot", tmp_path / "nope") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run("plot", tmp_path / "empty") == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    assert run("compare", tmp_path / "empty", tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 0, "time/round_s": 1.0}\n')
    assert run("plot", tmp_path / "empty") == 2
    assert "no reward/*/mean" in capsys.readouterr().err


def test_curves_reads_real_rows():
    from rlfh.eval.curves import curves, is_curve

    assert is_curve("reward/facescore/mean") and is_curve("loss/dpo") and not is_curve("reward/facescore/std")
    c = curves([{"step": 0, "loss/dpo": 1.0}, {"step": 1, "loss/dpo": float("nan")}, {"step": 2, "loss/dpo": 0.5}])
    assert c == {"loss/dpo": ([0.0, 2.0], [1.0, 0.5])}
    with pytest.raises(FileNotFoundError):
        from rlfh.eval.curves import load_run

        load_run("/nonexistent/run")
