"""`rlfh status RUN_DIR`: synthetic run directories (config, metrics, rollout log, checkpoints)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import pytest

from rlfh.cli.status import add_status_commands, format_status
from rlfh.config.schema import load_config, save_config
from rlfh.run.status import RunDirError, run_status, sparkline
from rollouts.log import RolloutLog, make_records
from tests.conftest import REPO
from tests.rollouts.test_log import fake_round

NUM_ROUNDS = 4
TIMES = {"sample": 3.0, "reward": 0.5, "log": 0.25, "learner": 1.0, "sync": 0.25}  # 5.0 s a round


def metrics_row(rnd: int, **extra) -> dict:
    return {
        "step": rnd,
        "round": rnd,
        "policy_version": rnd + 1,
        "reward/jpeg/mean": [-3.5, -3.2, -3.4][rnd % 3],
        "reward/facescore/mean": 1.0 + rnd,
        "reward/combined/mean": -2.0 + rnd,
        "loss/dpo": [0.7, 0.5, 0.6][rnd % 3],
        "dpo/implicit_acc": 0.5 + 0.25 * (rnd % 2),
        "dpo/face/implicit_acc": 1.0,
        "mpd/weight/global": 0.4,
        "mpd/weight/face": 0.6,
        **{f"time/{k}_s": v for k, v in TIMES.items()},
        "time/round_s": sum(TIMES.values()),
        **extra,
    }


def write_metrics(run, rows, tail: str = "") -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def add_checkpoint(run, rnd: int) -> None:
    """A checkpoint folder as the learner leaves it (engine state, trainer state, file manifest)."""
    path = run / "checkpoints" / f"round-{rnd:06d}"
    (path / "deepspeed").mkdir(parents=True)
    state = json.dumps({"round": rnd, "policy_version": rnd, "global_step": 3 * rnd}).encode()
    (path / "trainer_state.json").write_bytes(state)
    manifest = {"trainer_state.json": {"bytes": len(state), "sha256": hashlib.sha256(state).hexdigest()}}
    (path / "files.json").write_text(json.dumps(manifest))
    (run / "checkpoints" / "latest").write_text(path.name)


@pytest.fixture()
def run(tmp_path):
    """A run 3 rounds into 4: regions global+face under MPD, a checkpoint at round 2, 2 rollout shards."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"run_dir={run}",
            f"num_rounds={NUM_ROUNDS}",
            "learner.regions.names=[global, face]",
            "rewards=[{target: jpeg_compressibility, name: jpeg}, {target: facescore, weight: 0.5}]",
        ],
    )
    save_config(cfg, run / "config.yaml")
    write_metrics(run, [metrics_row(r, **({"time/checkpoint_s": 2.0} if r == 1 else {})) for r in range(3)])
    log = RolloutLog(run / "rollouts")
    for r in range(2):
        log.append(make_records(*fake_round(seed=r), round_index=r))
    add_checkpoint(run, 2)
    return run


def status_at(run, age_s: float, **kw) -> dict:
    return run_status(run, now=(run / "metrics.jsonl").stat().st_mtime + age_s, **kw)


def test_running_run_summary(run):
    st = status_at(run, 1.0)
    assert st["state"] == "running" and st["rounds_done"] == 3 and st["num_rounds"] == NUM_ROUNDS
    assert st["config"]["model"] == "rlfh:tiny-sdxl" and st["config"]["loss"] == "dpo"
    assert st["config"]["regions"] == ["global", "face"] and st["config"]["fairness"] == "mpd"
    assert [(r["name"], r["weight"]) for r in st["config"]["rewards"]] == [("jpeg", 1.0), ("facescore", 0.5)]
    assert st["last_round_s"] == 5.0
    # one round left at the mean cost of the last 5 rounds: (5 + 7 + 5) / 3 (round 1 saved a checkpoint)
    assert st["eta_s"] == pytest.approx(17.0 / 3)
    assert st["checkpoint"]["round"] == 2 and st["checkpoint"]["policy_version"] == 2
    assert st["checkpoint"]["name"] == "round-000002" and st["checkpoint"]["count"] == 1


def test_reward_curves_accuracy_and_mpd(run):
    st = status_at(run, 1.0)
    jpeg = st["rewards"]["jpeg"]
    assert (jpeg["first"], jpeg["last"], jpeg["best"], jpeg["best_round"]) == (-3.5, -3.4, -3.2, 1)
    assert jpeg["spark"] == "▁█▃"
    assert st["rewards"]["facescore"]["spark"] == "▁▅█"
    assert set(st["rewards"]) == {"jpeg", "facescore", "combined"}
    loss = st["losses"]["dpo"]
    assert (loss["best"], loss["best_round"]) == (0.5, 1)  # lower is better for a loss
    assert st["implicit_acc"]["global"] == {"last": 0.5, "mean_recent": pytest.approx(0.5 + 0.25 / 3)}
    assert st["implicit_acc"]["face"]["last"] == 1.0
    assert st["mpd_weights"] == {
        "face": {"last": 0.6, "mean_recent": pytest.approx(0.6)},
        "global": {"last": 0.4, "mean_recent": pytest.approx(0.4)},
    }


def test_timing_shares_over_last_rounds(run):
    tm = status_at(run, 1.0, last_n=2)["timing"]
    assert tm["rounds"] == 2 and tm["round_mean_s"] == 5.0
    assert {s: v["share"] for s, v in tm["stages"].items()} == pytest.approx(
        {"sample": 0.6, "reward": 0.1, "log": 0.05, "learner": 0.2, "sync": 0.05}
    )
    assert (tm["checkpoint_mean_s"], tm["checkpoints_timed"]) == (2.0, 1)


def test_rollout_log_counts(run):
    ro = status_at(run, 1.0)["rollouts"]
    assert (ro["records"], ro["shards"], ro["policy_versions"], ro["num_policy_versions"]) == (8, 2, [2, 2], 1)
    assert ro["rewards"]["jpeg"] == {"missing_rate": 0.0, "missing": 0, "count": 8, "top_reason": None}
    assert ro["rewards"]["facescore"] == {"missing_rate": 0.5, "missing": 4, "count": 8, "top_reason": "no face"}


def test_stopped_when_no_round_for_long(run):
    st = status_at(run, 3600.0)
    assert st["state"] == "stopped" and st["eta_s"] is None
    assert "resumes from round 2" in st["state_reason"] and str(run / "config.yaml") in st["state_reason"]
    # 3 x a 5 s round is under the 60 s floor: a minute of silence is still "running"
    assert status_at(run, 59.0)["state"] == "running" and status_at(run, 61.0)["state"] == "stopped"


def test_latest_pointer_to_incomplete_checkpoint(run):
    (run / "checkpoints" / "round-000003").mkdir()  # a crash mid-save: no trainer state
    (run / "checkpoints" / "latest").write_text("round-000003")
    st = status_at(run, 1.0)
    assert st["checkpoint"]["name"] == "round-000002"
    assert any("round-000003, which is not a complete checkpoint" in w for w in st["warnings"])


def test_finished_at_last_checkpoint(run):
    add_checkpoint(run, NUM_ROUNDS)  # saved just before the last round's metrics line
    st = status_at(run, 3600.0)
    assert st["state"] == "finished" and st["eta_s"] is None and st["checkpoint"]["round"] == NUM_ROUNDS
    assert st["checkpoint"]["count"] == 2


def test_starting_and_stale_start(run):
    (run / "metrics.jsonl").unlink()
    mtime = (run / "config.yaml").stat().st_mtime
    st = run_status(run, now=mtime + 30)
    assert st["state"] == "running" and st["rounds_done"] == 0 and "starting" in st["state_reason"]
    assert st["rewards"] == {} and st["timing"] is None
    assert run_status(run, now=mtime + 3600)["state"] == "stopped"


def test_resumed_run_counts_each_round_once(run):
    # crashed after logging round 2, resumed from the round-2 checkpoint: round 2 is logged again
    rows = [metrics_row(r) for r in range(3)] + [metrics_row(2, **{"reward/jpeg/mean": -3.0}), metrics_row(3)]
    write_metrics(run, rows)
    st = status_at(run, 1.0)
    assert st["rounds_done"] == 4 and st["state"] == "finished"
    assert st["rewards"]["jpeg"]["best"] == -3.0 and len(st["rewards"]["jpeg"]["spark"]) == 4


def test_torn_last_line_is_skipped_but_corruption_is_an_error(run):
    write_metrics(run, [metrics_row(r) for r in range(2)], tail='{"step": 2, "round": 2, "rew')
    st = status_at(run, 1.0)
    assert st["rounds_done"] == 2 and any("incomplete" in w for w in st["warnings"])
    write_metrics(run, [metrics_row(0)], tail="not json\n" + json.dumps(metrics_row(1)) + "\n")
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not a JSON object"):
        run_status(run)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        run_status(tmp_path / "nope")
    with pytest.raises(RunDirError, match="not an rlfh run directory: no config.yaml"):
        run_status(tmp_path)


def test_config_from_another_version_still_summarises(run):
    text = (run / "config.yaml").read_text().replace("    beta: 100.0\n", "    beta: 100.0\n    removed_option: 3\n")
    (run / "config.yaml").write_text(text)
    st = status_at(run, 1.0)
    assert st["config"]["loss"] == "dpo" and any("does not validate" in w for w in st["warnings"])


def test_config_of_the_layout_before_the_regroup_still_summarises(run):
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())
    data["learner"]["beta"] = data["learner"].pop("dpo")["beta"]  # keys as rlfh wrote them before MOVED_KEYS
    data["learner"]["lora"] = data["model"].pop("lora")
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    st = status_at(run, 1.0)
    assert st["config"]["beta"] == 100.0 and st["config"]["lora_rank"] == data["learner"]["lora"]["rank"]
    assert any("does not validate" in w for w in st["warnings"])


def test_sparkline():
    assert sparkline([]) == "" and sparkline([0.0, 1.0]) == "▁█" and sparkline([2.0, 2.0, 2.0]) == "▅▅▅"
    long = sparkline(list(range(100)), width=10)
    assert len(long) == 10 and long[0] == "▁" and long[-1] == "█" and list(long) == sorted(long)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlfh")
    add_status_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_json_and_text(run, capsys):
    os.utime(run / "metrics.jsonl")  # "now": the run is live
    assert cli(["status", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "running" and out["rounds_done"] == 3 and out["rollouts"]["records"] == 8
    assert out["rewards"]["jpeg"]["spark"] == "▁█▃" and out["timing"]["stages"]["sample"]["share"] == 0.6
    assert cli(["status", str(run)]) == 0
    text = capsys.readouterr().out
    assert format_status(run_status(run)).splitlines()[0] == text.splitlines()[0]
    for piece in (
        "state      running",
        "3/4 rounds",
        "ETA",
        "round-000002 (round 2, policy version 2",
        "facescore: 50.0% missing (mostly: no face)",
        "jpeg       -3.5 -> -3.4, best -3.2 @ 1  ▁█▃",
        "mpd weight face 0.6",
        "sample 60% | reward 10% | log 5% | learner 20% | sync 5%",
        "regions global, face (mpd)",
        "rewards jpeg x1, facescore x0.5",
    ):
        assert piece in text, f"{piece!r} not in:\n{text}"


def test_cli_errors(tmp_path, capsys):
    assert cli(["status", str(tmp_path)]) == 2
    assert "rlfh: error:" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("{}\n")
    assert cli(["status", str(tmp_path), "--last", "0"]) == 2
    assert "last_n=0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,line",
    [
        ([], "on 1 rollout actor(s); learner on CPU"),
        (
            ["resources.num_learner_ranks=2", "learner.micro_batch_size_per_gpu=1"],
            "learner on CPU, 2 data-parallel ranks",
        ),
        (
            [
                "resources.num_learner_gpus=4",
                "learner.train_batch_size=4",
                "learner.micro_batch_size_per_gpu=1",
                "rollout.prompts_per_round=4",
            ],
            "learner on 4 GPU(s), 4 data-parallel ranks",
        ),
        (["resources.colocate=true"], "on one colocated actor (rollout and learner share a device); learner on CPU"),
    ],
)
def test_status_names_the_learner_layout(run, overrides, line):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={run}", f"num_rounds={NUM_ROUNDS}", *overrides])
    save_config(cfg, run / "config.yaml")
    assert line in format_status(status_at(run, 1.0))
