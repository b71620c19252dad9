"""Timing, peak memory, and the length sweep behind ``tensorized-attention bench``.

The sweep runs the tensorized operator and full attention
(:func:`torch.nn.functional.scaled_dot_product_attention`, "SDPA") on the same q, k, v
over a list of sequence lengths, and reports the median time and the peak memory of
each. :func:`format_table`, :func:`plot` and :func:`write_json` turn its rows into a
table, a PNG, and a JSON file.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .fold import check_shape, choose_shape
from .ops import available_backends, tensorized_attn

__all__ = [
    "default_dtype",
    "device_info",
    "format_table",
    "peak_memory",
    "plot",
    "resolve_device",
    "sweep",
    "time_fn",
    "write_json",
]

MiB = 2**20


# ---------------------------------------------------------------------------------------
# devices


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on: torch version, device name, CPU count, threads."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["name"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = info["cpu"]
    return info


def _describe(info: dict[str, Any]) -> str:
    if info["device"] == "cuda":
        return f"{info['name']}, torch {info['torch']}, CUDA {info.get('cuda')}"
    return (
        f"{info['name']}, {info['cpu_count']} CPUs ({info['torch_threads']} torch threads), "
        f"torch {info['torch']}"
    )


# ---------------------------------------------------------------------------------------
# time and memory


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 3,
    min_time_s: float = 0.0,
    max_repeats: int = 1000,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Wall time of ``fn()`` in milliseconds: ``warmup`` untimed calls, then timed ones.

    At least ``repeats`` timed calls, and more while the timed calls add up to less than
    ``min_time_s`` seconds (at most ``max_repeats``), so quick functions get a median
    over many calls and slow ones are not run more than ``repeats`` times.

    On CUDA each call is timed with a pair of ``torch.cuda.Event`` (``enable_timing``),
    after a ``torch.cuda.synchronize``; on CPU with :func:`time.perf_counter`. ``device``
    defaults to CUDA when it is available. Returns ``median_ms`` (the number reported),
    ``min_ms``, ``max_ms``, ``repeats`` (the number of timed calls) and every time in
    ``times_ms``.

    >>> t = time_fn(lambda: sum(range(1000)), warmup=0, repeats=3, device="cpu")
    >>> sorted(t) == ["max_ms", "median_ms", "min_ms", "repeats", "times_ms"]
    True
    >>> t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    True
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = resolve_device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []

    def more() -> bool:
        if len(times) < repeats:
            return True
        return len(times) < max_repeats and sum(times) < min_time_s * 1000.0

    if device.type == "cuda":
        _synchronize(device)
        while more():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
    else:
        while more():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": len(times),
        "times_ms": times,
    }


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_memory(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return int(peak)


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> int:
    """Peak memory in bytes allocated by one call of ``fn()``, above what was live before it.

    Whatever ``fn`` returns is dropped once the call is over, but counts while it lives.

    - CUDA: ``torch.cuda.synchronize``, ``torch.cuda.reset_peak_memory_stats``, then
      ``torch.cuda.max_memory_allocated()`` after the call minus ``memory_allocated()``
      before it (the caching allocator's bytes in live tensors, kernels' workspaces included).
    - CPU: the call runs under ``torch.profiler.profile(profile_memory=True)``. The
      PyTorch CPU allocator reports every allocation and free to the profiler as an event
      with a signed size and a timestamp; their running sum in time order is the live
      memory the call added (frees of memory from before the call make it negative), and
      its maximum, at least 0, is the peak. This counts every buffer handed out by the
      PyTorch CPU allocator, kernels' scratch tensors included, but not memory that
      third-party libraries allocate on their own. Each call costs a profiler start and
      stop (tens of milliseconds), so keep it out of timings.

    >>> def fn():
    ...     x = torch.ones(25 * 2**20)  # 100 MiB of float32, freed on return
    ...     return float(x[0])
    >>> round(peak_memory(fn, device="cpu") / 2**20)
    100
    """
    device = resolve_device(device)
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(max(peak, 0))
    if device.type != "cpu":
        raise ValueError(f"peak_memory supports cpu and cuda devices, got {device}")
    return _cpu_peak_memory(fn)


# ---------------------------------------------------------------------------------------
# the sweep


def _shape_for(shape, N: int, ndim: int, local: int | None) -> tuple[int, ...]:
    if shape is None:
        return choose_shape(N, ndim, local=local)
    if callable(shape):
        return check_shape(tuple(shape(N)), N)
    return check_shape(tuple(shape), N)


def fold_label(shape: Sequence[int]) -> str:
    """``(128, 64)`` -> ``"128x64"``."""
    return "x".join(str(n) for n in shape)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _default_memory_budget(device: torch.device) -> int:
    """Half of the device's memory: free GPU memory, or physical RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    return 8 * 2**30


def _extrapolate(history: list[tuple[int, float]], N: int) -> float | None:
    """Predict a quantity at length N from the measured (length, value) pairs: a power
    law through the last two points, its exponent clamped to [1, 2] (2 with one point)."""
    points = [(n, x) for n, x in history if x and x > 0]
    if not points:
        return None
    n1, x1 = points[-1]
    exponent = 2.0
    if len(points) >= 2:
        n0, x0 = points[-2]
        if n1 != n0:
            exponent = min(2.0, max(1.0, math.log(x1 / x0) / math.log(n1 / n0)))
    return x1 * (N / n1) ** exponent


def _sdpa_qkv(q, k, v):
    """[B, N, H, D] -> [B, H, N, D]; returns (q, k, v, enable_gqa) for SDPA."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    H, Hkv = qt.shape[1], kt.shape[1]
    if H == Hkv:
        return qt, kt, vt, False
    return qt, kt, vt, True


def _sdpa_supports_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try a call
        try:
            x = torch.zeros(1, 2, 1, 1)
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


def sweep(
    lengths: Iterable[int],
    *,
    batch: int = 1,
    heads: int = 8,
    kv_heads: int | None = 2,
    headdim: int = 64,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = "auto",
    ndim: int = 2,
    shape: Sequence[int] | Callable[[int], Sequence[int]] | None = None,
    local: int | None = None,
    mode: str | None = None,
    sinks: int = 0,
    gate: float | torch.Tensor | None = None,
    backward: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    min_time_s: float = 1.0,
    memory: bool = True,
    sdpa: bool = True,
    sdpa_max_seconds: float = 30.0,
    sdpa_max_bytes: int | None = None,
    seed: int = 0,
    progress: bool = True,
    backend: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time the tensorized operator against full attention (SDPA) over sequence lengths.

    For each length ``N`` (run in increasing order) the same random q ``[batch, N, heads,
    headdim]`` and k, v ``[batch, N, kv_heads, headdim]`` go to

    - ``tensorized_attn(q, k, v, fold, causal=True, mode=..., gate=..., sinks=...)``, the
      fold being ``shape`` (a fold, or a function of N) or else ``choose_shape(N, ndim,
      local=local)``; its ``backend`` defaults to ``"reference"`` on CPU and ``"auto"``
      (the best one available) elsewhere;
    - ``scaled_dot_product_attention(q, k, v, is_causal=True)`` on the ``[B, H, N, D]``
      transposes, with ``enable_gqa=True`` when ``kv_heads < heads`` (k and v repeated
      per query head where this torch lacks it).

    Each is timed with :func:`time_fn` (at least ``repeats`` calls, more while they take
    less than ``min_time_s`` in all; forward, or forward and backward with
    ``backward=True``: gradients of q, k, v for a random output gradient) and, with
    ``memory=True``, measured once with :func:`peak_memory` (inputs excluded); that
    measured call comes first and counts as the first of the ``warmup`` calls.

    SDPA is skipped (``sdpa_ms`` None, the reason in ``sdpa_note``) at a length where its
    time or peak memory, extrapolated from the lengths measured before it, would pass
    ``sdpa_max_seconds`` per call or ``sdpa_max_bytes`` (default: half of the device's free
    memory), and when it runs out of memory. ``dtype`` defaults to float32 on CPU and
    bfloat16 on CUDA; ``gate`` may be a float (one value for every pass and head), a tensor
    ``[m]`` or ``[heads, m]``, or None.

    Returns ``(rows, device_info)``: one dict per length (``N``, ``fold``, ``tensorized_ms``,
    ``sdpa_ms``, ``speedup`` = SDPA time / tensorized time, ``tensorized_peak_bytes``,
    ``sdpa_peak_bytes``, min and max times, ``backend``, ``sdpa_note``; on Linux CPUs also
    ``other_cpu_load``, the cores other processes kept busy meanwhile: CPU timings are
    only as good as the machine is quiet).
    """
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive ints, got {lengths}")
    device = resolve_device(device)
    if dtype is None:
        dtype = default_dtype(device)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
    if backend is None:
        backend = "reference" if device.type == "cpu" else "auto"
    backends = available_backends(device)
    # "auto" takes the first available backend that handles the inputs' dtype
    backend_name = backend if backend != "auto" else f"auto ({', '.join(backends)} available)"
    if sdpa_max_bytes is None:
        sdpa_max_bytes = _default_memory_budget(device)
    gqa_native = _sdpa_supports_gqa()

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    cases = [(N, method) for N in lengths for method in (("tensorized", "sdpa") if sdpa else ("tensorized",))]
    bar = tqdm(total=len(cases), desc="bench", unit="case", disable=not progress, leave=False) if tqdm else None

    load_start = _load_average()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows: list[dict[str, Any]] = []
    sdpa_time_history: list[tuple[int, float]] = []
    sdpa_mem_history: list[tuple[int, float]] = []
    try:
        for N in lengths:
            busy_start = _cpu_busy_seconds() if device.type == "cpu" else None
            fold = _shape_for(shape, N, ndim, local)
            m = len(fold)
            g = gate
            if isinstance(g, (int, float)) and not isinstance(g, bool):
                g = torch.full((m,), float(g), device=device)
            elif isinstance(g, torch.Tensor):
                g = g.to(device)

            def make(*size):
                return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

            q = make(batch, N, heads, headdim)
            k = make(batch, N, kv_heads, headdim)
            v = make(batch, N, kv_heads, headdim)
            grad_out = make(batch, N, heads, headdim) if backward else None
            if backward:
                q, k, v = (x.requires_grad_() for x in (q, k, v))

            def tensorized(q=q, k=k, v=v, fold=fold, g=g):
                return tensorized_attn(q, k, v, fold, causal=True, mode=mode, gate=g, sinks=sinks, backend=backend)

            qt, kt, vt, gqa = _sdpa_qkv(q, k, v)

            def full(qt=qt, kt=kt, vt=vt, gqa=gqa):
                if gqa and not gqa_native:
                    rep = qt.shape[1] // kt.shape[1]
                    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
                    gqa = False
                extra = {"enable_gqa": True} if gqa else {}
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **extra)
                return out.transpose(1, 2)  # back to [B, N, H, D], a view

            row: dict[str, Any] = {
                "N": N,
                "fold": fold_label(fold),
                "shape": list(fold),
                "backend": backend_name,
            }
            for method, forward in (("tensorized", tensorized), ("sdpa", full)):
                if method == "sdpa" and not sdpa:
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"N={N} {method}")
                fn = _with_backward(forward, (q, k, v), grad_out) if backward else forward
                if method == "sdpa":
                    reason = _sdpa_skip_reason(
                        N, sdpa_time_history, sdpa_mem_history, sdpa_max_seconds, sdpa_max_bytes, rows
                    )
                    if reason:
                        _record_skip(row, method, reason)
                        if bar is not None:
                            bar.update(1)
                        continue
                try:
                    # the peak-memory call, when there is one, is the first warmup call
                    peak = peak_memory(fn, device=device) if memory else None
                    t = time_fn(fn, warmup=max(warmup - 1, 0) if memory else warmup, repeats=repeats,
                                min_time_s=min_time_s, device=device)
                except Exception as err:  # noqa: BLE001 - out of memory becomes a note
                    if not _is_oom(err):
                        raise
                    _record_skip(row, method, f"out of memory: {str(err).splitlines()[0][:120]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if bar is not None:
                        bar.update(1)
                    continue
                row[f"{method}_ms"] = t["median_ms"]
                row[f"{method}_min_ms"] = t["min_ms"]
                row[f"{method}_max_ms"] = t["max_ms"]
                row[f"{method}_repeats"] = t["repeats"]
                row[f"{method}_peak_bytes"] = peak
                if method == "sdpa":
                    row["sdpa_note"] = None
                    sdpa_time_history.append((N, t["median_ms"] / 1000.0))
                    if peak:
                        sdpa_mem_history.append((N, float(peak)))
                if bar is not None:
                    bar.update(1)
            if row.get("sdpa_ms") is not None and row.get("tensorized_ms"):
                row["speedup"] = row["sdpa_ms"] / row["tensorized_ms"]
            else:
                row["speedup"] = None
            if busy_start is not None:
                busy_end = _cpu_busy_seconds()
                if busy_end is not None:
                    wall = busy_end[2] - busy_start[2]
                    others = (busy_end[0] - busy_start[0]) - (busy_end[1] - busy_start[1])
                    row["other_cpu_load"] = round(max(others, 0.0) / wall, 2) if wall > 0 else None
            rows.append(row)
            del q, k, v, qt, kt, vt, grad_out
    finally:
        if bar is not None:
            bar.close()
    info = device_info(device)
    info["description"] = _describe(info)
    if load_start is not None:
        info["load_average_1min"] = {"start": load_start, "end": _load_average()}
    return rows, info


def _cpu_busy_seconds() -> tuple[float, float, float] | None:
    """(CPU seconds the whole machine was busy, CPU seconds of this process, wall time),
    from /proc/stat on Linux; None elsewhere. Their difference over a case, divided by
    its wall time, is how many cores other processes took meanwhile."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / tick  # user nice system idle iowait irq softirq steal
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def _load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS has none): other
    processes competing for the cores make CPU timings noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _with_backward(forward, inputs, grad_out):
    def fn():
        out = forward()
        return torch.autograd.grad(out, inputs, grad_out)

    return fn


def _record_skip(row: dict[str, Any], method: str, reason: str) -> None:
    for key in ("ms", "min_ms", "max_ms", "repeats", "peak_bytes"):
        row[f"{method}_{key}"] = None
    row[f"{method}_note"] = reason


def _sdpa_skip_reason(N, time_history, mem_history, max_seconds, max_bytes, rows) -> str | None:
    if any(r.get("sdpa_note", "") and r["sdpa_note"].startswith("out of memory") for r in rows):
        return "skipped: out of memory at a shorter length"
    t = _extrapolate(time_history, N)
    if t is not None and max_seconds is not None and t > max_seconds:
        return f"skipped: predicted {t:.0f} s per call > budget {max_seconds:g} s"
    mem = _extrapolate(mem_history, N)
    if mem is not None and max_bytes is not None and mem > max_bytes:
        return f"skipped: predicted peak {mem / MiB:.0f} MiB > budget {max_bytes / MiB:.0f} MiB"
    return None


# ---------------------------------------------------------------------------------------
# output


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if digits == 1 and abs(x) < 10:
        return f"{x:.2f}"
    return f"{x:.{digits}f}"


DISTURBED_LOAD = 0.1  # cores taken by other processes above which a length is flagged

TABLE_COLUMNS = ("N", "fold", "tensorized ms", "SDPA ms", "speedup", "tensorized peak MiB", "SDPA peak MiB")


def table_cells(row: dict[str, Any]) -> list[str]:
    """One row of :data:`TABLE_COLUMNS` as strings (``-``: not measured)."""

    def mib(b):
        return None if b is None else b / MiB

    speedup = row.get("speedup")
    return [
        str(row["N"]),
        row["fold"],
        _fmt(row.get("tensorized_ms")),
        _fmt(row.get("sdpa_ms")),
        "-" if speedup is None else f"{speedup:.2f}x",
        _fmt(mib(row.get("tensorized_peak_bytes"))),
        _fmt(mib(row.get("sdpa_peak_bytes"))),
    ]


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The rows as an aligned plain-text table (or a Markdown one), notes below it.

    Times are medians in milliseconds; ``speedup`` is SDPA time / tensorized time; peak
    memory in MiB (2**20 bytes); ``-``: not measured (see the notes).
    """
    body = [table_cells(r) for r in rows]
    header = list(TABLE_COLUMNS)
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---:" if i != 1 else "---" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    else:

        def line(cells):
            return "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        lines.append(line(header))
        lines.append("  ".join("-" * w for w in widths))
        lines += [line(cells) for cells in body]
    notes = [
        f"N={r['N']}: {method}: {r[f'{method}_note']}"
        for r in rows
        for method in ("tensorized", "sdpa")
        if r.get(f"{method}_note")
    ]
    notes += [
        f"N={r['N']}: other processes kept {r['other_cpu_load']:.2f} cores busy during this length: "
        "its timings may be disturbed"
        for r in rows
        if (r.get("other_cpu_load") or 0) > DISTURBED_LOAD
    ]
    if notes:
        lines.append("")
        lines += notes
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> str:
    """Two log-log panels, time and peak memory against sequence length, one line per
    method; saved as a PNG at ``path`` (needs matplotlib). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    series = (
        ("tensorized", "tensorized (fold per N)", "o-"),
        ("sdpa", "full attention (SDPA)", "s--"),
    )
    panels = (("ms", 1.0, "median time (ms)"), ("peak_bytes", MiB, "peak memory (MiB)"))
    for ax, (key, scale, ylabel) in zip(axes, panels, strict=True):
        for method, label, style in series:
            measured = [r for r in rows if r.get(f"{method}_{key}")]
            if not measured:
                continue
            xs = [r["N"] for r in measured]
            ys = [r[f"{method}_{key}"] / scale for r in measured]
            ax.plot(xs, ys, style, label=label)
            if method == "tensorized":
                for r, x, y in zip(measured, xs, ys, strict=True):
                    ax.annotate(r["fold"], (x, y), textcoords="offset points", xytext=(0, -12),
                                ha="center", fontsize=7, color="C0")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title("time")
    axes[1].set_title("peak memory")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


def write_json(path: str | os.PathLike, rows, device: dict[str, Any], *, command: str,
               config: dict[str, Any] | None = None) -> str:
    """Write ``{"command", "device", "config", "rows"}`` to ``path`` as JSON. Returns the path."""
    import json

    payload = {"command": command, "device": device, "config": config or {}, "rows": list(rows)}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    return os.fspath(path)
