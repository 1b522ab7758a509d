"""Learner -> rollout-actor weight transfer in size-bounded buckets.

A LoRA adapter is a few MB and goes as one bucket. Full fine-tuning moves the whole UNet (2.6e9
parameters for SDXL, 5 GB in bf16): sent as one object, the learner would first build a second full
copy in host memory and every rollout actor would hold one more before the first byte is applied.
In buckets of at most ``resources.sync_bucket_mb``, the learner copies one bucket to host memory,
puts it in the Ray object store and moves on; a rollout actor fetches one bucket, copies it into its
UNet in place and drops it. Under ZeRO-3 the learner gathers only the bucket's parameters at a time.

The policy version is set only after the last bucket is in, so a sync that fails half-way leaves an
actor whose samples the fleet rejects (see ``Sampler.load_full``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def plan_buckets(sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Group names, in order, into buckets of at most ``bucket_bytes``; a larger tensor goes alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    buckets: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        buckets.append(current)
    return buckets


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of its whole (gathered) value when ZeRO-3 has partitioned it away."""
    return int(getattr(t, "ds_numel", t.numel())) * t.element_size()


def iter_state_buckets(
    state: dict[str, torch.Tensor], bucket_bytes: int, gather=None
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``state`` as CPU copies in buckets of at most ``bucket_bytes``.

    Args:
        gather: optional context-manager factory taking the bucket's tensors (ZeRO-3's
            ``deepspeed.zero.GatheredParameters``): their full values exist only inside it.
    """
    for names in plan_buckets(((k, tensor_bytes(v)) for k, v in state.items()), bucket_bytes):
        tensors = [state[k] for k in names]
        with gather(tensors) if gather is not None else contextlib.nullcontext():
            bucket = {k: t.detach().cpu().clone() for k, t in zip(names, tensors)}
        yield bucket
