"""Launchers of the Triton pass kernels, the custom ops around them, and their autograd.

``tensorized_attention::triton_fwd`` runs the passes one after another; with
``for_backward`` it keeps what the backward needs (the input values of every pass, the
attention output of gated passes, the softmax statistics of every pass), otherwise it
ping-pongs between at most two intermediate buffers. ``tensorized_attention::triton_bwd``
runs the passes in reverse; dq and dk of a q and k shared by all passes are accumulated
across passes in q's dtype (one rounding per pass), those of per-pass q and k kept apart;
every reduction runs in a fixed order: repeated backward calls give identical results.

With rotary tensor positions, :func:`tensorized_attn_triton` hands the ops each pass's
rotated q and k and the sinks' queries and keys (:func:`_rotated_per_pass`: one kernel
writes every pass's copy, with autograd); the attention kernels themselves never rotate.

Both are ``torch.library.triton_op`` s (kernels launched through ``wrap_triton``), so
``torch.compile(fullgraph=True)`` traces into them.
"""

from __future__ import annotations

import os

import torch
import triton
from torch.library import triton_op, wrap_triton

from ...fold import fold_size, strides
from ...rope import rotate, sink_distances
from .kernels import LOG2E, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_sink_kernel, _fwd_kernel

SINK_CHUNK = 4096  # positions summed by one program of the sink-gradient kernel

# Tile settings forced over the defaults (keys of block_config's result), for tuning runs:
# {"fwd": {...}, "dq": {...}, ...}. Empty in normal use.
CONFIG_OVERRIDES: dict[str, dict] = {"fwd": {}, "fwd_contiguous": {}, "dq": {}, "dkdv": {}}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tile settings (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for head dims up to
# 128 and above: the fastest measured on an H100 (docs/benchmarks.md, h100_tune_131k*.json).
# "fwd_contiguous" is the forward of the pass along the contiguous dimension (stride 1).
TILES = {
    "fwd": ((128, 32, 4, 3), (64, 32, 4, 2)),
    "fwd_contiguous": ((64, 64, 4, 3), (64, 32, 4, 2)),
    "dq": ((64, 64, 4, 2), (32, 32, 4, 1)),
    "dkdv": ((32, 64, 4, 3), (32, 32, 4, 1)),
}


# Launch order of the programs of a strided pass: the tiles of one residue one after
# another (they share the keys and values of their fibers, which then come from the L2
# cache), rather than the residues of one tile index (kernels._tile_and_residue). The
# contiguous pass has one residue, so both orders launch the same programs; its forward
# keeps the tile-major code, measured faster (2.57-2.63 ms against 2.82 ms at 131k, two runs).
RESIDUE_MAJOR = True


def block_config(n: int, head_dim: int, kernel: str = "fwd") -> dict:
    """Tile sizes and launch order of kernel ``"fwd"``, ``"fwd_contiguous"``, ``"dq"`` or
    ``"dkdv"`` for a pass of fiber size ``n`` (a function of the shapes alone; tiles never
    exceed the fiber rounded up to a power of two)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    small = max(16, triton.next_power_of_2(n))
    if _interpreting():
        bm = bn = 16 if n <= 16 else 32
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=4, num_stages=1, RESIDUE_MAJOR=RESIDUE_MAJOR)
    bm, bn, warps, stages = TILES[kernel][0 if block_d <= 128 else 1]
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
               RESIDUE_MAJOR=RESIDUE_MAJOR and kernel != "fwd_contiguous")
    cfg.update(CONFIG_OVERRIDES[kernel])
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], small)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], small)
    return cfg


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _sink_block(sinks: int, seqlen: int) -> tuple[int, int]:
    count = min(sinks, seqlen)
    return count, max(16, triton.next_power_of_2(max(count, 1)))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _pick(stack: torch.Tensor, t: int) -> torch.Tensor:
    """Pass t's slice of a per-pass stack [P, ...] (P = 1: one tensor shared by all passes)."""
    return stack[t if stack.shape[0] > 1 else 0]


def fwd_pass(q, k, src, dst, attn, lse, gate, t, n, s, A, *, causal, complete, sinks, scale, cfg=None,
             sink_q=None, sink_k=None, seqlen=None, key_start=0, prior=False):
    """Launch the forward of one pass (pass number ``t`` along a dimension of size ``n``
    and stride ``s``; ``A = prod(shape) / s``): reads q, k and the values ``src``, writes
    ``dst`` (and the attention output ``attn`` when given, gated passes), and ``lse``.
    The sinks are scored with ``sink_q`` (default q) against ``sink_k`` (default the first
    rows of k). q may hold fewer rows than k: the queries are then k's last positions
    (q, dst, attn and lse hold their rows only; no sinks).

    A split pass (no gate, no sinks): ``seqlen`` positions (default k's rows), the queries
    the last ``q.shape[1]``, the keys only positions ``key_start .. key_start + k.shape[1] -
    1`` (k and ``src`` hold their rows). ``prior``: dst and lse already hold the attention
    over the pass's other keys, and this launch folds its keys into them."""
    B, NQ, H, D = q.shape
    N = k.shape[1] if seqlen is None else seqlen
    key_end = key_start + k.shape[1]
    key_range = bool(key_start or key_end != N or prior)
    if key_range and (gate is not None or sinks or attn is not None):
        raise ValueError("a split pass (keys of some positions only, or folded into a prior result) takes no gate "
                         "and no sinks")
    n_sinks, block_s = _sink_block(sinks, N)
    cfg = cfg or block_config(n, D, "fwd_contiguous" if s == 1 else "fwd")
    gate_arg = gate if gate is not None else lse
    sq = sink_q if sink_q is not None else q
    sk = sink_k if sink_k is not None else k
    grid = (triton.cdiv(A, cfg["BLOCK_M"]) * s * B * H,)
    wrap_triton(_fwd_kernel)[grid](
        q, k, src, dst, attn if attn is not None else dst, lse, gate_arg, sq, sk,
        *_strides(q), *_strides(k), *_strides(src), *_strides(dst), *_strides(sq), *_strides(sk),
        gate.stride(0) if gate is not None else 0, t,
        N, N - NQ, key_start, key_end, H, B * H, A, n, s, n_sinks, scale * LOG2E,
        GROUP=H // k.shape[2], V_GROUP=H // src.shape[2], HEAD_DIM=D, BLOCK_S=block_s,
        COMPLETE=complete, CAUSAL=causal, HAS_GATE=gate is not None, HAS_SINKS=n_sinks > 0,
        SINK_Q=sink_q is not None, STORE_ATTN=attn is not None, KEY_RANGE=key_range, PRIOR=prior,
        PRECISION=_precision(q.dtype),
        **cfg,
    )


@triton_op("tensorized_attention::triton_fwd", mutates_args=())
def triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
    sink_q: torch.Tensor | None, sink_k: torch.Tensor | None,
    shape: list[int], order: list[int], causal: bool, complete: bool, sinks: int,
    scale: float, for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [Pq, B, N, H, D] and k [Pk, B, N, Hkv, D]: the queries and keys of each pass
    (Pq, Pk = m), or one for all (1); v [B, N, Hkv, D]. sink_q [B, N, H, D] and sink_k
    [m, B, S, Hkv, D] (S = min(sinks, N)), when given, score the sinks instead of q and the
    first keys of k (rotary tensor positions: the sinks sit at fixed distances).
    With one pass and no sinks q may hold fewer positions than k, ``[Pq, B, NQ, H, D]``:
    the queries are the last NQ positions (a slice of a longer sequence whose earlier keys
    it reads), and out, attn and lse hold their rows only.
    Returns (out, values, attn, lse): values [m-1, B, N, H, D] = the inputs of passes
    2..m, attn [m, B, N, H, D] = the attention output of each pass (gate only), lse
    [m, B*H, N] float32; the last three are empty unless ``for_backward``."""
    _, B, NQ, H, D = q.shape
    N = k.shape[2]
    m = len(order)  # passes (a permutation of the dims; fewer for one pass of a sub-problem)
    _check_queries(NQ, N, m, sinks)
    P = fold_size(shape)
    st = strides(shape)
    keep = for_backward
    values = q.new_empty((m - 1, B, N, H, D) if keep else (min(m - 1, 2), B, N, H, D))
    attn = q.new_empty((m, B, NQ, H, D) if keep and gate is not None else (0,))
    lse = q.new_empty((m if keep else 1, B * H, NQ), dtype=torch.float32)
    out = q.new_empty((B, NQ, H, D))
    src = v
    for t, dim in enumerate(order):
        dst = out if t == m - 1 else values[t if keep else t % 2]
        fwd_pass(_pick(q, t), _pick(k, t), src, dst, attn[t] if attn.numel() else None, lse[t if keep else 0],
                 gate, t, shape[dim], st[dim], P // st[dim], causal=causal, complete=complete, sinks=sinks,
                 scale=scale, sink_q=sink_q, sink_k=sink_k[t] if sink_k is not None else None)
        src = dst
    if not keep:
        values = q.new_empty((0,))
    return out, values, attn, lse if keep else q.new_empty((0,), dtype=torch.float32)


@triton_op("tensorized_attention::triton_bwd", mutates_args=())
def triton_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
    sink_q: torch.Tensor | None, sink_k: torch.Tensor | None,
    out: torch.Tensor, values: torch.Tensor, attn: torch.Tensor, lse: torch.Tensor,
    shape: list[int], order: list[int], causal: bool, complete: bool, sinks: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dgate, dsink_q, dsink_k), shaped as their inputs (dq, dk per
    pass when q, k are); dgate is [H, m] float32; empty where there is no such input."""
    Pq, B, NQ, H, D = q.shape
    Pk, N, Hkv = k.shape[0], k.shape[2], k.shape[3]
    m = len(order)  # passes (a permutation of the dims; fewer for one pass of a sub-problem)
    P = fold_size(shape)
    st = strides(shape)
    dout = dout.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dsink_q = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device) if sink_q is not None else q.new_empty((0,))
    dsink_k = torch.empty_like(sink_k) if sink_k is not None else q.new_empty((0,))
    dval = q.new_empty((min(m - 1, 2), B, N, H, D))
    delta = torch.empty((B * H, NQ), dtype=torch.float32, device=q.device)
    dg_rows = torch.empty((B * H, NQ), dtype=torch.float32, device=q.device) if gate is not None else delta
    dgate = torch.zeros((H, m), dtype=torch.float32, device=q.device) if gate is not None else q.new_empty((0,))
    gate_arg = gate if gate is not None else q.new_empty(1)
    gate_stride = gate_arg.stride(0) if gate is not None else 0
    n_sinks, block_s = _sink_block(sinks, N)
    precision = _precision(q.dtype)
    grad_out = dout
    for t in range(m - 1, -1, -1):
        dim = order[t]
        n, s = shape[dim], st[dim]
        A = P // s
        q_t, k_t, dq_t, dk_t = _pick(q, t), _pick(k, t), _pick(dq, t), _pick(dk, t)
        sq = sink_q if sink_q is not None else q_t
        sk = sink_k[t] if sink_k is not None else k_t
        src = v if t == 0 else values[t - 1]
        this_out = out if t == m - 1 else values[t]
        pass_attn = attn[t] if gate is not None else this_out
        dsrc = dv if t == 0 else dval[(m - 1 - t) % 2]
        consts = dict(GROUP=H // Hkv, V_GROUP=H // src.shape[2], HEAD_DIM=D,
                      COMPLETE=complete, CAUSAL=causal, HAS_GATE=gate is not None, PRECISION=precision)
        common_strides = (*_strides(q_t), *_strides(k_t), *_strides(src))
        cfg = block_config(n, D, "dq")
        cfg_k = block_config(n, D, "dkdv")
        # dq kernel needs Attn, DQ and DQS to share DOut's strides: all are contiguous [B, N, H, D]
        pass_attn = pass_attn.contiguous()
        grid_q = (triton.cdiv(A, cfg["BLOCK_M"]) * s * B * H,)
        wrap_triton(_bwd_dq_kernel)[grid_q](
            q_t, k_t, src, grad_out, pass_attn, lse[t], delta, dg_rows, dq_t, gate_arg, sq, sk,
            dsink_q if sink_q is not None else dq_t,
            *common_strides, *_strides(grad_out), *_strides(sq), *_strides(sk),
            gate_stride, t,
            N, N - NQ, H, B * H, A, n, s, n_sinks, scale * LOG2E, scale,
            BLOCK_S=block_s, HAS_SINKS=n_sinks > 0, SINK_Q=sink_q is not None,
            ACCUMULATE=Pq == 1 and t != m - 1, ACCUMULATE_SINK_Q=t != m - 1, **consts, **cfg,
        )
        grid_k = (triton.cdiv(A, cfg_k["BLOCK_N"]) * s * B * Hkv,)
        wrap_triton(_bwd_dkdv_kernel)[grid_k](
            q_t, k_t, src, grad_out, lse[t], delta, dk_t, dsrc, gate_arg,
            *common_strides, *_strides(grad_out), *_strides(dk_t), *_strides(dsrc),
            gate_stride, t,
            N, N - NQ, H, B * Hkv, A, n, s, scale * LOG2E, scale,
            ACCUMULATE=Pk == 1 and t != m - 1, **consts, **cfg_k,
        )
        if n_sinks:
            chunks = triton.cdiv(N, SINK_CHUNK)
            dks = torch.empty((chunks * B * H, block_s, cfg["BLOCK_D"]), dtype=torch.float32, device=q.device)
            dvs = torch.empty_like(dks)
            wrap_triton(_bwd_sink_kernel)[(chunks * B * H,)](
                sq, sk, src, grad_out, lse[t], delta, dks, dvs, gate_arg,
                *_strides(sq), *_strides(sk), *_strides(src), *_strides(grad_out),
                gate_stride, t,
                N, H, B * H, n, s, n_sinks, scale * LOG2E, SINK_CHUNK,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_S=block_s, BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["num_warps"], **consts,
            )
            dks = dks.view(chunks, B, H, block_s, -1).sum(0)[:, :, :n_sinks, :D]  # [B, H, S, D]
            dvs = dvs.view(chunks, B, H, block_s, -1).sum(0)[:, :, :n_sinks, :D]
            dks = dks.view(B, Hkv, H // Hkv, n_sinks, D).sum(2).transpose(1, 2) * scale
            dvs = dvs.view(B, src.shape[2], -1, n_sinks, D).sum(2).transpose(1, 2)
            if sink_k is not None:
                dsink_k[t] = dks.to(dsink_k.dtype)
            else:
                dk_t[:, :n_sinks] += dks.to(dk.dtype)
            dsrc[:, :n_sinks] += dvs.to(dsrc.dtype)
        if gate is not None:
            dgate[:, t] = dg_rows.view(B, H, NQ).sum((0, 2))
        grad_out = dsrc
    return dq, dk, dv, dgate, dsink_q, dsink_k


def _check_queries(NQ: int, N: int, m: int, sinks: int) -> None:
    if NQ != N and (NQ > N or m != 1 or sinks):
        raise ValueError(f"the Triton passes take queries for the last {NQ} of {N} positions only in one pass "
                         f"without sinks (got {m} passes, sinks={sinks}); give q as many positions as k")


@triton_fwd.register_fake
def _(q, k, v, gate, sink_q, sink_k, shape, order, causal, complete, sinks, scale, for_backward):
    _, B, NQ, H, D = q.shape
    N = k.shape[2]
    m = len(order)  # passes (a permutation of the dims; fewer for one pass of a sub-problem)
    keep = for_backward
    return (
        q.new_empty((B, NQ, H, D)),
        q.new_empty((m - 1, B, N, H, D) if keep else (0,)),
        q.new_empty((m, B, NQ, H, D) if keep and gate is not None else (0,)),
        q.new_empty((m, B * H, NQ) if keep else (0,), dtype=torch.float32),
    )


@triton_bwd.register_fake
def _(dout, q, k, v, gate, sink_q, sink_k, out, values, attn, lse, shape, order, causal, complete, sinks, scale):
    _, B, N, H, D = q.shape
    m = len(order)  # passes (a permutation of the dims; fewer for one pass of a sub-problem)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty((H, m) if gate is not None else (0,), dtype=torch.float32),
        q.new_empty((B, N, H, D) if sink_q is not None else (0,)),
        k.new_empty(sink_k.shape if sink_k is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, gate, sink_q, sink_k, shape, order, causal, complete, sinks, scale, for_backward = inputs
    out, values, attn, lse = output
    ctx.save_for_backward(q, k, v, gate, sink_q, sink_k, out, values, attn, lse)
    ctx.options = (shape, order, causal, complete, sinks, scale)
    ctx.set_materialize_grads(True)


def _backward(ctx, dout, _dvalues, _dattn, _dlse):
    q, k, v, gate, sink_q, sink_k, out, values, attn, lse = ctx.saved_tensors
    if lse.numel() == 0:
        raise RuntimeError("tensorized_attention::triton_fwd was called with for_backward=False; cannot differentiate")
    dq, dk, dv, dgate, dsink_q, dsink_k = triton_bwd(dout, q, k, v, gate, sink_q, sink_k, out, values, attn, lse,
                                                     *ctx.options)
    return (dq, dk, dv, dgate if gate is not None else None, dsink_q if sink_q is not None else None,
            dsink_k if sink_k is not None else None, None, None, None, None, None, None, None)


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SplitPass(torch.autograd.Function):
    """:func:`split_pass_triton` with autograd (its backward is ``triton_bwd`` over all the keys)."""

    @staticmethod
    def forward(ctx, q, k, v, k_before, v_before, gate, wait, shape, causal, complete, scale):
        B, L, H, D = q.shape
        h = k_before.shape[1]
        n, s = shape[1], shape[2]
        # complete: the launches' frame starts `lead` positions before the keys, so that the
        # first query starts a tile of every residue (a window depends on differences of
        # positions alone); block fibers are aligned chunks: no lead
        lead = -h % (block_config(n, D, "fwd_contiguous" if s == 1 else "fwd")["BLOCK_M"] * s) if complete else 0
        N = lead + h + L
        A = -(-N // (n * s)) * n
        attn = q.new_empty((B, L, H, D))
        lse = torch.empty((1, B * H, L), dtype=torch.float32, device=q.device)
        options = dict(causal=causal, complete=complete, sinks=0, scale=scale, seqlen=N)
        fwd_pass(q, k, v, attn, None, lse[0], None, 0, n, s, A, key_start=lead + h, **options)
        wait()
        fwd_pass(q, k_before, v_before, attn, None, lse[0], None, 0, n, s, A, key_start=lead, prior=True, **options)
        out = attn
        if gate is not None:  # the kernels' epilogue, here: the attention must be whole first
            Hv = v.shape[2]  # query head h takes value head h // (H // Hv): broadcast, not copied
            g = gate.view(1, 1, Hv, H // Hv, 1)
            out = (g * v[:, :, :, None].to(torch.float32)
                   + (1.0 - g) * attn.view(B, L, Hv, H // Hv, D).to(torch.float32)).view(B, L, H, D).to(q.dtype)
        ctx.save_for_backward(q, k, v, k_before, v_before, gate, attn, lse)
        ctx.options = (list(shape), causal, complete, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_before, v_before, gate, attn, lse = ctx.saved_tensors
        shape, causal, complete, scale = ctx.options
        h = k_before.shape[1]
        k_all, v_all = torch.cat([k_before, k], 1), torch.cat([v_before, v], 1)
        empty = q.new_empty((0,))
        dq, dk, dv, dgate, _, _ = triton_bwd(
            dout, q[None], k_all[None], v_all, None if gate is None else gate[:, None], None, None, attn, empty,
            empty if gate is None else attn[None], lse, shape, [1], causal, complete, 0, scale)
        dk = dk[0]
        return (dq[0], dk[:, h:], dv[:, h:], dk[:, :h], dv[:, :h], None if gate is None else dgate[:, 0],
                None, None, None, None, None)


def split_pass_triton(q, k, v, k_before, v_before, wait, shape, *, causal, mode, gate, softmax_scale):
    """One pass, order ``(1,)`` of the fold ``shape`` ``(rows, n, s)``, whose keys arrive in
    two parts: the queries ``q [B, L, H, D]`` are the last L of ``h + L`` positions, ``k, v``
    the keys and values at those same positions, ``k_before, v_before [B, h, *, D]`` those
    of the h positions before. The first launch reads the queries' own keys; then ``wait()``
    (e.g. for ``k_before`` and ``v_before`` to arrive) and a second launch folds the earlier
    keys into its result by their log-sum-exp (query tiles that read none of them are left
    alone). Equals :func:`tensorized_attn_triton` on the joined keys (one rounding more of
    the attention output, in q's dtype). ``gate``: float32 ``[H]`` or None; no sinks, no
    positions (rotate q and k first)."""
    if any(x.stride(-1) != 1 for x in (q, k, v, k_before, v_before)):
        raise ValueError("split_pass_triton needs q, k, v, k_before and v_before contiguous in their last dim")
    return _SplitPass.apply(q, k, v, k_before, v_before, gate, wait, tuple(shape), causal, mode == "complete",
                            float(softmax_scale))


def tensorized_attn_triton(q, k, v, shape, *, causal, mode, order, gate, sinks, softmax_scale, positions=None,
                           return_values=False):
    """The Triton backend behind :func:`tensorized_attention.tensorized_attn`
    (inputs validated there). ``return_values``: also the outputs of every pass but the
    last, each [B, N, H, D] (what cached decoding keeps)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if gate is not None:
        gate = gate.to(torch.float32).contiguous()
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, gate)
    )
    if positions is None:
        qs, ks, sink_q, sink_k = q[None], k[None], None, None
    elif q.shape[1] != k.shape[1]:
        raise ValueError("tensor positions need q and k of the same positions; rotate q and k at their fiber "
                         "indices first when q holds only the last positions")
    else:
        qs, ks, sink_q, sink_k = _rotated_per_pass(q, k, shape, order, sinks, positions)
    out, values, *_ = triton_fwd(
        qs, ks, v, gate, sink_q, sink_k, list(shape), list(order), causal, mode == "complete", sinks,
        float(softmax_scale), needs_grad or return_values,
    )
    return (out, list(values.unbind(0))) if return_values else out


def _rotated_per_pass(q, k, shape, order, sinks, positions):
    """Rotary tensor positions (DESIGN.md §3) as the kernels take them: the queries and keys
    of every pass, rotated at ``p // s_j`` ([m, B, N, H(kv), D], one kernel each:
    :func:`.rotary.rotate_passes`, float32 angles as rope.rotate computes them, with
    autograd), the sink queries (unrotated) and the sink keys of every pass (rotated at minus
    their fixed distance, in PyTorch: a few keys). Inputs that arrive rotated at their
    positions are rotated once, by the difference of the angles; a pass of stride 1 takes
    them as they are, and the sinks' queries come from the same kernel, rotated back."""
    from .rotary import rotary_tables, rotate_passes

    N = q.shape[1]
    inv_freq = positions.inv_freq
    cos, sin = rotary_tables(N, inv_freq, q.device)
    rotated = positions.rotated
    rope_scale = 1.0 if rotated else positions.attention_scaling
    st = strides(shape)
    divisors = [0 if st[dim] == 1 and rotated else st[dim] for dim in order]
    count = min(sinks, N)
    unrotated = N + 1  # a divisor past the last position: the angle of every position is 0's
    sinks_from_kernel = count > 0 and rotated
    q_divisors = divisors + ([unrotated] if sinks_from_kernel else [])
    qs = rotate_passes(q, q, cos, sin, q_divisors, [0] * len(q_divisors), rope_scale, False, rotated)
    ks = rotate_passes(k, k, cos, sin, divisors, [0] * len(divisors), rope_scale, False, rotated)
    if not count:
        return qs, ks, None, None
    first = k[:, :count].transpose(1, 2)  # [B, Hkv, S, D]: rotate() wants positions at -2
    if rotated:
        first = rotate(first, torch.arange(count, device=q.device), inv_freq, inverse=True)
    k_sinks = [rotate(first, -sink_distances(shape[dim], sinks)[:count].to(q.device), inv_freq, scale=rope_scale)
               for dim in order]
    sink_k = torch.stack(k_sinks).transpose(2, 3).contiguous()  # [m, B, S, Hkv, D]
    # the sinks' queries are q unrotated (scaled like every rotation); the kernels read them strided
    if sinks_from_kernel:
        return qs[:-1], ks, qs[-1], sink_k
    sink_q = q if rope_scale == 1.0 else (q.to(torch.float32) * rope_scale).to(q.dtype)
    return qs, ks, sink_q, sink_k


__all__ = ["tensorized_attn_triton", "split_pass_triton", "triton_fwd", "triton_bwd", "fwd_pass", "block_config"]
