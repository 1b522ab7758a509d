"""A scorer written by `rlfh train-reward` loads in the reference code unchanged (opt-in).

Run: ``tests/parity/setup_reference_env.sh`` once, then ``RLFH_PARITY=1 pytest tests/parity -s``.
A full-size random-weight scorer (ViT-L/16 + med_config BERT, the reference's only architecture)
is fine-tuned by ``train_reward`` for one step at FaceScore's lr 1e-5 on two logged pairs; the
folder it writes is then scored by the reference FaceScore (OPPO-Mente-Lab/FaceScore, given face
boxes) and by the reference ImageReward (image-reward 1.5, ``RM.load``), and by rlfh's FaceScore
and ImageReward loaders: the scores must agree to 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import Detection
from rewards.blip_preprocess import VOCAB_PATH
from rewards.detectors.base import FixedBoxes
from rollouts.log import RolloutLog, decode_png
from tests.parity.test_reference_parity import FACESCORE_SRC, REF_VENV, TOL, _report

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(os.environ.get("RLFH_PARITY") != "1", reason="opt-in: set RLFH_PARITY=1"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (REF_VENV / "bin" / "python").exists() or not (FACESCORE_SRC / "FaceScore").is_dir():
        pytest.skip(f"no reference env at {REF_VENV}: run tests/parity/setup_reference_env.sh")
    from rlfh.config.schema import load_config
    from rlfh.recipes.train_reward import train_reward
    from tests.rewards.tiny_blip import FULL_MED_CONFIG, VIT_L, random_model, save_published
    from tests.rlfh.region_pair_logs import BOX, write_pair_log

    root = tmp_path_factory.mktemp("trained_parity")
    init = save_published(random_model(VIT_L, FULL_MED_CONFIG, seed=0), FULL_MED_CONFIG, root / "init", "FS_model.pt")
    log = write_pair_log(root / "log", 2, seed=0)
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"run_dir={root / 'run'}",
            "logging.wandb=false",
            "logging.progress=false",
            "rewards=[{target: jpeg_compressibility, name: quality}]",
            f"reward_training.pairs={log}",
            f"reward_training.init={init}",
            "reward_training.heldout_fraction=0",
            "reward_training.batch_size=2",
        ],
    )
    run = train_reward(cfg)
    # one ImageReward.pt beside the same med_config, for the ImageReward loaders (no second 1.8 GB file)
    (root / "ir").mkdir()
    os.link(run / "FS_model.pt", root / "ir" / "ImageReward.pt")
    shutil.copy(run / "med_config.json", root / "ir" / "med_config.json")
    (root / "bert-base-uncased").mkdir()
    shutil.copy(VOCAB_PATH, root / "bert-base-uncased" / "vocab.txt")
    images = [decode_png(r["image"]) for r in RolloutLog(log).records(["image"])]
    paths = []
    for i, im in enumerate(images):
        paths.append(root / f"img{i}.png")
        Image.fromarray(im).save(paths[-1])
    faces = [[*BOX, 0.99]]
    job = {
        "weights": str(run / "FS_model.pt"),
        "med_config": str(run / "med_config.json"),
        "facescore_src": str(FACESCORE_SRC),
        "facescore": [{"image": str(p), "faces": faces} for p in paths],
        "imagereward": [{"image": str(p), "prompt": "A face."} for p in paths],
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
    return {"run": run, "init": init, "ir_dir": root / "ir", "images": images, "box": BOX, "ref": ref}


def test_training_changed_the_scorer(trained):
    before = torch.load(trained["init"] / "FS_model.pt", weights_only=True)
    after = torch.load(trained["run"] / "FS_model.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert not torch.equal(before["mlp.layers.0.weight"], after["mlp.layers.0.weight"])
    assert torch.equal(
        before["blip.visual_encoder.blocks.0.attn.qkv.weight"], after["blip.visual_encoder.blocks.0.attn.qkv.weight"]
    )  # frozen (first 16 of 24)


def test_trained_scorer_matches_reference_facescore(trained):
    from rewards.facescore import FaceScore

    reward = FaceScore(str(trained["run"]), detector=FixedBoxes([[Detection(trained["box"], 0.99)]]))
    ours = [reward(im[None], ["x"])[0].value for im in trained["images"]]
    ref = [s for scores in trained["ref"]["facescore"] for s in scores]
    assert len(ref) == len(ours)
    assert _report("trained FaceScore", ours, ref) < TOL


def test_trained_scorer_matches_reference_imagereward(trained):
    from rewards.imagereward import ImageReward

    reward = ImageReward(str(trained["ir_dir"]))
    ours = [reward(im[None], ["A face."])[0].value for im in trained["images"]]
    assert _report("trained ImageReward", ours, trained["ref"]["imagereward"]) < TOL
    assert np.std(ours) > 0  # different images, different scores
