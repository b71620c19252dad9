"""The GPU kernels of a Chrome trace (``profile_distributed.py --trace`` writes one per
rank), in order: when each starts (ms after the first), how long it lasts, its stream.

    python benchmarks/trace_timeline.py benchmarks/results/distributed/traces/h100x2_1m_split/rank1.json
"""

from __future__ import annotations

import argparse
import json


def timeline(trace: dict, min_ms: float = 0.05) -> list[tuple[float, float, int, str]]:
    """(start ms, duration ms, stream, name) of every kernel lasting at least ``min_ms``."""
    kernels = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    if not kernels:
        return []
    t0 = kernels[0]["ts"]
    return [((e["ts"] - t0) / 1e3, e["dur"] / 1e3, e.get("args", {}).get("stream", -1), e["name"])
            for e in kernels if e["dur"] / 1e3 >= min_ms]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--min-ms", type=float, default=0.05, help="leave out kernels shorter than this")
    args = p.parse_args(argv)
    with open(args.trace) as f:
        rows = timeline(json.load(f), args.min_ms)
    for start, duration, stream, name in rows:
        print(f"{start:9.2f} +{duration:8.2f} ms  stream {stream:>3}  {name[:70]}")


if __name__ == "__main__":
    main()
