"""Run the GPU benchmark suite (or a part of it) and write JSON results.

    python benchmarks/run.py --out results/suite.json               # the whole registry
    python benchmarks/run.py --lengths 131072 --kv-heads 32 --tune  # tile settings instead
    python benchmarks/run.py --lengths 131072 --overrides results/best.json  # the suite with the fastest

The same suite runs from the command line as ``tensorized-attention bench --suite``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys

import torch

from tensorized_attention import suite
from tensorized_attention.ops.triton import launch

FWD_VARIANTS = [
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    # more warps per tile (fewer registers per thread, more programs per SM), deeper pipelines
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=256, BLOCK_N=32, num_warps=8, num_stages=2),
    # the launch order (launch.RESIDUE_MAJOR, the default) against the order it replaced
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3, RESIDUE_MAJOR=False),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, RESIDUE_MAJOR=False),
]
BWD_VARIANTS = {
    "dq": [
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, RESIDUE_MAJOR=False),
    ],
    "dkdv": [
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, RESIDUE_MAJOR=False),
    ],
}


def _time_forward_passes(shape, N, ceilings):
    """Each forward pass of ``shape`` alone (bf16, 32 heads, head dim 128), under FWD_VARIANTS."""
    from triton.testing import do_bench

    from tensorized_attention.fold import fold_size, strides

    st = strides(shape)
    q, k, v, src_h = (torch.randn(1, N, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    dst = torch.empty_like(q)
    lse = torch.empty(32, N, device="cuda", dtype=torch.float32)
    pass_floor = 4 * q.numel() * 2 / ceilings["copy_bytes_per_s"] * 1e3
    rows = []
    for t in range(len(shape)):
        for variant in FWD_VARIANTS:
            kernel = "fwd_contiguous" if st[t] == 1 else "fwd"
            launch.CONFIG_OVERRIDES[kernel] = variant
            cfg = launch.block_config(shape[t], 128, kernel)
            fn = functools.partial(
                launch.fwd_pass, q, k, v if t == 0 else src_h, dst, None, lse, None, t, shape[t], st[t],
                fold_size(shape) // st[t], causal=True, complete=True, sinks=0, scale=128**-0.5, cfg=cfg)
            try:
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as err:  # noqa: BLE001 - a setting that does not compile is reported
                ms = float("nan")
                print("   failed:", type(err).__name__, str(err)[:200])
            rows.append(dict(kind="fwd_pass", shape=shape, t=t, kernel=kernel, variant=variant, cfg=cfg, ms=ms,
                             x_pass_floor=ms / pass_floor))
            print(f"fwd pass {t} of {shape} {variant}: {ms:.3f} ms = {ms / pass_floor:.2f} x pass floor", flush=True)
            launch.CONFIG_OVERRIDES[kernel] = {}
    return rows


def tune(lengths, ndims, kernels, out_dir):
    """Time each forward pass of the Triton backend under FWD_VARIANTS (with "fwd" in
    ``kernels``), then forward+backward with the settings of the dq and dk/dv kernels varied
    one at a time (those of them in ``kernels``). Writes tune.json, and best.json: the
    fastest setting of each kernel, as --overrides takes it."""
    ceilings = suite.measure_ceilings()
    rows, best = [], {}

    def keep_best(kernel, variant, ms):
        if ms == ms and ms < best.get(kernel, (None, float("inf")))[1]:
            best[kernel] = (variant, ms)

    for N in lengths:
        for ndim in ndims:
            shape = suite.choose_shape(N, ndim)
            if "fwd" in kernels:
                for row in _time_forward_passes(shape, N, ceilings):
                    rows.append(row)
                    keep_best(row["kernel"], row["variant"], row["ms"])
            for kernel in ("dq", "dkdv"):
                if kernel not in kernels:
                    continue
                for variant in BWD_VARIANTS[kernel]:
                    launch.CONFIG_OVERRIDES[kernel] = variant
                    row = suite.run_case(suite.Case("triton", N, shape=shape, backward=True), ceilings)
                    row["variant"] = {kernel: variant}
                    rows.append(row)
                    keep_best(kernel, variant, row.get("ms", float("nan")))
                    print(f"fwd+bwd {shape} {kernel} {variant}: {row.get('ms', row.get('error'))} ms", flush=True)
                launch.CONFIG_OVERRIDES[kernel] = {}
    for method in ("sdpa-flash", "sdpa-cudnn"):
        for backward in (False, True):
            row = suite.run_case(suite.Case(method, lengths[-1], backward=backward), ceilings)
            rows.append(row)
            print(f"{row['name']}: {row.get('ms', row.get('error'))} ms", flush=True)
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump({"ceilings": ceilings, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "best.json"), "w") as f:
        json.dump({kernel: variant for kernel, (variant, _) in best.items()}, f, indent=1)
    print("fastest:", json.dumps({kernel: dict(v, ms=round(ms, 3)) for kernel, (v, ms) in best.items()}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768,131072,524288,1048576")
    p.add_argument("--kv-heads", default="32,8")
    p.add_argument("--ndims", default="2,3")
    p.add_argument("--modes", default="complete,block")
    p.add_argument("--methods", default="triton,sdpa-flash,sdpa-cudnn,flex-window,reference")
    p.add_argument("--directions", default="fwd,fwdbwd")
    p.add_argument("--select-topk", default="2",
                   help="top-k of the selected-pass cases (Triton, after 2-dim complete); '' for none")
    p.add_argument("--out", default="results/suite.json")
    p.add_argument("--tune", nargs="?", const="fwd,dq,dkdv", metavar="KERNELS",
                   help="time the tile settings of these kernels (fwd, dq, dkdv; default all) instead of the "
                        "registry; writes tune.json and best.json beside --out")
    p.add_argument("--overrides", metavar="JSON",
                   help="tile settings forced over the defaults, per kernel (a best.json of --tune)")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.overrides:
        with open(args.overrides) as f:
            overrides = json.load(f)
        for kernel, variant in overrides.items():
            launch.CONFIG_OVERRIDES[kernel] = variant
        print("tile settings forced:", json.dumps(overrides))
    if args.tune:
        return tune(ints(args.lengths), ints(args.ndims), args.tune.split(","), os.path.dirname(args.out) or ".")
    cases = suite.registry(
        ints(args.lengths), kv_heads=ints(args.kv_heads), ndims=ints(args.ndims),
        modes=args.modes.split(","), methods=args.methods.split(","),
        directions=[d == "fwdbwd" for d in args.directions.split(",")], select_topk=ints(args.select_topk),
    )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.overrides:
        command += "  # tile settings: " + json.dumps(launch.CONFIG_OVERRIDES)
    result = suite.run_suite(cases, out_path=args.out, command=command)
    for row in result["rows"]:
        extra = "".join(f" {k}={row[k]:.1f}" for k in ("x_floor", "x_vs_sdpa-flash", "x_vs_sdpa-cudnn") if k in row)
        print(f"{row['name']:<70} {row.get('ms', row.get('error'))}{extra}")
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
