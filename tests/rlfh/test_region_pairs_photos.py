"""`rlfh make-region-pairs` on real photos with configs/tiny.yaml at 256 px finds the faces that `rlfh score`
finds with the same config: the regions come from the photo, not from the tiny model's VAE reconstruction
(which blurs them away), and each face makes its own pair (FaceScore's one pair per face)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mediapipe", reason="needs the 'detect' extra: pip install -e '.[detect]'")
FACES = "rewards=[{target: face_detection_confidence}]"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """scikit-image's astronaut and insightface's two-person photo, at 256 x 256, as a metadata.jsonl folder."""
    from PIL import Image

    data = pytest.importorskip("skimage.data", reason="needs scikit-image (the 'test' extra)")
    root = tmp_path_factory.mktemp("photos")
    images = {"astronaut.png": data.astronaut()}
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.origin is not None:
        images["people.png"] = np.asarray(Image.open(Path(spec.origin).parent / "data/images/t1.jpg").convert("RGB"))
    with open(root / "metadata.jsonl", "w") as f:
        for name, im in images.items():
            Image.fromarray(im).resize((256, 256), Image.LANCZOS).save(root / name)
            f.write(json.dumps({"file_name": name, "text": "a photo of a person"}) + "\n")
    return root


@pytest.mark.slow
def test_make_region_pairs_finds_the_faces_rlfh_score_finds(photos, tiny_model_dir, tmp_path, capsys):
    from rlfh.cli.main import main
    from rollouts.log import RolloutLog

    names = [json.loads(line)["file_name"] for line in (photos / "metadata.jsonl").read_text().splitlines()]
    assert main(["score", "configs/tiny.yaml", *[str(photos / n) for n in names], FACES]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    faces = {Path(s["image"]).name: len(s["regions"].get("face", [])) for s in scored}
    assert faces["astronaut.png"] == 1 and sum(faces.values()) >= 1, faces

    run = tmp_path / "pairs"
    args = [
        f"run_dir={run}",
        f"model.path={tiny_model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "rollout.height=256",
        "rollout.width=256",
        "data.region_pairs.strength=0.5",  # 2 of the 4 steps: a quick inpainting
        "data.region_pairs.num_inference_steps=4",
        "learner.regions.names=[global, face]",
        "data.region_pairs.region=face",
        "data.region_pairs.winner=original",
        FACES,
    ]
    assert main(["make-region-pairs", "configs/tiny.yaml", str(photos), *args]) == 0
    n_with = sum(n > 0 for n in faces.values())
    assert f"{n_with} of {len(names)} images had the region; {sum(faces.values())} pairs" in capsys.readouterr().out
    records = RolloutLog(run / "rollouts").records()
    roles = [r["region_pair"]["role"] for r in records]
    assert roles.count("original") == n_with and roles.count("inpainted") == sum(faces.values())
    # winner=original scores nothing through the VAE: the inpainted copies carry no reward
    assert all(not r["rewards"] for r in records if r["region_pair"]["role"] == "inpainted")
