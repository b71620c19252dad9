"""Sequence-parallel tensorized attention across the GPUs of one host (docs/distributed.md).

Run under torchrun, one process per GPU::

    torchrun --nproc-per-node 2 benchmarks/distributed.py --out benchmarks/results/h100x2_distributed.json

For each length from --min-tokens (262144) doubling up to --max-tokens: the forward and the
forward + backward of :func:`tensorized_attention.distributed.sequence_parallel_tensorized_attn`
(bfloat16, 32 heads, 8 kv heads, head dim 128, fold (N / 256, 256) by default), median ms
over --iters timed calls (the slowest rank's), the peak memory of every GPU, the bytes each
rank sends (from the plan); the plain operator on one GPU (P = 1) for the ratio; and
PyTorch's context-parallel SDPA (torch.distributed.tensor.experimental.context_parallel) up to
--cp-max-tokens, its error recorded where it does not run. Rank 0 writes the JSON (device,
command, torch version, every number) and prints a table.

``--device cpu --backend gloo`` runs the same logic on the CPU (tiny sizes; what the tests
run): times come from time.perf_counter and no memory is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from process_group import exit_at_once, join, leave, slice_lengths

from tensorized_attention import tensorized_attn
from tensorized_attention.distributed import plan_sequence_parallel, sequence_parallel_tensorized_attn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-tokens", type=int, default=262144)
    p.add_argument("--max-tokens", type=int, default=1048576)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--inner", type=int, default=256, help="the fold is (N / inner, inner)")
    p.add_argument("--mode", choices=("complete", "block"), default="complete")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--iters", type=int, default=10, help="timed calls per measurement (after 2 warm-up calls)")
    p.add_argument("--cp-max-tokens", type=int, default=262144,
                   help="run context-parallel SDPA up to this length (full attention: quadratic)")
    p.add_argument("--no-single", action="store_true", help="skip the one-GPU operator (P = 1)")
    p.add_argument("--slices", choices=("equal", "balanced"), default="equal",
                   help="the ranks' slices: equal lengths, or distributed.balanced_lengths (the same work per rank)")
    p.add_argument("--align", type=int, default=1,
                   help="with --slices balanced: cut the slices at multiples of this (balanced_lengths' align)")
    p.add_argument("--shifts", default="0", metavar="S,...",
                   help="positions moved from the last rank's slice to rank 0's, one measurement each (a sweep of "
                        "the balance; the one-GPU operator is measured once per length)")
    p.add_argument("--max-halo", type=float, default=None,
                   help="the operator's max_halo: a pass takes a halo only when no rank's halo exceeds this times "
                        "its slice (default: no limit)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", default=None, help="process group backend (default nccl on cuda, gloo on cpu)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (rank 0)")
    args = p.parse_args(argv)
    if args.min_tokens < 1 or args.max_tokens < args.min_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if args.heads % args.kv_heads:
        p.error("--kv-heads must divide --heads")
    try:
        args.shifts = [int(x) for x in args.shifts.split(",")]
    except ValueError:
        p.error(f"--shifts takes integers separated by commas, got {args.shifts!r}")
    return args


def lengths_of(args) -> list[int]:
    out, n = [], args.min_tokens
    while n <= args.max_tokens:
        out.append(n)
        n *= 2
    return out


class Timer:
    """Median milliseconds of ``fn`` over ``iters`` calls, the slowest rank's (CUDA events on
    GPUs, perf_counter on the CPU)."""

    def __init__(self, device: torch.device, group=None):
        self.device, self.group = device, group

    def __call__(self, fn, iters: int) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(iters):
            self._barrier()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        ms = torch.tensor([statistics.median(times)], dtype=torch.float64, device=self.device)
        self.per_rank = [ms.item()]
        if self.group is not False:
            every = [torch.zeros_like(ms) for _ in range(dist.get_world_size())]
            dist.all_gather(every, ms)
            self.per_rank = [x.item() for x in every]
        return max(self.per_rank)

    def _barrier(self):
        if self.group is not False:
            dist.barrier()


def peak_memory(device: torch.device) -> list[int] | None:
    """Peak allocated bytes of every rank's GPU since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device)], dtype=torch.int64, device=device)
    every = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(every, peak)
    return [int(x.item()) for x in every]


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def fwd_and_bwd(fn, inputs, grad):
    """Callables for the forward alone (no autograd) and the forward + backward."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        out.backward(grad)
        for x in inputs:
            x.grad = None

    return forward, forward_backward


def measure(fn, inputs, grad, args, device, timer) -> dict:
    forward, forward_backward = fwd_and_bwd(fn, inputs, grad)
    row = {}
    for name, call in (("forward", forward), ("forward_backward", forward_backward)):
        reset_memory(device)
        row[f"{name}_ms"] = timer(call, args.iters)
        row[f"{name}_ms_per_rank"] = timer.per_rank
        row[f"{name}_peak_bytes"] = peak_memory(device) if timer.group is not False else _own_peak(device)
    return row


def _own_peak(device):
    return [torch.cuda.max_memory_allocated(device)] if device.type == "cuda" else None


def context_parallel_sdpa(args, N, device, dtype, timer) -> dict:
    """PyTorch's context-parallel SDPA (causal full attention, kv heads repeated), or the error."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        world = dist.get_world_size()
        mesh = init_device_mesh(device.type, (world,))
        g = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch, args.heads, N, args.headdim)
        q, k, v, grad = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4))

        def sdpa(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        row = {}
        with context_parallel(mesh, buffers=[q, k, v, grad], buffer_seq_dims=[2, 2, 2, 2]):
            # the buffers are sharded in place on entry; gradients are asked for after that
            row.update(measure(sdpa, [x.detach().requires_grad_() for x in (q, k, v)], grad, args, device, timer))
        return row
    except Exception as exc:  # recorded, not fatal: the row says why it did not run
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def run(args, on_row=None) -> dict | None:
    """Every length in turn; ``on_row(result so far)`` on rank 0 after each (the JSON is
    rewritten then, so a run stopped by a limit keeps what it measured)."""
    rank, world, device, backend = join(args.device, args.backend)
    dtype = DTYPES[args.dtype]
    timer = Timer(device)
    rows = []
    for N in lengths_of(args):
        if N % args.inner or N < world:
            raise SystemExit(f"--inner ({args.inner}) must divide every length (got {N}), each >= the ranks")
        shape = (N // args.inner, args.inner)
        single = None
        for shift in args.shifts:
            lengths = slice_lengths(N, world, shape, slices=args.slices, mode=args.mode, align=args.align, shift=shift)
            row = _parallel_row(args, N, shape, lengths, rank, world, device, dtype, timer)
            row["shift"] = shift
            if shift == args.shifts[0] and not args.no_single:  # every rank takes part (rank 0 measures)
                single = single_device(args, N, shape, device, dtype, rank)
            if single is not None:
                row["single"] = single
            if N <= args.cp_max_tokens and shift == args.shifts[0]:
                row["context_parallel_sdpa"] = context_parallel_sdpa(args, N, device, dtype, timer)
            rows.append(row)
            if rank == 0 and on_row is not None:
                on_row(_result(args, world, backend, device, rows))
    if rank != 0:
        return None
    return _result(args, world, backend, device, rows)


def _parallel_row(args, N, shape, lengths, rank, world, device, dtype, timer) -> dict:
    """The sequence-parallel operator on slices ``lengths``: the plan's bytes and the times."""
    L = lengths[rank]
    plan = plan_sequence_parallel(shape, N, world, mode=args.mode, heads=args.heads, kv_heads=args.kv_heads,
                                  headdim=args.headdim, dtype_bytes=torch.finfo(dtype).bits // 8,
                                  batch=args.batch, lengths=lengths, max_halo=args.max_halo)
    row = {"tokens": N, "shape": list(shape), "ranks": world, "lengths": lengths,
           "passes": [{"dim": e.dim, "stride": e.stride, "kind": e.kind, "send_bytes": list(e.send_bytes),
                       "recv_bytes": list(e.recv_bytes)} for e in plan],
           "forward_send_bytes": [sum(e.send_bytes[r] for e in plan) for r in range(world)],
           "backward_send_bytes": [sum(e.recv_bytes[r] for e in plan) for r in range(world)]}
    g = torch.Generator(device=device).manual_seed(1 + rank)
    q = torch.randn(args.batch, L, args.heads, args.headdim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(args.batch, L, args.kv_heads, args.headdim, generator=g, device=device, dtype=dtype)
            for _ in range(2))
    grad = torch.randn_like(q)
    inputs = [x.requires_grad_() for x in (q, k, v)]

    def parallel(q, k, v, shape=shape):
        return sequence_parallel_tensorized_attn(q, k, v, shape, mode=args.mode, max_halo=args.max_halo)

    row["parallel"] = measure(parallel, inputs, grad, args, device, timer)
    del q, k, v, grad, inputs
    return row


def _result(args, world, backend, device, rows) -> dict:
    return {
        "benchmark": "sequence-parallel tensorized attention",
        "command": " ".join([f"torchrun --nproc-per-node {world}", *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ranks": world, "process_group_backend": backend, "torch": torch.__version__,
        "dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads, "headdim": args.headdim,
        "batch": args.batch, "mode": args.mode, "iters": args.iters, "max_halo": args.max_halo,
        "slices": args.slices, "align": args.align, "rows": rows,
    }


def single_device(args, N, shape, device, dtype, rank) -> dict | None:
    """The plain operator on the whole sequence, rank 0 alone (the others wait)."""
    row = None
    if rank == 0:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(args.batch, N, args.heads, args.headdim, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(args.batch, N, args.kv_heads, args.headdim, generator=g, device=device, dtype=dtype)
                for _ in range(2))
        grad = torch.randn_like(q)
        inputs = [x.requires_grad_() for x in (q, k, v)]

        def plain(q, k, v):
            return tensorized_attn(q, k, v, shape, mode=args.mode)

        try:
            row = measure(plain, inputs, grad, args, device, Timer(device, group=False))
        except torch.OutOfMemoryError as exc:  # recorded: the length does not fit one device
            row = {"error": f"OutOfMemoryError: {str(exc).splitlines()[0]}"[:300]}
        del q, k, v, grad, inputs
        reset_memory(device)
    dist.barrier()
    return row


def table(result: dict) -> str:
    lines = [f"{result['device']} x{result['ranks']}, {result['dtype']}, H={result['heads']} "
             f"kv={result['kv_heads']} D={result['headdim']}, {result['mode']}",
             f"{'tokens':>9} {'kinds':>20} {'fwd ms':>9} {'P=1':>9} {'f+b ms':>9} {'P=1':>9} "
             f"{'peak GiB':>9} {'MiB sent':>9} {'CP SDPA fwd':>12}"]
    for r in result["rows"]:
        par, one, cp = r["parallel"], r.get("single") or {}, r.get("context_parallel_sdpa") or {}
        peak = par["forward_backward_peak_bytes"]
        lines.append(
            f"{r['tokens']:>9} {'/'.join(p['kind'] for p in r['passes']):>20} {par['forward_ms']:>9.2f} "
            f"{one.get('forward_ms', float('nan')):>9.2f} {par['forward_backward_ms']:>9.2f} "
            f"{one.get('forward_backward_ms', float('nan')):>9.2f} "
            f"{(max(peak) / 2**30 if peak else float('nan')):>9.2f} {max(r['forward_send_bytes']) / 2**20:>9.1f} "
            f"{_cp_cell(cp):>12}")
    return "\n".join(lines)


def _cp_cell(cp: dict) -> str:
    if "forward_ms" in cp:
        return f"{cp['forward_ms']:.2f}"
    return "error" if cp else "-"


def main(argv=None) -> None:
    args = parse_args(argv)

    def write(result):
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    result = run(args, on_row=write)
    if result is not None:
        write(result)
        print(table(result), flush=True)
    leave()


if __name__ == "__main__":
    main()
    exit_at_once()
