"""Perplexity of a causal language model over a long token sequence, window by window:
the computation behind ``tensorized-attention perplexity``.

The tokens ``t_0 … t_{n-1}`` are cut into windows of ``context`` tokens (all of them
``context`` long when ``n >= context``), window k starting at ``k * stride``; the last
window is moved back to end at token ``n - 1`` (it may then overlap the one before more than
the others do). The model reads each window on its own (positions 0 … context-1, no cache)
and predicts every token of it from the tokens before it in the window. Each target token
is scored once, in the first window that predicts it:

- ``stride == context`` (the default): non-overlapping windows, each scored on its own
  ``context - 1`` predictions (a window's first token has no context in it and is never
  scored);
- ``stride < context``: sliding windows (the evaluation of LongLoRA and of the Hugging Face
  perplexity guide): the first window scores all its predictions, every later one only its
  last ``stride`` tokens, each of which then sees at least ``context - stride`` tokens of
  context.

- ``score_last=T``: the same tokens at every context. Windows end at ``first_end``,
  ``first_end + T``, ... (``first_end``: the longest context evaluated, so every window is
  full), each reads the ``context`` tokens before its end and scores only its last ``T``:
  every context scores exactly the same targets and differs only in how much history each
  target sees. (With the windows above, a longer context also scores other tokens: later
  parts of a document, whose difficulty differs.)

The perplexity is ``exp`` of the mean negative log-likelihood (natural log) over the scored
tokens. :func:`plan_windows` gives the windows, :func:`window_nll` scores one,
:func:`evaluate` runs them all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Window", "evaluate", "evaluate_documents", "plan_windows", "read_tokens", "window_nll"]


class Window(NamedTuple):
    """Tokens ``[begin, end)`` go into the model; the targets ``[score_from, end)`` are scored
    (``score_from > begin``: each is predicted from the tokens before it in the window)."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def plan_windows(
    n_tokens: int, context: int, stride: int | None = None, max_windows: int | None = None, *,
    score_last: int | None = None, first_end: int | None = None,
) -> list[Window]:
    """The windows of the evaluation of ``n_tokens`` tokens (see the module's docstring).

    ``stride`` defaults to ``context``; ``max_windows`` keeps the first windows only.
    Without ``max_windows`` every token but the first is scored exactly once when
    ``stride < context``; with ``stride == context`` the first token of each window is not.
    ``score_last``: windows ending at ``first_end + i * score_last`` (``first_end``
    defaults to ``context``), each scoring its last ``score_last`` tokens.

    >>> plan_windows(10, 4)                 # non-overlapping, the last one moved back
    [Window(begin=0, end=4, score_from=1), Window(begin=4, end=8, score_from=5), Window(begin=6, end=10, score_from=8)]
    >>> [w.scored for w in plan_windows(10, 4, stride=2)]   # sliding: 3 then the last 2
    [3, 2, 2, 2]
    >>> plan_windows(12, 4, score_last=2, first_end=6)  # the same targets as with context 6
    [Window(begin=2, end=6, score_from=4), Window(begin=4, end=8, score_from=6), Window(begin=6, end=10, score_from=8), Window(begin=8, end=12, score_from=10)]
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if score_last is not None:
        return _tail_windows(n_tokens, context, score_last, first_end, max_windows, stride)
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride must lie in [1, context={context}], got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    length = min(context, n_tokens)
    windows: list[Window] = []
    scored_until = 0  # every target before this position is scored already
    begin = 0
    while max_windows is None or len(windows) < max_windows:
        end = begin + length
        if end > n_tokens:
            begin, end = n_tokens - length, n_tokens
        windows.append(Window(begin, end, max(begin + 1, scored_until)))
        scored_until = end
        if end == n_tokens:
            break
        begin += stride
    return windows


def _tail_windows(n_tokens, context, score_last, first_end, max_windows, stride) -> list[Window]:
    first_end = context if first_end is None else first_end
    if stride is not None:
        raise ValueError("score_last sets where windows end; it takes no stride")
    if not 1 <= score_last < context:
        raise ValueError(f"score_last must lie in [1, context - 1 = {context - 1}], got {score_last}")
    if first_end < context:
        raise ValueError(f"first_end ({first_end}) must be >= context ({context}): every window full")
    if first_end > n_tokens:
        raise ValueError(f"the first window ends at {first_end}, past the {n_tokens} tokens")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    windows = []
    end = first_end
    while end <= n_tokens and (max_windows is None or len(windows) < max_windows):
        windows.append(Window(end - context, end, end - score_last))
        end += score_last
    return windows


LOGIT_CHUNK = 8192  # positions whose logits exist at once (float32: 8192 x vocab x 4 bytes)


def _output_head(model):
    """(decoder, head) of a model whose logits are ``head(decoder(ids).last_hidden_state)``
    and nothing more (the Hugging Face layout, no logit soft-capping), else None."""
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if (isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module)
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None):
        return decoder, head
    return None


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, score_from: int = 1, chunk: int = LOGIT_CHUNK) -> tuple[float, int]:
    """Sum of the negative log-likelihoods (nats) of the tokens ``input_ids[score_from:]``,
    each predicted by ``model`` from the tokens before it; returns ``(sum, count)``.

    ``input_ids`` is one window, ``[L]`` or ``[1, L]``, read in one call (``use_cache=False``).
    For a model of the Hugging Face layout (``.model`` then ``.lm_head``) the output layer
    runs on ``chunk`` positions at a time, scored in float32 against the next tokens, so
    the logits of a 128k-token window never exist at once (they would take 25 GB); other
    models give all their logits.
    """
    ids = input_ids.reshape(1, -1)
    length = ids.shape[1]
    if not 1 <= score_from < length:
        raise ValueError(f"score_from must lie in [1, {length - 1}], got {score_from}")
    targets = ids[0, score_from:]
    parts = _output_head(model)
    if parts is None:
        logits = model(input_ids=ids, use_cache=False).logits[0]
        scored = logits[score_from - 1 : length - 1].float()
        nll = F.cross_entropy(scored, targets.to(scored.device), reduction="sum")
        return float(nll), int(targets.numel())
    decoder, head = parts
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, score_from - 1 : length - 1]
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        total += float(F.cross_entropy(logits, targets[start : start + chunk].to(logits.device), reduction="sum"))
    return total, int(targets.numel())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model,
    tokens: Sequence[int] | torch.Tensor,
    *,
    context: int,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    score_last: int | None = None,
    first_end: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` over ``tokens`` (a 1-D sequence of token ids), window by
    window (:func:`plan_windows`, :func:`window_nll`), under :func:`torch.no_grad`, on the
    model's device.

    Returns ``windows`` and ``scored_tokens`` (how many), ``tokens_processed`` (the windows'
    lengths summed), ``nll_sum``, ``mean_nll`` (nats per scored token), ``perplexity`` =
    ``exp(mean_nll)``, ``seconds`` (model time, windows only), ``tokens_per_s`` (tokens
    processed per second), ``scored_tokens_per_s``, and ``per_window``: ``begin``, ``end``,
    ``scored``, ``mean_nll`` and ``seconds`` of each window.
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    plan = plan_windows(ids.numel(), context, stride, max_windows, score_last=score_last, first_end=first_end)
    device = next(model.parameters()).device
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(plan, desc="perplexity", unit="window", disable=not progress) if tqdm else plan
    nll_sum, count, processed, elapsed = 0.0, 0, 0, 0.0
    per_window = []
    for w in bar:
        window = ids[w.begin : w.end].to(device)
        _synchronize(device)
        t0 = time.perf_counter()
        nll, n = window_nll(model, window, w.score_from - w.begin)
        _synchronize(device)
        dt = time.perf_counter() - t0
        nll_sum += nll
        count += n
        processed += w.end - w.begin
        elapsed += dt
        per_window.append({"begin": w.begin, "end": w.end, "scored": n, "mean_nll": nll / n, "seconds": dt})
        if tqdm is not None and progress:
            bar.set_postfix_str(f"ppl {math.exp(nll_sum / count):.3f}")
    mean = nll_sum / count
    return {
        "windows": len(plan),
        "scored_tokens": count,
        "tokens_processed": processed,
        "nll_sum": nll_sum,
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "seconds": elapsed,
        "tokens_per_s": processed / elapsed if elapsed > 0 else None,
        "scored_tokens_per_s": count / elapsed if elapsed > 0 else None,
        "per_window": per_window,
    }


@torch.no_grad()
def evaluate_documents(
    model,
    documents: Sequence[tuple[str, Sequence[int]]],
    *,
    context: int,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    score_last: int | None = None,
    first_end: int | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` over several documents (``(id, tokens)`` pairs), each cut into its
    own windows (no window crosses a document boundary), the totals pooled: the mean NLL
    is over every scored token of every document. ``max_windows`` caps the windows of all
    documents together (the first documents first). Returns :func:`evaluate`'s totals,
    ``documents`` (how many were read) and ``per_document`` (id, windows, scored, mean_nll)."""
    totals = dict(windows=0, scored_tokens=0, tokens_processed=0, nll_sum=0.0, seconds=0.0)
    per_document = []
    for doc_id, tokens in documents:
        left = None if max_windows is None else max_windows - totals["windows"]
        if left is not None and left <= 0:
            break
        result = evaluate(model, tokens, context=context, stride=stride, max_windows=left, progress=progress,
                          score_last=score_last, first_end=first_end)
        for key in totals:
            totals[key] += result[key]
        per_document.append({"id": doc_id, "windows": result["windows"], "scored": result["scored_tokens"],
                             "mean_nll": result["mean_nll"]})
    if not per_document:
        raise ValueError("no document to evaluate")
    mean = totals["nll_sum"] / totals["scored_tokens"]
    seconds = totals["seconds"]
    return {
        **totals,
        "documents": len(per_document),
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "tokens_per_s": totals["tokens_processed"] / seconds if seconds > 0 else None,
        "scored_tokens_per_s": totals["scored_tokens"] / seconds if seconds > 0 else None,
        "per_document": per_document,
    }


# ------------------------------------------------------------------ the command line


def read_tokens(path: str, dtype: str = "uint16"):
    """Token ids from a 1-D ``.npy`` array or a raw file of ``dtype`` integers, as int64."""
    import numpy as np

    if path.endswith(".npy"):
        array = np.load(path, allow_pickle=False)
    else:
        array = np.fromfile(path, dtype=np.dtype(dtype))
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D array of integer token ids, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def add_arguments(p) -> None:
    """The options of ``tensorized-attention perplexity``."""
    import os

    from .cli import DTYPES, _positive, parse_lengths
    from .setups import add_model_arguments

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text file, tokenized whole without special tokens")
    source.add_argument("--tokens", metavar="FILE",
                        help="token ids: a 1-D .npy array, or raw integers (.bin, see --tokens-dtype)")
    source.add_argument("--data", metavar="DIR",
                        help="a corpus built by 'tensorized-attention corpus': the documents of --split, "
                             "each cut into its own windows")
    p.add_argument("--split", default="test", help="the split of --data")
    p.add_argument("--min-doc-tokens", type=_positive, default=None,
                   help="read only documents of at least this many tokens (default: with --data the longest "
                        "--context, so every context reads the same documents; else all)")
    p.add_argument("--tokens-dtype", default="uint16", help="integer type of the ids in a raw --tokens file")
    p.add_argument("--context", type=parse_lengths, default=[2048],
                   help="tokens per window; a comma list evaluates each (k = 1024), one model load")
    p.add_argument("--stride", type=_positive, default=None,
                   help="tokens between window starts; None: the context, non-overlapping windows")
    p.add_argument("--score-last", type=_positive, default=None, metavar="T",
                   help="score only the last T tokens of each window, windows ending at the longest --context "
                        "+ i*T: every context scores the same tokens (no --stride)")
    p.add_argument("--max-windows", type=_positive, default=None,
                   help="evaluate the first K windows only (per context, over all documents)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", default=os.path.join("results", "perplexity.json"), help="the JSON file to write")
    add_model_arguments(p)


def run(args, command: str) -> int:
    """``tensorized-attention perplexity``: load the model with its attention, evaluate each
    --context, print and write the results (one record per context)."""
    import json
    import os
    import sys

    import numpy as np

    from . import bench, setups
    from .cli import PROG
    from .corpus import sha256_file

    def fail(message: str) -> int:
        print(f"{PROG} perplexity: error: {message}", file=sys.stderr)
        return 2

    contexts = list(args.context)
    if min(contexts) < 2:
        return fail(f"--context must be >= 2, got {min(contexts)}")
    if args.stride is not None and args.stride > min(contexts):
        return fail(f"--stride ({args.stride}) must not exceed --context ({min(contexts)})")
    if args.score_last is not None and (args.stride is not None or args.score_last >= min(contexts)):
        return fail(f"--score-last takes no --stride and must be below the shortest --context ({min(contexts)}), "
                    f"got {args.score_last}")
    try:
        setup = setups.parse_attention(args.attention)
    except ValueError as err:
        return fail(f"--attention: {err}")
    try:
        model, tokenizer, device, load_s = setups.load_for_job(
            args.model, setup, device=args.device, dtype=args.dtype, threads=args.threads, cache_dir=args.cache_dir)
    except setups.LOAD_ERRORS as err:
        return fail(str(err))
    dtype = next(model.parameters()).dtype

    if args.text is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        documents = [(args.text, tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])]
        source = {"text": args.text, "characters": len(text), "sha256": sha256_file(args.text)}
    elif args.tokens is not None:
        try:
            documents = [(args.tokens, read_tokens(args.tokens, args.tokens_dtype))]
        except (ValueError, TypeError) as err:
            return fail(str(err))
        source = {"tokens": args.tokens, "sha256": sha256_file(args.tokens)}
    else:
        from .corpus import load_split

        try:
            split = load_split(args.data, args.split)
        except (OSError, ValueError) as err:
            return fail(f"--data: {err}")
        documents = [(doc_id, np.asarray(split[i], dtype=np.int64)) for i, doc_id in enumerate(split.ids)]
        source = {"data": args.data, "split": args.split, "documents_in_split": len(documents)}
    least = args.min_doc_tokens or (max(contexts) if args.data is not None or args.score_last else 2)
    if args.score_last:  # the windows of every context end where the longest context's first one does
        least = max(least, max(contexts))
    documents = [(doc_id, tokens) for doc_id, tokens in documents if len(tokens) >= least]
    if not documents:
        return fail(f"no document of at least {least} tokens to evaluate")
    vocab = model.get_input_embeddings().num_embeddings
    for doc_id, tokens in documents:
        low, high = int(np.min(tokens)), int(np.max(tokens))
        if low < 0 or high >= vocab:
            return fail(f"{doc_id}: token ids must lie in [0, {vocab}), found {low} .. {high}")
    source.update(documents=len(documents), min_doc_tokens=least,
                  tokens_total=int(sum(len(tokens) for _, tokens in documents)))

    print(f"perplexity: {args.model} ({model.config.model_type}), attention {args.attention} "
          f"(attn_implementation={setup.attn_implementation!r}), {str(dtype).replace('torch.', '')} on "
          f"{device.type}; {source['documents']} document(s), {source['tokens_total']} tokens, "
          f"contexts {', '.join(map(str, contexts))}", flush=True)
    results = []
    for context in contexts:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = evaluate_documents(model, documents, context=context, stride=args.stride,
                                    max_windows=args.max_windows, progress=not args.no_progress,
                                    score_last=args.score_last,
                                    first_end=max(contexts) if args.score_last else None)
        result = {"context": context, "stride": args.score_last or args.stride or context,
                  "score_last": args.score_last, **result}
        if device.type == "cuda":
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if setup.kind in ("tensorized", "window"):
            from .hf import options_of, resolve_fold

            result["fold"] = list(resolve_fold(options_of(model.config), min(context, len(documents[0][1])),
                                               int(model.config.max_position_embeddings)))
        results.append(result)
        print(f"context {context}: {result['windows']} windows, {result['scored_tokens']} scored tokens, "
              f"mean NLL {result['mean_nll']:.4f} nats, perplexity {result['perplexity']:.3f}, "
              f"{result['tokens_per_s']:.1f} tokens/s", flush=True)

    import transformers

    record = {
        "model": args.model,
        "model_type": model.config.model_type,
        "attention": args.attention,
        "setup": setup.describe(),
        "options_resolved": (getattr(model.config, "tensorized_attention", None)
                             if setup.kind in ("tensorized", "window") else None),
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "dtype": str(dtype).replace("torch.", ""),
        "source": source,
        "max_windows": args.max_windows,
        "results": results,
        "load_s": round(load_s, 2),
        "device": bench.device_info(device),
        "transformers": transformers.__version__,
        "command": command,
    }
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0
