"""The end-to-end benchmark of Llama-shaped models (prefill, training step, decoding), every
system in one process on one device; writes model.json, model.md and model.png into --out.

    python benchmarks/model.py --quick --out results/bench_model        # the acceptance points, ~8 min on an H100
    python benchmarks/model.py --models llama3.2-1b --measurements train --lengths 32k,128k

The same runs from the command line as ``tensorized-attention bench model ...``; the options
are those of :mod:`tensorized_attention.bench_model`.
"""

from __future__ import annotations

import shlex
import sys

from tensorized_attention import bench_model

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(bench_model.main(argv, command=shlex.join(["python", "benchmarks/model.py", *argv])))
