"""Triton kernels of the selected pass (passes.SelectedPass, DESIGN.md §8): forward and backward.

Work is split by what a query reads, so that no key is read for a query that did not select it:

1. **Selected blocks, block-major.** Every (query, slot) pair, the slot being one of the
   query's selected blocks, is grouped by (head, block) beforehand (:func:`_pairs`); a
   program takes up to ``BLOCK_M`` pairs of one group, gathers their queries (by index, in
   place) and reads the block's ``W`` keys and values once for them, with tensor cores:
   exactly ``W`` keys per pair, however differently the queries chose. It writes the
   pair's partial softmax (its normalised output and log-sum-exp) to a buffer
   ``[B H, N, R, D]``.
2. **Window and sinks, query-major.** A program owns ``BLOCK_M`` consecutive queries of one
   head: their causal window ``0 <= p - p' < W``, the sinks outside the window and outside
   the row's selected blocks, and then the row's ``R`` partials of step 1, merged into one
   online softmax; it writes the output and the log-sum-exp once.

Rotary positions without a rotated copy per query: a selected key ``j`` of the row's
``i``-th block (in increasing order) is seen at distance ``A - j`` with
``A = (r - i + 1) W - 1``, and ``<q, R(j - A) k> = <R(A) q, R(j) k>``, so the keys come
rotated at their offset in their block (one copy, ``KB``) and the gathered queries are
rotated by their pair's ``A`` in the kernel; the sinks likewise, with
``A = (r + 1) W + S - 1``. The cosines and sines are read from tables of the
``(R + 1) W + S`` angles the pass can meet (computed in PyTorch: exact at any length). The
window uses q and k rotated at their positions (``QW``, ``KW``: a Hugging Face layer's own
q and k). Without positions nothing rotates.

The ranking (which blocks each query selects) is that of the reference
(:func:`tensorized_attention.ops.reference.select_blocks`) in one kernel,
:func:`_rank_kernel`: the scores of a tile of queries against the blocks' mean keys (or
their channel-wise max and min keys: two matrix products), tile by tile of blocks, and a
running top-k per query; no score matrix is written.

The backward mirrors it: dq of the selected blocks pair by pair (rotated back by the pair's
angle, into a buffer per slot), then a query-major kernel for the window's and the sinks'
dq that adds the slots; dk and dv of the window key-major, then, per key tile of a block,
over the pairs that selected the block. The sinks' few keys and values get their gradients
in PyTorch. Every sum runs in a fixed order: repeated backward calls agree bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .kernels import LOG2E, _online_softmax

BIG = 2**30  # a block index past every real block: padding of the selections


@triton.jit
def _rotated(x1, x2, A, COS, SIN, offs_h, h_ok, HALF: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate the two halves [BM, BH] of a tile by the angles A[:, None] * freq (by minus
    them with INVERSE), cos and sin read from the tables [angles, HALF]."""
    at = A.to(tl.int64)[:, None] * HALF + offs_h[None, :]
    c = tl.load(COS + at, mask=h_ok[None, :], other=1.0)
    s = tl.load(SIN + at, mask=h_ok[None, :], other=0.0)
    if INVERSE:
        s = -s
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    return (x1f * c - x2f * s).to(x1.dtype), (x2f * c + x1f * s).to(x1.dtype)


@triton.jit
def _halves(base, pos, ok, stride_n, offs_h, h_ok, HALF):
    """Rows ``pos`` of a [*, D] tensor at ``base``, loaded as their two halves [*, BH]."""
    rows = base + pos.to(tl.int64)[:, None] * stride_n
    m = ok[:, None] & h_ok[None, :]
    return tl.load(rows + offs_h[None, :], mask=m, other=0.0), tl.load(rows + HALF + offs_h[None, :], mask=m, other=0.0)


@triton.jit
def _rows(base, pos, ok, stride_n, offs_d, d_ok):
    """Rows ``pos`` of a [*, D] tensor at ``base`` [len(pos), BD]."""
    return tl.load(base + pos.to(tl.int64)[:, None] * stride_n + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _window_tile(k_base, v_base, start, hi, offs_m, offs_d, d_ok, stride_kn, stride_vn, W,
                 BLOCK_N: tl.constexpr):
    """Keys and values start .. start + BLOCK_N - 1 (below hi) of a query tile's window, and
    which (row, key) pairs the window holds (0 <= p - p' < W)."""
    offs_k = start + tl.arange(0, BLOCK_N)
    k_ok = offs_k < hi
    kt = _rows(k_base, offs_k, k_ok, stride_kn, offs_d, d_ok)
    vt = _rows(v_base, offs_k, k_ok, stride_vn, offs_d, d_ok)
    dist = offs_m[:, None] - offs_k[None, :]
    return kt, vt, (dist >= 0) & (dist < W) & k_ok[None, :]


@triton.jit
def _sink_allowed(SEL, bh, offs_m, m_ok, offs_s, s_ok, N, R, RC, W, BLOCK_R: tl.constexpr):
    """Which (row, sink) pairs the sinks' softmax holds: the sink is at or before the row,
    outside its window and outside the blocks the row selected."""
    offs_r = tl.arange(0, BLOCK_R)
    sel = tl.load(SEL + bh.to(tl.int64) * N * RC + offs_m.to(tl.int64)[:, None] * RC + offs_r[None, :],
                  mask=m_ok[:, None] & (offs_r[None, :] < R), other=2**30)
    in_sel = tl.sum((sel[:, :, None] == (offs_s // W)[None, None, :]).to(tl.int32), 1) > 0
    return (s_ok[None, :] & m_ok[:, None] & (offs_s[None, :] <= offs_m[:, None])
            & (offs_m[:, None] - offs_s[None, :] >= W) & ~in_sel)


@triton.jit
def _pair_rows(PAIR, start, end, R, W, BLOCK_M: tl.constexpr):
    """Pairs start .. start + BLOCK_M - 1 (below end): their queries p, slots and angles
    A = (r - slot + 1) W - 1 (r = min(p // W, R)), and which rows are pairs."""
    rows = start + tl.arange(0, BLOCK_M)
    ok = rows < end
    pair = tl.load(PAIR + rows, mask=ok, other=0)
    p = pair // R
    slot = pair % R
    return p, slot, (tl.minimum(p // W, R) - slot + 1) * W - 1, ok


@triton.jit
def _pair_tile(PAIR, TILE_GROUP, TILE_START, OFFS, t, n_blocks, R, W, BLOCK_M: tl.constexpr):
    """Tile t of the pairs: its group (head bh, block blk) and its rows (:func:`_pair_rows`)."""
    g = tl.load(TILE_GROUP + t)
    p, slot, A, ok = _pair_rows(PAIR, tl.load(TILE_START + t), tl.load(OFFS + g + 1), R, W, BLOCK_M)
    return g // n_blocks, g % n_blocks, p, slot, A, ok


@triton.jit
def _blocks_fwd_kernel(
    QC, KB, V, PAIR, TILE_GROUP, TILE_START, OFFS, COS, SIN, OSEL, LSEL,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    N, H, R, n_blocks, scale_log2,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Up to BLOCK_M (query, slot) pairs of one (head, block): the partial softmax of each
    pair over the block's keys outside the query's window, into OSEL [BH, N, R, D] (the
    normalised output) and LSEL [BH, N, R] (its log-sum-exp, base 2)."""
    bh, blk, p, slot, A, ok = _pair_tile(PAIR, TILE_GROUP, TILE_START, OFFS, tl.program_id(0), n_blocks, R, W,
                                         BLOCK_M)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    q1, q2 = _halves(QC + b.to(tl.int64) * stride_qb + h * stride_qh, p, ok, stride_qn, offs_h, h_ok, HALF)
    if ROPE:
        q1, q2 = _rotated(q1, q2, A, COS, SIN, offs_h, h_ok, HALF, False)
    k_base = KB + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, W, BLOCK_N):
        offs_k = blk * W + j0 + tl.arange(0, BLOCK_N)
        k_ok = offs_k < (blk + 1) * W
        k1, k2 = _halves(k_base, offs_k, k_ok, stride_kn, offs_h, h_ok, HALF)
        s = (tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
             + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale_log2
        allowed = ok[:, None] & k_ok[None, :] & (p[:, None] - offs_k[None, :] >= W)
        vt = _rows(v_base, offs_k, k_ok, stride_vn, offs_d, d_ok)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vt, PRECISION)
    has = l_i > 0
    dst = (bh.to(tl.int64) * N + p) * R + slot
    tl.store(LSEL + dst, tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=ok)
    tl.store(OSEL + dst[:, None] * HEAD_DIM + offs_d[None, :], acc / tl.where(has, l_i, 1.0)[:, None],
             mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _window_fwd_kernel(
    QW, KW, QC, KS, V, SEL, OSEL, LSEL, COS, SIN, Out, Lse,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_sb, stride_sn, stride_sh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    N, H, BH, R, RC, n_sinks, scale_log2,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """BLOCK_M consecutive queries of one head: the window, the sinks, then the rows'
    partials of the selected blocks (OSEL, LSEL), in one online softmax."""
    pid = tl.program_id(0)
    bh = pid % BH
    a0 = (pid // BH) * BLOCK_M
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_m = a0 + tl.arange(0, BLOCK_M)
    q_ok = offs_m < N
    r = tl.minimum(offs_m // W, R)  # the blocks each row selected
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    q_head = b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = KW + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # the window
    qw = _rows(QW + q_head, offs_m, q_ok, stride_qn, offs_d, d_ok)
    hi = tl.minimum(a0 + BLOCK_M, N)
    for start in range((tl.maximum(a0 - W + 1, 0) // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        kt, vt, allowed = _window_tile(k_base, v_base, start, hi, offs_m, offs_d, d_ok, stride_kn, stride_vn, W,
                                       BLOCK_N)
        s = tl.dot(qw, tl.trans(kt), input_precision=PRECISION) * scale_log2
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vt, PRECISION)

    # the sinks outside the window and the selected blocks, at (r + 1) W + S - 1 - s
    if n_sinks > 0:
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_sinks
        q1, q2 = _halves(QC + q_head, offs_m, q_ok, stride_qn, offs_h, h_ok, HALF)
        if ROPE:
            q1, q2 = _rotated(q1, q2, (r + 1) * W + n_sinks - 1, COS, SIN, offs_h, h_ok, HALF, False)
        k1, k2 = _halves(KS + b.to(tl.int64) * stride_sb + (h // GROUP) * stride_sh, offs_s, s_ok, stride_sn,
                         offs_h, h_ok, HALF)
        s = (tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
             + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale_log2
        allowed = _sink_allowed(SEL, bh, offs_m, q_ok, offs_s, s_ok, N, R, RC, W, BLOCK_R)
        vs = _rows(v_base, offs_s, s_ok, stride_vn, offs_d, d_ok)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vs, PRECISION)

    # the selected blocks' partials: each a (log-sum-exp, normalised output) of its own
    for i in range(0, R):
        has = q_ok & (i < r)
        at = (bh.to(tl.int64) * N + offs_m) * R + i
        lse_i = tl.load(LSEL + at, mask=has, other=float("-inf"))
        o_i = tl.load(OSEL + at[:, None] * HEAD_DIM + offs_d[None, :], mask=has[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, lse_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a padding row: nothing anywhere
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(lse_i - m_safe)
        acc = acc * alpha[:, None] + beta[:, None] * o_i
        l_i = l_i * alpha + beta
        m_i = m_new

    l_i = tl.where(q_ok, l_i, 1.0)
    tl.store(Lse + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=q_ok)
    out_ptrs = (Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on
                + offs_d[None, :])
    tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _blocks_dq_kernel(
    QC, KB, V, DO, Lse, Delta, PAIR, TILE_GROUP, TILE_START, OFFS, COS, SIN, DQSEL,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    N, H, R, n_blocks, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of up to BLOCK_M (query, slot) pairs of one (head, block), rotated back by the
    pair's angle, into DQSEL [BH, N, R, D] (float32): dS = P (dP - delta)."""
    bh, blk, p, slot, A, ok = _pair_tile(PAIR, TILE_GROUP, TILE_START, OFFS, tl.program_id(0), n_blocks, R, W,
                                         BLOCK_M)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    q_head = b.to(tl.int64) * stride_qb + h * stride_qh
    q1, q2 = _halves(QC + q_head, p, ok, stride_qn, offs_h, h_ok, HALF)
    if ROPE:
        q1, q2 = _rotated(q1, q2, A, COS, SIN, offs_h, h_ok, HALF, False)
    do = _rows(DO + q_head, p, ok, stride_qn, offs_d, d_ok)
    lse = tl.load(Lse + bh.to(tl.int64) * N + p, mask=ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N + p, mask=ok, other=0.0)
    k_base = KB + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh
    t1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    t2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for j0 in range(0, W, BLOCK_N):
        offs_k = blk * W + j0 + tl.arange(0, BLOCK_N)
        k_ok = offs_k < (blk + 1) * W
        k1, k2 = _halves(k_base, offs_k, k_ok, stride_kn, offs_h, h_ok, HALF)
        s = (tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
             + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale_log2
        allowed = ok[:, None] & k_ok[None, :] & (p[:, None] - offs_k[None, :] >= W)
        pr = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        vt = _rows(v_base, offs_k, k_ok, stride_vn, offs_d, d_ok)
        ds = (pr * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])).to(k1.dtype)
        t1 += tl.dot(ds, k1, input_precision=PRECISION)
        t2 += tl.dot(ds, k2, input_precision=PRECISION)
    if ROPE:
        t1, t2 = _rotated(t1, t2, A, COS, SIN, offs_h, h_ok, HALF, True)
    dst = ((bh.to(tl.int64) * N + p) * R + slot)[:, None] * HEAD_DIM + offs_h[None, :]
    m = ok[:, None] & h_ok[None, :]
    tl.store(DQSEL + dst, t1 * scale, mask=m)
    tl.store(DQSEL + dst + HALF, t2 * scale, mask=m)


@triton.jit
def _window_dq_kernel(
    QW, KW, QC, KS, V, DO, Lse, Delta, SEL, DQSEL, COS, SIN, DQW, DQC,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_sb, stride_sn, stride_sh,
    stride_vb, stride_vn, stride_vh,
    N, H, BH, R, RC, n_sinks, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of the window (into DQW) and of the content query (into DQC: the sinks' part,
    rotated back, plus the rows' slots of DQSEL), query-major as the forward."""
    pid = tl.program_id(0)
    bh = pid % BH
    a0 = (pid // BH) * BLOCK_M
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_m = a0 + tl.arange(0, BLOCK_M)
    q_ok = offs_m < N
    r = tl.minimum(offs_m // W, R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    q_head = b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = KW + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh
    lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=q_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=q_ok, other=0.0)
    do = _rows(DO + q_head, offs_m, q_ok, stride_qn, offs_d, d_ok)

    # the window
    qw = _rows(QW + q_head, offs_m, q_ok, stride_qn, offs_d, d_ok)
    dqw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(a0 + BLOCK_M, N)
    for start in range((tl.maximum(a0 - W + 1, 0) // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        kt, vt, allowed = _window_tile(k_base, v_base, start, hi, offs_m, offs_d, d_ok, stride_kn, stride_vn, W,
                                       BLOCK_N)
        s = tl.dot(qw, tl.trans(kt), input_precision=PRECISION) * scale_log2
        pr = tl.where(allowed & q_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        ds = pr * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])
        dqw += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    tl.store(DQW + q_head + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
             (dqw * scale).to(DQW.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])

    dq1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    # the sinks
    if n_sinks > 0:
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_sinks
        a_sink = (r + 1) * W + n_sinks - 1
        q1, q2 = _halves(QC + q_head, offs_m, q_ok, stride_qn, offs_h, h_ok, HALF)
        if ROPE:
            q1, q2 = _rotated(q1, q2, a_sink, COS, SIN, offs_h, h_ok, HALF, False)
        k1, k2 = _halves(KS + b.to(tl.int64) * stride_sb + (h // GROUP) * stride_sh, offs_s, s_ok, stride_sn,
                         offs_h, h_ok, HALF)
        s = (tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
             + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale_log2
        allowed = _sink_allowed(SEL, bh, offs_m, q_ok, offs_s, s_ok, N, R, RC, W, BLOCK_R)
        pr = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        vs = _rows(v_base, offs_s, s_ok, stride_vn, offs_d, d_ok)
        ds = (pr * (tl.dot(do, tl.trans(vs), input_precision=PRECISION) - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, input_precision=PRECISION)
        dq2 = tl.dot(ds, k2, input_precision=PRECISION)
        if ROPE:
            dq1, dq2 = _rotated(dq1, dq2, a_sink, COS, SIN, offs_h, h_ok, HALF, True)
        dq1 = dq1 * scale
        dq2 = dq2 * scale
    # the selected blocks' parts, one slot after the other (already scaled)
    for i in range(0, R):
        at = ((bh.to(tl.int64) * N + offs_m) * R + i)[:, None] * HEAD_DIM + offs_h[None, :]
        m = (q_ok & (i < r))[:, None] & h_ok[None, :]
        dq1 += tl.load(DQSEL + at, mask=m, other=0.0)
        dq2 += tl.load(DQSEL + at + HALF, mask=m, other=0.0)
    dq_rows = DQC + q_head + offs_m.to(tl.int64)[:, None] * stride_qn
    qh = q_ok[:, None] & h_ok[None, :]
    tl.store(dq_rows + offs_h[None, :], dq1.to(DQC.dtype.element_ty), mask=qh)
    tl.store(dq_rows + HALF + offs_h[None, :], dq2.to(DQC.dtype.element_ty), mask=qh)


@triton.jit
def _window_dkdv_kernel(
    QW, KW, V, DO, Lse, Delta, DKW, DV,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    N, H, BH, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key-major: for BLOCK_N keys and one query head, dk (DKW) and dv (DV, float32) of the
    window, per query head (the caller sums over the heads of a group)."""
    pid = tl.program_id(0)
    bh = pid % BH
    k0 = (pid // BH) * BLOCK_N
    b = bh // H
    h = bh % H
    offs_k = k0 + tl.arange(0, BLOCK_N)
    k_ok = offs_k < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kd = k_ok[:, None] & d_ok[None, :]
    kw = _rows(KW + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh, offs_k, k_ok, stride_kn, offs_d, d_ok)
    vt = _rows(V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh, offs_k, k_ok, stride_vn, offs_d, d_ok)
    q_head = b.to(tl.int64) * stride_qb + h * stride_qh
    dkw = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # the queries p with 0 <= p - j < W
    hi = tl.minimum(N, k0 + BLOCK_N + W - 1)
    for start in range((k0 // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qw = _rows(QW + q_head, offs_m, m_ok, stride_qn, offs_d, d_ok)
        do = _rows(DO + q_head, offs_m, m_ok, stride_qn, offs_d, d_ok)
        lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(kw, tl.trans(qw), input_precision=PRECISION) * scale_log2  # [BN, BM]
        dist = offs_m[None, :] - offs_k[:, None]
        allowed = (dist >= 0) & (dist < W) & m_ok[None, :] & k_ok[:, None]
        pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dst = pt * (tl.dot(vt, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dkw += tl.dot(dst.to(qw.dtype), qw, input_precision=PRECISION)
    rows = q_head + offs_k.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    tl.store(DKW + rows, (dkw * scale).to(DKW.dtype.element_ty), mask=kd)
    tl.store(DV + rows, dv, mask=kd)


@triton.jit
def _blocks_dkdv_kernel(
    QC, KB, V, DO, Lse, Delta, PAIR, OFFS, COS, SIN, DKB, DV,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    N, H, R, n_blocks, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """For BLOCK_N keys of one block and one query head: over the pairs that selected the
    block (PAIR[OFFS[g] : OFFS[g + 1]], BLOCK_M at a time), dk of the selected pass (DKB)
    and dv, added to the window's (DV, float32, written before)."""
    pid = tl.program_id(0)
    KT: tl.constexpr = W // BLOCK_N
    g = pid // KT
    bh = g // n_blocks
    blk = g % n_blocks
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_k = blk * W + (pid % KT) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    k1, k2 = _halves(KB + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh, offs_k, k_ok, stride_kn, offs_h,
                     h_ok, HALF)
    vt = _rows(V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh, offs_k, k_ok, stride_vn, offs_d, d_ok)
    q_head = b.to(tl.int64) * stride_qb + h * stride_qh
    dk1 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    e1 = tl.load(OFFS + g + 1)
    for e in range(tl.load(OFFS + g), e1, BLOCK_M):
        p, _, A, ok = _pair_rows(PAIR, e, e1, R, W, BLOCK_M)
        q1, q2 = _halves(QC + q_head, p, ok, stride_qn, offs_h, h_ok, HALF)
        if ROPE:
            q1, q2 = _rotated(q1, q2, A, COS, SIN, offs_h, h_ok, HALF, False)
        do = _rows(DO + q_head, p, ok, stride_qn, offs_d, d_ok)
        lse = tl.load(Lse + bh.to(tl.int64) * N + p, mask=ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * N + p, mask=ok, other=0.0)
        st = (tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
              + tl.dot(k2, tl.trans(q2), input_precision=PRECISION)) * scale_log2  # [BN, BM]
        allowed = ok[None, :] & k_ok[:, None] & (p[None, :] - offs_k[:, None] >= W)
        pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dst = (pt * (tl.dot(vt, tl.trans(do), input_precision=PRECISION) - delta[None, :])).to(q1.dtype)
        dk1 += tl.dot(dst, q1, input_precision=PRECISION)
        dk2 += tl.dot(dst, q2, input_precision=PRECISION)
    dk_rows = DKB + q_head + offs_k.to(tl.int64)[:, None] * stride_qn
    kh = k_ok[:, None] & h_ok[None, :]
    tl.store(dk_rows + offs_h[None, :], (dk1 * scale).to(DKB.dtype.element_ty), mask=kh)
    tl.store(dk_rows + HALF + offs_h[None, :], (dk2 * scale).to(DKB.dtype.element_ty), mask=kh)
    dv_rows = DV + q_head + offs_k.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    kd = k_ok[:, None] & d_ok[None, :]
    tl.store(dv_rows, tl.load(dv_rows, mask=kd, other=0.0) + dv, mask=kd)


@triton.jit
def _rank_kernel(
    QC, SUMMARY, SEL, stride_qb, stride_qn, stride_qh,
    N, H, Hkv, BH, n_blocks, RC, scale,
    GROUP: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr,
    BOUND: tl.constexpr,
):
    """The ranking of BLOCK_M queries of one head (what ``reference.select_blocks`` computes):
    each query's best ``K`` whole blocks before its own, of equal scores the later block,
    written in increasing order to SEL [BH, N, RC] (padding BIG). A block scores
    ``scale q . mean(k of the block)`` (SUMMARY: the mean keys [B, Hkv, n_blocks, D]) or,
    with BOUND, ``scale (max(q, 0) . kmax + min(q, 0) . kmin)`` (SUMMARY: the channel-wise
    bounds [B, Hkv, n_blocks, 2, D]); float32. The kept blocks are a set of K columns; a
    block enters when it beats the set's worst."""
    pid = tl.program_id(0)
    bh = pid % BH
    a0 = (pid // BH) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = a0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    own = offs_m // W
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _rows(QC + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, m_ok, stride_qn, offs_d, d_ok).to(tl.float32)
    ROWS: tl.constexpr = 2 if BOUND else 1  # summary rows per block
    summary = SUMMARY + ((b * Hkv + h // GROUP).to(tl.int64) * n_blocks) * (ROWS * HEAD_DIM)
    if BOUND:
        q_pos = tl.maximum(q, 0.0)
        q_neg = tl.minimum(q, 0.0)
    cols = tl.arange(0, KP)
    # K columns start empty (-inf, distinct negative indices); columns past K never take a block (+inf)
    best_v = tl.where(cols[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    best_i = -1 - cols[None, :] + tl.zeros([BLOCK_M, KP], tl.int32)
    for b0 in range(0, tl.minimum(n_blocks, (a0 + BLOCK_M - 1) // W), BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        rows = summary + offs_b.to(tl.int64)[:, None] * (ROWS * HEAD_DIM) + offs_d[None, :]
        bd_ok = (offs_b < n_blocks)[:, None] & d_ok[None, :]
        if BOUND:
            k_max = tl.load(rows, mask=bd_ok, other=0.0)
            k_min = tl.load(rows + HEAD_DIM, mask=bd_ok, other=0.0)
            s = tl.dot(q_pos, tl.trans(k_max), input_precision=PRECISION)
            s = tl.dot(q_neg, tl.trans(k_min), s, input_precision=PRECISION) * scale
        else:
            s = tl.dot(q, tl.trans(tl.load(rows, mask=bd_ok, other=0.0)), input_precision=PRECISION) * scale
        s = tl.where((offs_b[None, :] < own[:, None]) & (offs_b[None, :] < n_blocks), s, float("-inf"))
        for _ in tl.static_range(K):  # the tile's best left, offered to the kept set
            top = tl.max(s, 1)
            top_i = tl.max(tl.where(s == top[:, None], offs_b[None, :], -1), 1)
            worst = tl.min(best_v, 1)
            worst_i = tl.min(tl.where(best_v == worst[:, None], best_i, 2**30), 1)
            enters = (top > float("-inf")) & ((top > worst) | ((top == worst) & (top_i > worst_i)))
            replace = (best_v == worst[:, None]) & (best_i == worst_i[:, None]) & enters[:, None]
            best_v = tl.where(replace, top[:, None], best_v)
            best_i = tl.where(replace, top_i[:, None], best_i)
            s = tl.where(offs_b[None, :] == top_i[:, None], float("-inf"), s)
    kept = (cols[None, :] < K) & (best_v > float("-inf"))
    index = tl.where(kept, best_i, 2**30 + cols[None, :])  # distinct: empty columns sort last
    place = tl.sum((index[:, None, :] < index[:, :, None]).to(tl.int32), 2)  # [BM, KP]: its rank
    tl.store(SEL + (bh.to(tl.int64) * N + offs_m)[:, None] * RC + place, tl.where(kept, best_i, 2**30),
             mask=m_ok[:, None] & (cols[None, :] < K))


def _selections(step, q_content, k_content, scale, block_m=64):
    """Which blocks each query selects (the reference's ranking, :func:`_rank_kernel`):
    ``[B, H, N, max(R, 1)]`` int32 in increasing order (a slot's place is the block's rank
    among the row's selections; padding BIG), and R = min(topk, N // block)."""
    from ..reference import block_summaries

    B, N, H, D = q_content.shape
    Hkv = k_content.shape[2]
    W = step.block
    n_blocks = N // W
    R = min(step.topk, n_blocks)
    sel = torch.full((B, H, N, max(R, 1)), BIG, dtype=torch.int32, device=q_content.device)
    if R:
        summary = block_summaries(k_content.permute(0, 2, 1, 3)[:, :, None], step).float().contiguous()
        # the bound's two summary tiles: 32 blocks a tile keep shared memory in bounds at headdim 128
        _rank_kernel[(triton.cdiv(N, block_m) * B * H,)](
            q_content, summary, sel, *q_content.stride()[:3], N, H, Hkv, B * H, n_blocks, sel.shape[-1], scale,
            GROUP=H // Hkv, W=W, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m,
            BLOCK_B=32 if step.score == "bound" else 64, K=R, KP=max(2, triton.next_power_of_2(R)),
            PRECISION="ieee" if q_content.dtype == torch.float32 else "tf32", BOUND=step.score == "bound",
            num_warps=4)
    return sel, R


def _pairs(sel, R, n_blocks, block_m):
    """The (query, slot) pairs of the selections ``sel`` [B, H, N, *], grouped by (batch x
    head, block) ``g``: ``pair`` (``p R + slot``; within a group by increasing p),
    ``offsets`` [B H n_blocks + 1] (group g is pair[offsets[g] : offsets[g + 1]]), and the
    tiles of up to ``block_m`` pairs of one group: ``tile_group``, ``tile_start``."""
    B, H, N, _ = sel.shape
    device = sel.device
    chosen = sel[..., :R].reshape(B * H, N * R).long()
    valid = chosen < n_blocks
    keys = (torch.arange(B * H, device=device)[:, None] * n_blocks + chosen)[valid]
    order = torch.sort(keys, stable=True).indices
    pair = torch.arange(N * R, device=device).expand(B * H, -1)[valid][order].to(torch.int32)
    counts = torch.bincount(keys, minlength=B * H * n_blocks)
    offsets = torch.zeros(B * H * n_blocks + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    n_tiles = (counts + block_m - 1) // block_m
    tile_group = torch.repeat_interleave(torch.arange(B * H * n_blocks, device=device), n_tiles)
    first = torch.cumsum(n_tiles, 0) - n_tiles
    tile_start = offsets[tile_group] + (torch.arange(len(tile_group), device=device) - first[tile_group]) * block_m
    if not len(pair):
        pair = torch.zeros(1, dtype=torch.int32, device=device)
    return pair, offsets.to(torch.int32), tile_group.to(torch.int32), tile_start.to(torch.int32)


def _meta(q, info):
    D = q.shape[-1]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dict(W=info["W"], HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_H=max(16, triton.next_power_of_2(D // 2)), BLOCK_M=info["block_m"], BLOCK_N=info["block_n"],
                ROPE=info["rope"], PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=4, num_stages=1 if interpreting else 2)


def _window_meta(info):
    """The window kernels' own sizes: the sinks' tile and the selections' row."""
    return dict(BLOCK_S=max(16, triton.next_power_of_2(max(info["n_sinks"], 1))),
                BLOCK_R=max(2, triton.next_power_of_2(max(info["R"], 1))))


class _SelectedPass(torch.autograd.Function):
    """The selected pass on the Triton kernels, with its backward: the window's q and k, the
    content q, the keys rotated in their block, the sink keys and the values get gradients
    (the ranking is discrete and gets none)."""

    @staticmethod
    def forward(ctx, q_window, k_window, q_content, k_block, k_sink, values, sel, pair, offsets, tile_group,
                tile_start, tables, info):
        B, N, H, D = q_content.shape
        R, W = info["R"], info["W"]
        cos, sin = tables
        out = torch.empty(B, N, H, D, device=q_content.device, dtype=q_content.dtype)
        lse = torch.empty(B * H, N, device=q_content.device, dtype=torch.float32)
        osel = torch.empty(B * H, N, max(R, 1), D, device=q_content.device, dtype=torch.float32)
        lsel = torch.empty(B * H, N, max(R, 1), device=q_content.device, dtype=torch.float32)
        meta = _meta(q_content, info)
        strides = (*q_content.stride()[:3], *k_block.stride()[:3])
        groups = dict(GROUP=H // k_block.shape[2], V_GROUP=H // values.shape[2])
        if len(tile_group):
            _blocks_fwd_kernel[(len(tile_group),)](
                q_content, k_block, values, pair, tile_group, tile_start, offsets, cos, sin, osel, lsel,
                *strides, *values.stride()[:3], N, H, R, N // W, info["scale"] * LOG2E, **groups, **meta)
        _window_fwd_kernel[(triton.cdiv(N, info["block_m"]) * B * H,)](
            q_window, k_window, q_content, k_sink, values, sel, osel, lsel, cos, sin, out, lse,
            *strides, *k_sink.stride()[:3], *values.stride()[:3], *out.stride()[:3],
            N, H, B * H, R, sel.shape[-1], info["n_sinks"], info["scale"] * LOG2E,
            **groups, **_window_meta(info), **meta)
        ctx.save_for_backward(q_window, k_window, q_content, k_block, k_sink, values, out, lse, sel, pair, offsets,
                              tile_group, tile_start, cos, sin)
        ctx.info = info
        return out

    @staticmethod
    def backward(ctx, dout):
        (q_window, k_window, q_content, k_block, k_sink, values, out, lse, sel, pair, offsets, tile_group,
         tile_start, cos, sin) = ctx.saved_tensors
        info = ctx.info
        B, N, H, D = q_content.shape
        Hkv, Hv, W, R, S = k_block.shape[2], values.shape[2], info["W"], info["R"], info["n_sinks"]
        G, n_blocks, scale = H // Hkv, N // W, info["scale"]
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).permute(0, 2, 1).reshape(B * H, N).contiguous()
        meta = _meta(q_content, info)
        strides = (*q_content.stride()[:3], *k_block.stride()[:3], *values.stride()[:3])
        groups = dict(GROUP=G, V_GROUP=H // Hv)

        dqsel = torch.empty(B * H, N, max(R, 1), D, device=q_content.device, dtype=torch.float32)
        if len(tile_group):
            _blocks_dq_kernel[(len(tile_group),)](
                q_content, k_block, values, dout, lse, delta, pair, tile_group, tile_start, offsets, cos, sin, dqsel,
                *strides, N, H, R, n_blocks, scale * LOG2E, scale, **groups, **meta)
        dqw, dqc = torch.empty_like(q_window), torch.empty_like(q_content)
        _window_dq_kernel[(triton.cdiv(N, info["block_m"]) * B * H,)](
            q_window, k_window, q_content, k_sink, values, dout, lse, delta, sel, dqsel, cos, sin, dqw, dqc,
            *strides[:6], *k_sink.stride()[:3], *strides[6:], N, H, B * H, R, sel.shape[-1], S, scale * LOG2E, scale,
            **groups, **_window_meta(info), **meta)

        dkw, dkb, dv = torch.empty(3, B, N, H, D, device=q_content.device, dtype=torch.float32).unbind(0)
        _window_dkdv_kernel[(triton.cdiv(N, info["block_n"]) * B * H,)](
            q_window, k_window, values, dout, lse, delta, dkw, dv, *strides, N, H, B * H, scale * LOG2E, scale,
            **groups, **{k: meta[k] for k in ("W", "HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "PRECISION",
                                               "num_warps", "num_stages")})
        dkb[:, n_blocks * W:] = 0
        if n_blocks:
            _blocks_dkdv_kernel[(B * H * n_blocks * (W // info["block_n"]),)](
                q_content, k_block, values, dout, lse, delta, pair, offsets, cos, sin, dkb, dv,
                *strides, N, H, R, n_blocks, scale * LOG2E, scale, **groups, **meta)
        dks = None
        if S:  # the sinks' keys and values, in PyTorch: S keys read by every query
            dks, dv_sink = _sink_grads(q_content, k_sink, values, dout, lse, delta, sel, info)
            dv[:, :S] += dv_sink
        dkw, dkb = (x.reshape(B, N, Hkv, G, D).sum(3).to(k_block.dtype) for x in (dkw, dkb))
        dv = (dv.reshape(B, N, Hv, H // Hv, D).sum(3)).to(values.dtype)
        return dqw, dkw, dqc, dkb, dks, dv, None, None, None, None, None, None, None


def _sink_grads(q_content, k_sink, values, dout, lse, delta, sel, info):
    """Gradients of the sink keys [B, S, Hkv, D] and of the sinks' values (per query head,
    [B, S, H, D], float32) from every query that read them."""
    from ...rope import rotate

    B, N, H, D = q_content.shape
    S, W, R, scale = info["n_sinks"], info["W"], info["R"], info["scale"]
    Hkv, Hv = k_sink.shape[2], values.shape[2]
    p = torch.arange(N, device=q_content.device)
    qs = q_content.transpose(1, 2).float()  # [B, H, N, D]
    if info["rope"]:
        angle = (torch.clamp(p // W, max=R) + 1) * W + S - 1
        qs = rotate(qs, angle, info["inv_freq"])
    ks = k_sink.transpose(1, 2).float().repeat_interleave(H // Hkv, 1)  # [B, H, S, D]
    vs = values[:, :S].transpose(1, 2).float().repeat_interleave(H // Hv, 1)
    s_pos = torch.arange(S, device=q_content.device)
    in_sel = (sel[..., None] == (s_pos // W)).any(-2)  # [B, H, N, S]
    allowed = (s_pos <= p[:, None]) & (p[:, None] - s_pos >= W) & ~in_sel
    scores = scale * qs @ ks.transpose(-1, -2)
    prob = torch.where(allowed, torch.exp2(scores * LOG2E - lse.reshape(B, H, N, 1)), 0.0)
    do = dout.transpose(1, 2).float()
    ds = prob * (do @ vs.transpose(-1, -2) - delta.reshape(B, H, N, 1))
    dks = scale * ds.transpose(-1, -2) @ qs  # [B, H, S, D]
    dks = dks.reshape(B, Hkv, H // Hkv, S, D).sum(2).transpose(1, 2).to(k_sink.dtype)
    dv_sink = (prob.transpose(-1, -2) @ do).transpose(1, 2)  # [B, S, H, D]
    return dks, dv_sink


def selected_pass_triton(step, q_window, k_window, q_content, k_content, k_block, k_sink, values, *, sinks,
                         scale, inv_freq=None, block_m=None, block_n=None):
    """One selected pass on the Triton kernels (with autograd). q_window, q_content
    [B, N, H, D]; k_window, k_content, k_block [B, N, Hkv, D]; k_sink [B, S, Hkv, D]
    (S = min(sinks, N)); values [B, N, Hv, D] (Hv = Hkv or H). q_content and k_content
    (unrotated) rank the blocks. With ``inv_freq`` (rotary positions): q_window and
    k_window rotated at their positions, k_block rotated at each position's offset in its
    block, k_sink at its position; without, q_window = q_content and k_window = k_block =
    k_content. Returns [B, N, H, D]."""
    B, N, H, D = q_content.shape
    W = step.block
    if D % 2 or D > 256:
        raise ValueError(f"the Triton selected pass takes an even headdim <= 256, got {D}")
    block_m = block_m or 64
    block_n = block_n or min(64, W)
    if W % block_n:
        raise ValueError(f"the Triton selected pass needs key tiles that divide the block ({W}); use a block that "
                         "is a multiple of 16, or the reference backend")
    with torch.no_grad():
        sel, R = _selections(step, q_content, k_content, scale)
        pair, offsets, tile_group, tile_start = _pairs(sel, R, N // W, block_m)
    n_sinks = min(sinks, N)
    if inv_freq is not None:  # the cosines and sines of every angle the pass meets
        from .rotary import rotary_tables

        tables = rotary_tables((R + 1) * W + n_sinks, inv_freq.float(), q_content.device)
    else:
        tables = (torch.ones(1, device=q_content.device), torch.zeros(1, device=q_content.device))
    if not n_sinks:
        k_sink = k_block[:, :1].detach()
    info = dict(W=W, R=R, n_sinks=n_sinks, scale=scale, block_m=block_m, block_n=block_n, rope=inv_freq is not None,
                inv_freq=inv_freq)
    operands = [x.contiguous() for x in (q_window, k_window, q_content, k_block, k_sink, values)]
    return _SelectedPass.apply(*operands, sel, pair, offsets, tile_group, tile_start, tables, info)
def selected_pass(step, q, k, values, *, sinks, scale, positions=None, block_m=None, block_n=None):
    """The selected pass alone on the Triton kernels: q [B, N, H, D], k
    [B, N, Hkv, D] as :func:`tensorized_attention.tensorized_attn` takes them (with
    ``positions``, a :class:`~tensorized_attention.rope.TensorPositions`), values
    [B, N, Hv, D]. Prepares the kernel's operands (rotated copies of q and k, by the rotary
    kernel: :func:`.rotary.rotate_passes`)."""
    from ...rope import rotate
    from .rotary import rotary_tables, rotate_passes

    N = q.shape[1]
    n_sinks = min(sinks, N)
    if positions is None:
        return selected_pass_triton(step, q, k, q, k, k, k[:, :n_sinks], values, sinks=sinks, scale=scale,
                                    block_m=block_m, block_n=block_n)
    cos, sin = rotary_tables(N, positions.inv_freq, q.device)
    W = step.block
    if positions.rotated:  # a Hugging Face layer's q and k: rotated at 0 .. N-1 and scaled, the window's own
        rope_scale = 1.0
        q_window, k_window = q, k
        q_content, k_content = (rotate_passes(x, x, cos, sin, [1], [0], 1.0, True, False)[0] for x in (q, k))
        k_block = rotate_passes(k_content, k_content, cos, sin, [1], [W], 1.0, False, False)[0]
    else:
        rope_scale = positions.attention_scaling
        q_content, k_content = q, k
        q_window = rotate_passes(q, q, cos, sin, [1], [0], rope_scale, False, False)[0]
        k_window, k_block = rotate_passes(k, k, cos, sin, [1, 1], [0, W], rope_scale, False, False)
    pos = torch.arange(n_sinks, device=q.device)
    k_sink = rotate(k_content[:, :n_sinks].transpose(1, 2), pos, positions.inv_freq, scale=rope_scale).transpose(1, 2)
    if rope_scale != 1.0:
        q_content = (q_content.to(torch.float32) * rope_scale).to(q.dtype)
    return selected_pass_triton(step, q_window, k_window, q_content, k_content, k_block, k_sink,
                                values, sinks=sinks, scale=scale, inv_freq=positions.inv_freq,
                                block_m=block_m, block_n=block_n)
