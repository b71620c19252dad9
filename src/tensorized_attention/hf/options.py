"""The options of tensorized attention in a Hugging Face model: one dict,
``config.tensorized_attention``, saved and loaded with the model's config."""

from __future__ import annotations

import math
from typing import Any

from ..fold import check_shape, choose_shape
from ..passes import SCORES

__all__ = ["DEFAULTS", "PRESETS", "options_of", "resolve_fold", "window_options"]

DEFAULTS: dict[str, Any] = {
    # a fold (n_1, ..., n_m); its first entry may be None ("as many as the length needs"),
    # which keeps every position's output independent of the total length (needed for
    # cached generation); None: choose_shape(length, ndim, local=local)
    "shape": None,
    "ndim": 2,
    "local": None,
    "mode": "complete",  # or "block"
    "order": None,  # default range(m): coarsest first (the order cached decoding is built for)
    "positions": "tensor",  # rotary at p // s_j (DESIGN.md §3), or "sequence": the model's own RoPE
    # None, or per pass: None (no gate), an initial gate in (0, 1) (learned, as a logit), or
    # exactly 1 (fixed: the pass is off, its input goes through unchanged)
    "gate": None,
    "sinks": 0,
    # None, or {"block": W, "topk": k} (and optionally "score": "mean" or "bound"): a selected
    # pass (passes.SelectedPass) after the fold passes; with "order": [] it runs alone
    # (window + selected blocks + sinks)
    "select": None,
    # None, or {"block": W}: a pooled pass (passes.PooledPass) instead (one summary per block)
    "pool": None,
    # key relay: each fold pass mixes the keys as it mixes the values (DESIGN.md §8)
    "relay": False,
    "full_attention_layers": [],  # layer indices that keep full (SDPA) attention
}

# The best configuration the pilot found (DESIGN.md §7): 2 dims with a contiguous
# dimension of 256, coarse pass first, gate sigmoid(2) ~ 0.88 on the first pass, 4 sinks,
# tensor positions.
PRESETS: dict[str, dict[str, Any]] = {
    "pilot": {
        "shape": [None, 256],
        "mode": "complete",
        "order": [0, 1],
        "positions": "tensor",
        "gate": [0.88, None],
        "sinks": 4,
        "full_attention_layers": [],
    },
    # DESIGN.md §8's probe: a window of 256 keys, 4 sinks and the tokens of the top-2 earlier
    # 256-token blocks, the selected blocks and sinks at virtual positions before the window
    "select": {
        "shape": [None, 256],
        "order": [],
        "positions": "tensor",
        "sinks": 4,
        "select": {"block": 256, "topk": 2},
        "full_attention_layers": [],
    },
    # the pilot's passes, then a selected pass (gate sigmoid(2) on the coarse pass and on the
    # selected pass: each starts mostly off and is learned)
    "pilot_select": {
        "shape": [None, 256],
        "mode": "complete",
        "order": [0, 1],
        "positions": "tensor",
        "gate": [0.88, None, 0.88],
        "sinks": 4,
        "select": {"block": 256, "topk": 2},
        "full_attention_layers": [],
    },
}


def window_options(width: int, sinks: int = 0) -> dict[str, Any]:
    """A causal sliding window of ``width`` keys plus ``sinks`` sinks, as tensorized options:
    the fold (None, width) with its coarse pass off (gate exactly 1), so the contiguous pass,
    a window of ``width`` keys, is all that runs: the control of the long-range passes
    (same width, same sinks, same positions). The coarse pass is still computed, then
    discarded: time it with care."""
    return {"shape": [None, int(width)], "mode": "complete", "order": [0, 1], "positions": "tensor",
            "gate": [1.0, None], "sinks": int(sinks), "full_attention_layers": []}


def options_of(config) -> dict[str, Any]:
    """The validated options of a model config (missing keys take DEFAULTS)."""
    given = getattr(config, "tensorized_attention", None) or {}
    if isinstance(given, str):
        if given not in PRESETS:
            raise ValueError(f"config.tensorized_attention: unknown preset {given!r}; presets: {sorted(PRESETS)}")
        given = PRESETS[given]
    if not isinstance(given, dict):
        raise TypeError(f"config.tensorized_attention must be a dict (or a preset name), got {type(given).__name__}")
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"config.tensorized_attention: unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **given}
    if opts["positions"] not in ("tensor", "sequence"):
        raise ValueError(f"config.tensorized_attention['positions'] must be 'tensor' or 'sequence', got {opts['positions']!r}")
    if opts["mode"] not in ("block", "complete"):
        raise ValueError(f"config.tensorized_attention['mode'] must be 'block' or 'complete', got {opts['mode']!r}")
    select = opts["select"]
    if select is not None:
        if not isinstance(select, dict) or not {"block", "topk"} <= set(select) <= {"block", "topk", "score"} or any(
                isinstance(select[x], bool) or not isinstance(select[x], int) or select[x] < 1
                for x in ("block", "topk")) or select.get("score", "mean") not in SCORES:
            raise ValueError("config.tensorized_attention['select'] must be None or {'block': W, 'topk': k} "
                             f"with ints W, k >= 1 (and optionally 'score': one of {SCORES}), got {select!r}")
    pool = opts["pool"]
    if pool is not None:
        if not isinstance(pool, dict) or set(pool) != {"block"} or isinstance(pool["block"], bool) or not isinstance(
                pool["block"], int) or pool["block"] < 1:
            raise ValueError(f"config.tensorized_attention['pool'] must be None or {{'block': W}} with an int W >= 1, "
                             f"got {pool!r}")
        if select is not None:
            raise ValueError("config.tensorized_attention: 'select' and 'pool' are two kinds of last pass; give one")
    if not isinstance(opts["relay"], bool) or (opts["relay"] and (select is not None or pool is not None)):
        raise ValueError("config.tensorized_attention['relay'] must be true or false, and is not defined with "
                         f"'select' or 'pool'; got relay={opts['relay']!r}")
    if opts["order"] is not None and len(opts["order"]) == 0 and select is None and pool is None:
        raise ValueError("config.tensorized_attention['order'] = [] (no fold pass) needs a 'select' or 'pool' pass")
    m = num_passes(opts)
    gate = opts["gate"]
    if gate is not None:
        if len(gate) != m or any(g is not None and not 0.0 < float(g) <= 1.0 for g in gate):
            raise ValueError(f"config.tensorized_attention['gate'] must be None or {m} entries (one per pass), each None, in (0, 1) "
                             f"or exactly 1 (the pass off), got {gate!r}")
    return opts


def num_dims(opts: dict[str, Any]) -> int:
    return len(opts["shape"]) if opts["shape"] is not None else int(opts["ndim"])


def num_passes(opts: dict[str, Any]) -> int:
    """The passes one call runs: the fold passes of ``order`` (all dims by default), then
    the selected or pooled pass if any; the gate has one entry per pass."""
    fold = num_dims(opts) if opts["order"] is None else len(opts["order"])
    return fold + (opts["select"] is not None or opts["pool"] is not None)


def resolve_fold(opts: dict[str, Any], length: int, capacity: int = 0) -> tuple[int, ...]:
    """The fold used for a sequence of ``length`` positions. A first entry None holds
    ``max(length, capacity)`` positions (the model's trained length, say): a causal pass
    never reads beyond its query, so only the sinks' distance in the first pass
    (n_1 + S - 1 - i with tensor positions) sees n_1."""
    shape = opts["shape"]
    if shape is None:
        return choose_shape(length, int(opts["ndim"]), local=opts["local"])
    if shape[0] is None:
        tail = check_shape(list(shape[1:]), name="config.tensorized_attention['shape'][1:]") if len(shape) > 1 else ()
        return (max(1, -(-max(length, capacity) // math.prod(tail))), *tail)
    return check_shape(list(shape), length, name="config.tensorized_attention['shape']")
