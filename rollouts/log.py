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

Images (``logging.log_images``): PNG (default), JPEG at quality 95 (about a fifth of the PNG's
bytes), or none; the latent, which is what offline DPO reads, is always kept. With
``logging.keep_image_rounds: N`` the images of records older than the last N rounds are dropped
from their shards (each such shard rewritten once under a new name, then listed in the manifest in
place of the old one); their latents, rewards and regions stay.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
        # null for a sample; for an image of a region pair made by inpainting (rlfh/data/region_pairs.py):
        # role "inpainted" (source_id: the original's rollout_id) or "original" (an image that trains only
        # in its region pairs), the region, the noise strength and the mask's dilation in pixels
        (
            "region_pair",
            pa.struct(
                [
                    ("role", pa.string()),
                    ("source_id", pa.string()),
                    ("region", pa.string()),
                    ("strength", pa.float64()),
                    ("dilate", pa.int64()),
                ]
            ),
        ),
    ]
)


# Columns added to the format after logs were written: older shards lack them and read as null.
# Any other missing column is a damaged or foreign shard.
LATER_COLUMNS = frozenset({"staleness", "region_pair"})
NON_FINITE = "non-finite value"  # the missing reason :meth:`RolloutLog.summary` gives a NaN/inf reward


class RolloutLogError(RuntimeError):
    """The rollout log is missing, corrupted or not an rlfh rollout log."""


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


IMAGE_FORMATS = ("png", "jpeg", "none")
JPEG_QUALITY = 95


def decode_png(data: bytes | None) -> np.ndarray:
    """A logged image (PNG or JPEG) as uint8 RGB."""
    if data is None:
        raise RolloutLogError(
            "this rollout-log record holds no image (written with logging.log_images=none, or "
            "its image dropped by logging.keep_image_rounds); this step needs the images"
        )
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def recode_image(png: bytes | None, image_format: str) -> bytes | None:
    """A record's PNG as ``image_format`` (``logging.log_images``): png as is, jpeg, or none."""
    if png is None or image_format == "png":
        return png
    if image_format == "none":
        return None
    if image_format != "jpeg":
        raise ValueError(f"image format {image_format!r}: must be one of {IMAGE_FORMATS}")
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def decode_latent(record: dict[str, Any]) -> np.ndarray:
    latent = record.get("latent")
    problem = _latent_problem(None if latent is None else len(latent), record.get("latent_shape"))
    if problem is not None:
        raise RolloutLogError(f"rollout {record.get('rollout_id', '?')}: {problem}")
    return np.frombuffer(record["latent"], dtype=np.float32).reshape(record["latent_shape"])


def _latent_problem(nbytes: int | None, shape: list[int] | None) -> str | None:
    """Why a latent of ``nbytes`` bytes cannot be read as float32 of ``shape``, or None."""
    if nbytes is None:
        return "latent is null"
    if not shape or any(d is None or d < 1 for d in shape):
        return f"latent_shape {shape!r} is not a shape"
    expected = int(np.prod(shape)) * 4
    if nbytes != expected:
        return f"latent holds {nbytes} bytes but latent_shape {shape} needs {expected} (float32)"
    return None


def make_records(
    batch, scored, round_index: int, staleness: int | None = None, region_pairs: list[dict] | None = None
) -> list[dict[str, Any]]:
    """Rows for a :class:`rollouts.types.RolloutBatch` and its :class:`rewards.composite.ScoredBatch`;
    ``staleness``: how many policy versions the learner is ahead of the samples' policy;
    ``region_pairs``: per image, its ``region_pair`` value (None: plain samples)."""
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
                    {
                        "region": r,
                        "x1": d.box[0],
                        "y1": d.box[1],
                        "x2": d.box[2],
                        "y2": d.box[3],
                        "confidence": d.confidence,
                        "label": d.label,
                    }
                    for r, dets in regions.items()
                    for d in dets
                ],
                "created_at": now,
                "region_pair": None if region_pairs is None else region_pairs[i],
            }
        )
    return rows


class RolloutLog:
    """Append-only writer and verifying reader of one rollout log directory.

    Args:
        directory: the log's folder.
        image_format: how :meth:`append` keeps each record's image (``logging.log_images``).
        keep_image_rounds: keep images of the last this many rounds only (``logging.keep_image_rounds``;
            None keeps all).
    """

    def __init__(self, directory: str | Path, image_format: str = "png", keep_image_rounds: int | None = None):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {image_format!r}: must be one of {IMAGE_FORMATS}")
        self.dir = Path(directory)
        self.image_format = image_format
        self.keep_image_rounds = keep_image_rounds

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
                f"{self.manifest_path}: format {m.get('format')!r} v{m.get('version')!r}, "
                f"expected {FORMAT!r} v{VERSION}"
            )
        return m

    def append(self, records: list[dict[str, Any]]) -> str:
        """Write records as one new shard and list it in the manifest; returns the shard name."""
        if not records:
            raise ValueError("no records to append")
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest()
        name = f"shard-{len(manifest['shards']):06d}.parquet"
        if self.image_format != "png":
            records = [{**r, "image": recode_image(r.get("image"), self.image_format)} for r in records]
        table = pa.Table.from_pylist(records, schema=SCHEMA)
        rounds = [r["round"] for r in records]
        entry = {
            "name": name,
            "num_records": table.num_rows,
            "rounds": [min(rounds), max(rounds)],
            **self._write_shard(name, table),
            "created_at": time.time(),
        }
        if self.image_format == "none":
            entry["images"] = "none"
        manifest["shards"].append(entry)
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1).encode())
        if self.keep_image_rounds is not None:
            self.drop_images(before_round=max(rounds) + 1 - self.keep_image_rounds)
        return name

    def _write_shard(self, name: str, table: pa.Table) -> dict[str, Any]:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        atomic_write_bytes(self.dir / name, data)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def drop_images(self, before_round: int) -> int:
        """Null the images of the shards whose rounds all lie before ``before_round`` (latents,
        rewards and regions stay). Each such shard is rewritten under a new name, the manifest then
        lists it instead of the old one, and the old file goes: a crash in between leaves at most an
        unlisted file, never a listed shard that fails its checksum. Returns the records changed."""
        manifest = self.manifest()
        changed = 0
        for i, entry in enumerate(manifest["shards"]):
            if entry.get("images") == "none" or entry["rounds"][1] >= before_round:
                continue
            old = self.dir / entry["name"]
            if not old.is_file() or sha256_file(old) != entry["sha256"]:  # never rewrite (and so bless) a bad shard
                raise RolloutLogError(f"{old}: missing or not matching the manifest; not dropping its images")
            table = pq.read_table(old)
            table = table.set_column(
                table.schema.get_field_index("image"), "image", pa.nulls(table.num_rows, pa.binary())
            )
            name = f"{entry['name'].removesuffix('.parquet').split('.')[0]}.latents.parquet"
            manifest["shards"][i] = {**entry, "name": name, **self._write_shard(name, table), "images": "none"}
            atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1).encode())
            old.unlink(missing_ok=True)
            changed += entry["num_records"]
        return changed

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
        seen: dict[str, str] = {}
        for entry in manifest["shards"]:
            # a shard listed twice (or a copy under another name) would feed every sample in it twice
            for key in (entry["name"], entry.get("sha256")):
                if key in seen:
                    raise RolloutLogError(
                        f"{self.manifest_path}: shard {entry['name']} repeats {seen[key]} (same "
                        f"{'name' if key == entry['name'] else 'sha256'}); its samples would be read twice. "
                        f"Remove the duplicate entry from manifest.json"
                    )
            seen[entry["name"]] = entry["name"]
            if entry.get("sha256"):
                seen[entry["sha256"]] = entry["name"]
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
                    f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                    f"{entry['sha256'][:12]}...; the shard "
                    f"is corrupted. Restore it or remove its entry from manifest.json"
                )
            yield entry, path

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All verified shards as one Arrow table (schema :data:`SCHEMA`).

        Raises :class:`RolloutLogError`, naming the shard (and row), for a missing column, a latent
        whose bytes do not fit its ``latent_shape``, or a rollout id found twice in the log.
        """
        tables = []
        want = list(columns) if columns is not None else SCHEMA.names
        unknown = [c for c in want if c not in SCHEMA.names]
        if unknown:
            raise RolloutLogError(
                f"{self.dir}: no columns {unknown} in the rollout log format (columns: {SCHEMA.names})"
            )
        # ids are always read: they are how duplicated samples are found
        read = want if "rollout_id" in want else ["rollout_id", *want]
        first_shard_of: dict[str, str] = {}
        for entry, path in self.verified_shards():
            try:
                have = set(pq.read_schema(path).names)
                t = pq.read_table(path, columns=[c for c in read if c in have])
            except Exception as e:  # pyarrow raises several types for bad files
                raise RolloutLogError(f"{path}: not a readable Parquet file: {e}") from e
            lacking = [c for c in read if c not in have and c not in LATER_COLUMNS]
            if lacking:
                raise RolloutLogError(
                    f"{path}: the shard has no column(s) {lacking}; it is damaged or was not "
                    f"written by rlfh. Restore it or remove its entry from manifest.json"
                )
            for c in read:
                if c not in have:
                    t = t.append_column(SCHEMA.field(c), pa.nulls(t.num_rows, SCHEMA.field(c).type))
            if t.num_rows != entry["num_records"]:
                raise RolloutLogError(f"{path}: {t.num_rows} records, manifest says {entry['num_records']}")
            for row, rid in enumerate(t.column("rollout_id").to_pylist()):
                other = first_shard_of.get(rid)
                first_shard_of[rid] = entry["name"]
                if other is not None:
                    raise RolloutLogError(
                        f"{path} row {row}: rollout id {rid!r} is already in {other}; the log holds the same "
                        f"sample twice (a copied shard?). Remove the duplicate shard's entry from manifest.json"
                    )
            if "latent" in want and "latent_shape" in want:
                self._check_latents(t, path)
            tables.append(t.select(want))
        if not tables:
            raise RolloutLogError(f"{self.dir}: the rollout log holds no shards")
        return pa.concat_tables(tables)

    @staticmethod
    def _check_latents(t: pa.Table, path: Path) -> None:
        # a reshape error deep in training names neither the shard nor the sample; check here
        ids = t.column("rollout_id").to_pylist()
        shapes = t.column("latent_shape").to_pylist()
        sizes = pc.binary_length(t.column("latent")).to_pylist()  # without copying the latents into Python
        for row, nbytes in enumerate(sizes):
            problem = _latent_problem(nbytes, shapes[row])
            if problem is not None:
                raise RolloutLogError(f"{path} row {row} (rollout {ids[row]}): {problem}")

    def records(self, columns: list[str] | None = None) -> list[dict[str, Any]]:
        return self.read_table(columns).to_pylist()

    def summary(self) -> dict[str, Any]:
        """Counts and per-reward statistics, as ``rlfh rollouts inspect`` prints them.

        A NaN or infinite reward value counts as missing (reason ``"non-finite value"``) and also
        in the reward's ``non_finite``, so means and counts cover only usable values.
        """
        t = self.read_table(
            ["rollout_id", "policy_version", "prompt", "rewards", "regions", "latent_shape", "sampler", "region_pair"]
        )
        rows = t.to_pylist()
        rewards: dict[str, dict[str, Any]] = {}
        for r in rows:
            for rw in r["rewards"]:
                d = rewards.setdefault(rw["name"], {"values": [], "missing": 0, "non_finite": 0, "reasons": {}})
                value = rw["value"]
                if value is None or not math.isfinite(value):
                    # a NaN/inf value made the mean NaN and counted as present; it is as unusable as a
                    # missing one, and its count says a reward misbehaves, so it is kept apart
                    reason = rw["reason"] if value is None else NON_FINITE
                    d["missing"] += 1
                    d["non_finite"] += value is not None
                    d["reasons"][reason] = d["reasons"].get(reason, 0) + 1
                else:
                    d["values"].append(value)
        versions = [r["policy_version"] for r in rows]
        region_counts: dict[str, int] = {}
        for r in rows:
            for reg in r["regions"]:
                region_counts[reg["region"]] = region_counts.get(reg["region"], 0) + 1
        roles: dict[str, int] = {}
        for r in rows:
            if r["region_pair"] is not None:
                key = f"{r['region_pair']['region']}/{r['region_pair']['role']}"
                roles[key] = roles.get(key, 0) + 1
        return {
            "dir": str(self.dir),
            "shards": len(self.manifest()["shards"]),
            "records": len(rows),
            "unique_rollout_ids": len({r["rollout_id"] for r in rows}),
            "prompts": len({r["prompt"] for r in rows}),
            "policy_versions": [min(versions), max(versions)],
            "latent_shape": rows[0]["latent_shape"],
            "sampler": rows[0]["sampler"],
            # [height, width, records] per image size: several with rollout.resolutions (multi-aspect)
            "sizes": [
                [h, w, n]
                for (h, w), n in sorted(Counter((r["sampler"]["height"], r["sampler"]["width"]) for r in rows).items())
            ],
            "detections": region_counts,
            "region_pairs": roles,  # records in inpainted region pairs, by region and role
            "rewards": {
                n: {
                    "mean": float(np.mean(d["values"])) if d["values"] else None,
                    "std": float(np.std(d["values"])) if d["values"] else None,
                    "count": len(d["values"]),
                    "missing": d["missing"],
                    "non_finite": d["non_finite"],
                    "missing_reasons": d["reasons"],
                }
                for n, d in rewards.items()
            },
        }
