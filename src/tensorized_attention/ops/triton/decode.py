"""One Triton kernel per pass of a cached decoding step (hf/attention.py ``_decode``).

A decoded token's pass reads the ``count`` keys of its fiber or window, positions
``lo, lo + s, ..., p`` of the key cache, and their values: the value cache (the first pass)
or the ring of the previous pass's outputs (slot = position mod ring); then the sinks
outside the pass mask, and the gate's blend with the pass's input at p. One program per
(batch, query head) does all of it in float32 and writes the pass's output once: what the
PyTorch path does in about forty small operations.

With tensor positions the cache holds q and k rotated at their positions; the program
rotates each key by the fixed angle of its distance j (``j (s - 1)``, rows of ``COS`` /
``SIN``), and the sinks' query by minus the angle of p (``QCOS`` / ``QSIN``), as
``_decode`` explains.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .kernels import LOG2E

MAX_SINKS = 31  # the sinks a pass reads are the bits of one int32


@triton.jit
def _halves(ptr, row, offs_h, h_ok, HALF: tl.constexpr):
    """The two halves [rows, BH] of the head-dim vectors at ``ptr + row`` (row: [rows, 1])."""
    x1 = tl.load(ptr + row + offs_h[None, :], mask=h_ok, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + row + HALF + offs_h[None, :], mask=h_ok, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _fold(m_i, l_i, acc1, acc2, scores, v1, v2):
    """Fold scores [rows] (base 2, -inf where not read) and values into the online softmax."""
    m_new = tl.maximum(m_i, tl.max(scores, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc1 = acc1 * alpha + tl.sum(p[:, None] * v1, 0)
    acc2 = acc2 * alpha + tl.sum(p[:, None] * v2, 0)
    return m_new, l_i, acc1, acc2


# the integers that change from token to token are not specialized on (Triton would compile
# a variant per value 1 and per divisibility by 16, seen as stalls of hundreds of ms)
@triton.jit(do_not_specialize=["lo", "count", "s", "ring", "n_sinks", "sink_bits", "gate_col"])
def _decode_pass_kernel(
    Q, K, VAL, PREV, OUT, COS, SIN, QCOS, QSIN, SK, SV, GATE,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_ob, stride_oh, stride_skb, stride_skh, stride_skn,
    stride_svb, stride_svh, stride_svn,
    H, lo, count, s, ring, n_sinks, sink_bits, scale_log2, gate_col, stride_g,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, P_GROUP: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
    ROTATE: tl.constexpr, SINK_ROTATE: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """OUT[b, h] = the pass's output at p for query head h (see the module docstring).
    VAL rows are positions (ring = 0) or ring slots (position mod ring); its head is
    h // V_GROUP, PREV's h // P_GROUP; the sinks' keys SK are given as the pass scores them."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    hk = h // GROUP
    hv = h // V_GROUP
    offs_h = tl.arange(0, BLOCK_H)
    d_ok = offs_h < HALF
    q_ptr = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    q1 = tl.load(q_ptr + offs_h, mask=d_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF + offs_h, mask=d_ok, other=0.0).to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = VAL + b.to(tl.int64) * stride_vb + hv * stride_vh

    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc1 = tl.zeros([BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_H], tl.float32)
    for start in range(0, count, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        ok = i < count
        pos = (lo + i * s).to(tl.int64)
        h_ok = ok[:, None] & d_ok[None, :]
        k1, k2 = _halves(k_base, pos[:, None] * stride_kn, offs_h, h_ok, HALF)
        if ROTATE:  # key i by row i of the tables
            at = i.to(tl.int64)[:, None] * (2 * HALF) + offs_h[None, :]
            c = tl.load(COS + at, mask=h_ok, other=1.0)
            sn = tl.load(SIN + at, mask=h_ok, other=0.0)
            k1, k2 = k1 * c - k2 * sn, k2 * c + k1 * sn
        scores = (tl.sum(k1 * q1[None, :], 1) + tl.sum(k2 * q2[None, :], 1)) * scale_log2
        scores = tl.where(ok, scores, float("-inf"))
        if ring > 0:
            slot = pos % ring
        else:
            slot = pos
        v1, v2 = _halves(v_base, slot[:, None] * stride_vn, offs_h, h_ok, HALF)
        m_i, l_i, acc1, acc2 = _fold(m_i, l_i, acc1, acc2, scores, v1, v2)

    if n_sinks > 0:
        j = tl.arange(0, BLOCK_S)
        read = (j < n_sinks) & (((sink_bits >> j) & 1) == 1)
        s_ok = read[:, None] & d_ok[None, :]
        if SINK_ROTATE:  # the sinks' query: q rotated back by the angle of p
            c = tl.load(QCOS + offs_h, mask=d_ok, other=1.0)
            sn = tl.load(QSIN + offs_h, mask=d_ok, other=0.0)
            q1, q2 = q1 * c + q2 * sn, q2 * c - q1 * sn
        ks1, ks2 = _halves(SK + b.to(tl.int64) * stride_skb + hk * stride_skh, j.to(tl.int64)[:, None] * stride_skn,
                           offs_h, s_ok, HALF)
        scores = (tl.sum(ks1 * q1[None, :], 1) + tl.sum(ks2 * q2[None, :], 1)) * scale_log2
        scores = tl.where(read, scores, float("-inf"))
        vs1, vs2 = _halves(SV + b.to(tl.int64) * stride_svb + hv * stride_svh, j.to(tl.int64)[:, None] * stride_svn,
                           offs_h, s_ok, HALF)
        m_i, l_i, acc1, acc2 = _fold(m_i, l_i, acc1, acc2, scores, vs1, vs2)

    out1 = acc1 / l_i
    out2 = acc2 / l_i
    if HAS_GATE:
        g = tl.load(GATE + h * stride_g + gate_col).to(tl.float32)
        p_ptr = PREV + b.to(tl.int64) * stride_pb + (h // P_GROUP) * stride_ph
        out1 = g * tl.load(p_ptr + offs_h, mask=d_ok, other=0.0).to(tl.float32) + (1.0 - g) * out1
        out2 = g * tl.load(p_ptr + HALF + offs_h, mask=d_ok, other=0.0).to(tl.float32) + (1.0 - g) * out2
    o_ptr = OUT + b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(o_ptr + offs_h, out1.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(o_ptr + HALF + offs_h, out2.to(OUT.dtype.element_ty), mask=d_ok)


def decode_pass(q, key, values, prev, out, *, lo: int, count: int, stride: int, ring: int | None, scale: float,
                rotation=None, sink_keys=None, sink_values=None, sink_rows=(), sink_rotation=None,
                gate=None, gate_col: int = 0) -> torch.Tensor:
    """One pass of a decoded token in one Triton kernel, into ``out [B, H, D]`` (D even, the
    head dim contiguous in every input).

    q ``[B, H, D]``: the query (rotated at its position with tensor positions); key ``[B,
    Hkv, L, D]``: the key cache; values ``[B, Hv, rows, D]``: the pass's input values, rows
    = positions, or ring slots (position mod ``ring``); its keys and values are positions
    ``lo, lo + stride, ..., lo + (count - 1) stride``. rotation: (cos, sin) ``[count, D]``
    by which each key is rotated, in order. sink_keys ``[B, Hkv, S, D]`` (as the pass scores
    them) and sink_values ``[B, Hv, S, D]``, of which ``sink_rows`` are read, the query
    rotated by sink_rotation (cos, sin) ``[D]`` first where given. gate ``[H, m]`` (float32):
    column gate_col blends ``prev [B, Hv or H, D]`` (the pass's input at the query)."""
    B, H, D = q.shape
    if D % 2:
        raise ValueError(f"decode_pass takes an even head dim (its two halves), got {D}")
    Hkv = key.shape[1]
    half = D // 2
    bits = 0
    for j in sink_rows:
        bits |= 1 << j
    n_sinks = sink_keys.shape[2] if sink_keys is not None and sink_rows else 0
    if n_sinks > MAX_SINKS:
        raise ValueError(f"decode_pass reads at most {MAX_SINKS} sinks, got {n_sinks}")
    cos, sin = rotation if rotation is not None else (q, q)
    qcos, qsin = sink_rotation if sink_rotation is not None else (q, q)
    sk = sink_keys if n_sinks else key
    sv = sink_values if n_sinks else values
    g = gate if gate is not None else q
    # eager: launch the kernel itself; wrap_triton's dispatch would cost more host time than
    # the kernel takes (it runs once per pass, layer and token); under torch.compile it traces
    kernel = wrap_triton(_decode_pass_kernel) if torch.compiler.is_compiling() else _decode_pass_kernel
    kernel[(B * H,)](
        q, key, values, prev, out, cos, sin, qcos, qsin, sk, sv, g,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        values.stride(0), values.stride(1), values.stride(2), prev.stride(0), prev.stride(1),
        out.stride(0), out.stride(1), sk.stride(0), sk.stride(1), sk.stride(2), sv.stride(0), sv.stride(1), sv.stride(2),
        H, lo, count, stride, ring or 0, n_sinks, bits, scale * LOG2E, gate_col,
        g.stride(0) if gate is not None else 0,
        GROUP=H // Hkv, V_GROUP=H // values.shape[1], P_GROUP=H // prev.shape[1], HALF=half,
        BLOCK_N=64, BLOCK_H=max(16, triton.next_power_of_2(half)), BLOCK_S=32,
        ROTATE=rotation is not None, SINK_ROTATE=sink_rotation is not None, HAS_GATE=gate is not None,
        num_warps=4,
    )
    return out
