"""Joining and leaving the torchrun process group, and the ranks' slices of the sequence,
for the benchmarks run on several ranks (distributed.py, profile_distributed.py,
check_distributed.py, transfer.py)."""

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


def slice_lengths(N: int, world: int, shape, *, slices: str, mode: str = "complete", align: int = 1,
                  shift: int = 0) -> list[int]:
    """The ranks' slice lengths: ``slices="equal"`` (the first ranks one longer where N does
    not divide) or ``"balanced"`` (``balanced_lengths`` with ``align``), then ``shift``
    positions moved from the last rank's slice to rank 0's (negative: the other way)."""
    from tensorized_attention.distributed import balanced_lengths

    if slices == "balanced":
        lengths = balanced_lengths(N, world, shape, mode=mode, align=align)
    else:
        lengths = [N // world + (r < N % world) for r in range(world)]
    if shift and (world == 1 or min(lengths[0] + shift, lengths[-1] - shift) < 1):
        raise SystemExit(f"shift {shift} on the slices {lengths} of {world} ranks leaves a rank without positions, "
                         f"or moves positions within one rank")
    lengths[0] += shift
    lengths[-1] -= shift
    return lengths


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
