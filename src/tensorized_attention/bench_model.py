"""End-to-end benchmark of Llama-shaped models: ``tensorized-attention bench model``.

Hugging Face ``LlamaForCausalLM`` models are built from a config with random weights (no
download), in the shapes of :data:`MODELS`, optionally with fewer layers than the real
model (``layers``: the times are then also reported scaled to the whole model, ``ms_model``
= ``ms`` x layers of the model / layers measured; peak memory is the measured model's).
Each system only switches ``attn_implementation`` (:data:`SYSTEMS`); the model code is
transformers' own.

Measurements (batch ``batch``, random token ids, the model's dtype):

- ``prefill``: one forward over N tokens without a cache, logits of the last position only
  (``logits_to_keep=1``), under ``torch.no_grad``.
- ``train``: forward and backward over N tokens with gradient checkpointing (transformers'
  ``gradient_checkpointing_enable``, non-reentrant), the next-token cross-entropy computed
  over chunks of :data:`LOSS_CHUNK` positions (each chunk's logits recomputed in the
  backward, never all N x vocab logits at once); no optimizer step (the gradients are
  dropped after each step).
- ``decode``: a prefill of N tokens with the model's cache (``use_cache=True``), then
  ``decode_tokens`` greedy tokens one at a time with that cache: tokens per second, the
  cache's bytes (measured on the cache after the prefill: the keys and values of every
  layer, plus, for tensorized attention, its decoding state, see :mod:`tensorized_attention.hf`)
  and their ratio to full attention's ``2 * layers * kv_heads * head_dim * bytes`` per token.

Attention share: every (model, measurement, length) also runs the system ``noop``, whose
attention returns zeros of the right shape (kept in the autograd graph of q, k and v, so
their projections' backward still runs) and does nothing else. The non-attention work of
the model is the same for every system, so ``attention_ms = ms - noop_ms`` and
``attention_share = attention_ms / ms``.

Timing: a first call (the warmup: compilation, autotuning, allocator growth) under a reset
peak-memory counter gives the peak (``torch.cuda.max_memory_allocated`` minus what was
allocated before: weights excluded, activations, gradients and caches included); then one
timed call, and more up to ``repeats`` while they fit in ``budget_s`` seconds (wall clock
between ``torch.cuda.synchronize`` calls); the median is reported. A first call longer than
``max_call_s`` is the only one (flagged ``single_call``: its time includes the warmup). A system is skipped at a length where the
extrapolation of its shorter lengths predicts a call longer than ``max_call_s``, or where it
ran out of memory at a shorter length. Every failure (out of memory, an import error, a
kernel that refuses the shapes) is recorded in its row and the run goes on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MODELS", "SYSTEMS", "MEASUREMENTS", "ModelSpec", "System", "Task", "build_model", "quick_plan",
           "full_plan", "run_plan", "format_markdown", "plot", "summary", "main"]

SCHEMA = "tensorized-attention/bench-model/1"
MEASUREMENTS = ("prefill", "train", "decode")
LOSS_CHUNK = 4096
GiB = 2**30


# ------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-shaped model: a name and the ``LlamaConfig`` keyword arguments."""

    name: str
    config: dict[str, Any]

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"])

    def full_cache_bytes_per_token(self, element_size: int = 2) -> int:
        """Full attention's cache per token: keys and values of every layer and kv head."""
        return 2 * self.layers * int(self.config["num_key_value_heads"]) * self.head_dim() * element_size


MODELS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec("llama3-8b", dict(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
        max_position_embeddings=131072, rms_norm_eps=1e-5)),
    "llama3.2-1b": ModelSpec("llama3.2-1b", dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5)),
    "smollm2-135m": ModelSpec("smollm2-135m", dict(
        num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5)),
}


def build_model(spec: ModelSpec, *, layers: int | None = None, device="cpu", dtype=torch.bfloat16, seed: int = 0):
    """``LlamaForCausalLM`` of ``spec``'s shape (``layers`` decoder layers when given) with
    random weights, on ``device`` in ``dtype``, in eval mode, attention dropout 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(spec.config)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        settings["num_hidden_layers"] = int(layers)
    settings.setdefault("attention_dropout", 0.0)
    config = LlamaConfig(**settings)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype=dtype)
    model.config.use_cache = False
    return model.eval()


# ----------------------------------------------------------------------------- systems


@dataclass(frozen=True)
class System:
    """One attention of the comparison: ``attn_implementation`` (registered by ``prepare``
    when it is not transformers' own), an optional context around every call (the SDPA
    backend), tensorized options, and the measurements it supports."""

    name: str
    attn_implementation: str
    description: str
    prepare: Callable[[], None] | None = None
    context: Callable[[], Any] | None = None
    tensorized_options: str | dict | None = None
    measurements: tuple[str, ...] = MEASUREMENTS

    def enter(self):
        return self.context() if self.context is not None else contextlib.nullcontext()

    def apply(self, model) -> None:
        if self.prepare is not None:
            self.prepare()
        if self.tensorized_options is not None:
            from . import hf

            hf.enable(model, self.tensorized_options)
        else:
            model.set_attn_implementation(self.attn_implementation)


def _no_mask(*args, attention_mask=None, **kwargs):
    """The mask function of the attentions registered here: causal by construction, no
    dense mask is built; a padded batch is refused."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError("this benchmark's attention functions take no padded batches")
    return None


def _register(name: str, fn) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)


def noop_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Zeros [B, q_len, H, D]: the model without its attention. Under autograd they stay in
    the graph of q, k and v (their gradients are zeros, so the projections' backward still
    runs); without it they are a plain allocation."""
    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    zero = (key.sum() + value.sum()) * 0
    return (query.transpose(1, 2) * 0 + zero).contiguous(), None


def _prepare_noop() -> None:
    _register("noop", noop_attention)


_FLEX: dict[str, Any] = {}
FLEX_WINDOW = 256


def flex_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FlexAttention (``torch.compile``d) with a causal sliding window of
    :data:`FLEX_WINDOW` keys, the block mask built once per length (``_compile=True``: block
    by block, never the dense N x N mask). Prefill and training only (q_len = kv_len)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len != kv_len:
        raise NotImplementedError("flex-window: cached decoding is not measured (q_len != kv_len)")
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    masks = _FLEX.setdefault("masks", {})
    mask = masks.get((q_len, str(query.device)))
    if mask is None:
        window = FLEX_WINDOW

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        masks.clear()  # one length at a time: the masks of earlier lengths are not kept
        mask = create_block_mask(sliding, None, None, q_len, kv_len, device=query.device, _compile=True)
        masks[(q_len, str(query.device))] = mask
    out = _FLEX["fn"](query, key, value, block_mask=mask, scale=scaling,
                      enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _prepare_flex() -> None:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _register("flex_window", flex_window_attention)


NSA_BLOCK, NSA_BLOCKS = 64, 16


def nsa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Native Sparse Attention of ``fla-core`` (``fla.ops.nsa.parallel_nsa``, Triton): the
    compressed and the selected branches (blocks of :data:`NSA_BLOCK`, :data:`NSA_BLOCKS`
    selected blocks per query) with constant gates of 1/2; its sliding-window branch needs
    the flash-attn 2 package and is off. NSA's own gate projections are not part of a Llama
    model, hence the constant gates: the cost of the attention is what is measured."""
    from fla.ops.nsa import parallel_nsa

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, N, H, D]
    g = torch.full(q.shape[:3], 0.5, device=q.device, dtype=q.dtype)
    out = parallel_nsa(q, k, v, g_cmp=g, g_slc=g, block_counts=NSA_BLOCKS, block_size=NSA_BLOCK,
                       window_size=0, scale=scaling)
    return out, None


def _prepare_nsa() -> None:
    import fla.ops.nsa  # noqa: F401 - fails here when fla-core is not installed

    _register("nsa", nsa_attention)


def fa4_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FlashAttention 4 (``flash-attn-4``, CuTe DSL): causal full attention, grouped-query
    heads native; for a q shorter than k (decoding) the causal diagonal is aligned to the
    end, as flash-attn does."""
    from flash_attn.cute import flash_attn_func

    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))  # [B, N, H, D]
    out = flash_attn_func(q, k, v, softmax_scale=scaling, causal=True)
    if isinstance(out, tuple):
        out = out[0]
    return out, None


def _prepare_fa4() -> None:
    import flash_attn.cute  # noqa: F401 - fails here when flash-attn-4 (or its CuTe DSL) is missing

    _register("fa4", fa4_attention)


def _sdpa_backend(name: str):
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, name))

    return context


SYSTEMS: dict[str, System] = {
    "noop": System("noop", "noop", "attention replaced by zeros (the model without its attention)",
                   prepare=_prepare_noop),
    "tensorized": System("tensorized", "tensorized", "tensorized:pilot (hf.PRESETS['pilot']: fold [None, 256], "
                         "complete, coarse pass first, gate, 4 sinks, tensor positions; default backend)",
                         tensorized_options="pilot"),
    "sdpa-flash": System("sdpa-flash", "sdpa", "transformers' sdpa, SDPBackend.FLASH_ATTENTION",
                         context=_sdpa_backend("FLASH_ATTENTION")),
    "sdpa-cudnn": System("sdpa-cudnn", "sdpa", "transformers' sdpa, SDPBackend.CUDNN_ATTENTION",
                         context=_sdpa_backend("CUDNN_ATTENTION")),
    "sdpa": System("sdpa", "sdpa", "transformers' sdpa, torch's own backend choice"),
    "flex-window": System("flex-window", "flex_window", f"FlexAttention (compiled), causal sliding window of "
                          f"{FLEX_WINDOW} keys", prepare=_prepare_flex, measurements=("prefill", "train")),
    "nsa": System("nsa", "nsa", f"fla-core parallel_nsa (Triton): compressed + selected branches, blocks of "
                  f"{NSA_BLOCK}, {NSA_BLOCKS} selected", prepare=_prepare_nsa, measurements=("prefill", "train")),
    "fa4": System("fa4", "fa4", "flash-attn-4 flash_attn_func (CuTe DSL), causal full attention",
                  prepare=_prepare_fa4),
}


# ------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Task:
    """One model (with ``layers`` decoder layers, None: all), one measurement, its lengths
    and systems. ``noop`` is added first to every task (the attention share needs it)."""

    model: ModelSpec
    measurement: str
    lengths: tuple[int, ...]
    systems: tuple[str, ...]
    layers: int | None = None
    batch: int = 1
    decode_tokens: int = 32

    def __post_init__(self):
        if self.measurement not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {self.measurement!r}; allowed: {', '.join(MEASUREMENTS)}")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths must be >= 2, got {self.lengths}")
        if self.layers is not None and not 1 <= self.layers <= self.model.layers:
            raise ValueError(f"layers must lie in 1..{self.model.layers} for {self.model.name}, got {self.layers}")
        if self.batch < 1 or self.decode_tokens < 1:
            raise ValueError(f"batch and decode_tokens must be >= 1, got {self.batch}, {self.decode_tokens}")

    @property
    def layers_measured(self) -> int:
        return self.layers or self.model.layers


K = 1024
ALL_SYSTEMS = ("tensorized", "sdpa-flash", "sdpa-cudnn", "flex-window", "nsa", "fa4")
#: layers measured per model in the plans: Llama-3-8B one layer (times scaled x 32), the others whole
PLAN_LAYERS = {"llama3-8b": 1, "llama3.2-1b": None, "smollm2-135m": None}


def quick_plan() -> list[Task]:
    """The acceptance points, about 8 minutes on one H100, most important first: Llama-3-8B
    shape prefill (one layer, times x 32) at 32k, 128k, 512k, tensorized and SDPA (torch's
    own backend choice, what a model gets by default, and the flash and cuDNN backends); the
    Llama-3.2-1B shape training step at 128k; decoding after a 128k prefill at batch 1;
    then the peers at 128k (prefill, one Llama-3-8B layer)."""
    big, small = MODELS["llama3-8b"], MODELS["llama3.2-1b"]
    sdpa = ("sdpa", "sdpa-flash", "sdpa-cudnn")
    return [
        Task(big, "prefill", (32 * K, 128 * K, 512 * K), ("tensorized", *sdpa), layers=1),
        Task(small, "train", (128 * K,), ("tensorized", *sdpa)),
        Task(small, "decode", (128 * K,), ("tensorized", *sdpa), decode_tokens=32),
        Task(big, "prefill", (128 * K,), ("flex-window", "nsa", "fa4"), layers=1),
    ]


def full_plan(models: Iterable[str] = tuple(MODELS), measurements: Iterable[str] = MEASUREMENTS,
              lengths: Sequence[int] = (32 * K, 128 * K, 512 * K, 1024 * K), systems: Sequence[str] = ALL_SYSTEMS,
              layers: int | None | str = "plan", decode_tokens: int = 64,
              decode_batches: Sequence[int] = (1,)) -> list[Task]:
    """Every model x measurement over ``lengths`` and ``systems`` (``layers``: "plan" for
    :data:`PLAN_LAYERS`, None for whole models, or a number for every model)."""
    tasks = []
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; models: {', '.join(MODELS)}")
        spec = MODELS[name]
        n_layers = PLAN_LAYERS.get(name) if layers == "plan" else layers
        if n_layers is not None:
            n_layers = min(int(n_layers), spec.layers)
        for measurement in measurements:
            chosen = tuple(s for s in systems if measurement in SYSTEMS[s].measurements)
            batches = decode_batches if measurement == "decode" else (1,)
            for batch in batches:
                tasks.append(Task(spec, measurement, tuple(lengths), chosen, layers=n_layers, batch=batch,
                                  decode_tokens=decode_tokens))
    return tasks


# ------------------------------------------------------------------------ measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _timed(fn: Callable[[], Any], device: torch.device, *, repeats: int, budget_s: float,
           max_call_s: float = math.inf) -> dict[str, Any]:
    """A first call under a reset peak counter (the warmup, and the peak memory), then at
    least one timed call (none when the first took longer than ``max_call_s``: it is then
    the time reported, flagged ``single_call``) and more, up to ``repeats``, while the next
    is expected to end within ``budget_s`` seconds of timed calls."""
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    if first > max_call_s:
        return {"times_ms": [first * 1e3], "single_call": True, "peak_bytes": peak}
    times: list[float] = []
    while not times or (len(times) < repeats and sum(times) + times[-1] <= budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"times_ms": [t * 1e3 for t in times], "single_call": False, "peak_bytes": peak}


def _prefill_fn(model, ids):
    def fn():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    return fn


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                    chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy of ``lm_head(hidden)`` against ``labels`` [B, N] (the
    label of position i is token i + 1; the last position has none), ``chunk`` positions at
    a time, each chunk's logits recomputed in the backward (``torch.utils.checkpoint``)."""
    from torch.utils.checkpoint import checkpoint

    hidden, target = hidden[:, :-1], labels[:, 1:]
    count = target.numel()

    def piece(h, y):
        logits = lm_head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        total = total + checkpoint(piece, hidden[:, start:start + chunk], target[:, start:start + chunk],
                                   use_reentrant=False)
    return total / count


def _train_fn(model, ids):
    def fn():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        loss = chunked_lm_loss(hidden, model.lm_head, ids)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return float(loss.detach())

    return fn


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache after a prefill: every layer's keys and values,
    and the decoding state tensorized attention keeps on it (ring buffers, sinks)."""
    seen: set[int] = set()
    total = 0

    def add(x):
        nonlocal total
        if isinstance(x, torch.Tensor) and x.numel() and id(x) not in seen:
            seen.add(id(x))
            total += x.numel() * x.element_size()

    for layer in getattr(cache, "layers", []) or []:
        add(getattr(layer, "keys", None))
        add(getattr(layer, "values", None))
    if not getattr(cache, "layers", None):
        for name in ("key_cache", "value_cache"):
            for x in getattr(cache, name, []) or []:
                add(x)
    for state in getattr(cache, "_tensorized_states", {}).values():
        for x in [*state.values, *state.sinks, state.last]:
            add(x)
    return total


def _decode(model, ids, tokens: int, device: torch.device, budget_s: float) -> dict[str, Any]:
    """Prefill with the cache (timed once), then ``tokens`` greedy steps (after 2 untimed)."""
    kw = _cache_kw(model)
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        cache = getattr(out, kw)
        held = cache_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        del out

        def step(token):
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kw: cache})
            return out.logits[:, -1:].argmax(-1)

        for _ in range(2):
            token = step(token)
        _sync(device)
        times = []
        start = time.perf_counter()
        for _ in range(tokens):
            t0 = time.perf_counter()
            token = step(token)
            _sync(device)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget_s:
                break
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return {"times_ms": [t * 1e3 for t in times], "prefill_ms": prefill_s * 1e3, "cache_bytes": held,
            "peak_bytes": peak}


# --------------------------------------------------------------------------------- run


def _is_oom(err: BaseException) -> bool:
    from .bench import _is_oom as oom

    return oom(err)


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".strip()


def _extrapolate(history: list[tuple[int, float]], N: int) -> float | None:
    from .bench import _extrapolate as extrapolate

    return extrapolate(history, N)


def device_record(device: torch.device) -> dict[str, Any]:
    """Device name, memory, and the versions of torch, transformers, triton and the peers' packages
    (None: not installed)."""
    import transformers

    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / GiB, 1), cuda=torch.version.cuda,
                    sms=props.multi_processor_count)
    else:
        from .bench import _cpu_name

        info["name"] = _cpu_name()
    from importlib.metadata import PackageNotFoundError, version

    for package in ("triton", "fla-core", "flash-attn-4", "nvidia-cutlass-dsl"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def _write(result: dict[str, Any], path: str | None) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)


def run_plan(tasks: Sequence[Task], *, device="auto", dtype: torch.dtype | str | None = None, repeats: int = 3,
             budget_s: float = 30.0, max_call_s: float = 60.0, deadline_s: float | None = None,
             out_path: str | None = None, command: str = "", systems: dict[str, System] | None = None,
             progress: bool = True, plan: str = "custom") -> dict[str, Any]:
    """Run every task; return (and write to ``out_path`` after every measurement) the JSON
    record: ``device``, ``config``, ``systems`` (name, description, ``error`` when it could
    not be prepared) and ``rows`` (one per task x length x system, see the module doc).

    ``budget_s``: the time budget of one measurement; ``max_call_s``: skip a system at a
    length where one call is predicted longer; ``deadline_s``: start no measurement after
    this many seconds (the rest is recorded as skipped)."""
    from .bench import resolve_device

    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if repeats < 1 or budget_s <= 0 or max_call_s <= 0:
        raise ValueError(f"need repeats >= 1 and positive budgets, got {repeats}, {budget_s}, {max_call_s}")
    systems = dict(SYSTEMS if systems is None else systems)
    for task in tasks:
        unknown = [s for s in task.systems if s not in systems]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; known: {', '.join(systems)}")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device_record(device),
        "config": {"plan": plan, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "budget_s": budget_s,
                   "max_call_s": max_call_s, "deadline_s": deadline_s, "loss_chunk": LOSS_CHUNK,
                   "optimizer_in_train_step": False, "gradient_checkpointing": True,
                   "attention_share": "1 - ms(noop) / ms(system), noop: attention returning zeros",
                   "timing": "median wall time of calls between torch.cuda.synchronize, after one warmup call"},
        "tasks": [], "systems": {}, "rows": [],
    }

    def say(text):
        if progress:
            print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    prepared: dict[str, str | None] = {}

    def prepare(name) -> str | None:
        if name not in prepared:
            system = systems[name]
            try:
                if system.prepare is not None:
                    system.prepare()
                prepared[name] = None
            except Exception as err:  # noqa: BLE001 - a peer that does not install or import is recorded
                prepared[name] = f"not available: {_error_text(err)}"
            result["systems"][name] = {"attn_implementation": system.attn_implementation,
                                       "description": system.description, "error": prepared[name]}
        return prepared[name]

    for task in tasks:
        names = ("noop", *[s for s in task.systems if s != "noop"])
        result["tasks"].append({"model": task.model.name, "measurement": task.measurement,
                                "lengths": list(task.lengths), "systems": list(names),
                                "layers_measured": task.layers_measured, "layers_model": task.model.layers,
                                "batch": task.batch, "decode_tokens": task.decode_tokens})
        say(f"{task.model.name} ({task.layers_measured}/{task.model.layers} layers) {task.measurement} "
            f"batch {task.batch}: lengths {list(task.lengths)}, systems {list(names)}")
        try:
            model = build_model(task.model, layers=task.layers, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001
            message = _error_text(err)
            say(f"  cannot build the model: {message}")
            for N in task.lengths:
                for name in names:
                    result["rows"].append(_row(task, N, name, status="error", error=f"model: {message}"))
            gc.collect()
            _empty(device)
            continue
        history: dict[str, list[tuple[int, float]]] = {}
        failed_oom: set[str] = set()
        for N in sorted(task.lengths):
            ids = torch.randint(0, int(task.model.config["vocab_size"]), (task.batch, N), device=device)
            for name in names:
                row = _row(task, N, name)
                system = systems[name]
                reason = None
                if deadline_s is not None and time.perf_counter() - start > deadline_s:
                    reason = f"skipped: the run's deadline ({deadline_s:g} s) has passed"
                elif task.measurement not in system.measurements:
                    reason = f"not measured: {name} supports {', '.join(system.measurements)} only"
                elif name in failed_oom:
                    reason = "skipped: out of memory at a shorter length"
                else:
                    error = prepare(name)
                    if error:
                        row.update(status="unavailable", error=error)
                        result["rows"].append(row)
                        say(f"  N={N:>8} {name:<12} {error}")
                        continue
                    predicted = _extrapolate(history.get(name, []), N)
                    if predicted is not None and predicted > max_call_s:
                        reason = f"skipped: predicted {predicted:.0f} s per call > max_call_s {max_call_s:g} s"
                if reason:
                    row.update(status="skipped", error=reason)
                    result["rows"].append(row)
                    say(f"  N={N:>8} {name:<12} {reason}")
                    continue
                say(f"  N={N:>8} {name:<12} ...")
                try:
                    measured = _measure(task, system, model, ids, device, repeats=repeats, budget_s=budget_s,
                                        max_call_s=max_call_s)
                    row.update(measured)
                    row["status"] = "ok"
                except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                    oom = _is_oom(err)
                    row.update(status="oom" if oom else "error", error=_error_text(err))
                    if oom:
                        failed_oom.add(name)
                finally:
                    if task.measurement == "train":
                        with contextlib.suppress(Exception):
                            disable = (getattr(model, "activation_checkpointing_disable", None)
                                       or model.gradient_checkpointing_disable)
                            disable()
                        model.eval()
                        for p in model.parameters():
                            p.grad = None
                gc.collect()
                _empty(device)
                if row["status"] == "ok":
                    per_call = row["ms"] / 1e3 * (task.decode_tokens if task.measurement == "decode" else 1)
                    history.setdefault(name, []).append((N, max(per_call, row.get("prefill_ms", 0) / 1e3)))
                result["rows"].append(row)
                say(f"  N={N:>8} {name:<12} {_describe_row(row)}")
                _add_shares(result["rows"])
                _write(result, out_path)
            del ids
        del model
        gc.collect()
        _empty(device)
    _add_shares(result["rows"])
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    _write(result, out_path)
    return result


def _empty(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(task: Task, N: int, system: str, **extra) -> dict[str, Any]:
    row = {"model": task.model.name, "measurement": task.measurement, "N": N, "batch": task.batch,
           "system": system, "layers_measured": task.layers_measured, "layers_model": task.model.layers,
           "status": None, "error": None, "ms": None, "ms_model": None, "peak_gib": None}
    row.update(extra)
    return row


def _measure(task: Task, system: System, model, ids, device, *, repeats: int, budget_s: float,
             max_call_s: float) -> dict[str, Any]:
    if task.measurement == "decode":
        # the model's capacity holds the prefill and the decoded tokens: a fold [None, 256]
        # then keeps its first dimension while decoding (tensorized decoding needs a fixed fold)
        need = ids.shape[1] + task.decode_tokens
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, need)
    system.apply(model)
    scale = task.model.layers / task.layers_measured
    with system.enter():
        if task.measurement == "prefill":
            t = _timed(_prefill_fn(model, ids), device, repeats=repeats, budget_s=budget_s, max_call_s=max_call_s)
        elif task.measurement == "train":
            model.train()
            if hasattr(model, "activation_checkpointing_enable"):  # the newer name of the same switch
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            t = _timed(_train_fn(model, ids), device, repeats=repeats, budget_s=budget_s, max_call_s=max_call_s)
        else:
            t = _decode(model, ids, task.decode_tokens, device, budget_s)
    ms = statistics.median(t["times_ms"])
    out: dict[str, Any] = {"ms": ms, "ms_model": ms * scale, "times_ms": [round(x, 3) for x in t["times_ms"]],
                           "repeats": len(t["times_ms"]), "single_call": t.get("single_call", False),
                           "peak_gib": None if t["peak_bytes"] is None else t["peak_bytes"] / GiB}
    if task.measurement == "decode":
        full = task.model.full_cache_bytes_per_token(torch.finfo(model.dtype).bits // 8)
        measured_full = task.layers_measured * full // task.model.layers
        per_token = t["cache_bytes"] / (ids.shape[0] * ids.shape[1])
        out.update(tokens_per_s=task.batch * 1e3 / ms if ms else None, ms_per_token=ms,
                   tokens_per_s_model=task.batch * 1e3 / (ms * scale) if ms else None,
                   prefill_ms=t["prefill_ms"], cache_bytes=t["cache_bytes"], cache_bytes_per_token=per_token,
                   full_cache_bytes_per_token=measured_full,
                   cache_ratio_to_full=per_token / measured_full if measured_full else None)
    return out


def _add_shares(rows: list[dict[str, Any]]) -> None:
    """attention_ms = ms - ms(noop) of the same model, measurement, length and batch."""
    base = {(r["model"], r["measurement"], r["N"], r["batch"], r["layers_measured"]): r["ms"]
            for r in rows if r["system"] == "noop" and r.get("status") == "ok"}
    for r in rows:
        noop = base.get((r["model"], r["measurement"], r["N"], r["batch"], r["layers_measured"]))
        if r["system"] == "noop" or r.get("status") != "ok" or noop is None or not r["ms"]:
            continue
        r["attention_ms"] = r["ms"] - noop
        r["attention_share"] = max(0.0, r["attention_ms"]) / r["ms"]


def _describe_row(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['error']}"
    text = f"{row['ms']:.1f} ms"
    if row["layers_measured"] != row["layers_model"]:
        text += f" (x{row['layers_model'] / row['layers_measured']:g} layers: {row['ms_model']:.0f} ms)"
    if row.get("peak_gib") is not None:
        text += f", peak {row['peak_gib']:.2f} GiB"
    if row["measurement"] == "decode":
        text += (f", {row['tokens_per_s']:.1f} tok/s, cache {row['cache_bytes_per_token']:.0f} B/token "
                 f"({row['cache_ratio_to_full']:.3f}x full)")
    if row.get("single_call"):
        text += " (one call)"
    return text


# ------------------------------------------------------------------------------ output


def _length(N: int) -> str:
    if N % (1024 * 1024) == 0:
        return f"{N // (1024 * 1024)}M"
    return f"{N // 1024}k" if N % 1024 == 0 else str(N)


def _groups(rows):
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["measurement"], r["batch"], r["layers_measured"], r["layers_model"]),
                          []).append(r)
    return groups


def _cell(r: dict[str, Any] | None, value: str) -> str:
    if r is None:
        return "–"
    if r.get("status") == "oom":
        return "OOM"
    if r.get("status") in ("skipped",):
        return "skip"
    if r.get("status") in ("error", "unavailable"):
        return "n/a" if r["status"] == "unavailable" else "error"
    return value


FASTEST_EXCLUDES = ("noop",)


def format_markdown(result: dict[str, Any]) -> str:
    """Markdown tables of a run: per model, measurement and batch, one row per length,
    one column per system (time of the whole model, the attention share in brackets), the
    fastest system named, peak memory; decoding adds tokens per second and cache bytes per
    token; the errors below."""
    out = []
    dev = result.get("device", {})
    out.append(f"Device: {dev.get('name')}, torch {dev.get('torch')}, transformers {dev.get('transformers')}; "
               f"`{result.get('command', '')}`")
    out.append("")
    notes: list[str] = []
    for (model, measurement, batch, measured, full), rows in _groups(result["rows"]).items():
        systems = list(dict.fromkeys(r["system"] for r in rows))
        lengths = sorted({r["N"] for r in rows})
        by = {(r["N"], r["system"]): r for r in rows}
        scaled = measured != full
        title = f"### {model}, {measurement}, batch {batch}"
        if scaled:
            title += f" ({measured} of {full} layers measured, times x {full / measured:g})"
        out.append(title)
        out.append("")
        if measurement == "decode":
            unit = "ms per token"
        elif measurement == "train":
            unit = "ms per forward + backward step (no optimizer)"
        else:
            unit = "ms per prefill (last-token logits)"
        out.append(f"Median {unit}, attention share in brackets; peak GiB of the measured model below.")
        out.append("")
        header = ["N", *systems, "fastest"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---:"] * (len(header) - 1) + ["---"]) + "|")
        for N in lengths:
            cells = [_length(N)]
            best = None
            for s in systems:
                r = by.get((N, s))
                value = "–"
                if r is not None and r.get("status") == "ok":
                    share = r.get("attention_share")
                    value = f"{r['ms_model']:,.1f}" + (f" ({share:.0%})" if share is not None else "")
                    if s not in FASTEST_EXCLUDES and (best is None or r["ms_model"] < best[1]):
                        best = (s, r["ms_model"])
                cells.append(_cell(r, value))
            cells.append(f"**{best[0]}**" if best else "–")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append("| peak GiB | " + " | ".join(systems) + " |")
        out.append("|---:|" + "|".join(["---:"] * len(systems)) + "|")
        for N in lengths:
            cells = [_length(N)]
            for s in systems:
                r = by.get((N, s))
                ok = r is not None and r.get("status") == "ok" and r.get("peak_gib") is not None
                cells.append(_cell(r, f"{r['peak_gib']:.2f}" if ok else "–"))
            out.append("| " + " | ".join(cells) + " |")
        if measurement == "decode":
            out.append("")
            out.append("| decoding | " + " | ".join(systems) + " |")
            out.append("|---|" + "|".join(["---:"] * len(systems)) + "|")
            for N in lengths:
                for label, key, fmt in (("tokens/s", "tokens_per_s_model", "{:.1f}"),
                                        ("cache B/token", "cache_bytes_per_token", "{:,.0f}"),
                                        ("x full attention's cache", "cache_ratio_to_full", "{:.3f}"),
                                        ("prefill ms (with cache)", "prefill_ms", "{:,.0f}")):
                    cells = [f"{_length(N)} {label}"]
                    for s in systems:
                        r = by.get((N, s))
                        ok = r is not None and r.get("status") == "ok" and r.get(key) is not None
                        cells.append(_cell(r, fmt.format(r[key]) if ok else "–"))
                    out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for r in rows:
            if r.get("status") != "ok" and r.get("error"):
                notes.append(f"{model} {measurement} N={_length(r['N'])} {r['system']}: {r['error']}")
    if notes:
        out.append("Not measured:")
        out.append("")
        out += [f"- {n}" for n in dict.fromkeys(notes)]
        out.append("")
    return "\n".join(out)


def summary(result: dict[str, Any]) -> list[str]:
    """The acceptance ratios found in a run: tensorized against the faster SDPA backend."""
    lines = []
    for (model, measurement, batch, _measured, _full), rows in _groups(result["rows"]).items():
        for N in sorted({r["N"] for r in rows}):
            ok = {r["system"]: r for r in rows if r["N"] == N and r.get("status") == "ok"}
            sdpa = [ok[s] for s in ("sdpa-flash", "sdpa-cudnn", "sdpa") if s in ok]
            ten = ok.get("tensorized")
            head = f"{model} {measurement} b{batch} N={_length(N)}:"
            if ten is None:
                lines.append(f"{head} tensorized not measured")
                continue
            if not sdpa:
                why = "; ".join(f"{r['system']}: {r['status']}" for r in rows
                                if r["N"] == N and r["system"].startswith("sdpa"))
                lines.append(f"{head} tensorized {ten['ms_model']:.0f} ms, SDPA did not run ({why or 'not asked'})")
                continue
            best = min(sdpa, key=lambda r: r["ms_model"])
            text = (f"{head} tensorized {ten['ms_model']:.1f} ms vs {best['system']} {best['ms_model']:.1f} ms: "
                    f"{best['ms_model'] / ten['ms_model']:.2f}x")
            if measurement == "decode":
                text += (f"; cache {ten['cache_bytes_per_token']:.0f} vs {best['cache_bytes_per_token']:.0f} B/token "
                         f"({ten['cache_bytes_per_token'] / best['cache_bytes_per_token']:.3f}x)")
            lines.append(text)
    return lines


def plot(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Log-log time against length, one panel per model x measurement, one line per system
    (times of the whole model); saved as a PNG (needs matplotlib). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = list(_groups(result["rows"]).items())
    cols = min(3, max(1, len(groups)))
    nrows = math.ceil(len(groups) / cols) if groups else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, ((model, measurement, batch, measured, full), rows) in zip(axes.flat, groups, strict=False):
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = sorted((r["N"], r["ms_model"]) for r in rows if r["system"] == system and r.get("status") == "ok")
            if pts:
                style = {"tensorized": "o-", "noop": ":"}.get(system, "s--")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=system,
                        **({"color": "0.5"} if system == "noop" else {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("ms per token" if measurement == "decode" else "ms")
        scaled = f", {measured}/{full} layers x{full / measured:g}" if measured != full else ""
        ax.set_title(f"{model} {measurement} b{batch}{scaled}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    dev = result.get("device", {})
    fig.suptitle(f"{dev.get('name')}, {result.get('config', {}).get('dtype')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


# ------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    from .cli import _positive, parse_lengths

    p.add_argument("--quick", action="store_true",
                   help="the quick plan (quick_plan: the acceptance points, about 8 minutes on one H100); "
                        "--models/--measurements/--lengths/--systems/--layers are ignored")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--measurements", default=",".join(MEASUREMENTS), help="comma list of prefill, train, decode")
    p.add_argument("--lengths", type=parse_lengths, default=[32 * K, 128 * K, 512 * K, 1024 * K],
                   help="comma-separated lengths; k = 1024, m = 1024**2")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help=f"comma list of {', '.join(s for s in SYSTEMS if s != 'noop')} (noop always runs)")
    p.add_argument("--layers", default="plan",
                   help="decoder layers measured: 'plan' (llama3-8b 1, times scaled x 32; the others whole), "
                        "'full', or a number for every model")
    p.add_argument("--decode-tokens", type=_positive, default=64, help="greedy tokens timed after the prefill")
    p.add_argument("--decode-batches", default="1", help="comma list of decoding batch sizes")
    p.add_argument("--repeats", type=_positive, default=3, help="timed calls after the warmup call, at most")
    p.add_argument("--budget-s", type=float, default=30.0, help="time budget of one measurement (seconds)")
    p.add_argument("--max-call-s", type=float, default=60.0,
                   help="skip a system at a length where one call is predicted longer than this")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no measurement after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default=os.path.join("results", "bench_model"), help="directory for model.json / .png / .md")
    p.add_argument("--no-plot", action="store_true", help="do not write model.png")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def _split(text: str, allowed: Iterable[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    allowed = list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: unknown {bad or text!r}; allowed: {', '.join(allowed)}")
    return items


def build_tasks(args) -> tuple[list[Task], str]:
    """The plan the arguments ask for, and its name."""
    if args.quick:
        return [replace(t, decode_tokens=min(t.decode_tokens, args.decode_tokens)) for t in quick_plan()], "quick"
    layers: int | str | None = args.layers
    if layers == "full":
        layers = None
    elif layers != "plan":
        try:
            layers = int(layers)
        except ValueError:
            raise ValueError(f"--layers must be 'plan', 'full' or a number, got {args.layers!r}") from None
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
    try:
        batches = [int(x) for x in args.decode_batches.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--decode-batches must be a comma list of numbers, got {args.decode_batches!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--decode-batches must be numbers >= 1, got {args.decode_batches!r}")
    tasks = full_plan(_split(args.models, MODELS, "--models"), _split(args.measurements, MEASUREMENTS, "--measurements"),
                      args.lengths, _split(args.systems, [s for s in SYSTEMS if s != "noop"], "--systems"),
                      layers=layers, decode_tokens=args.decode_tokens, decode_batches=batches)
    return tasks, "custom"


def run(args, command: str) -> int:
    """``tensorized-attention bench model``: run the plan, write model.json, model.md and
    model.png into --out, print the table and the summary."""
    prog = "tensorized-attention bench model"
    try:
        tasks, plan_name = build_tasks(args)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    dtype = None if args.dtype == "auto" else args.dtype
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.json")
    try:
        result = run_plan(tasks, device=args.device, dtype=dtype, repeats=args.repeats, budget_s=args.budget_s,
                          max_call_s=args.max_call_s, deadline_s=args.deadline_s, out_path=path, command=command,
                          progress=not args.no_progress, plan=plan_name)
    except (ValueError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    table = format_markdown(result)
    with open(os.path.join(args.out, "model.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print("summary:")
    for line in summary(result):
        print(f"  {line}")
    print(f"wrote {path} and {os.path.join(args.out, 'model.md')}")
    if not args.no_plot:
        try:
            print(f"wrote {plot(result, os.path.join(args.out, 'model.png'))}")
        except ImportError:
            print("no plot: matplotlib is not installed")
    return 0


def main(argv: Sequence[str] | None = None, command: str | None = None) -> int:
    import argparse
    import shlex

    parser = argparse.ArgumentParser(
        prog="tensorized-attention bench model",
        description="End-to-end benchmark of Llama-shaped models (random weights) with each attention: prefill, "
                    "training step, decoding; writes model.json, model.md and model.png into --out "
                    "(see tensorized_attention.bench_model and docs/benchmarks.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if command is None:
        command = shlex.join(["tensorized-attention", "bench", "model", *argv])
    return run(args, command)

