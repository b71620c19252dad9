"""The GPU benchmark suite: a registry of cases, one runner, JSON results.

Each case times one method on one input set with ``triton.testing.do_bench`` (median
of repeated runs, CUDA events) and measures its peak memory. Methods:

* ``triton``: this library's Triton backend;
* ``reference``: this library's PyTorch backend (lengths it fits);
* ``sdpa-flash``, ``sdpa-cudnn``: ``torch.nn.functional.scaled_dot_product_attention``
  with one backend forced, causal full attention (up to ``max_sdpa_len``: beyond that
  it is quadratic and only wastes device time);
* ``flex-window``: FlexAttention with a causal sliding window as wide as the fold's
  contiguous dimension (the cheap local attention a user would try instead).

Beside the time, each row has the floor of the tensorized passes (DESIGN.md §5): per
pass the larger of its bytes over the measured copy bandwidth and its FLOPs over the
measured bf16 matrix-product rate, summed over the passes.
"""

from __future__ import annotations

import functools
import gc
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .fold import choose_shape, strides
from .ops import tensorized_attn
from .rope import TensorPositions

__all__ = ["Case", "registry", "measure_ceilings", "pass_floor", "run_suite"]

TENSORIZED = ("triton", "reference")
BASELINES = ("sdpa-flash", "sdpa-cudnn", "flex-window")


@dataclass(frozen=True)
class Case:
    method: str
    seqlen: int
    heads: int = 32
    kv_heads: int = 32
    headdim: int = 128
    batch: int = 1
    dtype: str = "bfloat16"
    backward: bool = False
    mode: str = "complete"
    shape: tuple[int, ...] = ()
    sinks: int = 0
    gate: bool = False  # a gate of 0.5 on every pass
    positions: bool = False  # tensor positions (rotary, the frequencies of SmolLM2: base 100000)
    select: int = 0  # topk of a selected pass after the fold passes (block: the last fold size); 0: none

    @property
    def name(self) -> str:
        fold = "x".join(map(str, self.shape)) if self.shape else "-"
        extras = (f"+select{self.select}" if self.select else "") + (f"+sinks{self.sinks}" if self.sinks else "")
        extras += ("+gate" if self.gate else "") + ("+rope" if self.positions else "")
        mode = self.mode + extras if self.method in TENSORIZED else ""
        return (f"{self.method} N={self.seqlen} H={self.heads}/{self.kv_heads} fold={fold} "
                f"{mode} {'fwd+bwd' if self.backward else 'fwd'}")


def registry(
    lengths: Iterable[int] = (4096, 16384, 32768, 131072, 524288, 1048576),
    *,
    kv_heads: Iterable[int] = (32, 8),
    ndims: Iterable[int] = (2, 3),
    modes: Iterable[str] = ("complete", "block"),
    directions: Iterable[bool] = (False, True),
    methods: Iterable[str] = ("triton",) + BASELINES + ("reference",),
    max_sdpa_len: int = 131072,
    max_reference_len: int = 32768,
    select_topk: Iterable[int] = (2,),
) -> list[Case]:
    """The cases of the suite (batch 1, 32 heads, head dim 128, bfloat16, causal). With
    ``select_topk``: also the configuration of a trained model on Triton, ``complete`` on the
    2-dim fold with 4 sinks, a gate and tensor positions, followed by a selected pass of that
    top-k (block: the contiguous dimension), and the same without the selected pass."""
    cases = []
    for N in lengths:
        for hkv in kv_heads:
            for bwd in directions:
                for method in methods:
                    if method in TENSORIZED:
                        if method == "reference" and N > max_reference_len:
                            continue
                        for ndim in ndims:
                            for mode in modes:
                                cases.append(Case(method, N, kv_heads=hkv, backward=bwd, mode=mode,
                                                  shape=choose_shape(N, ndim)))
                        if method == "triton" and select_topk:
                            cases += [Case(method, N, kv_heads=hkv, backward=bwd, shape=choose_shape(N, 2), sinks=4,
                                           gate=True, positions=True, select=k) for k in (0, *select_topk)]
                    elif method.startswith("sdpa") and N <= max_sdpa_len:
                        cases.append(Case(method, N, kv_heads=hkv, backward=bwd))
                    elif method == "flex-window":
                        cases.append(Case(method, N, kv_heads=hkv, backward=bwd, shape=choose_shape(N, 2)))
    return cases


def measure_ceilings(device="cuda") -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured."""
    from triton.testing import do_bench

    src = torch.empty(2**31, dtype=torch.bfloat16, device=device).normal_()  # 4 GiB
    dst = torch.empty_like(src)
    ms = do_bench(functools.partial(dst.copy_, src), warmup=50, rep=300, return_mode="median")
    copy_bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    rate = 2 * 8192**3 / (ms * 1e-3)
    return {"copy_bytes_per_s": copy_bw, "bf16_flops_per_s": rate}


def _keys_per_query(N: int, n: int, s: int, mode: str, causal: bool, sinks: int) -> int:
    """Total number of keys read in one pass by all N queries (sinks included)."""
    p = torch.arange(N, dtype=torch.int64)
    a = p // s
    if mode == "complete":
        keys = torch.clamp(a + 1, max=n)
        in_window = lambda i: ((p - i) % s == 0) & ((p - i) // s < n) & (p >= i)  # noqa: E731
    else:
        first = (a // n) * n
        if causal:
            keys = a - first + 1
        else:
            last = torch.clamp(first + n, max=(N - 1 - p % s) // s + 1)
            keys = last - first
        in_window = lambda i: ((p - i) % s == 0) & ((p - i) // s >= 0) & ((i // s) // n == a // n) & (  # noqa: E731
            (i // s <= a) if causal else torch.ones_like(p, dtype=torch.bool))
    total = int(keys.sum())
    for i in range(min(sinks, N)):
        extra = ~in_window(i)
        if causal:
            extra &= p >= i
        total += int(extra.sum())
    return total


def pass_floor(case: Case, ceilings: dict) -> dict:
    """Bytes, FLOPs and the floor (ms) of the forward passes of a tensorized case; for
    fwd+bwd, the backward's are added (it reads q, k, the pass input, its output
    gradient and output, and reads and writes dq, dk and the input's gradient; 2.5x the
    forward's FLOPs)."""
    B, N, H, Hkv, D = case.batch, case.seqlen, case.heads, case.kv_heads, case.headdim
    size = torch.finfo(getattr(torch, case.dtype)).bits // 8
    st = strides(case.shape)
    total_bytes = total_flops = floor_s = 0.0
    for t, dim in enumerate(range(len(case.shape))):
        hv = Hkv if t == 0 else H
        bytes_ = B * N * D * size * (H + Hkv + hv + H)
        keys = _keys_per_query(N, case.shape[dim], st[dim], case.mode, True, case.sinks)
        flops = 4 * B * H * D * keys
        if case.backward:
            bytes_ += B * N * D * size * (H + Hkv + hv + 2 * H + 2 * H + 2 * Hkv + hv)
            flops *= 3.5
        total_bytes += bytes_
        total_flops += flops
        floor_s += max(bytes_ / ceilings["copy_bytes_per_s"], flops / ceilings["bf16_flops_per_s"])
    return {"bytes": total_bytes, "flops": total_flops, "floor_ms": floor_s * 1e3}


def _inputs(case: Case, device):
    dtype = getattr(torch, case.dtype)
    B, N, H, Hkv, D = case.batch, case.seqlen, case.heads, case.kv_heads, case.headdim
    q = torch.randn(B, N, H, D, device=device, dtype=dtype, requires_grad=case.backward)
    k = torch.randn(B, N, Hkv, D, device=device, dtype=dtype, requires_grad=case.backward)
    v = torch.randn(B, N, Hkv, D, device=device, dtype=dtype, requires_grad=case.backward)
    return q, k, v


def _forward_fn(case: Case, q, k, v) -> Callable[[], torch.Tensor]:
    if case.method in TENSORIZED:
        from .passes import SelectedPass

        select = SelectedPass(case.shape[-1], case.select) if case.select else None
        gate = torch.full((case.heads, len(case.shape) + bool(select)), 0.5, device=q.device) if case.gate else None
        positions = None
        if case.positions:
            D = case.headdim
            positions = TensorPositions(1.0 / 100000.0 ** (torch.arange(0, D, 2, device=q.device) / D))
        return lambda: tensorized_attn(q, k, v, case.shape, causal=True, mode=case.mode, sinks=case.sinks,
                                       gate=gate, positions=positions, select=select, backend=case.method)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA's [B, H, N, D] (views)
    gqa = case.heads != case.kv_heads
    if case.method.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[case.method]

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)

        return run
    if case.method == "flex-window":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        window = case.shape[-1]

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        # _compile: build the block mask block by block, never the dense N x N mask
        mask = create_block_mask(sliding, None, None, case.seqlen, case.seqlen, device=q.device, _compile=True)
        flex = torch.compile(flex_attention)
        return lambda: flex(qt, kt, vt, block_mask=mask, enable_gqa=gqa)
    raise ValueError(f"unknown method {case.method!r}")


def run_case(case: Case, ceilings: dict, device="cuda", warmup_ms=25, rep_ms=100) -> dict:
    from triton.testing import do_bench

    row = {**asdict(case), "name": case.name}
    try:
        q, k, v = _inputs(case, device)
        fwd = _forward_fn(case, q, k, v)
        if case.backward:
            dout = torch.randn_like(q)

            def fn():
                out = fwd()
                torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2) if out.shape != q.shape else dout)
        else:
            def fn():
                with torch.no_grad():
                    return fwd()
        fn()  # compile / warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["inputs_mb"] = sum(x.numel() * x.element_size() for x in (q, k, v)) / 2**20
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        row["ms"], row["ms_p20"], row["ms_p80"] = ms
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
    except Exception as err:  # a baseline that does not run here is reported, not fatal
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    if case.method in TENSORIZED and case.shape and not case.select:  # the floor of the fold passes
        fl = pass_floor(case, ceilings)
        row.update(floor_ms=fl["floor_ms"], bytes=fl["bytes"], flops=fl["flops"])
        if "ms" in row:
            row["x_floor"] = row["ms"] / fl["floor_ms"]
            row["gb_per_s"] = fl["bytes"] / (row["ms"] * 1e-3) / 1e9
            row["tflops"] = fl["flops"] / (row["ms"] * 1e-3) / 1e12
    return row


def run_suite(cases: list[Case], *, device="cuda", out_path=None, progress=True, command="") -> dict:
    """Run every case; returns (and writes, with ``out_path``) {device, ceilings, rows}."""
    import triton
    from tqdm import tqdm

    ceilings = measure_ceilings(device)
    props = torch.cuda.get_device_properties(device)
    result = {
        "device": {"name": props.name, "memory_gb": props.total_memory / 1e9,
                   "sms": props.multi_processor_count, "torch": torch.__version__,
                   "triton": triton.__version__, "cuda": torch.version.cuda},
        "ceilings": ceilings, "command": command, "date": time.strftime("%Y-%m-%d"), "rows": [],
    }
    bar = tqdm(cases, disable=not progress, desc="bench", unit="case")
    for case in bar:
        bar.set_postfix_str(case.name)
        row = run_case(case, ceilings, device)
        result["rows"].append(row)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
    add_speedups(result["rows"])
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each tensorized row over the SDPA rows of the same length, kv heads
    and direction (measured in the same run)."""
    for row in rows:
        if row["method"] not in TENSORIZED or "ms" not in row:
            continue
        for base in ("sdpa-flash", "sdpa-cudnn"):
            for other in rows:
                if (other["method"] == base and "ms" in other and other["seqlen"] == row["seqlen"]
                        and other["kv_heads"] == row["kv_heads"] and other["backward"] == row["backward"]):
                    row[f"x_vs_{base}"] = other["ms"] / row["ms"]

