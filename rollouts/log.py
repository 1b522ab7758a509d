"""The rollout log: every sample the engine made, as Parquet shards with a checksummed manifest.

Layout::

    DIR/manifest.json             {"format": "rlfh-rollouts", "version": 1, "shards": [...]}
    DIR/shard-000000.parquet      one shard per append (a round's samples)

Each shard is written to a temporary name, flushed, fsynced and renamed; then the manifest is
rewritten the same way. A reader only accepts shards listed in the manifest whose size and sha256
match, so a killed writer can leave at most an unlisted file, never a half-written shard that is
read. Any Parquet reader (pyarrow, pandas, DuckDB) reads the shards directly.

Record schema (one row per image): see :data:`SCHEMA`. ``rewards`` holds every configured reward,
with ``value`` null and a ``reason`` when it could not be computed; ``regions`` holds every
detection (region name, box in image pixels, confidence, label).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rollouts.fileio import atomic_write_bytes, sha256_file

FORMAT = "rlfh-rollouts"
VERSION = 1

SCHEMA = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("round", pa.int64()),
        ("policy_version", pa.int64()),
        ("staleness", pa.int64()),  # learner's policy version when logged - policy_version (null: not online)
        ("model_id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        (
            "sampler",
            pa.struct(
                [
                    ("num_inference_steps", pa.int64()),
                    ("guidance_scale", pa.float64()),
                    ("height", pa.int64()),
                    ("width", pa.int64()),
                    ("eta", pa.float64()),
                ]
            ),
        ),
        ("latent", pa.binary()),  # float32, C order
        ("latent_shape", pa.list_(pa.int32())),  # (4, h, w)
        ("image", pa.binary()),  # PNG
        ("rewards", pa.list_(pa.struct([("name", pa.string()), ("value", pa.float64()), ("reason", pa.string())]))),
        (
            "regions",
            pa.list_(
                pa.struct(
                    [
                        ("region", pa.string()),
                        ("x1", pa.float64()),
                        ("y1", pa.float64()),
                        ("x2", pa.float64()),
                        ("y2", pa.float64()),
                        ("confidence", pa.float64()),
                        ("label", pa.string()),
                    ]
                )
            ),
        ),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


class RolloutLogError(RuntimeError):
    """The rollout log is missing, corrupted or not an rlfh rollout log."""


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_latent(record: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(record["latent"], dtype=np.float32).reshape(record["latent_shape"])


def make_records(batch, scored, round_index: int, staleness: int | None = None) -> list[dict[str, Any]]:
    """Rows for a :class:`rollouts.types.RolloutBatch` and its :class:`rewards.composite.ScoredBatch`;
    ``staleness``: how many policy versions the learner is ahead of the samples' policy."""
    now = time.time()
    rows = []
    s = batch.settings
    for i in range(len(batch)):
        regions = scored.regions(i) if scored is not None else {}
        rows.append(
            {
                "rollout_id": batch.rollout_ids[i],
                "round": round_index,
                "policy_version": batch.policy_version,
                "staleness": staleness,
                "model_id": batch.model_id,
                "prompt": batch.prompts[i],
                "negative_prompt": s.negative_prompt,
                "seed": batch.seeds[i],
                "sampler": {
                    "num_inference_steps": s.num_inference_steps,
                    "guidance_scale": s.guidance_scale,
                    "height": s.height,
                    "width": s.width,
                    "eta": s.eta,
                },
                "latent": np.ascontiguousarray(batch.latents[i], dtype=np.float32).tobytes(),
                "latent_shape": list(batch.latents[i].shape),
                "image": png_bytes(batch.images[i]),
                "rewards": [
                    {"name": name, "value": res[i].value, "reason": res[i].reason}
                    for name, res in (scored.results.items() if scored is not None else [])
                ],
                "regions": [
                    {"region": r, "x1": d.box[0], "y1": d.box[1], "x2": d.box[2], "y2": d.box[3],
                     "confidence": d.confidence, "label": d.label}
                    for r, dets in regions.items()
                    for d in dets
                ],
                "created_at": now,
            }
        )
    return rows


class RolloutLog:
    """Append-only writer and verifying reader of one rollout log directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            if self.dir.is_dir() and any(self.dir.glob("shard-*.parquet")):
                raise RolloutLogError(f"{self.dir}: shards but no manifest.json; this log was not written by rlfh")
            return {"format": FORMAT, "version": VERSION, "shards": []}
        try:
            m = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise RolloutLogError(f"{self.manifest_path}: not valid JSON ({e})") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise RolloutLogError(
                f"{self.manifest_path}: format {m.get('format')!r} v{m.get('version')!r}, expected {FORMAT!r} v{VERSION}"
            )
        return m

    def append(self, records: list[dict[str, Any]]) -> str:
        """Write records as one new shard and list it in the manifest; returns the shard name."""
        if not records:
            raise ValueError("no records to append")
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest()
        name = f"shard-{len(manifest['shards']):06d}.parquet"
        table = pa.Table.from_pylist(records, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        atomic_write_bytes(self.dir / name, data)
        rounds = [r["round"] for r in records]
        manifest["shards"].append(
            {
                "name": name,
                "num_records": table.num_rows,
                "rounds": [min(rounds), max(rounds)],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "created_at": time.time(),
            }
        )
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1).encode())
        return name

    def rollback(self, from_round: int) -> int:
        """Unlist the shards of rounds >= ``from_round`` (a resumed run redoes those rounds).

        Their files move to ``DIR/rolled_back/`` (nothing is deleted) and the manifest is rewritten
        atomically, so the log never holds the same round twice. Returns the number of records unlisted.
        """
        manifest = self.manifest()
        keep, drop = [], []
        for entry in manifest["shards"]:
            lo, hi = entry.get("rounds", [None, None])
            if lo is None:
                raise RolloutLogError(f"{self.dir}: shard {entry['name']} records no rounds; cannot roll back")
            if lo >= from_round:
                drop.append(entry)
            elif hi >= from_round:
                raise RolloutLogError(f"{self.dir}: shard {entry['name']} spans rounds {lo}-{hi} across {from_round}")
            else:
                keep.append(entry)
        if not drop:
            return 0
        target = self.dir / "rolled_back" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.manifest_path, json.dumps({**manifest, "shards": keep}, indent=1).encode())
        for entry in drop:
            src = self.dir / entry["name"]
            if src.exists():
                os.replace(src, target / entry["name"])
        (target / "manifest.json").write_text(json.dumps({**manifest, "shards": drop}, indent=1))
        return sum(e["num_records"] for e in drop)

    def verified_shards(self) -> Iterator[tuple[dict[str, Any], Path]]:
        """Yield (manifest entry, path) of each shard after checking its size and sha256."""
        if not self.dir.is_dir():
            raise RolloutLogError(f"{self.dir}: no such rollout log directory")
        manifest = self.manifest()
        listed = {s["name"] for s in manifest["shards"]}
        stray = sorted(p.name for p in self.dir.glob("shard-*.parquet") if p.name not in listed)
        if stray:
            warnings.warn(f"{self.dir}: ignoring shards not in the manifest (from an interrupted write): {stray}")
        for entry in manifest["shards"]:
            path = self.dir / entry["name"]
            if not path.is_file():
                raise RolloutLogError(f"{path}: listed in the manifest but missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise RolloutLogError(
                    f"{path}: {size} bytes but the manifest records {entry['bytes']}; the shard is truncated or was "
                    f"modified after it was written. Restore it or remove its entry from manifest.json"
                )
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise RolloutLogError(
                    f"{path}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...; the shard "
                    f"is corrupted. Restore it or remove its entry from manifest.json"
                )
            yield entry, path

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All verified shards as one Arrow table (schema :data:`SCHEMA`)."""
        tables = []
        want = list(columns) if columns is not None else SCHEMA.names
        for entry, path in self.verified_shards():
            try:
                have = set(pq.read_schema(path).names)
                t = pq.read_table(path, columns=[c for c in want if c in have])
            except Exception as e:  # pyarrow raises several types for bad files
                raise RolloutLogError(f"{path}: not a readable Parquet file: {e}") from e
            for c in want:  # a column added to the format later (``staleness``): null in older shards
                if c not in have and c in SCHEMA.names:
                    t = t.append_column(SCHEMA.field(c), pa.nulls(t.num_rows, SCHEMA.field(c).type))
            t = t.select([c for c in want if c in t.column_names])
            if t.num_rows != entry["num_records"]:
                raise RolloutLogError(f"{path}: {t.num_rows} records, manifest says {entry['num_records']}")
            tables.append(t)
        if not tables:
            raise RolloutLogError(f"{self.dir}: the rollout log holds no shards")
        return pa.concat_tables(tables)

    def records(self, columns: list[str] | None = None) -> list[dict[str, Any]]:
        return self.read_table(columns).to_pylist()

    def summary(self) -> dict[str, Any]:
        """Counts and per-reward statistics, as ``rlfh rollouts inspect`` prints them."""
        t = self.read_table(["rollout_id", "policy_version", "prompt", "rewards", "regions", "latent_shape", "sampler"])
        rows = t.to_pylist()
        rewards: dict[str, dict[str, Any]] = {}
        for r in rows:
            for rw in r["rewards"]:
                d = rewards.setdefault(rw["name"], {"values": [], "missing": 0, "reasons": {}})
                if rw["value"] is None:
                    d["missing"] += 1
                    d["reasons"][rw["reason"]] = d["reasons"].get(rw["reason"], 0) + 1
                else:
                    d["values"].append(rw["value"])
        versions = [r["policy_version"] for r in rows]
        region_counts: dict[str, int] = {}
        for r in rows:
            for reg in r["regions"]:
                region_counts[reg["region"]] = region_counts.get(reg["region"], 0) + 1
        return {
            "dir": str(self.dir),
            "shards": len(self.manifest()["shards"]),
            "records": len(rows),
            "unique_rollout_ids": len({r["rollout_id"] for r in rows}),
            "prompts": len({r["prompt"] for r in rows}),
            "policy_versions": [min(versions), max(versions)],
            "latent_shape": rows[0]["latent_shape"],
            "sampler": rows[0]["sampler"],
            "detections": region_counts,
            "rewards": {
                n: {
                    "mean": float(np.mean(d["values"])) if d["values"] else None,
                    "std": float(np.std(d["values"])) if d["values"] else None,
                    "count": len(d["values"]),
                    "missing": d["missing"],
                    "missing_reasons": d["reasons"],
                }
                for n, d in rewards.items()
            },
        }
