"""Where the time of the selected pass goes on a GPU: the ranking, the grouping of the
pairs, the forward, forward+backward (Triton backend, bfloat16, median of do_bench).

    python benchmarks/profile_select.py --seqlen 131072 --out results/profile_select.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from tensorized_attention import SelectedPass, TensorPositions, tensorized_attn
from tensorized_attention.ops.triton import select
from tensorized_attention.passes import SCORES


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--score", default="mean", choices=SCORES, help="how the pass ranks blocks")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--kernels", type=int, default=0, metavar="K",
                   help="also profile one forward+backward (torch.profiler) and record its K costliest GPU kernels")
    p.add_argument("--sweep", default=None, metavar="MxNxW,...",
                   help="also time forward+backward with these tiles: queries (pairs) per tile M, keys per tile N, "
                        "warps W of every kernel, e.g. 64x64x4,64x128x8")
    p.add_argument("--baselines", action="store_true",
                   help="also time, in the same run, plain `complete` (fold (N/block, block)) and SDPA-flash: the "
                        "retrieval issue's speed targets are ratios to them")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    N, H, Hkv, D = args.seqlen, args.heads, args.kv_heads, args.headdim
    step = SelectedPass(args.block, args.topk, args.score)
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = TensorPositions(1.0 / 100000.0 ** (torch.arange(0, D, 2, device="cuda") / D))
    scale = D**-0.5
    sel, R = select._selections(step, q.detach(), k.detach(), scale)
    rows = {}

    def time(name, fn):
        torch.cuda.reset_peak_memory_stats()
        rows[name] = {"ms": do_bench(fn, warmup=5, rep=30, return_mode="median"),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(f"{name:<22} {rows[name]['ms']:9.3f} ms  peak {rows[name]['peak_gib']:.1f} GiB", flush=True)

    time("ranking", lambda: select._selections(step, q.detach(), k.detach(), scale))
    time("pairs", lambda: select._pairs(sel, R, N // args.block, 64))

    def fwd():
        with torch.no_grad():
            return select.selected_pass(step, q, k, v, sinks=args.sinks, scale=scale, positions=positions)

    def fwd_bwd():
        out = select.selected_pass(step, q, k, v, sinks=args.sinks, scale=scale, positions=positions)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    if args.sweep:
        _sweep(args.sweep, time, step, q, k, v, args.sinks, scale, positions)
    time("selected pass fwd", fwd)
    time("selected pass fwd+bwd", fwd_bwd)
    if args.baselines:
        _baselines(time, q, k, v, args.block)
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "command": "python " + " ".join(sys.argv),
              "rows": rows}
    if args.baselines:
        ms = {name: row["ms"] for name, row in rows.items()}
        result["ratios"] = {
            "fwd / complete fwd": ms["selected pass fwd"] / ms["complete fwd"],
            "sdpa-flash fwd / fwd": ms["sdpa-flash fwd"] / ms["selected pass fwd"],
            "sdpa-flash fwd+bwd / fwd+bwd": ms["sdpa-flash fwd+bwd"] / ms["selected pass fwd+bwd"],
        }
        print(json.dumps(result["ratios"], indent=1), flush=True)
    if args.kernels:
        result["kernels"] = _costliest_kernels(fwd_bwd, args.kernels)
        for r in result["kernels"]:
            print(f"  {r['ms']:9.3f} ms  x{r['calls']}  {r['name'][:90]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def _baselines(time, q, k, v, block):
    """Plain causal `complete` over the fold (N / block, block) and SDPA's flash backend on the
    same q, k, v (GQA by repeated keys where they have fewer heads), forward and
    forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    shape = (q.shape[1] // block, block)

    def complete():
        return tensorized_attn(q, k, v, shape, causal=True, mode="complete", backend="triton")

    def flash():
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        kt, vt = (x.repeat_interleave(groups, 1) for x in (kt, vt))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    for name, fn in (("complete", complete), ("sdpa-flash", flash)):
        with torch.no_grad():
            time(f"{name} fwd", fn)

        def fwd_bwd(fn=fn):
            out = fn()
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

        time(f"{name} fwd+bwd", fwd_bwd)


def _sweep(spec, time, step, q, k, v, sinks, scale, positions):
    """Forward and forward+backward at each tile size of ``spec`` (the kernels' warps set
    through their launch parameters)."""
    meta = select._meta
    for item in spec.split(","):
        block_m, block_n, warps = (int(x) for x in item.lower().split("x"))
        select._meta = lambda q_, info, warps=warps: {**meta(q_, info), "num_warps": warps}
        try:
            def fwd_bwd(block_m=block_m, block_n=block_n):
                out = select.selected_pass(step, q, k, v, sinks=sinks, scale=scale, positions=positions,
                                           block_m=block_m, block_n=block_n)
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

            time(f"fwd+bwd {item}", fwd_bwd)
        except Exception as exc:  # a tile that does not fit (shared memory, registers): recorded
            print(f"fwd+bwd {item}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        finally:
            select._meta = meta


def _costliest_kernels(fn, count):
    """The ``count`` GPU kernels with the most device time in one call of ``fn`` (after a warm
    call): name, calls, milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [{"name": e.key, "calls": e.count, "ms": e.device_time_total / 1e3} for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:count]


if __name__ == "__main__":
    main()
