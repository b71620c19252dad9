"""Joining and leaving the torchrun process group, for the benchmarks run on several ranks
(distributed.py, profile_distributed.py, transfer.py)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def join(device: str, backend: str | None = None) -> tuple[int, int, torch.device, str]:
    """Join the group torchrun set up (NCCL on "cuda", gloo on "cpu", unless ``backend``
    names one) and take this rank's GPU. Returns rank, world size, device, backend."""
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device != "cuda":
        return rank, world, torch.device("cpu"), backend
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(local)
    return rank, world, local, backend


def leave() -> None:
    """Leave the group, all ranks together: a rank leaving while another still tears down
    can abort it."""
    dist.barrier()
    dist.destroy_process_group()


def exit_at_once() -> None:
    """End the process once its work is done and the group left, without the interpreter's
    teardown: there gloo's worker threads now and then abort the process (SIGABRT,
    "terminate called without an active exception") after every result was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
