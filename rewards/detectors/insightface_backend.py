"""RetinaFace-class face detection through insightface's model zoo (backend ``insightface``).

insightface's face packs carry a SCRFD detector (RetinaFace's successor from the same authors):
``buffalo_l/det_10g.onnx``, ``buffalo_s/det_500m.onnx``, ``antelopev2/scrfd_10g_bnkps.onnx``.
``insightface.model_zoo.get_model`` routes such a file to its ``SCRFD`` (or ``RetinaFace``) class,
which letterboxes the image into ``det_size``, decodes the per-stride outputs and applies NMS.

No package registry ships these packs and their hosts are unreachable from CI, so the models are
user-provided, in insightface's standard layout::

    <root>/models/<pack>/det_10g.onnx      root defaults to ~/.insightface (or $INSIGHTFACE_ROOT)

``model`` is a pack name (``buffalo_l``) looked up under ``<root>/models/``, or a path to an
``.onnx`` file. A missing model raises :class:`RewardError` naming the path it expected.

Input convention: the model zoo takes BGR uint8 (it swaps to RGB inside ``blobFromImage``); this
backend takes RGB like every detector here and flips the channels itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rewards.base import Detection, RewardError, check_images

# Detector files of the known packs, tried in this order inside a pack directory.
DETECTOR_GLOBS = ("det_*.onnx", "scrfd*.onnx", "retinaface*.onnx")


def default_root() -> Path:
    """insightface's model root: ``$INSIGHTFACE_ROOT`` or ``~/.insightface``."""
    return Path(os.environ.get("INSIGHTFACE_ROOT") or "~/.insightface").expanduser()


def resolve_model_file(model: str, root: str | os.PathLike | None = None) -> Path:
    """Find the detector ``.onnx`` for a pack name or a file path.

    Raises:
        RewardError: the file or pack directory is missing, or the pack holds no (or several)
            detector files.
    """
    if model.endswith(".onnx"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise RewardError(f"insightface detector model {path} does not exist")
        return path
    pack = (Path(root).expanduser() if root is not None else default_root()) / "models" / model
    hint = (
        f"insightface model pack {model!r} is not installed: expected {pack}/det_10g.onnx (buffalo_l) or "
        f"another {'/'.join(DETECTOR_GLOBS)} file there. The packs are not on any package registry: copy "
        f"the unzipped pack into {pack.parent}/ (or pass root=..., set INSIGHTFACE_ROOT, or give model= a "
        f".onnx path)"
    )
    if not pack.is_dir():
        raise RewardError(hint)
    for pattern in DETECTOR_GLOBS:
        found = sorted(pack.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RewardError(f"{pack} holds several detector files {[p.name for p in found]}; pass model=<file.onnx>")
    raise RewardError(hint)


class InsightFaceDetector:
    """Face detector on an insightface SCRFD/RetinaFace ONNX model, CPU by default.

    Args:
        model: pack name under ``<root>/models/`` or path to a detector ``.onnx``.
        root: insightface root (default ``$INSIGHTFACE_ROOT`` or ``~/.insightface``).
        det_size: (width, height) the image is letterboxed into (insightface's default 640x640).
        det_thresh: score threshold (insightface's default 0.5; FaceScore filters >= 0.9 itself).
        nms_thresh: NMS IoU threshold (insightface's default 0.4).
        providers: onnxruntime execution providers (default CPU only).

    Raises:
        RewardError: model missing, not a detector, insightface not installed, bad options.
    """

    region = "face"

    def __init__(
        self,
        model: str = "buffalo_l",
        root: str | os.PathLike | None = None,
        det_size: Sequence[int] = (640, 640),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        providers: Sequence[str] | None = None,
    ):
        if len(det_size) != 2 or any(int(v) <= 0 or int(v) % 32 for v in det_size):
            # SCRFD's coarsest stride is 32: other sizes break the anchor grid.
            raise RewardError(f"det_size must be two positive multiples of 32 (width, height), got {det_size!r}")
        for name, v in (("det_thresh", det_thresh), ("nms_thresh", nms_thresh)):
            if not 0.0 <= v <= 1.0:
                raise RewardError(f"{name} must be in [0, 1], got {v!r}")
        self.model_file = resolve_model_file(model, root)
        try:
            from insightface.model_zoo import get_model
        except ImportError as e:
            raise RewardError(
                f"the insightface detector needs the 'detect' extra (pip install -e '.[detect]'): {e}"
            ) from e
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        try:
            net: Any = get_model(str(self.model_file), providers=providers)
        except Exception as e:  # onnx/onnxruntime raise many types for a corrupt file
            raise RewardError(f"insightface could not load {self.model_file}: {type(e).__name__}: {e}") from e
        if net is None or getattr(net, "taskname", None) != "detection":
            raise RewardError(
                f"{self.model_file} is not a face detector (insightface routed it to "
                f"{type(net).__name__ if net is not None else 'nothing'})"
            )
        self.det_size = (int(det_size[0]), int(det_size[1]))
        ctx_id = -1 if providers == ["CPUExecutionProvider"] else 0
        net.prepare(ctx_id, input_size=self.det_size, det_thresh=float(det_thresh), nms_thresh=float(nms_thresh))
        self._net = net

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        """Detect faces.

        Args:
            images: (B, H, W, 3) uint8 RGB.

        Returns:
            Per image, the faces above ``det_thresh``, best first, boxes clipped to the image.
        """
        images = check_images(images)
        out = []
        for image in images:
            h, w = image.shape[:2]
            bgr = np.ascontiguousarray(image[..., ::-1])
            dets, _kps = self._net.detect(bgr, input_size=self.det_size)
            faces = []
            for x1, y1, x2, y2, score in np.asarray(dets, dtype=np.float64).reshape(-1, 5):
                x1, x2 = np.clip([x1, x2], 0.0, w)
                y1, y2 = np.clip([y1, y2], 0.0, h)
                if x2 > x1 and y2 > y1:
                    faces.append(Detection((float(x1), float(y1), float(x2), float(y2)), float(score)))
            out.append(sorted(faces, key=lambda d: -d.confidence))
        return out
