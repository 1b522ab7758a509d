"""Parity of rewards.facescore / rewards.imagereward with the reference code (opt-in).

Run: ``tests/parity/setup_reference_env.sh`` once, then ``RLFH_PARITY=1 pytest -m parity -s``.
The SAME seeded random weights, at the reference's full size (ViT-L/16 + med_config BERT, 446.7M
values), are saved in the published layout; the reference (THUDM/ImageReward via image-reward 1.5,
OPPO-Mente-Lab/FaceScore's FaceScore.py with given face boxes) scores them in its own venv as a
subprocess (JSON in and out), and our implementation must agree to 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import Detection
from rewards.blip_preprocess import VOCAB_PATH
from rewards.detectors.base import FixedBoxes

REPO = Path(__file__).resolve().parents[2]
REF_VENV = Path(os.environ.get("RLFH_REF_VENV", REPO / ".ref-venv"))
FACESCORE_SRC = REF_VENV / "src" / "FaceScore"
TOL = 1e-4
# Float boxes as a detector gives them (x1, y1, x2, y2, confidence): a face, a small box, a box
# past the right/bottom edges, and one below the 0.9 threshold that both sides must skip.
ASTRONAUT_FACES = [
    [170.6, 28.3, 262.4, 141.8, 0.998],
    [20.2, 30.7, 61.9, 90.1, 0.93],
    [430.5, 400.2, 512.7, 513.4, 0.95],
    [300.0, 300.0, 380.0, 390.0, 0.85],
]
COFFEE_FACES = [[100.4, 50.6, 300.2, 330.9, 0.97]]

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(os.environ.get("RLFH_PARITY") != "1", reason="opt-in: set RLFH_PARITY=1"),
]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    if not (REF_VENV / "bin" / "python").exists() or not (FACESCORE_SRC / "FaceScore").is_dir():
        pytest.skip(f"no reference env at {REF_VENV}: run tests/parity/setup_reference_env.sh")
    import skimage.data
    from PIL import Image

    from tests.rewards.tiny_blip import FULL_MED_CONFIG, VIT_L, random_model, save_published

    root = tmp_path_factory.mktemp("parity")
    fs_dir = save_published(random_model(VIT_L, FULL_MED_CONFIG, seed=0), FULL_MED_CONFIG, root / "fs", "FS_model.pt")
    ir_dir = root / "ir"
    ir_dir.mkdir()
    os.link(fs_dir / "FS_model.pt", ir_dir / "ImageReward.pt")  # same weights, no second 1.8 GB file
    shutil.copy(fs_dir / "med_config.json", ir_dir / "med_config.json")
    (root / "bert-base-uncased").mkdir()
    shutil.copy(VOCAB_PATH, root / "bert-base-uncased" / "vocab.txt")

    images = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea()}
    for name, im in images.items():
        Image.fromarray(im).save(root / f"{name}.png")  # lossless: both sides see the same pixels
    prompts = {
        "astronaut": "an astronaut in a white suit",
        "coffee": "a cup of coffee on a saucer, top view",
        "chelsea": "A cat.",
    }
    faces = {"astronaut": ASTRONAUT_FACES, "coffee": COFFEE_FACES, "chelsea": [[50.0, 60.0, 150.0, 170.0, 0.5]]}
    job = {
        "weights": str(fs_dir / "FS_model.pt"),
        "med_config": str(fs_dir / "med_config.json"),
        "facescore_src": str(FACESCORE_SRC),
        "facescore": [{"image": str(root / f"{n}.png"), "faces": faces[n]} for n in images],
        "imagereward": [{"image": str(root / f"{n}.png"), "prompt": prompts[n]} for n in images],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [str(REF_VENV / "bin" / "python"), str(Path(__file__).with_name("reference_runner.py"))],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise AssertionError(f"reference run failed:\n{proc.stderr[-4000:]}")
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"fs_dir": fs_dir, "ir_dir": ir_dir, "images": images, "prompts": prompts, "faces": faces, "ref": ref}


def _report(name: str, ours, ref) -> float:
    diff = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(ref, dtype=np.float64))))
    print(
        f"\n[parity] {name}: max |ours - reference| = {diff:.3g} over {len(ref)} scores; "
        f"reference scores {np.round(ref, 4).tolist()}",
        file=sys.stderr,
    )
    return diff


def test_facescore_matches_reference(parity):
    from rewards.facescore import FaceScore

    names = list(parity["images"])
    reward = FaceScore(str(parity["fs_dir"]), detector=FixedBoxes([[]]))
    ours, ref = [], []
    for n, ref_scores in zip(names, parity["ref"]["facescore"]):
        reward.detector = FixedBoxes([[Detection(tuple(f[:4]), f[4]) for f in parity["faces"][n]]])
        (res,) = reward(parity["images"][n][None], ["x"])
        scored = [s for s in res.info["face_scores"] if s is not None]
        assert len(scored) == len(ref_scores), (n, res.info, ref_scores)
        if not ref_scores:  # the reference returns [] for no face >= 0.9; we return an explicit missing
            assert res.value is None and "no face" in res.reason
        ours += scored
        ref += ref_scores
    assert np.std(ref) > 0.05, f"random weights give near-constant scores {ref}: parity would prove nothing"
    assert _report("FaceScore", ours, ref) < TOL


def test_differentiable_facescore_close_to_reference(parity):
    from rewards.facescore import FaceScore

    n = "astronaut"
    reward = FaceScore(str(parity["fs_dir"]), detector=FixedBoxes([[]]))
    boxes = [[0, *f[:4]] for f in parity["faces"][n] if f[4] >= 0.9]
    image = torch.from_numpy(parity["images"][n]).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    scores = reward.differentiable()(image, boxes)
    diff = _report("DifferentiableFaceScore", scores.detach().numpy(), parity["ref"]["facescore"][0])
    scores.sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert diff < 1e-3


def test_imagereward_matches_reference(parity):
    from rewards.imagereward import ImageReward

    reward = ImageReward(str(parity["ir_dir"]))
    names = list(parity["images"])
    ours = [reward(parity["images"][n][None], [parity["prompts"][n]])[0].value for n in names]
    ref = parity["ref"]["imagereward"]
    assert np.std(ref) > 0.05, f"random weights give near-constant scores {ref}: parity would prove nothing"
    assert _report("ImageReward", ours, ref) < TOL
