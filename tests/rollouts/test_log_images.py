"""logging.log_images (png | jpeg | none) and logging.keep_image_rounds: what each record keeps,
that latents (what offline DPO reads) always stay, and that the log stays verifiable."""

import warnings

import numpy as np
import pytest

from rollouts.log import RolloutLog, RolloutLogError, decode_latent, decode_png, make_records
from tests.rollouts.test_log import fake_round


def smooth_round(seed=0, n=4):
    """fake_round with photo-like (smooth) images, which JPEG keeps close."""
    batch, scored = fake_round(n=n, seed=seed)
    y, x = np.mgrid[0:16, 0:16]
    smooth = np.stack([x * 12, y * 12, (x + y) * 6], -1).astype(np.uint8)
    batch.images[:] = np.roll(smooth, seed, axis=1)[None]
    return batch, scored


def shard_bytes(log):
    return sum(e["bytes"] for e in log.manifest()["shards"])


@pytest.mark.parametrize("fmt", ["png", "jpeg", "none"])
def test_each_format_keeps_the_latents(tmp_path, fmt):
    log = RolloutLog(tmp_path / fmt, image_format=fmt)
    batch, scored = smooth_round()
    log.append(make_records(batch, scored, round_index=0))
    recs = log.records()
    for r, lat, img in zip(recs, batch.latents, batch.images):
        np.testing.assert_array_equal(decode_latent(r), lat)
        if fmt == "png":
            np.testing.assert_array_equal(decode_png(r["image"]), img)
        elif fmt == "jpeg":
            assert r["image"][:2] == b"\xff\xd8"  # a JPEG
            assert np.abs(decode_png(r["image"]).astype(int) - img).mean() < 3
        else:
            assert r["image"] is None
            with pytest.raises(RolloutLogError, match="log_images=none"):
                decode_png(r["image"])


def test_jpeg_and_none_are_smaller_than_png(tmp_path):
    import dataclasses

    from PIL import Image
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS))
    sizes = {}
    for fmt in ("png", "jpeg", "none"):
        log = RolloutLog(tmp_path / fmt, image_format=fmt)
        batch, scored = fake_round(n=4)
        batch = dataclasses.replace(batch, images=np.stack([photo] * 4))
        log.append(make_records(batch, scored, round_index=0))
        sizes[fmt] = shard_bytes(log)
    assert sizes["none"] < sizes["jpeg"] < 0.5 * sizes["png"], sizes


def test_keep_image_rounds_drops_older_images_and_the_log_verifies(tmp_path):
    log = RolloutLog(tmp_path / "rollouts", keep_image_rounds=2)
    batches = [smooth_round(seed=r) for r in range(5)]
    for r, (batch, scored) in enumerate(batches):
        log.append(make_records(batch, scored, round_index=r))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray (unlisted) shard left behind
        recs = log.records()
    assert len(recs) == 20
    by_round = {}
    for rec in recs:
        by_round.setdefault(rec["round"], []).append(rec)
    for r, rows in by_round.items():
        assert all((row["image"] is None) == (r < 3) for row in rows), r  # images of rounds 3, 4 stay
        for row, lat in zip(rows, batches[r][0].latents):
            np.testing.assert_array_equal(decode_latent(row), lat)
    names = [e["name"] for e in log.manifest()["shards"]]
    assert sorted(p.name for p in log.dir.glob("shard-*.parquet")) == sorted(names)
    assert [e.get("images") for e in log.manifest()["shards"]] == ["none"] * 3 + [None] * 2
    # a resumed run rolls back the later rounds as before
    assert log.rollback(2) == 12 and {r["round"] for r in log.records()} == {0, 1}


def test_a_corrupted_shard_is_not_rewritten(tmp_path):
    log = RolloutLog(tmp_path / "rollouts")
    log.append(make_records(*smooth_round(), round_index=0))
    shard = log.dir / log.manifest()["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RolloutLogError, match="not dropping its images"):
        log.drop_images(before_round=5)


def test_config_keys_are_validated():
    from rlfh.config.schema import ConfigError, config_from_dict

    assert config_from_dict({"logging": {"log_images": "jpeg", "keep_image_rounds": 3}}).logging.log_images == "jpeg"
    with pytest.raises(ConfigError, match="logging.keep_image_rounds=0"):
        config_from_dict({"logging": {"keep_image_rounds": 0}})
    with pytest.raises(ConfigError, match="logging.log_images"):
        config_from_dict({"logging": {"log_images": "webp"}})
