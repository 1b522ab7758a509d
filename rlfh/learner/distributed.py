"""torch.distributed set-up for DeepSpeed: nccl on GPUs, gloo on CPU.

DeepSpeed falls back to MPI discovery when the rendezvous variables are missing, which fails on a
plain machine, so they are always set explicitly: by :func:`init_distributed` for a single-process
learner, by the learner ranks (``rlfh.learner.group``) for a data-parallel one.
"""

from __future__ import annotations

import ipaddress
import os
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_rendezvous(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """The env:// rendezvous of one rank. Each Ray actor sees only its own GPU, hence LOCAL_RANK 0."""
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    if ipaddress.ip_address(master_addr).is_loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        # ranks on one machine: keep gloo's pairs on loopback rather than the host's first interface
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def init_distributed() -> None:
    """Join the process group (idempotent); a world of one on a fresh loopback port unless
    :func:`set_rendezvous` named a larger one."""
    import deepspeed
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # A fresh loopback port every time: a MASTER_PORT inherited from a parent process (a test
        # runner, another learner) may still be bound there.
        set_rendezvous(0, 1, "127.0.0.1", free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def join_learner_group(world_size: int) -> tuple[int, int]:
    """Join the process group (:func:`init_distributed`); this rank's ``(rank, world size)``, the world
    being the config's ``world_size`` learner ranks."""
    import torch.distributed as dist

    init_distributed()
    rank, size = dist.get_rank(), dist.get_world_size()
    if size != world_size:
        raise RuntimeError(
            f"the process group has {size} ranks but the config asks for {world_size} learner ranks "
            f"(resources.num_learner_ranks / num_learner_gpus)"
        )
    return rank, size
