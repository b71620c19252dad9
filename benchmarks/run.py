"""Run the GPU benchmark suite (or a part of it) and write JSON results.

    python benchmarks/run.py --out results/suite.json               # the whole registry
    python benchmarks/run.py --lengths 131072 --kv-heads 32 --tune  # tile settings too

The same suite runs from the command line as ``tensorized-attention bench --suite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

from tensorized_attention import suite
from tensorized_attention.ops.triton import launch


def tune(lengths, out_dir):
    """Time the Triton forward and forward+backward under several tile settings."""
    fwd_variants = [
        {}, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    ]
    bwd_variants = [{}, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
                    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1)]
    ceilings = suite.measure_ceilings()
    rows = []
    for N in lengths:
        for ndim in (2, 3):
            shape = suite.choose_shape(N, ndim)
            for variant in fwd_variants:
                launch.CONFIG_OVERRIDES["fwd"] = variant
                row = suite.run_case(suite.Case("triton", N, shape=shape), ceilings)
                row["variant"] = {"fwd": variant}
                rows.append(row)
                print(f"fwd {shape} {variant}: {row.get('ms', row.get('error'))} ms, x_floor {row.get('x_floor')}", flush=True)
            launch.CONFIG_OVERRIDES["fwd"] = {}
            for variant in bwd_variants:
                launch.CONFIG_OVERRIDES["bwd"] = variant
                row = suite.run_case(suite.Case("triton", N, shape=shape, backward=True), ceilings)
                row["variant"] = {"bwd": variant}
                rows.append(row)
                print(f"fwd+bwd {shape} {variant}: {row.get('ms', row.get('error'))} ms", flush=True)
            launch.CONFIG_OVERRIDES["bwd"] = {}
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump({"ceilings": ceilings, "rows": rows}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768,131072,524288,1048576")
    p.add_argument("--kv-heads", default="32,8")
    p.add_argument("--ndims", default="2,3")
    p.add_argument("--modes", default="complete,block")
    p.add_argument("--methods", default="triton,sdpa-flash,sdpa-cudnn,flex-window,reference")
    p.add_argument("--directions", default="fwd,fwdbwd")
    p.add_argument("--out", default="results/suite.json")
    p.add_argument("--tune", action="store_true", help="time tile settings instead of the registry")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.tune:
        return tune(ints(args.lengths), os.path.dirname(args.out) or ".")
    cases = suite.registry(
        ints(args.lengths), kv_heads=ints(args.kv_heads), ndims=ints(args.ndims),
        modes=args.modes.split(","), methods=args.methods.split(","),
        directions=[d == "fwdbwd" for d in args.directions.split(",")],
    )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = suite.run_suite(cases, out_path=args.out, command=command)
    for row in result["rows"]:
        extra = "".join(f" {k}={row[k]:.1f}" for k in ("x_floor", "x_vs_sdpa-flash", "x_vs_sdpa-cudnn") if k in row)
        print(f"{row['name']:<70} {row.get('ms', row.get('error'))}{extra}")
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
