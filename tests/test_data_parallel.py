"""The data-parallel learner: two DeepSpeed ranks over gloo, each a Ray actor on this machine.

Two ranks with micro-batch 1 must take the same update as one rank accumulating two micro-batches
of 1 on the same data (DeepSpeed averages the ranks' gradients; the per-step noise is drawn the
same on every rank), with and without ZeRO partitioning and with the MPD rule; and the online loop
runs, checkpoints and resumes with two ranks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlfh.data.batches import PairBatch

pytestmark = pytest.mark.slow


def pair_batch(n=4, with_faces=False):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    masks = {}
    if with_faces:
        face = np.zeros((n, 1, 8, 8), np.float32)
        face[::2, :, 1:5, 1:5] = 1.0  # faces in half of the pairs
        masks = {"face": face}
    return PairBatch(lat[0], lat[1], [f"a photo of person {i}" for i in range(n)], masks, dict(masks))


def lora_weights(group):
    import ray

    state = {}
    for ref in group.weight_buckets(2**30):
        state.update(ray.get(ref))
    return state


# ZeRO-0 reduces gradients in the engine's backward, ZeRO-2 in per-parameter hooks (here under MPD's
# per-region autograd passes); the online test below runs ZeRO-0 ranks end to end
@pytest.mark.parametrize(
    "extra",
    [
        ["learner.engine.zero_stage=0"],
        ["learner.engine.zero_stage=2", "learner.regions.names=[global, face]", "learner.regions.fairness.rule=mpd"],
    ],
    ids=["zero0", "zero2-mpd"],
)
def test_two_ranks_update_like_one_rank_accumulating(ray_local, tiny_cfg, extra):
    from rlfh.learner.group import LearnerGroup

    base = [
        "learner.train_batch_size=2",
        "learner.micro_batch_size_per_gpu=1",
        "learner.lr=1e-3",
        "resources.num_cpus_per_actor=0.5",
        *extra,
    ]
    batch = pair_batch(with_faces="learner.regions.fairness.rule=mpd" in extra)
    one = LearnerGroup(tiny_cfg(*base))  # one rank, two micro-batches per step
    two = LearnerGroup(tiny_cfg(*base, "resources.num_learner_ranks=2"))  # two ranks, one micro-batch each
    try:
        assert one.world_size == 1 and two.world_size == 2
        w0 = lora_weights(one)  # the seeded LoRA init, the same in both
        m1, m2 = one.train(batch, 1), two.train(batch, 1)
        assert m1["learner/steps"] == m2["learner/steps"] == 2
        w1, w2 = lora_weights(one), lora_weights(two)
        moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
        assert moved > 1e-4  # the update is not trivially zero
        # the gradients match up to summation order (allreduce vs accumulation); Adam's first steps
        # divide by |g|, which turns that rounding into up to ~1e-6 of a weight where g is near 0:
        # the tolerance is 1% of one step (lr 1e-3), a wrong average or a lost rank is a whole step
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
        # the ranks hold one model: rank 1's weights equal rank 0's exactly
        digests = {ray_local.get(a.weights_digest.remote()) for a in two.ranks}
        assert len(digests) == 1
        if "learner.regions.fairness.rule=mpd" in extra:
            assert "mpd/weight/face" in m2 and np.isfinite(m2["mpd/weight/face"])
    finally:
        one.shutdown()
        two.shutdown()


def test_online_run_with_two_learner_ranks_checkpoints_and_resumes(ray_local, tiny_cfg):
    from rlfh.recipes.online import train

    over = [
        "num_rounds=2",
        "rollout.prompts_per_round=2",
        "learner.train_batch_size=2",
        "learner.micro_batch_size_per_gpu=1",
        "resources.num_learner_ranks=2",
        "resources.num_cpus_per_actor=0.5",
        "logging.checkpoint_every=1",
    ]
    run_dir = train(tiny_cfg(*over))
    state = json.loads((run_dir / "checkpoints" / "round-000002" / "trainer_state.json").read_text())
    assert state["learner_ranks"] == 2 and state["round"] == 2
    run_dir = train(tiny_cfg(*over[1:], "num_rounds=3"))  # resumes at round 2 with both ranks
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["policy_version"] == 3 and rows[-1]["learner/steps"] == 3 * rows[0]["learner/steps"]
    assert all(np.isfinite(r["loss/dpo"]) for r in rows)
    # offline DPO from that run's rollout log, on two ranks as well
    from rlfh.recipes.offline import train_offline

    off = train_offline(
        tiny_cfg(*over[1:], "num_rounds=1", f"rollouts={run_dir / 'rollouts'}", f"run_dir={run_dir.parent / 'offline'}")
    )
    row = json.loads((off / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["policy_version"] == 1 and np.isfinite(row["loss/dpo"])
    assert json.loads((off / "checkpoints" / "round-000001" / "trainer_state.json").read_text())["learner_ranks"] == 2


def test_a_failing_rank_fails_the_call_at_once_and_unplaceable_ranks_say_why(ray_local):
    import time

    from rlfh.learner.group import get_all
    from rlfh.learner.placement import reserve

    ray = ray_local

    @ray.remote(num_cpus=0)
    def blocked():  # a rank waiting in a collective for the one that failed
        time.sleep(600)

    @ray.remote(num_cpus=0)
    def failing():
        raise ValueError("out of memory on rank 1")

    refs = [blocked.remote(), failing.remote()]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)learner rank 1 failed in train: .*out of memory on rank 1"):
        get_all(refs, "train")
    assert time.monotonic() - t0 < 60
    ray.cancel(refs[0], force=True)
    with pytest.raises(RuntimeError, match=r"could not reserve 2 x \{'CPU': 64\} \(PACK\) for the learner ranks"):
        reserve([{"CPU": 64}] * 2, "PACK", "the learner ranks", timeout_s=2)
