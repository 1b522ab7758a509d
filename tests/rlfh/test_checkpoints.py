import json

import pytest

from rlfh.run.checkpoints import latest_checkpoint, mark_latest, verify, write_file_manifest
from rlfh.run.metrics import read_metrics, rollback_metrics


def fake_checkpoint(root, name, payload=b"weights"):
    d = root / "checkpoints" / name
    (d / "deepspeed").mkdir(parents=True)
    (d / "deepspeed" / "state.pt").write_bytes(payload)
    (d / "trainer_state.json").write_text(json.dumps({"round": int(name.split("-")[1])}))
    write_file_manifest(d)
    return d


def test_latest_is_used_when_intact(tmp_path):
    fake_checkpoint(tmp_path, "round-000002")
    c4 = fake_checkpoint(tmp_path, "round-000004")
    mark_latest(tmp_path, c4)
    assert latest_checkpoint(tmp_path) == c4 and verify(c4) is None


def test_torn_checkpoint_falls_back_with_warning(tmp_path):
    c2 = fake_checkpoint(tmp_path, "round-000002")
    c4 = fake_checkpoint(tmp_path, "round-000004", payload=b"x" * 1000)
    mark_latest(tmp_path, c4)
    (c4 / "deepspeed" / "state.pt").write_bytes(b"x" * 500)  # torn: truncated after it was written
    with pytest.warns(UserWarning, match="skipping checkpoint round-000004: .*500 bytes"):
        assert latest_checkpoint(tmp_path) == c2
    (c2 / "deepspeed" / "state.pt").write_bytes(b"weightz")  # same size, different bytes
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        assert latest_checkpoint(tmp_path) is None


def test_incomplete_checkpoint_is_skipped(tmp_path):
    c2 = fake_checkpoint(tmp_path, "round-000002")
    (tmp_path / "checkpoints" / "round-000004").mkdir()
    with pytest.warns(UserWarning, match="incomplete"):
        assert latest_checkpoint(tmp_path) == c2
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_metrics_rollback(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": r, "round": r}) + "\n" for r in range(5)))
    assert rollback_metrics(tmp_path, 3) == 2
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert len((tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()) == 2
