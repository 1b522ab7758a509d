"""HG-DPO's normal stage: SDRecon winners (the real image re-noised part-way and denoised by the current
policy) on the curriculum, their validation, the mixing, and what they do to the policy."""

import re

import numpy as np
import pytest
import torch

from rlfh.config.schema import ConfigError, HGDPOStage, load_config
from rlfh.data.hgdpo import Curriculum, mix_real_winners, pair_counts, prompts_for_losers, sdrecon_inputs
from rlfh.data.real_images import RealImageSource
from tests.conftest import REPO
from tests.rlfh.test_hgdpo import generated_pairs, vae, write_photos  # noqa: F401 (vae is a fixture)

THREE_STAGES = [HGDPOStage(10, 0.0), HGDPOStage(20, 0.0, 1.0), HGDPOStage(30, 1.0)]  # easy, normal, hard


def test_curriculum_with_a_normal_stage():
    steps = Curriculum(THREE_STAGES)
    rounds = (0, 9, 10, 19, 20, 29, 30, 99)
    assert [steps.stage(r) for r in rounds] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [steps.fraction(r) for r in rounds] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert [steps.sdrecon_fraction(r) for r in rounds] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    ramp = Curriculum(THREE_STAGES, interpolate=True)
    assert [ramp.sdrecon_fraction(r) for r in (0, 15, 20, 25, 30)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert [ramp.fraction(r) for r in (0, 15, 20, 25, 30)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert all(ramp.fraction(r) + ramp.sdrecon_fraction(r) <= 1.0 for r in range(40))
    assert (
        pair_counts(0.5, 0.5, 3) == (2, 1)
        and pair_counts(0.0, 1.0, 4) == (0, 4)
        and pair_counts(0.25, 0.25, 4) == (1, 1)
    )


def test_normal_stage_validation_in_config_and_curriculum():
    bad = [
        "data.hgdpo.real_images=/photos",
        "data.hgdpo.stages=[{until_round: 5, real_winner_fraction: 0.6, sdrecon_winner_fraction: 0.6}, "
        "{until_round: 9, real_winner_fraction: 0.0, sdrecon_winner_fraction: -0.1}]",
        "data.hgdpo.sdrecon_strength=0.05",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", bad)
    for pattern in [
        r"data.hgdpo.stages\[0\]: real_winner_fraction \+ sdrecon_winner_fraction = 0.6 \+ 0.6 > 1",
        r"data.hgdpo.stages\[1\].sdrecon_winner_fraction=-0.1: must be in \[0, 1\]",
        r"data.hgdpo.sdrecon_strength=0.05 of rollout.num_inference_steps=10 runs no denoising step",
    ]:
        assert re.search(pattern, str(err.value)), str(err.value)
    with pytest.raises(ConfigError, match=r"data.hgdpo.sdrecon_strength=1.5: must be in \(0, 1\]"):
        load_config(
            REPO / "configs" / "tiny.yaml",
            [
                *bad[:1],
                "data.hgdpo.sdrecon_strength=1.5",
                "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0, sdrecon_winner_fraction: 1}]",
            ],
        )
    with pytest.raises(ValueError, match=r"0.6 \+ 0.6 > 1"):
        Curriculum([HGDPOStage(5, 0.6, 0.6)])
    # the strength only matters when a stage asks for SDRecon winners
    load_config(REPO / "configs" / "tiny.yaml", ["data.hgdpo.real_images=/photos", "data.hgdpo.sdrecon_strength=0"])


def test_mixing_places_sdrecon_winners_with_their_captions(tmp_path, vae):  # noqa: F811
    src = RealImageSource(write_photos(tmp_path / "photos"), 64, 64)
    real = src.encode(vae)
    pairs = generated_pairs(with_masks=False)
    real_in, sd_caps = sdrecon_inputs(src, 0.25, 4, round=2, seed=1, sdrecon_fraction=0.5)
    caps = prompts_for_losers(src, 0.25, 4, round=2, seed=1, sdrecon_fraction=0.5)
    assert len(caps) == 3 and caps[1:] == sd_caps and real_in.shape == (2, 4, 8, 8)
    for lat, cap in zip(real_in, sd_caps):  # the inputs are the captioned images' real latents
        np.testing.assert_array_equal(lat, real[[it.text for it in src.items].index(cap)])
    marked = np.stack([np.full((4, 8, 8), 20.0 + s, np.float32) for s in range(2)])  # SDRecon winner s marked 20 + s
    fresh = np.stack([np.full((4, 8, 8), 10.0 + s, np.float32) for s in range(3)])
    mixed, stats = mix_real_winners(
        pairs, src, 0.25, 2, 1, losers_latents=fresh, sdrecon_fraction=0.5, sdrecon_latents=marked
    )
    assert (stats["hgdpo/real_pairs"], stats["hgdpo/sdrecon_pairs"], stats["hgdpo/generated_pairs"]) == (1, 2, 1)
    for j in range(4):
        w = mixed.latents_w[j, 0, 0, 0]
        if w >= 20:  # an SDRecon pair: its caption, and the loser generated for that caption
            s = int(w) - 20
            assert mixed.prompts[j] == sd_caps[s] and mixed.latents_l[j, 0, 0, 0] == 11 + s
        elif mixed.latents_l[j, 0, 0, 0] == 10:  # the real pair
            assert mixed.prompts[j] == caps[0]
            np.testing.assert_array_equal(mixed.latents_w[j], real[[it.text for it in src.items].index(caps[0])])
        else:
            np.testing.assert_array_equal(mixed.latents_w[j], pairs.latents_w[j])
    with pytest.raises(ValueError, match="sdrecon_latents None: expected"):
        mix_real_winners(pairs, src, 0.25, 2, 1, losers_latents=fresh, sdrecon_fraction=0.5)


class InProcessFleet:
    """RolloutFleet's sample / refine over one in-process Sampler (RealWinners without Ray)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def sample(self, prompts, seeds, settings, batch_size, record=False):
        from rollouts.actor import sample_in_batches

        return sample_in_batches(self.sampler, prompts, seeds, settings, batch_size, record)

    def refine(self, latents, prompts, seeds, settings, strength, masks=None, batch_size=8):
        return self.sampler.refine(latents, prompts, seeds, settings, strength, masks)


@pytest.fixture(scope="module")
def normal_stage(tiny_model_dir, tmp_path_factory):
    """RealWinners of an online run in its normal stage, on the tiny model's own sampler."""
    return real_winners_in_the_normal_stage(tiny_model_dir, tmp_path_factory.mktemp("sdrecon"))


def real_winners_in_the_normal_stage(model_dir, root):
    """(config, RealWinners) of an online run in its normal stage on ``model_dir``'s own sampler (any family)."""
    from families import load_pipeline
    from rlfh.data.sources import SourceContext
    from rlfh.data.sources.hgdpo import RealWinners
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={model_dir}",
            f"data.hgdpo.real_images={write_photos(root / 'photos')}",
            "data.hgdpo.stages=[{until_round: 1, real_winner_fraction: 0.0, sdrecon_winner_fraction: 1.0}]",
            "learner.train_batch_size=4",
            "learner.micro_batch_size_per_gpu=4",
        ],
    )
    rc = cfg.rollout
    settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width)
    sampler = Sampler(load_pipeline(cfg.model), model_id=cfg.model.path)
    return cfg, RealWinners(cfg, SourceContext(root, InProcessFleet(sampler), settings))


def test_sdrecon_winners_are_the_real_images_partly_redenoised(normal_stage):
    _, rw = normal_stage
    pairs = generated_pairs(with_masks=False)
    mixed, stats = rw.mix(pairs, 0)
    assert stats["hgdpo/stage"] == 0 and stats["hgdpo/sdrecon_pairs"] == 4 and stats["hgdpo/real_pairs"] == 0
    real_of = {it.text: rw.source.latents[i] for i, it in enumerate(rw.source.items)}  # captions are distinct
    for j in range(4):
        real = real_of[mixed.prompts[j]]
        d_sd = np.sqrt(((mixed.latents_w[j] - real) ** 2).mean())
        d_fresh = np.sqrt(((mixed.latents_l[j] - real) ** 2).mean())  # a fresh sample for the same caption
        assert 0.05 < d_sd < 0.7 * d_fresh, (j, d_sd, d_fresh)  # re-denoised, yet much nearer the real image
    print(f"SDRecon-real RMS {stats['hgdpo/sdrecon_real_rms']:.3f}, fresh-real RMS {stats['hgdpo/loser_real_rms']:.3f}")
    assert 0.05 < stats["hgdpo/sdrecon_real_rms"] < 0.7 * stats["hgdpo/loser_real_rms"]
    again, _ = rw.mix(pairs, 0)  # seeded from (seed, round): the same winners
    np.testing.assert_array_equal(again.latents_w, mixed.latents_w)
    assert not np.array_equal(rw.mix(pairs, 1)[0].latents_w, mixed.latents_w)


def dpo_margins(lrn, pairs, seed=7):
    """(mse_theta_w - mse_theta_l) - (mse_ref_w - mse_ref_l) on fixed probes: < 0 where DPO prefers the winner."""
    from rlfh.losses.region_mse import per_sample_mse

    g = torch.Generator().manual_seed(seed)
    w, l = torch.from_numpy(pairs.latents_w), torch.from_numpy(pairs.latents_l)
    out = []
    with torch.no_grad():
        enc, added = lrn.condition(pairs.prompts + pairs.prompts, 64, 64)
        for t_val in (200, 500, 800):
            t = torch.full((2 * len(w),), t_val)
            x_t, t, target = lrn.noised(torch.cat([w, l]), t, torch.randn(w.shape, generator=g).repeat(2, 1, 1, 1))
            pred = lrn.denoiser(x_t, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
            ref = lrn.reference(x_t, t, enc, added)
            e_p, e_r = per_sample_mse(pred, target), per_sample_mse(ref, target)
            b = len(w)
            out.append(((e_p[:b] - e_p[b:]) - (e_r[:b] - e_r[b:])).numpy())
    return np.concatenate(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_on_sdrecon_pairs_learns_to_prefer_them(normal_stage, seed):
    import dataclasses

    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train

    cfg, rw = normal_stage
    pairs, _ = rw.mix(generated_pairs(with_masks=False), seed)
    lrn = LearnerEngine(dataclasses.replace(cfg, seed=seed))
    assert np.allclose(dpo_margins(lrn, pairs, seed + 7), 0.0, atol=1e-6)  # policy = reference: no preference yet
    for _ in range(3):
        train(lrn, pairs, 4)
    margins = dpo_margins(lrn, pairs, seed + 7)
    print("implicit accuracy on the SDRecon pairs after training:", float((margins < 0).mean()))
    assert (margins < 0).mean() >= 0.75 and margins.mean() < 0
