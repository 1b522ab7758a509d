"""Bucket planning for the weight sync, and the rollout side's checks on what arrives."""

import pytest
import torch

from rlfh.learner.weight_sync import iter_state_buckets, plan_buckets


def test_buckets_keep_order_respect_the_limit_and_isolate_big_tensors():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("big", 500), ("d", 10), ("e", 100)]
    assert plan_buckets(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"], ["e"]]
    assert plan_buckets(sizes, 10**9) == [["a", "b", "c", "big", "d", "e"]]
    with pytest.raises(ValueError, match="must be > 0"):
        plan_buckets(sizes, 0)


def test_state_buckets_cover_every_tensor_once_as_cpu_copies():
    state = {f"w{i}": torch.full((i + 1, 8), float(i)) for i in range(20)}  # 32 .. 640 bytes
    buckets = list(iter_state_buckets(state, 1024))
    assert len(buckets) > 1
    seen = [k for b in buckets for k in b]
    assert seen == list(state)
    for b in buckets:
        assert sum(v.numel() * 4 for v in b.values()) <= 1024 or len(b) == 1
        for k, v in b.items():
            assert torch.equal(v, state[k]) and v.data_ptr() != state[k].data_ptr()


def test_full_load_rejects_unknown_missing_and_misshapen_weights(tiny_model_dir):
    from families import load_pipeline
    from rlfh.config.schema import ModelConfig
    from rollouts.sampler import Sampler

    s = Sampler(load_pipeline(ModelConfig(path=str(tiny_model_dir)), "cpu"))
    own = {k: v.clone() for k, v in s.pipe.unet.state_dict().items()}
    keys = list(own)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        s.load_full([{"nope.weight": torch.zeros(1)}], 1)
    with pytest.raises(RuntimeError, match="shape"):
        s.load_full([{keys[0]: torch.zeros(3, 3, 3)}], 1)
    with pytest.raises(RuntimeError, match="miss"):
        s.load_full([{k: own[k] for k in keys[:5]}], 1)
    assert s.policy_version == -1  # a torn sync never passes for a policy version
    half = len(keys) // 2
    s.load_full([{k: own[k] + 1 for k in keys[:half]}, {k: own[k] + 1 for k in keys[half:]}], 7)
    assert s.policy_version == 7
    assert all(torch.equal(v, own[k] + 1) for k, v in s.pipe.unet.state_dict().items())
