"""Colocated mode: one actor is learner and rollout actor, sampling with the learner's own UNet."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_colocated_actor_samples_with_the_learners_unet(ray_local, tiny_cfg):
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.learner.group import LearnerGroup
    from rollouts.actor import RolloutActor, RolloutFleet
    from rollouts.types import SamplerSettings

    ray = ray_local
    cfg = tiny_cfg("resources.colocate=true", "resources.num_cpus_per_actor=0.5", "learner.lr=1e-3")
    rc = cfg.rollout
    settings = SamplerSettings(rc.num_inference_steps, rc.guidance_scale, rc.negative_prompt, rc.height, rc.width)
    group = LearnerGroup(cfg, colocate=True)
    # unmerged like the colocated sampler, so that the two agree bit for bit
    separate = RolloutActor.options(num_cpus=0.5).remote(cfg.model, cfg.model.lora, merge_lora=False)
    try:
        actor = group.lead
        assert ray.get(actor.shares_denoiser.remote())  # one UNet in the process, not a copy
        fleet, ref_fleet = RolloutFleet([actor], 0), RolloutFleet([separate], 0)
        prompts, seeds = ["a photo of a person"] * 4, [1, 2, 3, 4]
        fleet.sync(None, 0, True)
        ref_fleet.sync(group.weight_buckets(2**30), 0, True)
        before = fleet.collect(fleet.submit(prompts, seeds, settings, 2))
        # the same images as a separate rollout actor synced with the learner's weights
        assert np.array_equal(before.images, ref_fleet.collect(ref_fleet.submit(prompts, seeds, settings, 2)).images)
        batch, _ = learner_batch(
            cfg.learner,
            ScoredSamples(
                before.latents,
                prompts,
                [0, 0, 1, 1],
                [0.0, 1.0, 2.0, 0.5],
                [{} for _ in prompts],
                (rc.height, rc.width),
            ),
        )
        group.train(batch, 2)
        version = group.policy_version()
        assert version == 1
        with pytest.raises(Exception, match="policy version"):
            fleet.sync(None, 5, True)  # a colocated sync can only confirm the learner's own version
        fleet.sync(None, version, True)
        after = fleet.collect(fleet.submit(prompts, seeds, settings, 2))
        assert after.policy_version == 1 and not np.array_equal(after.latents, before.latents)
        ref_fleet.sync(group.weight_buckets(2**30), version, True)
        assert np.array_equal(after.images, ref_fleet.collect(ref_fleet.submit(prompts, seeds, settings, 2)).images)
        # SDEdit by the trained policy (HG-DPO's SDRecon winners) on the colocated actor, as on a separate one
        refined = fleet.refine(before.latents, prompts, seeds, settings, 0.5, batch_size=2)
        assert refined.policy_version == 1
        assert np.array_equal(
            refined.latents, ref_fleet.refine(before.latents, prompts, seeds, settings, 0.5, batch_size=2).latents
        )
    finally:
        group.shutdown()
        ray.kill(separate)


def test_colocated_online_run(ray_local, tiny_cfg):
    from rlfh.recipes.online import train
    from rollouts.log import RolloutLog

    run_dir = train(
        tiny_cfg(
            "num_rounds=2", "rollout.prompts_per_round=2", "resources.colocate=true", "resources.num_cpus_per_actor=0.5"
        )
    )
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2] and [r["rollout/sampled_policy_version"] for r in rows] == [
        0,
        1,
    ]
    recs = RolloutLog(run_dir / "rollouts").records(["round"])
    assert len(recs) == 2 * rows[0]["rollout/samples"]
