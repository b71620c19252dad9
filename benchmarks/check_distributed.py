"""The sequence-parallel operator against the one-device operator on the same inputs
(docs/distributed.md). Run under torchrun, one process per GPU::

    torchrun --nproc-per-node 2 benchmarks/check_distributed.py --tokens 1048576 --slices balanced \
        --out benchmarks/results/distributed/check.json

Every rank draws the whole q, k, v and output gradient from one seed and keeps its slice;
it runs :func:`~tensorized_attention.distributed.sequence_parallel_tensorized_attn` forward
and backward on it; rank 0 gathers every rank's output and gradients of q, k and v, runs
:func:`tensorized_attention.tensorized_attn` on the whole sequence, and writes, per tensor,
the largest absolute difference and the largest absolute value of the one-device result.
``--device cpu --backend gloo`` runs it on the CPU (tiny sizes; the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from process_group import exit_at_once, join, leave, slice_lengths

from tensorized_attention import tensorized_attn
from tensorized_attention.distributed import sequence_parallel_tensorized_attn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NAMES = ("out", "dq", "dk", "dv")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--inner", type=int, default=256, help="the fold is (tokens / inner, inner)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--mode", choices=("complete", "block"), default="complete")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--align", type=int, default=1, help="with --slices balanced: balanced_lengths' align")
    p.add_argument("--slices", choices=("equal", "balanced"), default="balanced")
    p.add_argument("--shift", type=int, default=0, help="positions moved from the last rank's slice to rank 0's")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", default=None, help="process group backend (default nccl on cuda, gloo on cpu)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (rank 0)")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.tokens % args.inner:
        p.error(f"--inner ({args.inner}) must divide --tokens ({args.tokens})")
    if args.heads % args.kv_heads:
        p.error("--kv-heads must divide --heads")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device, backend = join(args.device, args.backend)
    dtype, N = DTYPES[args.dtype], args.tokens
    shape = (N // args.inner, args.inner)
    lengths = slice_lengths(N, world, shape, slices=args.slices, mode=args.mode, align=args.align, shift=args.shift)
    start, L = sum(lengths[:rank]), lengths[rank]
    g = torch.Generator(device=device).manual_seed(0)
    H, Hkv, D = args.heads, args.kv_heads, args.headdim
    whole = [torch.randn(1, N, heads, D, generator=g, device=device, dtype=dtype) for heads in (H, Hkv, Hkv, H)]
    q, k, v, grad = (x[:, start:start + L].clone() for x in whole)
    whole = [x.cpu() for x in whole] if rank == 0 else None  # kept off the GPU while the ranks run
    inputs = [x.requires_grad_() for x in (q, k, v)]
    out = sequence_parallel_tensorized_attn(*inputs, shape, mode=args.mode)
    out.backward(grad)
    mine = [out.detach(), *(x.grad for x in inputs)]
    del out, inputs, q, k, v, grad
    gathered = _gather(mine, lengths, rank, world)
    del mine
    if rank == 0:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        q, k, v, grad = (x.to(device).requires_grad_(i < 3) for i, x in enumerate(whole))
        ref = tensorized_attn(q, k, v, shape, mode=args.mode)
        ref.backward(grad)
        refs = [ref.detach(), q.grad, k.grad, v.grad]
        result = {
            "check": "sequence-parallel against one device, same inputs",
            "command": " ".join([f"torchrun --nproc-per-node {world}", *sys.argv]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "ranks": world, "process_group_backend": backend, "torch": torch.__version__, "dtype": args.dtype,
            "tokens": N, "shape": list(shape), "heads": H, "kv_heads": Hkv, "headdim": D, "mode": args.mode,
            "lengths": lengths,
            "tensors": {name: _differences(got, want) for name, got, want in zip(NAMES, gathered, refs, strict=True)},
        }
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        for name, row in result["tensors"].items():
            print(f"{name}: max |parallel - one device| {row['max_abs_diff']:.3g}, "
                  f"max |one device| {row['max_abs_reference']:.3g}", flush=True)
    leave()


def _differences(got: torch.Tensor, want: torch.Tensor, chunk: int = 65536) -> dict:
    """The largest |got - want| and |want|, in float32, a chunk of positions at a time."""
    diff = ref = 0.0
    for i in range(0, want.shape[1], chunk):
        w = want[:, i:i + chunk].float()
        diff = max(diff, (got[:, i:i + chunk].to(w.device).float() - w).abs().max().item())
        ref = max(ref, w.abs().max().item())
    return {"max_abs_diff": diff, "max_abs_reference": ref}


def _gather(tensors: list[torch.Tensor], lengths: list[int], rank: int, world: int) -> list[torch.Tensor] | None:
    """Every rank's slices of ``tensors``, joined along dim 1 on rank 0 (on the CPU); None
    on the other ranks."""
    if rank != 0:
        for x in tensors:
            dist.send(x.contiguous(), dst=0)
        return None
    parts = [[x.cpu()] for x in tensors]
    for r in range(1, world):
        for part, x in zip(parts, tensors, strict=True):
            got = x.new_empty((x.shape[0], lengths[r], *x.shape[2:]))
            dist.recv(got, src=r)
            part.append(got.cpu())
    return [torch.cat(part, 1) for part in parts]


if __name__ == "__main__":
    main()
    exit_at_once()
