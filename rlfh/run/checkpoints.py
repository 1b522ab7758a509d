"""Where checkpoints live in a run directory and which one is the latest complete one.

    RUN_DIR/checkpoints/round-000010/   pytorch_lora_weights.safetensors, deepspeed/, trainer_state.json
    RUN_DIR/checkpoints/latest          the name of the newest complete checkpoint

A checkpoint folder is renamed into place only when complete (:func:`save_learner`)
and ``latest`` is rewritten atomically after it, so a crash at any point leaves ``latest`` naming a
complete checkpoint. Each checkpoint lists its files with sizes and sha256 in ``files.json``; a
checkpoint whose files do not match (torn by a disk fault, edited, truncated) is skipped with a
warning and the previous one is used.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from rollouts.fileio import atomic_write_bytes, sha256_file

MANIFEST = "files.json"


def write_file_manifest(directory: Path) -> None:
    """Record every file under ``directory`` (size, sha256) in ``files.json``; call before the rename."""
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps(files, indent=1))


def verify(path: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{path}: no {MANIFEST}"
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{manifest}: not valid JSON"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{f}: {f.stat().st_size} bytes, expected {meta['bytes']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{f}: sha256 mismatch"
    return None


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: str | Path, round_index: int) -> Path:
    return checkpoints_root(run_dir) / f"round-{round_index:06d}"


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / MANIFEST).is_file()


def mark_latest(run_dir: str | Path, path: Path) -> None:
    atomic_write_bytes(checkpoints_root(run_dir) / "latest", path.name.encode())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint to resume from (``latest`` first), or None for a fresh run."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("round-*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
        named = root / pointer.read_text().strip()
        candidates = [named] + [p for p in candidates if p != named and p.name < named.name]
    rejected: list[str] = []
    for path in candidates:
        problem = verify(path) if is_complete(path) else f"{path}: incomplete"
        if problem is None:
            return path
        rejected.append(f"{path.name} ({problem})")
        warnings.warn(f"skipping checkpoint {path.name}: {problem}; trying the previous one")
    if rejected:
        # the caller starts over from round 0 and sets the earlier rounds aside: never without a word
        warnings.warn(
            f"NO INTACT CHECKPOINT in {root}: every one was rejected: {'; '.join(rejected)}. The run starts again "
            f"from round 0 (earlier rollouts and metrics are set aside, not deleted); to keep the old progress, "
            f"stop it and restore a checkpoint",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def resolve_lora(path: str | Path) -> Path:
    """The LoRA weights a path means: a ``.safetensors`` file, a folder holding
    ``pytorch_lora_weights.safetensors`` (a checkpoint), a ``checkpoints`` folder or a run directory
    (their ``latest`` checkpoint); FileNotFoundError if none."""
    p = Path(path)
    for _ in range(3):  # run dir -> checkpoints/ -> round-N/
        if p.is_file() and p.suffix == ".safetensors":
            return p
        if (p / "pytorch_lora_weights.safetensors").is_file():
            return p
        if (p / "checkpoints" / "latest").is_file():
            p = p / "checkpoints"
        if (p / "latest").is_file():
            p = p / (p / "latest").read_text().strip()
            continue
        break
    raise FileNotFoundError(
        f"{path}: no LoRA there (expected pytorch_lora_weights.safetensors, a checkpoint folder, "
        f"or a run directory with checkpoints/latest)"
    )


LORA_FILE = "pytorch_lora_weights.safetensors"


def stored_lora_alpha(file: Path) -> float | None:
    """The alpha a LoRA file states (diffusers' adapter metadata, or kohya's per-layer ``.alpha``
    keys), or None: an rlfh file written before alpha was stored."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        kohya = [k for k in f.keys() if k.endswith(".alpha")]
        if not raw and kohya:  # kohya-style files carry one alpha per layer
            return float(f.get_tensor(kohya[0]))
    if not raw:
        return None
    alphas = [v for k, v in json.loads(raw).items() if k.endswith("lora_alpha")]
    return float(alphas[0]) if alphas else None


def load_lora_into(pipe, lora: Path) -> None:
    """Load a LoRA that :func:`resolve_lora` found (callers resolve first, to fail before a slow model
    load) into a diffusers pipeline: its ``.safetensors`` file, or the folder holding one. diffusers
    applies the alpha stored in the file (``ModelFamily.save_lora``); a file without one loads at
    alpha = rank, said here because it is the wrong strength for a LoRA trained with another alpha."""
    file = lora if lora.is_file() else lora / LORA_FILE
    if stored_lora_alpha(file) is None:
        warnings.warn(
            f"{file} stores no LoRA alpha (written before rlfh kept it): it loads at alpha = rank; "
            f"if it was trained with another model.lora.alpha, its strength is off by alpha / rank",
            stacklevel=2,
        )
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
