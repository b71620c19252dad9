"""Run each forward pass of one tensorized case, for a profiler to read, and time it.

    python benchmarks/profile_passes.py --seqlen 131072 --shape 512,256 --no-time
    ncu --set full -k regex:_fwd_kernel --launch-skip 4 --launch-count 2 --csv --page details \
        python benchmarks/profile_passes.py --seqlen 131072 --shape 512,256 --no-time > fwd_passes.csv

The passes of an m-dim fold are launched twice each to compile and warm up (2m launches:
``--launch-skip 2m``), then once each (``--launch-count m``); bf16, batch 1, causal, the
given heads and head dim. Without ``--no-time`` each pass is then timed alone (median of
``triton.testing.do_bench``) beside its byte floor at 3.0 TB/s.
"""

from __future__ import annotations

import argparse

import torch

from tensorized_attention.fold import fold_size, strides
from tensorized_attention.ops.triton import launch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--shape", default="512,256", help="the fold, comma separated")
    p.add_argument("--mode", choices=("block", "complete"), default="complete")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--no-time", action="store_true", help="launch only (under a profiler)")
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the kernels under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    shape = [int(x) for x in args.shape.split(",")]
    N, H, Hkv, D = args.seqlen, args.heads, args.kv_heads, args.headdim
    if fold_size(shape) < N:
        p.error(f"--shape {args.shape} holds {fold_size(shape)} positions, fewer than --seqlen {N}")
    q = torch.randn(1, N, H, D, device=args.device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, N, Hkv, D, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    src_h = torch.randn_like(q)  # the input of the passes after the first
    dst = torch.empty_like(q)
    lse = torch.empty(H, N, device=args.device, dtype=torch.float32)
    st = strides(shape)

    def run(t):
        launch.fwd_pass(q, k, v if t == 0 else src_h, dst, None, lse, None, t, shape[t], st[t],
                        fold_size(shape) // st[t], causal=True, complete=args.mode == "complete", sinks=0,
                        scale=D**-0.5)

    passes = range(len(shape))
    for t in [*passes, *passes, *passes]:  # two warm-up launches of each pass, then the profiled ones
        run(t)
    if args.device == "cuda":
        torch.cuda.synchronize()
    if args.device != "cuda" or args.no_time:
        return
    from triton.testing import do_bench

    for t in passes:
        ms = do_bench(lambda t=t: run(t), warmup=25, rep=100, return_mode="median")
        floor = (2 * q.numel() + k.numel() + (v if t == 0 else src_h).numel()) * 2 / 3.0e12 * 1e3
        print(f"pass {t} (n={shape[t]}, s={st[t]}): {ms:.3f} ms; its bytes over 3.0 TB/s: {floor:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
