"""Training and forward speed of one model shape under several attention setups, through
the real commands (``tensorized-attention train`` and ``perplexity``), on random weights
and random tokens: the throughput that plans the long-context study (docs/results.md).
Weights do not change the speed, so no checkpoint has to travel: the model is built from
a ``config.json`` (and its tokenizer files) with random weights.

    python benchmarks/train_speed.py --config-dir DIR --out results/train_speed.json

``DIR`` holds ``config.json`` and the tokenizer files of the model (for SmolLM2-135M: those
of the converted checkpoint, ``tensorized_attention.models.model_dir()``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from tensorized_attention.cli import main as cli

SETUPS = [
    "full:linear=4",
    'tensorized:{"shape": [null, 256], "mode": "complete", "order": [0, 1], "positions": "tensor"}',
    "tensorized:pilot",
    "window:256+4",
]


def random_checkpoint(config_dir: str, out_dir: str) -> str:
    """A checkpoint of the model of ``config_dir/config.json`` with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    for name in os.listdir(config_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(config_dir, name), out_dir)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", required=True)
    p.add_argument("--context", type=int, default=32768, help="training context")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per setup (batch 1)")
    p.add_argument("--eval-contexts", default="32k,128k", help="forward-only contexts (perplexity)")
    p.add_argument("--setups", default="\n".join(SETUPS), help="attention setups, one per line")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/train_speed.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    work = tempfile.mkdtemp(prefix="train-speed-")
    model = random_checkpoint(args.config_dir, os.path.join(work, "model"))
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    tokens = os.path.join(work, "tokens.npy")
    rng = np.random.default_rng(0)
    np.save(tokens, rng.integers(0, vocab, size=args.context * (args.steps + 2) + 1).astype(np.int64))
    rows = []
    for spec in [s for s in args.setups.splitlines() if s.strip()]:
        row = {"attention": spec}
        out = os.path.join(work, f"train-{len(rows)}")
        start = time.perf_counter()
        status = cli(["train", "--model", model, "--attention", spec, "--tokens", tokens, "--context",
                      str(args.context), "--batch", "1", "--train-tokens", str(args.steps * args.context),
                      "--gradient-checkpointing", "--log-every", "1", "--save-every", "100000",
                      "--device", args.device, "--out", out, "--no-progress"])
        row["train_status"], row["train_wall_s"] = status, time.perf_counter() - start
        if status == 0:
            log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
            steady = log[2:] or log
            row["train_log"] = log
            for key in ("tokens_per_s", "mfu", "peak_memory_gib", "step_s"):
                values = [r[key] for r in steady if r.get(key) is not None]
                row[f"train_{key}_median"] = statistics.median(values) if values else None
        shutil.rmtree(out, ignore_errors=True)
        ppl_out = os.path.join(work, f"ppl-{len(rows)}.json")
        status = cli(["perplexity", "--model", model, "--attention", spec, "--tokens", tokens, "--context",
                      args.eval_contexts, "--max-windows", "2", "--device", args.device, "--out", ppl_out,
                      "--no-progress"])
        row["forward_status"] = status
        if status == 0:
            row["forward"] = [{k: r.get(k) for k in ("context", "windows", "tokens_per_s", "seconds", "peak_memory_mb")}
                              for r in json.load(open(ppl_out))["results"]]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "train_log"}), flush=True)
        _write(args, model, rows)  # after every setup: a run cut short keeps what it measured
    shutil.rmtree(work, ignore_errors=True)


def _write(args, model, rows):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "context": args.context, "steps": args.steps,
                   "command": "python benchmarks/train_speed.py " + " ".join(args.argv),
                   "config": json.load(open(os.path.join(model, "config.json"))), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
