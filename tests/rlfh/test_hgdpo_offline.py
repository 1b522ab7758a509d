"""HG-DPO in ``rlfh offline-dpo``: real and SDRecon winners mixed into the logged pairs on the curriculum,
sampled (SDRecon, fresh losers) at the log's sampler settings by what the loop hands in."""

import numpy as np
import pytest

from rlfh.data.hgdpo import pair_counts
from tests.rlfh.test_hgdpo import write_photos

PROMPTS = ["a portrait of a woman", "a cup of coffee", "a photo of a cat", "a man waving"]
LOG_STEPS = 4  # the log's steps, unlike the config's, so the test sees which settings the samplers get


def write_log(directory, rounds: int = 1, per_prompt: int = 2):
    """A rollout log of ``rounds`` rounds, every prompt sampled ``per_prompt`` times (random latents,
    distinct rewards): one DPO pair per (round, prompt)."""
    from rewards.base import RewardResult
    from rewards.composite import ScoredBatch
    from rollouts.log import RolloutLog, make_records
    from rollouts.types import RolloutBatch, SamplerSettings

    rng = np.random.default_rng(7)
    log = RolloutLog(directory)
    for rnd in range(rounds):
        prompts = [p for p in PROMPTS for _ in range(per_prompt)]
        n = len(prompts)
        batch = RolloutBatch(
            images=np.zeros((n, 64, 64, 3), np.uint8),
            latents=rng.standard_normal((n, 4, 8, 8)).astype(np.float32),
            prompts=prompts,
            seeds=list(range(n)),
            settings=SamplerSettings(LOG_STEPS, 3.0, "blurry", 64, 64),
            policy_version=rnd,
            model_id="tiny",
            rollout_ids=[f"r{rnd}-{i}" for i in range(n)],
        )
        scored = ScoredBatch(
            results={"jpeg_compressibility": [RewardResult(float(v)) for v in rng.permutation(n)]},
            weights={"jpeg_compressibility": 1.0},
            regions_of={"jpeg_compressibility": "global"},
        )
        log.append(make_records(batch, scored, round_index=rnd))
    return directory


class RecordingSampler:
    """The sampler protocol of rlfh/data/sources/hgdpo.py with outputs that name their inputs: ``refine``
    returns its latents + 100, ``sample`` a constant latent per seed; every call is kept."""

    def __init__(self):
        self.calls = []

    def _batch(self, latents, prompts, seeds, settings):
        from rollouts.types import RolloutBatch

        return RolloutBatch(
            np.zeros((len(prompts), 64, 64, 3), np.uint8), latents, list(prompts), list(seeds), settings, 0, "tiny"
        )

    def sample(self, prompts, seeds, settings, batch_size, record=False):
        self.calls.append(("sample", list(prompts), settings))
        lat = np.stack([np.full((4, 8, 8), -1000.0 - i, np.float32) for i in range(len(seeds))])
        return self._batch(lat, prompts, seeds, settings)

    def refine(self, latents, prompts, seeds, settings, strength, masks=None, batch_size=8):
        self.calls.append(("refine", list(prompts), settings, strength))
        return self._batch(np.asarray(latents, np.float32) + 100.0, prompts, seeds, settings)


STAGES = (
    "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0.0}, "
    "{until_round: 2, real_winner_fraction: 0.5, sdrecon_winner_fraction: 0.5}, "
    "{until_round: 3, real_winner_fraction: 1.0}]"
)


@pytest.fixture()
def offline_cfg(tiny_model_dir, tmp_path):
    from rlfh.config.schema import load_config
    from tests.conftest import REPO

    photos = write_photos(tmp_path / "photos")
    rollouts = write_log(tmp_path / "rollouts")

    def make(*overrides):
        return load_config(
            REPO / "configs" / "offline_dpo.yaml",
            [
                f"run_dir={tmp_path / 'run'}",
                f"model.path={tiny_model_dir}",
                f"rollouts={rollouts}",
                f"data.hgdpo.real_images={photos}",
                STAGES,
                *overrides,
            ],
        )

    return make


def test_offline_mixing_follows_the_curriculum_with_the_logs_settings(offline_cfg, tmp_path):
    from rlfh.data.sources import SourceContext
    from rlfh.data.sources.hgdpo import RealWinners
    from rlfh.recipes.offline import batch_from_log, logged_settings

    cfg = offline_cfg("data.hgdpo.sdrecon_strength=0.5")
    pairs, _ = batch_from_log(cfg)
    settings = logged_settings(cfg)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.negative_prompt, settings.height) == (
        LOG_STEPS,
        3.0,
        "blurry",
        64,
    )
    sampler = RecordingSampler()
    hg = RealWinners(cfg, SourceContext(tmp_path, sampler, settings))
    n = len(pairs)
    assert n == len(PROMPTS)
    # round 0, the easy stage: the logged pairs as they are, nothing sampled
    same, stats = hg.mix(pairs, 0)
    assert same is pairs and stats["hgdpo/generated_pairs"] == n and not sampler.calls
    # round 1: half real, half SDRecon winners, each with a fresh loser for its caption
    mixed, stats = hg.mix(pairs, 1)
    k_real, k_sd = pair_counts(0.5, 0.5, n)
    assert (stats["hgdpo/real_pairs"], stats["hgdpo/sdrecon_pairs"], stats["hgdpo/generated_pairs"]) == (
        k_real,
        k_sd,
        0,
    )
    assert [c[0] for c in sampler.calls] == ["sample", "refine"]
    assert all(c[2] == settings for c in sampler.calls) and sampler.calls[1][3] == 0.5
    real_by_caption = {it.text: hg.source.latents[i] for i, it in enumerate(hg.source.items)}
    loser_caps, sd_caps = sampler.calls[0][1], sampler.calls[1][1]
    assert loser_caps[k_real:] == sd_caps
    kinds = []
    for j in range(n):
        w, l, cap = mixed.latents_w[j], mixed.latents_l[j], mixed.prompts[j]
        assert l.min() <= -1000 and cap in real_by_caption  # every loser fresh, every prompt a caption
        kinds.append(
            "sdrecon"
            if np.allclose(w, real_by_caption[cap] + 100.0)
            else "real"
            if np.array_equal(w, real_by_caption[cap])
            else "other"
        )
    assert sorted(kinds) == ["real"] * k_real + ["sdrecon"] * k_sd
    # round 2, the hard stage: real winners only
    _, stats = hg.mix(pairs, 2)
    assert (stats["hgdpo/real_pairs"], stats["hgdpo/sdrecon_pairs"]) == (n, 0) and sampler.calls[-1][0] == "sample"


def test_offline_mixing_keeps_logged_losers_without_fresh_ones(offline_cfg, tmp_path):
    from rlfh.data.sources import SourceContext
    from rlfh.data.sources.hgdpo import RealWinners, needs_policy_samples
    from rlfh.recipes.offline import batch_from_log, logged_settings

    cfg = offline_cfg(
        "data.hgdpo.fresh_losers=false", "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 1.0}]"
    )
    assert not needs_policy_samples(cfg.data.hgdpo)
    pairs, _ = batch_from_log(cfg)
    mixed, stats = RealWinners(cfg, SourceContext(tmp_path, None, logged_settings(cfg))).mix(pairs, 0)
    assert stats["hgdpo/real_pairs"] == len(pairs)
    assert np.array_equal(mixed.latents_l, pairs.latents_l) and not np.array_equal(mixed.latents_w, pairs.latents_w)
    with pytest.raises(ValueError, match="no sampler"):
        RealWinners(offline_cfg(), SourceContext(tmp_path, None, logged_settings(cfg)))
    with pytest.raises(ValueError, match=r"sdrecon_strength=0.1 of rollout.num_inference_steps=4 runs no denoising"):
        RealWinners(
            offline_cfg("data.hgdpo.sdrecon_strength=0.1"),
            SourceContext(tmp_path, RecordingSampler(), logged_settings(cfg)),
        )


def test_offline_hcp_real_priors_reach_the_real_winners(offline_cfg, tmp_path):
    """data.hcp_priors.prior=real offline: the logged samples carry zero priors (as online) that the real
    winners fill with their own, so the HcP loss sees them (without the key they were dropped)."""
    from rlfh.data.sources import SourceContext
    from rlfh.data.sources.hgdpo import RealWinners
    from rlfh.recipes.offline import batch_from_log, logged_settings

    cfg = offline_cfg(
        "model.hcp.enabled=true",
        "data.hcp_priors.prior=real",
        "data.hgdpo.fresh_losers=false",
        "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 1.0}]",
    )
    from rlfh.data.sources.hcp_priors import HcpPriors

    pairs, _ = batch_from_log(cfg, [HcpPriors(cfg, SourceContext(tmp_path))])
    assert pairs.priors_w is not None and not pairs.priors_w.any()
    hg = RealWinners(cfg, SourceContext(tmp_path, None, logged_settings(cfg)))
    hg.source.pose_priors = lambda images: np.ones((len(images), 1, 8, 8), np.float32)  # a stand-in detector
    mixed, _ = hg.mix(pairs, 0)
    assert mixed.priors_w.shape == (len(pairs), 1, 8, 8) and mixed.priors_w.min() == 1.0


@pytest.mark.slow
def test_offline_dpo_hgdpo_curriculum(tiny_model_dir, tmp_path):
    """`rlfh offline-dpo` with HG-DPO: easy, normal (SDRecon by the learner's own UNet), hard, one round each."""
    import time

    from rlfh.run.metrics import read_metrics
    from tests.test_end_to_end import rlfh

    rollouts = write_log(tmp_path / "rollouts")
    run_dir = tmp_path / "run"
    t0 = time.time()
    rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={rollouts}",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "num_rounds=3",
        "logging.progress=false",
        f"data.hgdpo.real_images={write_photos(tmp_path / 'photos')}",
        "data.hgdpo.sdrecon_strength=0.5",
        "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0.0}, "
        "{until_round: 2, real_winner_fraction: 0.0, sdrecon_winner_fraction: 1.0}, "
        "{until_round: 3, real_winner_fraction: 1.0}]",
    )
    print(f"offline-dpo with HG-DPO, 3 rounds: {time.time() - t0:.1f}s")
    rows = read_metrics(run_dir)
    n = len(PROMPTS)
    assert [r["hgdpo/stage"] for r in rows] == [0, 1, 2]
    assert [(r["hgdpo/generated_pairs"], r["hgdpo/sdrecon_pairs"], r["hgdpo/real_pairs"]) for r in rows] == [
        (n, 0, 0),
        (0, n, 0),
        (0, 0, n),
    ]
    # the normal stage's winners came from the policy, between the real image and a fresh sample
    assert 0 < rows[1]["hgdpo/sdrecon_real_rms"] < rows[1]["hgdpo/loser_real_rms"]
    assert all(np.isfinite(r["loss/dpo"]) and r["learner/steps"] > 0 for r in rows)
    assert (run_dir / "checkpoints" / "round-000003" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_offline_hgdpo_on_two_learner_ranks(ray_local, tiny_model_dir, tmp_path):
    """Two data-parallel ranks: rank 0 samples the SDRecon winners and fresh losers with its own UNet."""
    from rlfh.config.schema import load_config
    from rlfh.recipes.offline import train_offline
    from rlfh.run.metrics import read_metrics
    from tests.conftest import REPO

    over = [
        f"run_dir={tmp_path / 'run'}",
        f"model.path={tiny_model_dir}",
        f"rollouts={write_log(tmp_path / 'rollouts')}",
        f"data.hgdpo.real_images={write_photos(tmp_path / 'photos')}",
        "num_rounds=2",
        "logging.progress=false",
        "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0.5, sdrecon_winner_fraction: 0.5}, "
        "{until_round: 2, real_winner_fraction: 1.0}]",
        "learner.micro_batch_size_per_gpu=1",
        "resources.num_learner_ranks=2",
        "resources.num_cpus_per_actor=0.5",
    ]
    rows = read_metrics(train_offline(load_config(REPO / "configs" / "offline_dpo.yaml", over)))
    n = len(PROMPTS)
    assert [(r["hgdpo/sdrecon_pairs"], r["hgdpo/real_pairs"]) for r in rows] == [(n // 2, n // 2), (0, n)]
    assert 0 < rows[0]["hgdpo/sdrecon_real_rms"] < rows[0]["hgdpo/loser_real_rms"]
    assert all(np.isfinite(r["loss/dpo"]) for r in rows)
    with pytest.raises(ValueError, match="learner.engine.zero_stage=3 partitions"):
        train_offline(load_config(REPO / "configs" / "offline_dpo.yaml", [*over, "learner.engine.zero_stage=3"]))
