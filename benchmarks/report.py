"""Tables (Markdown) and a plot from the GPU suite's JSON results.

    python benchmarks/report.py benchmarks/results/h100_suite_4k_128k.json benchmarks/results/h100_suite_131k.json \
        benchmarks/results/h100_suite_131k_32kv.json benchmarks/results/h100_flex_131k.json \
        benchmarks/results/h100_suite_512k_1m.json --plot docs/bench_h100.png

Prints the Markdown that docs/benchmarks.md holds.
"""

from __future__ import annotations

import argparse
import json


def _case(row):
    return (row["method"], row["seqlen"], row["kv_heads"], row["backward"], tuple(row["shape"]), _mode(row))


def _mode(row):
    return row["mode"] + (f"+select{row['select']}" if row.get("select") else "")


def load(paths):
    """The rows of every file; a case measured again in a later file (same method, length,
    kv heads, direction, fold and mode) keeps the later row only."""
    rows, meta = {}, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = meta or data
        for row in data["rows"]:
            rows.pop(_case(row), None)
            rows[_case(row)] = row
    return list(rows.values()), meta


def _fold(row):
    return "x".join(map(str, row["shape"])) if row["shape"] else "–"


def _ms(row):
    return f"{row['ms']:.2f}" if "ms" in row else ("OOM" if "out of memory" in row.get("error", "") else "error")


def table(rows, *, kv_heads, backward):
    pick = [r for r in rows if r["kv_heads"] == kv_heads and r["backward"] == backward]
    out = ["| N | method | fold | mode | ms (median) | x floor | GB/s | vs SDPA-flash | vs SDPA-cuDNN | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(pick, key=lambda r: (r["seqlen"], r["method"] != "triton", r["method"], len(r["shape"]), _mode(r))):
        tens = r["method"] in ("triton", "reference")
        cells = [
            f"{r['seqlen']:,}", r["method"], _fold(r), _mode(r) if tens else "–", _ms(r),
            f"{r['x_floor']:.2f}" if "x_floor" in r else "–",
            f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else "–",
            f"{r['x_vs_sdpa-flash']:.1f}x" if "x_vs_sdpa-flash" in r else "–",
            f"{r['x_vs_sdpa-cudnn']:.1f}x" if "x_vs_sdpa-cudnn" in r else "–",
            f"{r['peak_mb']:,.0f}" if "peak_mb" in r else "–",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, backward in zip(axes, (False, True), strict=True):
        series = {}
        for r in rows:
            if r["kv_heads"] != 32 or r["backward"] != backward or "ms" not in r or r["method"] == "reference":
                continue
            if r["method"] == "triton":
                label = f"tensorized (Triton), {len(r['shape'])} dims, {_mode(r)}"
            elif r["method"] == "flex-window":
                label = "FlexAttention sliding window (width n_m)"
            else:
                label = {"sdpa-flash": "SDPA flash (full)", "sdpa-cudnn": "SDPA cuDNN (full)"}[r["method"]]
            series.setdefault(label, []).append((r["seqlen"], r["ms"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title("forward + backward" if backward else "forward")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (median)")
    axes[1].legend(fontsize=8)
    fig.suptitle("H100, bf16, batch 1, 32 heads, head dim 128, causal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    rows, meta = load(args.paths)
    dev = meta["device"]
    c = meta["ceilings"]
    print(f"Device: {dev['name']}, torch {dev['torch']}, triton {dev['triton']}, CUDA {dev['cuda']}; "
          f"measured copy bandwidth {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.\n")
    for kv in (32, 8):
        for backward in (False, True):
            print(f"### {'Forward + backward' if backward else 'Forward'}, {kv} kv heads\n")
            print(table(rows, kv_heads=kv, backward=backward) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
