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

__all__ = ["Window", "evaluate", "plan_windows", "window_nll"]


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
    n_tokens: int, context: int, stride: int | None = None, max_windows: int | None = None
) -> list[Window]:
    """The windows of the evaluation of ``n_tokens`` tokens (see the module's docstring).

    ``stride`` defaults to ``context``; ``max_windows`` keeps the first windows only.
    Without ``max_windows`` every token but the first is scored exactly once when
    ``stride < context``; with ``stride == context`` the first token of each window is not.

    >>> plan_windows(10, 4)                 # non-overlapping, the last one moved back
    [Window(begin=0, end=4, score_from=1), Window(begin=4, end=8, score_from=5), Window(begin=6, end=10, score_from=8)]
    >>> [w.scored for w in plan_windows(10, 4, stride=2)]   # sliding: 3 then the last 2
    [3, 2, 2, 2]
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
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


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, score_from: int = 1) -> tuple[float, int]:
    """Sum of the negative log-likelihoods (nats) of the tokens ``input_ids[score_from:]``,
    each predicted by ``model`` from the tokens before it; returns ``(sum, count)``.

    ``input_ids`` is one window, ``[L]`` or ``[1, L]``. The model computes the logits of all
    L positions in one call (``use_cache=False``); those of positions
    ``score_from - 1 … L - 2`` are scored in float32 against the next tokens.
    """
    ids = input_ids.reshape(1, -1)
    length = ids.shape[1]
    if not 1 <= score_from < length:
        raise ValueError(f"score_from must lie in [1, {length - 1}], got {score_from}")
    logits = model(input_ids=ids, use_cache=False).logits[0]
    scored = logits[score_from - 1 : length - 1].float()
    targets = ids[0, score_from:].to(scored.device)
    nll = F.cross_entropy(scored, targets, reduction="sum")
    return float(nll), int(targets.numel())


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
    plan = plan_windows(ids.numel(), context, stride, max_windows)
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
