"""HG-DPO pieces on the tiny model: real-image source, curriculum, mixing, one DPO step."""

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfh.config.schema import ConfigError, HGDPOStage, load_config
from rlfh.data.batches import PairBatch
from rlfh.data.hgdpo import Curriculum, mix_real_winners, prompts_for_losers, real_pair_count
from rlfh.data.real_images import RealImageSource, prepare_image

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = {
    "astronaut.jpg": "a portrait of a woman in a space suit",
    "coffee.png": "a cup of coffee on a saucer",
    "chelsea.jpg": "a photo of a cat",
}


def write_photos(root):
    """Three real photos (skimage crops) in the ImageFolder layout; the astronaut has a face box."""
    from PIL import Image
    from skimage import data

    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()[:400, 50:450]).save(root / "astronaut.jpg", quality=90)
    Image.fromarray(data.coffee()).save(root / "coffee.png")
    Image.fromarray(data.chelsea()).save(root / "chelsea.jpg", quality=90)
    rows = [{"file_name": f, "text": t} for f, t in CAPTIONS.items()]
    rows[0]["regions"] = {"face": [[120, 20, 260, 200]]}  # 400x400 crop, face near the top centre
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from families import load_pipeline
    from rlfh.config.schema import ModelConfig
    from rlfh.data.real_images import load_vae

    alone = load_vae(ModelConfig(path=tiny_model_dir))
    piped = load_pipeline(ModelConfig(path=tiny_model_dir)).vae
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), piped.state_dict().values()))
    return alone


@pytest.fixture()
def photos(tmp_path):
    return write_photos(tmp_path / "photos")


def test_encoding_equals_a_direct_vae_call(photos, vae):
    src = RealImageSource(photos, 64, 48, latent_mode="mean")
    lat = src.encode(vae)
    assert lat.shape == (3, 4, 8, 6) and lat.dtype == np.float32
    x = torch.from_numpy(np.stack([src.image(i) for i in range(3)]))
    assert x.shape == (3, 3, 64, 48) and x.min() >= -1.0 and x.max() <= 1.0
    with torch.no_grad():
        direct = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(lat, direct.numpy(), rtol=1e-5, atol=1e-6)


def test_sampled_latents_match_diffusers_sample_and_ignore_batching(photos, vae):
    one = RealImageSource(photos, 64, 64, encode_batch_size=1, seed=3).encode(vae)
    two = RealImageSource(photos, 64, 64, encode_batch_size=2, seed=3).encode(vae)
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)
    x = torch.from_numpy(prepare_image(__import__("PIL.Image").Image.open(photos / "coffee.png"), 64, 64))[None]
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(3 * 1_000_003 + 1))
    np.testing.assert_allclose(one[1], (ref * vae.config.scaling_factor)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_cache_is_reused_and_invalidated_when_a_file_changes(photos, vae, tmp_path):
    run = tmp_path / "run"
    first = RealImageSource(photos, 64, 64, cache_dir=run)
    a = first.encode(vae)
    assert not first.loaded_from_cache and len(list(run.glob("hgdpo-real-*.safetensors"))) == 1
    again = RealImageSource(photos, 64, 64, cache_dir=run)
    np.testing.assert_array_equal(again.encode(vae), a)
    assert again.loaded_from_cache

    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()[::-1]).save(photos / "chelsea.jpg", quality=80)  # new content, size, mtime
    os.utime(photos / "chelsea.jpg", ns=(1, 1))
    changed = RealImageSource(photos, 64, 64, cache_dir=run)
    b = changed.encode(vae)
    assert not changed.loaded_from_cache
    np.testing.assert_array_equal(b[:2], a[:2])
    assert not np.allclose(b[2], a[2])
    assert len(list(run.glob("hgdpo-real-*.safetensors"))) == 1  # the stale encoding is gone
    assert RealImageSource(photos, 64, 32, cache_dir=run).encode(vae).shape == (3, 4, 8, 4)  # size is in the key


def test_clear_errors(tmp_path, photos, vae):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        RealImageSource(tmp_path / "nowhere", 64, 64)
    (photos / "metadata.jsonl").write_text('{"file_name": "gone.jpg", "text": "x"}\n{"text": "no file"}\n')
    with pytest.raises(ValueError, match=r"(?s)2 problem.*gone\.jpg.*line 2"):
        RealImageSource(photos, 64, 64)
    (photos / "bad.jpg").write_bytes(b"not an image")
    (photos / "metadata.jsonl").write_text('{"file_name": "bad.jpg", "text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jpg cannot be read"):
        RealImageSource(photos, 64, 64).encode(vae)
    (photos / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        RealImageSource(photos, 64, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        RealImageSource(photos, 60, 64)
    saved = tmp_path / "hf"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            RealImageSource(saved, 64, 64)


def test_sampling_is_deterministic_and_distinct(photos):
    src = RealImageSource(photos, 64, 64)
    assert src.sample(3, round=5, seed=1) == src.sample(3, round=5, seed=1)
    assert sorted(src.sample(3, round=5, seed=1)) == [0, 1, 2]
    assert len(src.sample(7, 0, 0)) == 7 and src.sample(0, 0, 0) == []
    assert {tuple(src.sample(3, r, 0)) for r in range(20)} != {tuple(src.sample(3, 0, 0))}


def test_curriculum_values_at_stage_edges():
    stages = [HGDPOStage(10, 0.0), HGDPOStage(20, 0.5), HGDPOStage(30, 1.0)]
    steps = Curriculum(stages)
    assert [steps.fraction(r) for r in (0, 9, 10, 19, 20, 29, 30, 1000)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    ramp = Curriculum(stages, interpolate=True)
    assert [ramp.fraction(r) for r in (0, 9, 10, 15, 20, 25, 30, 99)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    as_dicts = Curriculum([dataclasses.asdict(s) for s in stages], interpolate=True)
    assert [as_dicts.fraction(r) for r in (0, 15, 99)] == [0.0, 0.25, 1.0]


def test_curriculum_and_config_share_one_validation():
    bad = [
        "data.hgdpo.stages=[{until_round: 10, real_winner_fraction: 0.0}, {until_round: 5, real_winner_fraction: 1.5}]",
        "data.hgdpo.real_images=/photos",
    ]
    with pytest.raises(ConfigError) as cfg_err:
        load_config(REPO / "configs" / "tiny.yaml", bad)
    expected = [
        r"data.hgdpo.stages\[1\].until_round=5: must be greater than the previous stage's 10",
        r"data.hgdpo.stages\[1\].real_winner_fraction=1.5: must be in \[0, 1\]",
    ]
    for pattern in expected:
        assert re.search(pattern, str(cfg_err.value))
    with pytest.raises(ValueError, match="(?s)" + ".*".join(expected)):
        Curriculum([HGDPOStage(10, 0.0), HGDPOStage(5, 1.5)])
    with pytest.raises(ValueError, match="no stages"):
        Curriculum([])
    with pytest.raises(ValueError, match=r"stages\[0\].*until_round and real_winner_fraction"):
        Curriculum([{"until_round": 40, "real_winner_fraction": 1.0, "fraction": 1}])


def generated_pairs(n=4, with_masks=True):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    prompts = ["a photo of a cat", "a portrait of a woman", "a man waving his hand", "two people talking"][:n]
    masks = {"face": np.ones((n, 1, 8, 8), np.float32)} if with_masks else {}
    return PairBatch(lat[0], lat[1], prompts, masks, {k: v.copy() for k, v in masks.items()})


def test_mixing_replaces_the_expected_winners_and_keeps_losers(photos, vae):
    src = RealImageSource(photos, 64, 64)
    real = src.encode(vae)
    pairs = generated_pairs()
    assert real_pair_count(0.5, 4) == 2 and real_pair_count(0.125, 4) == 1 and real_pair_count(0.1, 4) == 0
    mixed, stats = mix_real_winners(pairs, src, 0.5, round=3, seed=0)
    assert stats == {
        "hgdpo/real_winner_fraction": 0.5,
        "hgdpo/real_pairs": 2.0,
        "hgdpo/sdrecon_winner_fraction": 0.0,
        "hgdpo/sdrecon_pairs": 0.0,
        "hgdpo/generated_pairs": 2.0,
    }
    idx = src.sample(2, 3, 0)
    changed = [j for j in range(4) if not np.array_equal(mixed.latents_w[j], pairs.latents_w[j])]
    assert len(changed) == 2
    np.testing.assert_array_equal(mixed.latents_l, pairs.latents_l)  # generated losers stay
    assert sorted(mixed.prompts[j] for j in changed) == sorted(src.items[i].text for i in idx)
    for j in changed:  # each winner is the real image of its caption
        i = next(i for i in idx if src.items[i].text == mixed.prompts[j])
        np.testing.assert_array_equal(mixed.latents_w[j], real[i])
        has_box = bool(src.items[i].regions)
        assert mixed.masks_w["face"][j].any() == has_box and mixed.masks_l["face"][j].all()
    if any(src.items[i].text == "a photo of a cat" for i in idx):
        assert mixed.prompts[0] == "a photo of a cat"  # the closest prompt's pair took the cat
    assert mix_real_winners(pairs, src, 0.0, 3, 0)[0] is pairs


def test_fresh_losers_for_the_real_captions(photos, vae):
    src = RealImageSource(photos, 64, 64)
    src.encode(vae)
    pairs = generated_pairs(with_masks=False)
    captions = prompts_for_losers(src, 0.75, 4, round=1, seed=2)
    assert len(captions) == 3
    fresh = np.stack([np.full((4, 8, 8), 10.0 + s, np.float32) for s in range(3)])  # loser s marked 10 + s
    mixed, _ = mix_real_winners(pairs, src, 0.75, 1, 2, losers_latents=fresh)
    slot = {j: int(mixed.latents_l[j, 0, 0, 0]) - 10 for j in range(4) if mixed.latents_l[j, 0, 0, 0] >= 10}
    assert sorted(slot.values()) == [0, 1, 2]
    for j, s in slot.items():  # loser s was generated for caption s, and the pair is conditioned on it
        assert mixed.prompts[j] == captions[s]
        real_i = next(i for i in range(3) if src.items[i].text == captions[s])
        np.testing.assert_array_equal(mixed.latents_w[j], src.encode(vae)[real_i])
    untouched = next(j for j in range(4) if j not in slot)
    np.testing.assert_array_equal(mixed.latents_l[untouched], pairs.latents_l[untouched])
    with pytest.raises(ValueError, match="one per caption"):
        mix_real_winners(pairs, src, 0.75, 1, 2, losers_latents=fresh[:2])
    with pytest.raises(RuntimeError, match="encode"):
        mix_real_winners(pairs, RealImageSource(photos, 64, 64), 0.5, 1, 2)


def test_mixed_pairs_train_one_step(photos, vae, tiny_model_dir):
    from rlfh.config.schema import load_config
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"model.path={tiny_model_dir}", "learner.train_batch_size=4", "learner.micro_batch_size_per_gpu=4"],
    )
    src = RealImageSource(photos, cfg.rollout.height, cfg.rollout.width)
    src.encode(vae)
    mixed, _ = mix_real_winners(generated_pairs(with_masks=False), src, 1.0, 0, cfg.seed)
    metrics = train(LearnerEngine(cfg), mixed, epochs=1)
    assert metrics["learner/steps"] == 1.0 and math.isfinite(metrics["loss/dpo"])


def test_fp16_vae_is_upcast_and_latents_mean_std_are_applied(photos, vae):
    import copy

    base = RealImageSource(photos, 64, 64, latent_mode="mean").encode(vae)
    half = copy.deepcopy(vae).to(torch.float16)  # force_upcast is true in the tiny (SDXL-like) config
    seen = []
    half.encoder.register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, mod.conv_in.weight.dtype)))
    up = RealImageSource(photos, 64, 64, latent_mode="mean").encode(half)
    assert seen == [(torch.float32, torch.float32)] and half.dtype == torch.float16  # upcast, then restored
    np.testing.assert_allclose(up, base, rtol=0, atol=0.05 * np.abs(base).max())  # fp16 weights, fp32 compute
    shifted = copy.deepcopy(vae)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 1.0]
    shifted.register_to_config(latents_mean=mean, latents_std=std)
    got = RealImageSource(photos, 64, 64, latent_mode="mean").encode(shifted)
    raw = base / vae.config.scaling_factor
    want = (raw - np.array(mean).reshape(1, 4, 1, 1)) * vae.config.scaling_factor / np.array(std).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_saved_datasets_dataset(tmp_path, vae):
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    from skimage import data

    images = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    datasets.Dataset.from_dict({"image": images, "text": ["a cup of coffee", "a cat"]}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(tmp_path / "hf"))
    src = RealImageSource(tmp_path / "hf", 64, 64, latent_mode="mean")
    assert [it.text for it in src.items] == ["a cup of coffee", "a cat"]
    x = torch.from_numpy(np.stack([prepare_image(im, 64, 64) for im in images]))
    with torch.no_grad():
        direct = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(src.encode(vae), direct.numpy(), rtol=1e-5, atol=1e-6)


def test_curriculum_must_end_within_the_run():
    # the walkthrough once ended its hard stage at round 300 of a 200-round run: that stage never ran
    stages = (
        "data.hgdpo.stages=[{until_round: 100, real_winner_fraction: 0.0}, {until_round: 200, "
        "real_winner_fraction: 0.0, sdrecon_winner_fraction: 1.0}, {until_round: 300, real_winner_fraction: 1.0}]"
    )
    with pytest.raises(
        ConfigError, match=r"stages\[2\].until_round=300 > num_rounds=200.*stages \[2\] would never run"
    ):
        load_config(REPO / "configs" / "tiny.yaml", [stages, "num_rounds=200", "data.hgdpo.real_images=/photos"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", [stages, "num_rounds=300", "data.hgdpo.real_images=/photos"])
    assert cfg.data.hgdpo.stages[-1].until_round == 300
