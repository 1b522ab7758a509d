"""Detector backends on real photos (MediaPipe) and on a hand-built SCRFD-layout model (insightface).

Real photos: scikit-image's astronaut portrait (``skimage.data.astronaut()``, 512x512, one face) and
insightface's bundled ``data/images/t1.jpg`` (1280x886 group photo, two raised hands).
The MediaPipe models come from ``rewards.detectors.get_models`` (cached under ~/.cache/rlfh, so
only the first run downloads the 36 MB wheel).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rewards.base import Detection, RewardError
from rewards.detectors import get_models
from rewards.detectors.base import BACKENDS, build_detector

pytest.importorskip("mediapipe", reason="needs the 'detect' extra: pip install -e '.[detect]'")


@pytest.fixture(scope="session")
def mediapipe_models() -> Path:
    """The MediaPipe models dir, fetched from the package registry on first use."""
    d = get_models.models_dir()
    if get_models.missing_models(d):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            try:
                wheel = get_models.download_wheel(Path(tmp))
            except RewardError as e:
                pytest.skip(f"package registry unreachable, cannot fetch the MediaPipe models: {e}")
            get_models.extract_models(wheel, d)  # a hash mismatch here fails the test
    assert not get_models.missing_models(d)
    return d


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="needs scikit-image (the 'test' extra)")
    return data.astronaut()  # (512, 512, 3) uint8 RGB


@pytest.fixture(scope="session")
def group_photo() -> np.ndarray:
    from PIL import Image

    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        pytest.skip("needs insightface (the 'detect' extra) for its bundled photo data/images/t1.jpg")
    path = Path(spec.origin).parent / "data" / "images" / "t1.jpg"
    return np.asarray(Image.open(path).convert("RGB"))  # (886, 1280, 3)


@pytest.fixture(scope="session")
def face_detector(mediapipe_models):
    det = build_detector("mediapipe_face", models_dir=mediapipe_models)
    yield det
    det.close()


@pytest.fixture(scope="session")
def hand_detector(mediapipe_models):
    det = build_detector("mediapipe_hand", models_dir=mediapipe_models)
    yield det
    det.close()


def test_backends_registered():
    for name in ("mediapipe_face", "mediapipe_hand", "insightface"):
        assert name in BACKENDS


def test_models_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RLFH_MODELS_DIR", str(tmp_path / "env"))
    assert get_models.models_dir() == tmp_path / "env"
    assert get_models.models_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("RLFH_MODELS_DIR")
    assert get_models.models_dir() == Path.home() / ".cache" / "rlfh" / "mediapipe"


def test_get_models_cli_is_idempotent_and_checks_hashes(mediapipe_models, tmp_path, capsys):
    # Nothing missing -> no download, exit 0.
    assert get_models.main(["--dir", str(mediapipe_models)]) == 0
    assert "hand_landmarker.task" in capsys.readouterr().out
    # A corrupted file is reported missing.
    bad = tmp_path / "m"
    bad.mkdir()
    for name in get_models.TFLITE_FILES:
        (bad / name).write_bytes((mediapipe_models / name).read_bytes()[:-1])
    assert {p.name for p in get_models.missing_models(bad)} == {*get_models.TFLITE_FILES, get_models.HAND_TASK}


def _wheel_from_cache(models: Path, path: Path, corrupt: bool = False) -> Path:
    """A stand-in mediapipe wheel holding the cached models at their in-wheel paths."""
    import zipfile

    with zipfile.ZipFile(models / get_models.HAND_TASK) as task, zipfile.ZipFile(path, "w") as wheel:
        for name, (member, _) in get_models.TFLITE_FILES.items():
            wheel.writestr(member, (models / name).read_bytes())
        for name, (member, _) in get_models.HAND_TASK_MEMBERS.items():
            data = task.read(name)
            wheel.writestr(member, data[:-1] + b"x" if corrupt else data)
    return path


def test_extract_assembles_task_and_checks_hashes(mediapipe_models, tmp_path):
    wheel = _wheel_from_cache(mediapipe_models, tmp_path / "mediapipe.whl")
    out = tmp_path / "models"
    out.mkdir()
    # the stand-in wheel holds the face and hand models only; the pose bundle comes from the cache
    (out / get_models.POSE_TASK).write_bytes((mediapipe_models / get_models.POSE_TASK).read_bytes())
    assert get_models.main(["--dir", str(out), "--wheel", str(wheel)]) == 0
    assert get_models.missing_models(out) == []
    with build_detector("mediapipe_hand", models_dir=out) as det:  # the assembled bundle loads
        assert det.detect(np.zeros((1, 64, 64, 3), np.uint8)) == [[]]
    bad = _wheel_from_cache(mediapipe_models, tmp_path / "bad.whl", corrupt=True)
    with pytest.raises(RewardError, match="sha256"):
        get_models.extract_models(bad, tmp_path / "bad_models")


def test_missing_models_error_names_the_script(tmp_path):
    from rewards.detectors.mediapipe_backend import MediaPipeFaceDetector, MediaPipeHandDetector

    for cls in (MediaPipeFaceDetector, MediaPipeHandDetector):
        with pytest.raises(RewardError, match=r"python -m rewards\.detectors\.get_models"):
            cls(models_dir=tmp_path)


def test_astronaut_has_one_face(face_detector, astronaut):
    (faces,) = face_detector.detect(astronaut[None])
    assert len(faces) == 1
    (face,) = faces
    x1, y1, x2, y2 = face.box
    # Eileen Collins' face is at about x 170-280, y 70-190 in the 512x512 portrait.
    assert 150 <= x1 < 200 and 250 < x2 <= 300, face.box
    assert 50 <= y1 < 110 and 160 < y2 <= 210, face.box
    assert 0.85 < face.confidence <= 1.0
    assert face.label is None


def test_face_detector_full_range_model(mediapipe_models, astronaut):
    with build_detector("mediapipe_face", models_dir=mediapipe_models, model="full_range") as det:
        (faces,) = det.detect(astronaut[None])
    assert len(faces) == 1 and 150 <= faces[0].box[0] < 200 and faces[0].confidence > 0.85


def test_no_face_in_flat_images(face_detector):
    flat = np.stack([np.zeros((256, 256, 3), np.uint8), np.full((256, 256, 3), 200, np.uint8)])
    assert face_detector.detect(flat) == [[], []]


def test_group_photo_has_two_raised_hands(hand_detector, group_photo):
    (hands,) = hand_detector.detect(group_photo[None])
    assert len(hands) == 2
    h, w = group_photo.shape[:2]
    by_x = sorted(hands, key=lambda d: d.box[0])
    # The raised hands: one left of centre (x about 180-255), one right (x about 620-685), both at
    # shoulder height (y about 405-500).
    assert 150 < by_x[0].box[0] < 200 and 230 < by_x[0].box[2] < 280
    assert 590 < by_x[1].box[0] < 650 and 660 < by_x[1].box[2] < 710
    for d in hands:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert 380 < y1 and y2 < 520
        assert 0.9 < d.confidence <= 1.0  # handedness score
        assert d.label in ("Left", "Right")
    assert {d.label for d in hands} == {"Left", "Right"}


def test_hand_detector_batch_keeps_order(hand_detector, group_photo, astronaut):
    from PIL import Image

    small = np.asarray(Image.fromarray(astronaut).resize((group_photo.shape[1], group_photo.shape[0])))
    results = hand_detector.detect(np.stack([small, group_photo]))
    assert len(results) == 2 and len(results[0]) == 0 and len(results[1]) == 2


def test_bad_options_raise(mediapipe_models):
    with pytest.raises(RewardError, match="face model"):
        build_detector("mediapipe_face", models_dir=mediapipe_models, model="medium")
    with pytest.raises(RewardError, match="num_hands"):
        build_detector("mediapipe_hand", models_dir=mediapipe_models, num_hands=0)
    with pytest.raises(RewardError, match="min_confidence"):
        build_detector("mediapipe_face", models_dir=mediapipe_models, min_confidence=1.5)


# ---- insightface: no real pack can be fetched here, so a hand-built model in det_10g's layout ----


def _scrfd_like_onnx(path: Path) -> None:
    """Write an ONNX model with det_10g's interface: input ``input.1`` (1, 3, H, W), 9 outputs
    (scores, bbox distances, keypoints for strides 8/16/32, 2 anchors per cell, unbatched 2-D).

    Its weights are set by hand so the output is predictable: the stride-8 score is
    sigmoid(10 * mean of the model's channel 0 over the 8x8 cell - 5) (anchor 0; anchor 1 uses -6),
    i.e. high only where channel 0 (red, after insightface's BGR->RGB swap) is bright; strides 16/32
    never fire; every box reaches 2 strides (16 px) from its anchor on each side.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        w_score = np.zeros((2, 3, 1, 1), np.float32)
        w_score[:, 0] = 10.0
        b_score = np.array([-5.0, -6.0] if s == 8 else [-50.0, -50.0], np.float32)
        heads = {
            "score": (w_score, b_score, 1, True),
            "bbox": (np.zeros((8, 3, 1, 1), np.float32), np.full(8, 2.0, np.float32), 4, False),
            "kps": (np.zeros((20, 3, 1, 1), np.float32), np.zeros(20, np.float32), 10, False),
        }
        for head, (w, b, width, sigmoid) in heads.items():
            inits += [numpy_helper.from_array(w, f"{head}{s}_w"), numpy_helper.from_array(b, f"{head}{s}_b")]
            nodes.append(helper.make_node("Conv", [f"pool{s}", f"{head}{s}_w", f"{head}{s}_b"], [f"{head}{s}_c"]))
            last = f"{head}{s}_c"
            if sigmoid:
                nodes.append(helper.make_node("Sigmoid", [last], [f"{head}{s}_sig"]))
                last = f"{head}{s}_sig"
            # (1, A*width, h, w) -> (1, h, w, A*width) -> (h*w*A, width): insightface's anchor order
            nodes.append(helper.make_node("Transpose", [last], [f"{head}{s}_t"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{head}{s}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{head}{s}_t", f"{head}{s}_shape"], [f"{head}_{s}"]))
            outputs[head].append(helper.make_tensor_value_info(f"{head}_{s}", TensorProto.FLOAT, [None, width]))
    graph = helper.make_graph(
        nodes,
        "scrfd_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, None, None])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory) -> Path:
    pytest.importorskip("insightface", reason="needs the 'detect' extra")
    root = tmp_path_factory.mktemp("insightface")
    _scrfd_like_onnx(root / "models" / "buffalo_l" / "det_10g.onnx")
    return root


def test_insightface_missing_pack_names_expected_path(tmp_path):
    with pytest.raises(RewardError, match=str(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")):
        build_detector("insightface", root=tmp_path)
    with pytest.raises(RewardError, match="does not exist"):
        build_detector("insightface", model=str(tmp_path / "nope.onnx"))


def test_insightface_rejects_non_detector(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(RewardError, match="could not load"):
        build_detector("insightface", model=str(tmp_path / "junk.onnx"))


@pytest.mark.parametrize("scale", [1, 2])
def test_insightface_inference_path(insightface_root, scale):
    """Real model-zoo code path (routing, letterbox, decode, NMS, rescale) on the hand-built SCRFD."""
    det = build_detector("insightface", root=insightface_root)
    img = np.zeros((640 * scale, 640 * scale, 3), np.uint8)
    # A red 8x8 cell at (x 320, y 240) after letterboxing into 640x640.
    img[240 * scale : 248 * scale, 320 * scale : 328 * scale] = (255, 0, 0)
    blue = img[..., ::-1].copy()  # same patch in blue: channel order must matter
    faces, none = det.detect(np.stack([img, blue]))
    assert none == []
    assert len(faces) == 1  # the two anchors of the cell give the same box: NMS keeps one
    (face,) = faces
    # Anchor centre (320, 240), distances 2 strides = 16 px, scaled back by the letterbox factor.
    np.testing.assert_allclose(face.box, np.array([304, 224, 336, 256]) * scale, atol=1e-3)
    expected = 1 / (1 + np.exp(-(10 * (255 - 127.5) / 128 - 5)))
    assert face.confidence == pytest.approx(expected, abs=1e-4)


def test_insightface_threshold_and_model_path(insightface_root):
    path = insightface_root / "models" / "buffalo_l" / "det_10g.onnx"
    det = build_detector("insightface", model=str(path), det_thresh=0.999)
    img = np.zeros((640, 640, 3), np.uint8)
    img[240:248, 320:328] = (255, 0, 0)
    assert det.detect(img[None]) == [[]]  # score 0.9932 < 0.999
    with pytest.raises(RewardError, match="multiples of 32"):
        build_detector("insightface", model=str(path), det_size=(600, 600))


def test_detection_boxes_are_json_roundtrippable(face_detector, astronaut):
    (faces,) = face_detector.detect(astronaut[None])
    assert [Detection.from_json(f.to_json()) for f in faces] == faces


def test_mediapipe_pose_finds_the_people_of_the_group_photo(group_photo):
    from rewards.detectors.mediapipe_backend import NUM_LANDMARKS, MediaPipePoseLandmarker

    try:
        models = get_models.ensure_models()
    except RewardError as e:
        pytest.skip(f"package registry unreachable, cannot fetch the MediaPipe pose model: {e}")
    with MediaPipePoseLandmarker(models, num_poses=6) as det:
        found = det.landmarks(group_photo[None])[0]
        assert det.landmarks(np.zeros((1, 128, 128, 3), np.uint8))[0].shape == (0, NUM_LANDMARKS, 3)
    h, w = group_photo.shape[:2]
    assert found.shape[0] >= 2 and found.shape[1:] == (NUM_LANDMARKS, 3)
    noses = found[:, 0]
    assert (
        (noses[:, 0] > 0).all() and (noses[:, 0] < w).all() and (noses[:, 1] > 0).all() and (noses[:, 1] < h / 2).all()
    )
    assert (noses[:, 2] > 0.5).all()  # faces in view
