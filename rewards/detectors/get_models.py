"""Fetch the detector models from the package registry: ``python -m rewards.detectors.get_models``.

MediaPipe 1.x wheels ship no models and the usual model hosts are not reachable from CI, but the
``mediapipe==0.10.21`` wheel on PyPI carries the same TFLite graphs under ``mediapipe/modules/``.
This script downloads that wheel with pip (``--no-deps``, any platform's wheel works: the TFLite
files are platform independent), checks each file against the SHA-256 recorded below and writes:

    <models dir>/face_detection_short_range.tflite        BlazeFace, short range (MediaPipe's default)
    <models dir>/face_detection_full_range_sparse.tflite  BlazeFace, full range
    <models dir>/hand_landmarker.task                     palm detector + hand landmark model (full)
    <models dir>/pose_landmarker.task                     BlazePose detector + 33-landmark model (full)

A Tasks ``HandLandmarker`` wants a ``.task`` bundle: a zip holding ``hand_detector.tflite`` and
``hand_landmarks_detector.tflite``; it is assembled here from the wheel's palm detection and hand
landmark models (the "full" variants, which MediaPipe Hands uses at its default model_complexity=1).

The wheel's pose models (``pose_detection.tflite``, ``pose_landmark_full.tflite``: MediaPipe Pose's
legacy graphs, its default model_complexity=1) carry no TFLite metadata, and a Tasks ``PoseLandmarker``
needs the input normalization from it; :func:`with_image_metadata` writes that metadata (RGB image
input, mean/std: the detector [-1, 1], the landmark model [0, 1], as the legacy graphs feed them)
with MediaPipe's own flatbuffer schemas. The weights are the wheel's, byte for byte.

The models dir is, in order: ``--dir``, the ``RLFH_MODELS_DIR`` environment variable,
``~/.cache/rlfh/mediapipe``. Re-running is cheap: files already present with the right hash are
kept. ``--wheel PATH`` uses a wheel downloaded beforehand (no network).

InsightFace's model packs (``buffalo_l``, ``antelopev2``: ``det_10g.onnx``, a SCRFD detector) are
on no package registry; put them in insightface's standard layout ``~/.insightface/models/<pack>/``
yourself (see ``rewards/detectors/insightface_backend.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rewards.base import RewardError

MEDIAPIPE_WHEEL_VERSION = "0.10.21"
# pip needs one concrete wheel to download; this CPython 3.11 manylinux one is 35.6 MB and its
# TFLite files are the same as in every other platform's wheel of this version.
_WHEEL_PLATFORM = ("manylinux_2_28_x86_64", "311")

# file in the models dir -> (path inside the wheel, sha256 of the file)
TFLITE_FILES: dict[str, tuple[str, str]] = {
    "face_detection_short_range.tflite": (
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    ),
    "face_detection_full_range_sparse.tflite": (
        "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
        "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
    ),
}
# member of hand_landmarker.task -> (path inside the wheel, sha256)
HAND_TASK_MEMBERS: dict[str, tuple[str, str]] = {
    "hand_detector.tflite": (
        "mediapipe/modules/palm_detection/palm_detection_full.tflite",
        "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54",
    ),
    "hand_landmarks_detector.tflite": (
        "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
        "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3",
    ),
}
HAND_TASK = "hand_landmarker.task"
# member of pose_landmarker.task -> (path inside the wheel, sha256 of the wheel's file, input mean, std)
POSE_TASK_MEMBERS: dict[str, tuple[str, str, float, float]] = {
    "pose_detector.tflite": (
        "mediapipe/modules/pose_detection/pose_detection.tflite",
        "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
        127.5,
        127.5,
    ),
    "pose_landmarks_detector.tflite": (
        "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
        "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
        0.0,
        255.0,
    ),
}
POSE_TASK = "pose_landmarker.task"
FETCH_COMMAND = "python -m rewards.detectors.get_models"


def models_dir(path: str | os.PathLike | None = None) -> Path:
    """The MediaPipe models dir: ``path``, else ``$RLFH_MODELS_DIR``, else ``~/.cache/rlfh/mediapipe``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("RLFH_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rlfh" / "mediapipe"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_ok(path: Path, sha: str) -> bool:
    return path.is_file() and _sha256(path.read_bytes()) == sha


def _hand_task_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return all(
                name in z.namelist() and _sha256(z.read(name)) == sha for name, (_, sha) in HAND_TASK_MEMBERS.items()
            )
    except zipfile.BadZipFile:
        return False


def missing_models(directory: str | os.PathLike | None = None) -> list[Path]:
    """Paths of the face and hand models that are absent or corrupt in the models dir (empty when complete)."""
    d = models_dir(directory)
    missing = [d / name for name, (_, sha) in TFLITE_FILES.items() if not _file_ok(d / name, sha)]
    if not _hand_task_ok(d / HAND_TASK):
        missing.append(d / HAND_TASK)
    return missing


def missing_pose_model(directory: str | os.PathLike | None = None) -> bool:
    """Whether ``pose_landmarker.task`` is absent or unreadable in the models dir (its members carry
    added metadata, so the check is that both are there and hold a TFLite model, not a hash)."""
    path = models_dir(directory) / POSE_TASK
    if not path.is_file():
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return not all(name in z.namelist() and z.read(name)[4:8] == b"TFL3" for name in POSE_TASK_MEMBERS)
    except zipfile.BadZipFile:
        return True


def with_image_metadata(model: bytes, mean: float, std: float) -> bytes:
    """``model`` (a TFLite flatbuffer) with TFLite metadata naming input 0 an RGB image normalized as
    (x - mean) / std, which MediaPipe Tasks reads to preprocess; weights and graph are unchanged."""
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md
    from mediapipe.tasks.metadata import schema_py_generated as tfl

    graph = tfl.ModelT.InitFromObj(tfl.Model.GetRootAsModel(model, 0))
    norm = md.NormalizationOptionsT()
    norm.mean, norm.std = [float(mean)], [float(std)]
    unit = md.ProcessUnitT()
    unit.optionsType, unit.options = md.ProcessUnitOptions.NormalizationOptions, norm
    props = md.ImagePropertiesT()
    props.colorSpace = md.ColorSpaceType.RGB
    content = md.ContentT()
    content.contentPropertiesType, content.contentProperties = md.ContentProperties.ImageProperties, props
    image = md.TensorMetadataT()
    image.name, image.content, image.processUnits = "image", content, [unit]
    outputs = []
    for i in graph.subgraphs[0].outputs:
        out = md.TensorMetadataT()
        out.name = f"output_{i}"
        outputs.append(out)
    sub = md.SubGraphMetadataT()
    sub.inputTensorMetadata, sub.outputTensorMetadata = [image], outputs
    meta = md.ModelMetadataT()
    meta.name, meta.subgraphMetadata, meta.minParserVersion = "pose", [sub], "1.0.0"
    b = flatbuffers.Builder(0)
    b.Finish(meta.Pack(b), b"M001")
    buf = tfl.BufferT()
    buf.data = list(b.Output())
    graph.buffers.append(buf)
    entry = tfl.MetadataT()
    entry.name, entry.buffer = "TFLITE_METADATA", len(graph.buffers) - 1
    graph.metadata = (graph.metadata or []) + [entry]
    b = flatbuffers.Builder(0)
    b.Finish(graph.Pack(b), b"TFL3")
    return bytes(b.Output())


def extract_pose_model(wheel_path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Assemble ``pose_landmarker.task`` from a mediapipe 0.10.21 wheel's checked pose models; returns the dir."""
    d = models_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel_path) as wheel, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as task:
        for name, (member, sha, mean, std) in POSE_TASK_MEMBERS.items():
            task.writestr(name, with_image_metadata(_read_checked(wheel, member, sha), mean, std))
    _write_atomic(d / POSE_TASK, buf.getvalue())
    return d


def download_wheel(dest: Path) -> Path:
    """Download the mediapipe wheel that carries the TFLite models into ``dest`` with pip.

    Raises:
        RewardError: pip failed (registry unreachable, ...); pip's output is included.
    """
    platform, pyver = _WHEEL_PLATFORM
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"mediapipe=={MEDIAPIPE_WHEEL_VERSION}",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        platform,
        "--python-version",
        pyver,
        "--implementation",
        "cp",
        "-d",
        str(dest),
        "--disable-pip-version-check",
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"mediapipe-{MEDIAPIPE_WHEEL_VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RewardError(
            f"could not download mediapipe=={MEDIAPIPE_WHEEL_VERSION} from the package registry "
            f"(command: {' '.join(cmd)}):\n{proc.stdout}{proc.stderr}"
        )
    return wheels[0]


def _read_checked(wheel: zipfile.ZipFile, member: str, sha: str) -> bytes:
    try:
        data = wheel.read(member)
    except KeyError:
        raise RewardError(f"{wheel.filename} has no {member}: is it mediapipe {MEDIAPIPE_WHEEL_VERSION}?") from None
    if _sha256(data) != sha:
        raise RewardError(f"{member} in {wheel.filename} has sha256 {_sha256(data)}, expected {sha}")
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so a concurrent reader (parallel test workers) never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def extract_models(wheel_path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Extract and check the models from a mediapipe wheel into the models dir; returns the dir."""
    d = models_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        for name, (member, sha) in TFLITE_FILES.items():
            _write_atomic(d / name, _read_checked(wheel, member, sha))
        buf = io.BytesIO()
        # Stored, not deflated: MediaPipe memory-maps the bundle's members.
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as task:
            for name, (member, sha) in HAND_TASK_MEMBERS.items():
                task.writestr(name, _read_checked(wheel, member, sha))
        _write_atomic(d / HAND_TASK, buf.getvalue())
    return d


def ensure_models(
    directory: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Make sure the models dir is complete, downloading the wheel only when something is missing.

    Args:
        directory: models dir (default: see :func:`models_dir`).
        wheel: a mediapipe 0.10.21 wheel already on disk; skips the download.
        force: re-extract even if every file is present and checks out.

    Returns:
        The models dir.

    Raises:
        RewardError: the download failed or a file does not match its recorded hash.
    """
    d = models_dir(directory)
    hands, pose = force or bool(missing_models(d)), force or missing_pose_model(d)
    if not (hands or pose):
        return d
    with tempfile.TemporaryDirectory(prefix="rlfh-mediapipe-") as tmp:
        path = wheel if wheel is not None else download_wheel(Path(tmp))
        if hands:
            extract_models(path, d)
        if pose:
            extract_pose_model(path, d)
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="models dir (default: $RLFH_MODELS_DIR or ~/.cache/rlfh/mediapipe)")
    parser.add_argument("--wheel", help=f"use this mediapipe=={MEDIAPIPE_WHEEL_VERSION} wheel instead of downloading")
    parser.add_argument("--force", action="store_true", help="re-extract even if the models are present")
    args = parser.parse_args(argv)
    try:
        d = ensure_models(args.dir, args.wheel, args.force)
    except RewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in sorted(d.iterdir()):
        if not p.name.startswith("."):
            print(f"{p}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
