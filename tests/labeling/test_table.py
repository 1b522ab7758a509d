"""The labels table: checksummed lines, a torn last line, undo, and concurrent writers."""

import json
import multiprocessing as mp

import pytest

from rlfh.labeling.table import LabelsError, LabelsTable


def _label(table, labeler="ann", task="a+b", winner="a", loser="b"):
    return table.append(
        {
            "kind": "label",
            "labeler": labeler,
            "mode": "pairwise",
            "task": task,
            "records": ["a", "b"],
            "winner": winner,
            "loser": loser,
            "tie": False,
        }
    )


def test_labels_round_trip_and_undo(tmp_path):
    t = LabelsTable(tmp_path)
    first = _label(t, task="t1")
    _label(t, task="t2", winner="b", loser="a")
    t.append({"kind": "undo", "labeler": "ann", "target": t.last_undoable("ann")["id"]})
    labels = t.labels()
    assert [(lab.task, lab.winner, lab.loser) for lab in labels] == [("t1", "a", "b")]
    assert labels[0].id == first["id"] and labels[0].labeler == "ann" and labels[0].time.endswith("Z")
    # undo reaches back one more label each time, never another labeler's
    _label(t, labeler="bob", task="t1")
    assert t.last_undoable("ann")["id"] == first["id"]


def test_a_modified_line_is_named(tmp_path):
    t = LabelsTable(tmp_path)
    _label(t, task="t1")
    _label(t, task="t2")
    lines = t.path.read_text().splitlines()
    changed = json.loads(lines[1])
    changed["winner"] = "b"
    t.path.write_text(lines[0] + "\n" + json.dumps(changed) + "\n")
    with pytest.raises(LabelsError, match="line 2: the checksum"):
        t.labels()
    t.path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(LabelsError, match="line 2: not JSON"):
        t.labels()


def test_a_torn_last_line_is_skipped_then_cut(tmp_path):
    t = LabelsTable(tmp_path)
    _label(t, task="t1")
    whole = t.path.read_bytes()
    t.path.write_bytes(whole + whole[:40])  # a writer killed mid-line
    with pytest.warns(UserWarning, match="torn last line"):
        assert [lab.task for lab in t.labels()] == ["t1"]
    _label(t, task="t2")  # the next writer cuts the torn tail off before appending
    assert [lab.task for lab in t.labels()] == ["t1", "t2"]
    assert t.path.read_bytes().count(b"\n") == 2


def test_unknown_kind_and_bad_labeler_are_refused(tmp_path):
    t = LabelsTable(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        t.append({"kind": "delete", "labeler": "ann"})
    with pytest.raises(ValueError, match="labeler"):
        _label(t, labeler="../etc")
    assert not t.path.exists() or t.path.read_bytes() == b""


def _writer(directory, name, n):
    t = LabelsTable(directory)
    for i in range(n):
        _label(t, labeler=name, task=f"{name}-{i}", winner="a" * 2000, loser="b")  # long lines: interleaving shows


def test_concurrent_writers_never_interleave(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, f"w{k}", 40)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    labels = LabelsTable(tmp_path).labels()  # every line verifies
    assert len(labels) == 160
    for k in range(4):
        assert [lab.task for lab in labels if lab.labeler == f"w{k}"] == [f"w{k}-{i}" for i in range(40)]
