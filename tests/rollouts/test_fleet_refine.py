"""RolloutFleet.refine: Sampler.refine spread over the rollout actors, in input order."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_fleet_refine_equals_the_sampler_in_process(ray_local, tiny_cfg):
    from families import load_pipeline
    from rollouts.actor import RolloutActor, RolloutFleet
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    ray = ray_local
    cfg = tiny_cfg()
    settings = SamplerSettings(4, 1.0, "", 64, 64)
    sampler = Sampler(load_pipeline(cfg.model), model_id=cfg.model.path)
    prompts, seeds = ["a photo of a person", "a portrait of a woman", "two people talking"], [5, 6, 7]
    x0 = sampler.sample(prompts, [1, 2, 3], settings).latents
    masks = np.zeros((3, 1, 8, 8), np.float32)
    masks[:, :, 2:6, 2:6] = 1.0
    actors = [RolloutActor.options(num_cpus=0.5).remote(cfg.model, cfg.model.lora) for _ in range(2)]
    try:
        fleet = RolloutFleet(actors, 0)
        got = fleet.refine(x0, prompts, seeds, settings, 0.5, batch_size=1)  # shares of 1 and 2, calls of 1
        want = sampler.refine(x0, prompts, seeds, settings, 0.5)
        assert got.prompts == prompts and got.seeds == seeds
        np.testing.assert_allclose(got.latents, want.latents, atol=1e-5)
        inpainted = fleet.refine(x0, prompts, seeds, settings, 0.5, masks=masks, batch_size=2)
        np.testing.assert_array_equal(inpainted.latents[..., :2, :], x0[..., :2, :])  # outside the mask: kept
        assert not np.allclose(inpainted.latents[..., 2:6, 2:6], x0[..., 2:6, 2:6], atol=1e-3)
        with pytest.raises(ValueError, match="2 latents, 3 prompts"):
            fleet.refine(x0[:2], prompts, seeds, settings, 0.5)
    finally:
        for a in actors:
            ray.kill(a)
