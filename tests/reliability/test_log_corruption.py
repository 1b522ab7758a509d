"""Damaged rollout logs, metrics files and checkpoints: each is named in a clear error (or, where a
crash makes exactly that damage, repaired with a warning naming the file), never a bare traceback
from deep inside training or a silent restart."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlfh.run.checkpoints import latest_checkpoint, mark_latest
from rlfh.run.metrics import MetricsFileError, MetricsLogger, read_metrics, rollback_metrics
from rollouts.fileio import sha256_file
from rollouts.log import RolloutLog, RolloutLogError, decode_latent, make_records
from tests.conftest import REPO
from tests.rlfh.test_checkpoints import fake_checkpoint
from tests.rollouts.test_log import fake_round


def _rewrite_shard(log: RolloutLog, name: str, table: pa.Table) -> None:
    """Replace a shard's content and fix its manifest entry, as a buggy or foreign writer would."""
    path = log.dir / name
    pq.write_table(table, path)
    manifest = log.manifest()
    for e in manifest["shards"]:
        if e["name"] == name:
            e.update(bytes=path.stat().st_size, sha256=sha256_file(path), num_records=table.num_rows)
    log.manifest_path.write_text(json.dumps(manifest))


def _log_with_rounds(tmp_path, n=2) -> RolloutLog:
    log = RolloutLog(tmp_path / "rollouts")
    for r in range(n):
        log.append(make_records(*fake_round(seed=r), round_index=r))
    return log


def test_shard_without_latent_column_names_shard_and_column(tmp_path):
    log = _log_with_rounds(tmp_path)
    t = pq.read_table(log.dir / "shard-000001.parquet")
    _rewrite_shard(log, "shard-000001.parquet", t.drop_columns(["latent"]))
    with pytest.raises(RolloutLogError, match=r"shard-000001\.parquet: the shard has no column\(s\) \['latent'\]"):
        log.records(["round", "latent", "latent_shape"])
    assert len(log.records(["round", "prompt"])) == 8  # the columns it has still read


def test_wrong_latent_shape_names_shard_row_and_rollout(tmp_path):
    log = _log_with_rounds(tmp_path)
    t = pq.read_table(log.dir / "shard-000001.parquet")
    shapes = t.column("latent_shape").to_pylist()
    shapes[2] = [4, 3, 3]
    t = t.set_column(t.column_names.index("latent_shape"), "latent_shape", pa.array(shapes, pa.list_(pa.int32())))
    _rewrite_shard(log, "shard-000001.parquet", t)
    with pytest.raises(
        RolloutLogError,
        match=r"shard-000001\.parquet row 2 \(rollout r1-2\): latent holds 64 bytes "
        r"but latent_shape \[4, 3, 3\] needs 144",
    ):
        log.records(["latent", "latent_shape"])
    # a record decoded on its own says which rollout it is
    with pytest.raises(RolloutLogError, match="rollout x: latent holds 64 bytes"):
        decode_latent({"rollout_id": "x", "latent": b"\0" * 64, "latent_shape": [4, 3, 3]})


def test_shard_listed_twice_is_refused(tmp_path):
    log = _log_with_rounds(tmp_path)
    manifest = log.manifest()
    manifest["shards"].append(dict(manifest["shards"][0]))
    log.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RolloutLogError, match="shard shard-000000.parquet repeats shard-000000.parquet .same name."):
        log.records(["rollout_id"])


def test_copied_shard_under_another_name_is_refused(tmp_path):
    log = _log_with_rounds(tmp_path)
    manifest = log.manifest()
    (log.dir / "shard-000002.parquet").write_bytes((log.dir / "shard-000000.parquet").read_bytes())
    manifest["shards"].append(dict(manifest["shards"][0], name="shard-000002.parquet"))
    log.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RolloutLogError, match="repeats shard-000000.parquet .same sha256."):
        log.records(["round"])


def test_two_shards_with_the_same_rows_are_refused(tmp_path):
    log = _log_with_rounds(tmp_path)
    # the same samples written again (different bytes: another timestamp), e.g. a replayed append
    log.append(make_records(*fake_round(seed=0), round_index=2))
    with pytest.raises(
        RolloutLogError,
        match=r"shard-000002\.parquet row 0: rollout id 'r0-0' is already in "
        r"shard-000000\.parquet",
    ):
        log.records(["round"])  # found even when rollout_id is not asked for
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "rollouts", "inspect", str(log.dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "already in shard-000000.parquet" in r.stderr and "Traceback" not in r.stderr


def test_non_finite_rewards_count_as_missing_in_inspect(tmp_path):
    # RewardResult refuses NaN today; logs written before that (or by other tools) still hold it
    records = make_records(*fake_round(), round_index=0)
    for row, value in ((1, math.nan), (3, math.inf)):
        (jpeg,) = [rw for rw in records[row]["rewards"] if rw["name"] == "jpeg"]
        jpeg["value"] = value
    log = RolloutLog(tmp_path)
    log.append(records)
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "rollouts", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    jpeg = json.loads(r.stdout)["rewards"]["jpeg"]  # strict JSON: a NaN mean would not parse
    assert jpeg["count"] == 2 and jpeg["mean"] == pytest.approx(-1.0)  # values 0 and -2
    assert jpeg["missing"] == 2 and jpeg["non_finite"] == 2
    assert jpeg["missing_reasons"] == {"non-finite value": 2}
    face = json.loads(r.stdout)["rewards"]["facescore"]
    assert face["non_finite"] == 0 and face["missing_reasons"] == {"no face": 2}


def _metrics(tmp_path, rounds=3, tail=""):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": r, "round": r, "loss/dpo": 0.5}) + "\n" for r in range(rounds)) + tail)
    return path


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = _metrics(tmp_path, tail='{"step": 3, "round": 3, "loss/d')
    with pytest.warns(UserWarning, match=f"{path}: dropping the torn last line"):
        assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    # resume: the rollback keeps rounds < 2 and removes the torn text, so new rows start on a fresh line
    with pytest.warns(UserWarning, match="torn last line"):
        assert rollback_metrics(tmp_path, 2) == 1
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2


def test_torn_line_is_removed_before_appending_even_without_rollback(tmp_path):
    from types import SimpleNamespace

    _metrics(tmp_path, tail='{"step": 3, "ro')
    cfg = SimpleNamespace(logging=SimpleNamespace(wandb=False, wandb_mode="disabled"))
    with pytest.warns(UserWarning, match="torn last line"):
        logger = MetricsLogger(tmp_path, cfg)
    logger.log({"round": 3, "loss/dpo": 0.25}, step=3)
    logger.close()
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = _metrics(tmp_path)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsFileError, match=rf"{path}:2: not a JSON object"):
        read_metrics(tmp_path)
    with pytest.raises(MetricsFileError, match=rf"{path}:2:"):
        rollback_metrics(tmp_path, 0)


def test_every_checkpoint_corrupt_is_said_loudly(tmp_path):
    c2 = fake_checkpoint(tmp_path, "round-000002")
    c4 = fake_checkpoint(tmp_path, "round-000004")
    mark_latest(tmp_path, c4)
    (c4 / "deepspeed" / "state.pt").write_bytes(b"weightz")
    (c2 / "trainer_state.json").unlink()
    with pytest.warns(Warning) as record:  # the per-checkpoint skips come first, then the loud one
        assert latest_checkpoint(tmp_path) is None
    (loud,) = [str(w.message) for w in record if w.category is RuntimeWarning]
    assert loud.startswith(f"NO INTACT CHECKPOINT in {tmp_path / 'checkpoints'}")
    assert "round-000004 (" in loud and "sha256 mismatch" in loud
    assert "round-000002 (" in loud and "incomplete" in loud
    assert "starts again from round 0" in loud
