"""Where each rank's time goes in a sequence-parallel forward (or, with ``--backward``,
forward + backward): its kernels by device time (torch.profiler), beside the plain
operator's on one device (rank 0).

    torchrun --standalone --nproc-per-node 2 benchmarks/profile_distributed.py --tokens 1048576 --slices balanced

bfloat16, 32 heads, 8 kv heads, head dim 128, fold (N / 256, 256), complete, as
benchmarks/distributed.py. Each rank runs 2 untimed forwards, then ``--calls`` under the
profiler; prints per rank the wall ms per call, the device-busy ms and the ``--top``
costliest operators and kernels, and writes them as JSON with ``--out`` (rank 0).
``--device cpu`` runs it with gloo at tiny sizes (the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from process_group import exit_at_once, join, leave, slice_lengths

from tensorized_attention import tensorized_attn
from tensorized_attention.distributed import sequence_parallel_tensorized_attn

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def profiled(fn, calls: int, cuda: bool, top: int, trace: str | None = None) -> dict:
    """Wall ms per call, busy ms per call and the top rows of ``calls`` calls of ``fn``
    (``trace``: also write the profile's timeline there, a Chrome trace)."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    key = (lambda e: -e.self_device_time_total) if cuda else (lambda e: -e.self_cpu_time_total)
    rows = [dict(name=e.key, calls=e.count / calls,
                 ms=(e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / calls)
            for e in sorted(device if cuda else events, key=key)[:top]]
    busy = sum(e.self_device_time_total for e in device) / 1e3 / calls if cuda else None
    return dict(wall_ms=wall_ms, busy_ms=busy, rows=rows)


def _call(fn, inputs, backward: bool) -> None:
    """``fn(*inputs)``, without gradients; with ``backward``, and the gradients of the inputs."""
    if not backward:
        with torch.no_grad():
            fn(*inputs)
        return
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    torch.autograd.grad(out, leaves, torch.ones_like(out))


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--inner", type=int, default=256, help="the fold is (N / inner, inner)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--align", type=int, default=1, help="with --slices balanced: balanced_lengths' align")
    p.add_argument("--slices", choices=("equal", "balanced"), default="balanced")
    p.add_argument("--shift", type=int, default=0, help="positions moved from the last rank's slice to rank 0's")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-single", action="store_true", help="skip the plain operator on rank 0")
    p.add_argument("--backward", action="store_true", help="profile forward + backward (gradients of q, k, v)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="write each rank's timeline there (rank<r>.json, a Chrome trace: chrome://tracing, Perfetto)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    rank, world, device, _ = join(args.device)
    N, dtype = args.tokens, DTYPES[args.dtype]
    shape = (N // args.inner, args.inner)
    lengths = slice_lengths(N, world, shape, slices=args.slices, align=args.align, shift=args.shift)
    g = torch.Generator(device=device).manual_seed(rank)
    q = torch.randn(1, lengths[rank], args.heads, args.headdim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, lengths[rank], args.kv_heads, args.headdim, generator=g, device=device, dtype=dtype)
            for _ in range(2))

    def parallel():
        _call(lambda *x: sequence_parallel_tensorized_attn(*x, shape), (q, k, v), args.backward)

    trace = None
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        trace = str(Path(args.trace) / f"rank{rank}.json")
    mine = dict(rank=rank, length=lengths[rank], **profiled(parallel, args.calls, cuda, args.top, trace))
    every = [None] * world
    dist.all_gather_object(every, mine)
    single = None
    if rank == 0 and not args.no_single:
        del q, k, v
        qf, kf, vf = (torch.randn(1, N, h, args.headdim, device=device, dtype=dtype)
                      for h in (args.heads, args.kv_heads, args.kv_heads))

        def plain():
            _call(lambda *x: tensorized_attn(*x, shape), (qf, kf, vf), args.backward)

        single = profiled(plain, args.calls, cuda, args.top)
    dist.barrier()
    result = None
    if rank == 0:
        result = dict(command=" ".join([f"torchrun --nproc-per-node {world}", *sys.argv]),
                      device=torch.cuda.get_device_name(device) if cuda else "cpu", tokens=N, shape=list(shape),
                      lengths=lengths, dtype=args.dtype, backward=args.backward, ranks=every, single=single)
        for r in every + ([dict(rank="single", length=N, **single)] if single else []):
            busy = "" if r["busy_ms"] is None else f", device busy {r['busy_ms']:.1f} ms"
            print(f"rank {r['rank']} ({r['length']} positions): {r['wall_ms']:.1f} ms per call{busy}")
            for row in r["rows"]:
                print(f"  {row['ms']:9.2f} ms {row['calls']:5.1f}x  {row['name'][:100]}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    leave()
    return result


if __name__ == "__main__":
    main()
    exit_at_once()
