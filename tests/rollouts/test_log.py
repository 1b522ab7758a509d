import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from rewards.base import Detection, RewardResult
from rewards.composite import ScoredBatch
from rollouts.log import RolloutLog, RolloutLogError, decode_latent, decode_png, make_records
from rollouts.types import RolloutBatch, SamplerSettings


def fake_round(n=4, seed=0):
    rng = np.random.default_rng(seed)
    batch = RolloutBatch(
        images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
        latents=rng.standard_normal((n, 4, 2, 2)).astype(np.float32),
        prompts=[f"prompt {i % 2}" for i in range(n)],
        seeds=list(range(n)),
        settings=SamplerSettings(10, 5.0, "blurry", 16, 16),
        policy_version=2,
        model_id="tiny",
        rollout_ids=[f"r{seed}-{i}" for i in range(n)],
    )
    face = [Detection((1.0, 2.0, 5.0, 6.0), 0.97)]
    scored = ScoredBatch(
        results={
            "jpeg": [RewardResult(float(-i)) for i in range(n)],
            "facescore": [
                RewardResult(1.5, regions={"face": face}) if i % 2 == 0 else RewardResult.missing("no face")
                for i in range(n)
            ],
        },
        weights={"jpeg": 1.0, "facescore": 1.0},
        regions_of={"jpeg": "global", "facescore": "face"},
    )
    return batch, scored


def test_round_trip(tmp_path):
    log = RolloutLog(tmp_path / "rollouts")
    batch, scored = fake_round()
    log.append(make_records(batch, scored, round_index=0))
    log.append(make_records(*fake_round(seed=1), round_index=1))
    recs = log.records()
    assert len(recs) == 8 and len({r["rollout_id"] for r in recs}) == 8
    r0 = recs[0]
    np.testing.assert_array_equal(decode_png(r0["image"]), batch.images[0])
    np.testing.assert_array_equal(decode_latent(r0), batch.latents[0])
    assert r0["prompt"] == "prompt 0" and r0["seed"] == 0 and r0["policy_version"] == 2 and r0["model_id"] == "tiny"
    assert r0["sampler"] == {"num_inference_steps": 10, "guidance_scale": 5.0, "height": 16, "width": 16, "eta": 0.0}
    assert {x["name"]: x["value"] for x in r0["rewards"]} == {"jpeg": 0.0, "facescore": 1.5}
    miss = {x["name"]: x for x in recs[1]["rewards"]}["facescore"]
    assert miss["value"] is None and miss["reason"] == "no face"
    assert r0["regions"] == [
        {"region": "face", "x1": 1.0, "y1": 2.0, "x2": 5.0, "y2": 6.0, "confidence": 0.97, "label": None}
    ]
    assert recs[1]["regions"] == []


def test_shards_are_plain_parquet(tmp_path):
    log = RolloutLog(tmp_path)
    log.append(make_records(*fake_round(), round_index=0))
    table = pq.read_table(tmp_path / "shard-000000.parquet")  # any Parquet reader, no rlfh code
    assert table.num_rows == 4 and "rewards" in table.column_names
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"][0]["num_records"] == 4 and len(manifest["shards"][0]["sha256"]) == 64


def test_truncated_shard_rejected(tmp_path):
    log = RolloutLog(tmp_path)
    log.append(make_records(*fake_round(), round_index=0))
    shard = tmp_path / "shard-000000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(RolloutLogError, match="truncated"):
        log.records()


def test_bad_checksum_rejected(tmp_path):
    log = RolloutLog(tmp_path)
    log.append(make_records(*fake_round(), round_index=0))
    shard = tmp_path / "shard-000000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(RolloutLogError, match="sha256 .* does not match"):
        log.records()


def test_missing_shard_and_bad_manifest(tmp_path):
    log = RolloutLog(tmp_path)
    log.append(make_records(*fake_round(), round_index=0))
    (tmp_path / "shard-000000.parquet").unlink()
    with pytest.raises(RolloutLogError, match="missing"):
        log.records()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RolloutLogError, match="not valid JSON"):
        log.records()


def test_interrupted_write_leaves_no_accepted_shard(tmp_path):
    """A writer killed after the shard rename but before the manifest update leaves a stray file."""
    log = RolloutLog(tmp_path)
    log.append(make_records(*fake_round(), round_index=0))
    (tmp_path / "shard-000001.parquet").write_bytes(b"PAR1 half written")
    (tmp_path / ".shard-000002.parquet.tmp123").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="ignoring shards not in the manifest"):
        assert len(log.records()) == 4


def test_killed_writer_process(tmp_path):
    """SIGKILL in the middle of appends: whatever is listed reads back whole."""
    code = f"""
import numpy as np, sys
from tests.rollouts.test_log import fake_round
from rollouts.log import RolloutLog, make_records
log = RolloutLog({str(tmp_path / 'log')!r})
i = 0
while True:
    log.append(make_records(*fake_round(n=32, seed=i), round_index=i)); i += 1
"""
    p = subprocess.Popen([sys.executable, "-c", code])
    import time

    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "log" / "manifest.json").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    p.kill()
    p.wait()
    log = RolloutLog(tmp_path / "log")
    recs = log.records()  # stray files of the killed append are ignored with a warning
    n_shards = len(log.manifest()["shards"])
    assert n_shards >= 1 and len(recs) == 32 * n_shards


def test_empty_log_is_an_error(tmp_path):
    with pytest.raises(RolloutLogError, match="no such rollout log"):
        RolloutLog(tmp_path / "nope").records()


def test_inspect_cli(tmp_path):
    log = RolloutLog(tmp_path)
    log.append(make_records(*fake_round(), round_index=0))
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "rollouts", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    s = json.loads(r.stdout)
    assert s["records"] == 4 and s["rewards"]["facescore"]["missing"] == 2
    assert s["rewards"]["facescore"]["missing_reasons"] == {"no face": 2}
    assert s["rewards"]["jpeg"]["mean"] == pytest.approx(-1.5)
    (tmp_path / "shard-000000.parquet").write_bytes(b"x")
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "rollouts", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "truncated" in r.stderr


def test_rollback_unlists_later_rounds_and_keeps_files(tmp_path):
    log = RolloutLog(tmp_path)
    for r in range(3):
        log.append(make_records(*fake_round(seed=r), round_index=r))
    assert log.rollback(1) == 8
    recs = log.records(["round"])
    assert sorted({r["round"] for r in recs}) == [0] and len(recs) == 4
    moved = list((tmp_path / "rolled_back").glob("*/shard-*.parquet"))
    assert len(moved) == 2  # nothing deleted
    log.append(make_records(*fake_round(seed=9), round_index=1))  # the resumed round writes anew
    assert sorted(r["round"] for r in log.records(["round"])) == [0] * 4 + [1] * 4
    assert log.rollback(5) == 0


def test_staleness_per_sample_and_logs_from_before_the_column(tmp_path, monkeypatch):
    import pyarrow as pa

    import rollouts.log as log_module

    log = RolloutLog(tmp_path / "rollouts")
    old_schema = pa.schema([f for f in log_module.SCHEMA if f.name != "staleness"])
    monkeypatch.setattr(log_module, "SCHEMA", old_schema)  # a shard written before the column existed
    old_rows = [{k: v for k, v in r.items() if k != "staleness"} for r in make_records(*fake_round(), round_index=0)]
    log.append(old_rows)
    monkeypatch.undo()
    log.append(make_records(*fake_round(seed=1), round_index=1, staleness=1))
    recs = log.records(["round", "staleness"])
    assert [r["staleness"] for r in recs] == [None] * 4 + [1] * 4
    assert log.read_table().column_names == log_module.SCHEMA.names  # all columns, in the format's order
