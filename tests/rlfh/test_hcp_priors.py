"""HcP pose priors through the data path: pairs and weighted samples carry them with the region masks,
HG-DPO's real images get theirs from MediaPipe Pose once per image (rlfh/data/pose_prior.py)."""

import numpy as np
import pytest

from rlfh.config.schema import LearnerConfig
from rlfh.data.batches import ScoredSamples
from rlfh.data.pairs import learner_batch
from rlfh.data.pose_prior import PosePriors
from rlfh.data.sources import SourceContext
from rlfh.data.sources.hcp_priors import HcpPriors
from rlfh.losses.filtered import FilteredConfig
from tests.rlfh.test_hgdpo import vae, write_photos  # noqa: F401 (fixture)


def test_learner_batch_selects_the_priors_with_the_pairs_and_samples():
    n = 6
    lat = np.random.default_rng(0).standard_normal((n, 4, 8, 8)).astype(np.float32)
    priors = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 1, 8, 8), np.float32)
    groups = ["a", "a", "a", "b", "b", "b"]
    scores = [0.1, 0.9, 0.5, 0.3, 0.2, 0.8]
    samples = ScoredSamples(lat, groups, groups, scores, [{}] * n, (64, 64), priors=priors)
    pairs, _ = learner_batch(LearnerConfig(), samples)
    # best vs worst per prompt: a -> (1, 0), b -> (5, 4)
    assert pairs.priors_w[:, 0, 0, 0].tolist() == [1.0, 5.0]
    assert pairs.priors_l[:, 0, 0, 0].tolist() == [0.0, 4.0]
    kept, _ = learner_batch(LearnerConfig(loss="filtered", filtered=FilteredConfig(threshold=0.5)), samples)
    assert kept.priors[:, 0, 0, 0].tolist() == [1.0, 2.0, 5.0]
    assert not pairs.masks_w and not kept.masks  # the priors are no region mask


@pytest.fixture(scope="module")
def pose_models():
    pytest.importorskip("mediapipe", reason="needs the 'detect' extra")
    from rewards.base import RewardError
    from rewards.detectors import get_models

    try:
        return get_models.ensure_models()
    except RewardError as e:
        pytest.skip(f"package registry unreachable, cannot fetch the MediaPipe pose model: {e}")


def test_real_images_get_mediapipe_pose_priors_once(tmp_path, pose_models, vae):  # noqa: F811
    from rlfh.data.batches import PairBatch
    from rlfh.data.hgdpo import mix_real_winners
    from rlfh.data.real_images import RealImageSource

    src = RealImageSource(write_photos(tmp_path / "photos"), 256, 256, latent_mode="mean")
    detect, calls = PosePriors(0.03), []
    src.pose_priors = lambda images: calls.append(len(images)) or detect(images)
    masks, priors = src.region_masks([0, 0, 1], ["face"]), src.priors([0, 0, 1])
    assert priors.shape == (3, 1, 32, 32) and masks["face"].shape == (3, 1, 32, 32)
    astronaut = priors[0, 0]
    assert astronaut.max() > 0.2  # MediaPipe Pose found the astronaut's upper body
    assert astronaut[:16].sum() > astronaut[16:].sum() * 0.2  # face and shoulders: not all at the bottom
    assert np.array_equal(priors[0], priors[1]) and calls == [1, 1]  # item 0 once
    assert src.priors([0]).max() > 0 and calls == [1, 1]  # cached
    # HG-DPO: the real winners take their priors into the pairs; kept generated losers keep theirs
    src.encode(vae)
    n = 2
    lat = np.zeros((n, 4, 32, 32), np.float32)
    pairs = PairBatch(
        lat,
        lat,
        ["a portrait of a woman", "a cup"],
        priors_w=np.zeros((n, 1, 32, 32), np.float32),
        priors_l=np.ones((n, 1, 32, 32), np.float32),
    )
    mixed, stats = mix_real_winners(pairs, src, 1.0, round=0, seed=0)
    assert stats["hgdpo/real_pairs"] == 2
    for j, cap in enumerate(mixed.prompts):
        i = next(k for k, it in enumerate(src.items) if it.text == cap)
        assert np.array_equal(mixed.priors_w[j], src.prior(i))
    assert mixed.priors_l.min() == 1.0
    unset = RealImageSource(src.root, 256, 256)
    assert not unset.priors([0]).any()  # no pose_priors: zeros
    detect.close()


def test_offline_batch_takes_priors_from_the_logged_images(tiny_cfg, tmp_path, pose_models):
    from PIL import Image
    from skimage import data

    from rewards.base import RewardResult
    from rewards.composite import ScoredBatch
    from rlfh.recipes.offline import batch_from_log
    from rollouts.log import RolloutLog, make_records
    from rollouts.types import RolloutBatch, SamplerSettings

    person = np.asarray(Image.fromarray(data.astronaut()[:400, 50:450]).resize((256, 256)))
    cup = np.asarray(Image.fromarray(data.coffee()).resize((256, 256)))
    n = 4
    batch = RolloutBatch(
        images=np.stack([person, cup, cup, person]),
        latents=np.zeros((n, 4, 32, 32), np.float32),
        prompts=["a woman", "a woman", "a cup", "a cup"],
        seeds=list(range(n)),
        settings=SamplerSettings(10, 5.0, "", 256, 256),
        policy_version=0,
        model_id="tiny",
        rollout_ids=[f"r{i}" for i in range(n)],
    )
    scored = ScoredBatch(
        results={"jpeg_compressibility": [RewardResult(v) for v in (1.0, 0.0, 1.0, 0.0)]},
        weights={"jpeg_compressibility": 1.0},
        regions_of={"jpeg_compressibility": "global"},
    )
    RolloutLog(tmp_path / "rollouts").append(make_records(batch, scored, round_index=0))
    cfg = tiny_cfg("model.hcp.enabled=true", f"rollouts={tmp_path / 'rollouts'}", "learner.train_batch_size=2")
    hcp = HcpPriors(cfg, SourceContext(tmp_path))
    try:
        pairs, _ = batch_from_log(cfg, [hcp])
    finally:
        hcp.close()
    by_prompt = {p: i for i, p in enumerate(pairs.prompts)}
    w, l = pairs.priors_w, pairs.priors_l
    assert w.shape == (2, 1, 32, 32)
    assert w[by_prompt["a woman"]].max() > 0.2 and not l[by_prompt["a woman"]].any()  # winner: the astronaut
    assert not w[by_prompt["a cup"]].any() and l[by_prompt["a cup"]].max() > 0.2  # loser: the astronaut


def test_online_round_priors_by_mode(tiny_cfg, tmp_path, pose_models):
    from PIL import Image
    from skimage import data

    images = np.stack(
        [
            np.asarray(Image.fromarray(data.astronaut()[:400, 50:450]).resize((256, 256))),
            np.zeros((256, 256, 3), np.uint8),
        ]
    )

    def priors(cfg):
        samples = ScoredSamples(
            np.zeros((2, 4, 32, 32), np.float32),
            ["a", "a"],
            ["a", "a"],
            [1.0, 0.0],
            [{}, {}],
            (256, 256),
            images=images,
        )
        if HcpPriors.wanted(cfg, SourceContext(tmp_path)):
            source = HcpPriors(cfg, SourceContext(tmp_path))
            source.annotate(samples)
            source.close()
        return samples.priors

    assert priors(tiny_cfg()) is None  # HcP off: the source is not built
    got = priors(tiny_cfg("model.hcp.enabled=true"))  # prior=samples: detected on the round's images
    assert got.shape == (2, 1, 32, 32) and got[0].max() > 0.2 and not got[1].any()
    real = priors(
        tiny_cfg("model.hcp.enabled=true", "data.hcp_priors.prior=real", f"data.hgdpo.real_images={tmp_path}")
    )
    assert not real.any()  # prior=real: zeros until HG-DPO's real winners fill theirs
