"""What each option of the operator costs on the Triton backend, one option at a time.

    python benchmarks/profile_options.py --seqlen 131072 --kv-heads 8 --out results/options.json

Times (medians, ``suite.run_case``) the 2-dim ``complete`` fold forward, and forward+backward
with ``--backward``: plain, with a gate, with 4 sinks, with tensor positions, and with all
three (what a trained model runs), side by side in one run.
"""

from __future__ import annotations

import argparse
import json

from tensorized_attention import suite

VARIANTS = {
    "plain": {},
    "gate": dict(gate=True),
    "sinks4": dict(sinks=4),
    "positions": dict(positions=True),
    "gate+sinks4": dict(gate=True, sinks=4),
    "sinks4+positions": dict(sinks=4, positions=True),
    "gate+sinks4+positions": dict(gate=True, sinks=4, positions=True),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--backward", action="store_true", help="forward+backward too")
    p.add_argument("--out")
    args = p.parse_args(argv)
    ceilings = suite.measure_ceilings()
    shape = suite.choose_shape(args.seqlen, 2)
    rows = []
    for backward in (False, True) if args.backward else (False,):
        for name, options in VARIANTS.items():
            case = suite.Case("triton", args.seqlen, heads=args.heads, kv_heads=args.kv_heads, shape=shape,
                              backward=backward, **options)
            row = suite.run_case(case, ceilings)
            row["variant"] = name
            rows.append(row)
            print(f"{name:<24} {'fwd+bwd' if backward else 'fwd':<8} {row.get('ms', row.get('error'))}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), ceilings=ceilings, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
