"""`rlfh finetune` (rlfh/recipes/finetune.py), FairHuman's supervised fine-tuning: real images with their
face masks (from the metadata, else the config's detectors, cached per image), the plain diffusion loss per
region balanced by MPD; it learns the images on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlfh.config.schema import load_config
from tests.conftest import REPO

FACE = "{target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}"
CONFIG = REPO / "configs" / "fairhuman_sdxl.yaml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four 64x64 images: two with a face box in their metadata line, two for the detector."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(4):
            a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            a[16:48, 16:48] = rng.integers(0, 255, 3)
            Image.fromarray(a).save(root / f"{i}.png")
            row = {"file_name": f"{i}.png", "text": f"a photo of person {i}"}
            if i < 2:
                row["regions"] = {"face": [[16, 16, 47, 47]]}
            f.write(json.dumps(row) + "\n")
    return root


def tiny(tiny_model_dir, run_dir, photos) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "model.vae_path=null",
        "model.dtype=float32",
        "model.lora.enabled=false",
        "rollout.height=64",
        "rollout.width=64",
        f"rewards=[{FACE}]",
        "learner.regions.names=[global, face]",
        "learner.train_batch_size=4",
        "learner.micro_batch_size_per_gpu=4",
        "learner.lr=3e-4",
        "learner.engine.zero_stage=0",
        "learner.engine.gradient_checkpointing=false",
        "data.finetune.latent_mode=mean",
        f"data.finetune.images={photos}",
        "logging.wandb=false",
        "logging.progress=false",
    ]


def test_masks_come_from_the_metadata_else_the_detectors_once(photos, tiny_model_dir, tmp_path, monkeypatch):
    from rewards.composite import RewardSet
    from rewards.regions import region_mask
    from rlfh.recipes.finetune import REGIONS_CACHE, finetune_batch

    cfg = load_config(CONFIG, tiny(tiny_model_dir, tmp_path, photos))
    batch, stats = finetune_batch(cfg, tmp_path)
    assert len(batch) == 4 and stats["finetune/with_face"] == 4 and np.all(batch.weights == 1)
    # images 0, 1: their own box (16..47); 2, 3: the fixture detector's (8, 8, 40, 40)
    np.testing.assert_array_equal(batch.masks["face"][0, 0], region_mask([(16, 16, 47, 47)], (64, 64)).numpy())
    np.testing.assert_array_equal(batch.masks["face"][2, 0], region_mask([(8, 8, 40, 40)], (64, 64)).numpy())
    assert len(json.loads((tmp_path / REGIONS_CACHE).read_text())) == 2  # only the two without boxes
    monkeypatch.setattr(RewardSet, "from_config", lambda *a, **k: pytest.fail("the detections are cached"))
    again, _ = finetune_batch(cfg, tmp_path)
    np.testing.assert_array_equal(again.masks["face"], batch.masks["face"])


def test_config_rules_name_the_key(tiny_model_dir, tmp_path, photos):
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"data.finetune.images \(rlfh finetune\) .* use learner.loss=rwr/filtered"):
        load_config(CONFIG, [*tiny(tiny_model_dir, tmp_path, photos), "learner.loss=nft"])
    lc = load_config(CONFIG).learner
    assert lc.regions.names == ["global", "face", "hand"] and lc.regions.fairness.rule == "mpd"
    assert lc.regions.scale == 5.0


def probe_loss(lrn, batch) -> float:
    """mean over fixed (t, eps) probes of the eps-MSE on the training images."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.from_numpy(batch.latents)
    out = []
    with torch.no_grad():
        enc, added = lrn.condition(batch.prompts, 64, 64)
        for t_val in (100, 400, 700):
            eps = torch.randn(x0.shape, generator=g)
            x_t, t, target = lrn.noised(x0, torch.full((len(x0),), t_val), eps)
            pred = lrn.denoiser(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
            out.append(float((pred - target).pow(2).mean()))
    return float(np.mean(out))


@pytest.mark.slow
def test_finetuning_learns_the_images_with_region_losses(photos, tiny_model_dir, tmp_path):
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from rlfh.recipes.finetune import finetune_batch

    cfg = load_config(CONFIG, tiny(tiny_model_dir, tmp_path, photos))
    batch, _ = finetune_batch(cfg, tmp_path)
    lrn = LearnerEngine(cfg)
    before = probe_loss(lrn, batch)
    metrics = [train(lrn, batch, 4) for _ in range(3)]
    after = probe_loss(lrn, batch)
    assert all(np.isfinite(m["loss/filtered/face"]) and m["regions/face/present"] == 1.0 for m in metrics)
    assert "mpd/weight/face" in metrics[-1] or any(k.startswith("fairness/") for k in metrics[-1])
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_rlfh_finetune_command_writes_per_region_losses(photos, tiny_model_dir, tmp_path):
    from rlfh.cli.main import main
    from rlfh.run.metrics import read_metrics

    args = [a for a in tiny(tiny_model_dir, tmp_path / "run", photos) if not a.startswith("data.finetune.images")]
    assert main(["finetune", str(CONFIG), f"data={photos}", "num_rounds=2", *args]) == 0
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(np.isfinite(r["loss/filtered/face"]) and r["finetune/images"] == 4 for r in rows)
