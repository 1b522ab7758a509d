"""The labels table: people's choices on a rollout log, append-only and checksummed, beside the log.

    ROLLOUT_DIR/labels.jsonl      one JSON object a line

Each line is an event with its own ``sha256`` (of the line's other fields, as canonical JSON: sorted
keys, no spaces), so a line changed after it was written is found and named. Events:

* ``label``: ``labeler``, ``time`` (UTC, ISO 8601), ``mode``, ``task`` (the task key,
  :mod:`rlfh.labeling.tasks`), ``records`` (the rollout ids shown, in the order shown), and the choice:
  ``winner`` / ``loser`` (rollout ids; best and worst in best-worst mode) or ``tie: true``;
* ``skip``: the labeler passed on ``task``; it is shown again only after every other task;
* ``undo``: ``target`` names the ``id`` of an earlier label or skip of the same labeler, which no
  longer counts. Nothing is ever rewritten: undoing is one more line.

Writes: each event is one ``write`` of one line under an exclusive ``fcntl`` lock on the file, then
flushed and fsynced before the call returns, so two servers (two labelers) on the same log never
interleave lines. A process killed mid-write leaves at most a torn last line without its newline;
readers skip it (with a warning) and the next writer cuts it off under the lock before appending, so
a crash loses at most the event being written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

TABLE_NAME = "labels.jsonl"
KINDS = ("label", "skip", "undo")
MODES = ("best-worst", "pairwise", "win-tie-lose")
LABELER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class LabelsError(RuntimeError):
    """The labels table is damaged (a complete line that is not JSON or fails its checksum)."""


def check_labeler(name: str) -> str:
    if not isinstance(name, str) or not LABELER_RE.match(name):
        raise ValueError(f"labeler {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
    return name


def line_digest(event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Label:
    """One choice that counts (not undone): ``winner``/``loser`` rollout ids, or a tie (both None)."""

    id: str
    labeler: str
    time: str
    mode: str
    task: str
    records: tuple[str, ...]
    winner: str | None
    loser: str | None

    @property
    def tie(self) -> bool:
        return self.winner is None


class LabelsTable:
    """Appends to and reads the labels table of one rollout log directory."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        self.path = self.dir / TABLE_NAME

    # ---- writing -------------------------------------------------------------------------

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Add ``event`` (kind and its fields) with a fresh ``id``, the time and its checksum; returns it."""
        if event.get("kind") not in KINDS:
            raise ValueError(f"event kind {event.get('kind')!r}: must be one of {KINDS}")
        check_labeler(event.get("labeler", ""))
        event = {
            **event,
            "id": uuid.uuid4().hex,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if "time" not in event else event["time"],
        }
        event["sha256"] = line_digest(event)
        line = (json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._cut_torn_tail(fd)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, line)  # one write of one line: a reader sees all of it or a torn tail
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        return event

    @staticmethod
    def _cut_torn_tail(fd: int) -> None:
        """Truncate a last line without its newline (a writer killed mid-line); it never counted."""
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            return
        if os.pread(fd, 1, size - 1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        tail = os.pread(fd, size - start, start)
        cut = tail.rfind(b"\n")
        os.ftruncate(fd, start + cut + 1 if cut >= 0 else 0)

    # ---- reading -------------------------------------------------------------------------

    def events(self) -> Iterator[dict[str, Any]]:
        """Every verified event, in order. A torn last line is skipped with a warning.

        Raises:
            LabelsError: a complete line is not JSON, or its checksum does not match (naming the line).
        """
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        if torn:
            warnings.warn(f"{self.path}: ignoring a torn last line ({len(torn)} bytes, a write cut short)")
        for n, raw in enumerate(lines, 1):
            try:
                event = json.loads(raw)
            except json.JSONDecodeError as e:
                raise LabelsError(f"{self.path} line {n}: not JSON ({e}); the table was damaged") from None
            if not isinstance(event, dict) or event.get("sha256") != line_digest(event):
                raise LabelsError(
                    f"{self.path} line {n}: the checksum does not match the line; it was modified after it was "
                    f"written. Restore the file or delete that line"
                )
            yield event

    def active(self) -> list[dict[str, Any]]:
        """The label and skip events that no undo cancels, in order."""
        events = list(self.events())
        undone = {e["target"] for e in events if e["kind"] == "undo"}
        return [e for e in events if e["kind"] != "undo" and e["id"] not in undone]

    def labels(self) -> list[Label]:
        """Every label that counts, of every labeler."""
        return [
            Label(
                e["id"],
                e["labeler"],
                e["time"],
                e["mode"],
                e["task"],
                tuple(e["records"]),
                e.get("winner"),
                e.get("loser"),
            )
            for e in self.active()
            if e["kind"] == "label"
        ]

    def last_undoable(self, labeler: str) -> dict[str, Any] | None:
        """The labeler's latest label or skip that still counts (what undo takes back)."""
        mine = [e for e in self.active() if e["labeler"] == labeler]
        return mine[-1] if mine else None
