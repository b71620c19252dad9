"""Triton kernels of the selected pass (passes.SelectedPass, DESIGN.md §8): forward and backward.

A program owns ``BLOCK_M`` consecutive queries of one head, all in one block ``c`` of the
sequence (``BLOCK_M`` divides the block size ``W``), and folds into one online softmax:

1. the window: key tiles over ``[a0 - W + 1, a0 + BLOCK_M)``, masked to ``0 <= p - p' < W``;
2. the sinks outside the window and outside the row's selected blocks;
3. the union of the blocks its rows selected (computed beforehand, :func:`tile_unions`):
   each block is read once, in place (no gathered copy of k or v), and masked per row to
   the rows that selected it and to the keys outside their window.

Rotary positions without a rotated copy per query: a selected key ``j`` of the row's
``i``-th block is seen at distance ``A - j`` with ``A = (r - i + 1) W - 1``, and
``<q, R(j - A) k> = <R(A) q, R(j) k>``, so the keys come rotated at their offset in their
block (one copy, ``KB``) and the query tile is rotated by its rows' ``A`` in the kernel;
the sinks likewise, with ``A = (r + 1) W + S - 1``. The window uses q and k rotated at
their positions (``QW``, ``KW``: a Hugging Face layer's own q and k). Without positions
nothing rotates.

The ranking (which blocks each query selects) is computed in PyTorch by
:func:`tensorized_attention.ops.reference.select_blocks`, exactly as the reference does.

The backward, as for the fold passes: a query-major kernel for dq (the window's, and the
content query's from the selected blocks and sinks, rotated back by each row's angle) and
a key-major kernel for dk and dv, which finds the query tiles that selected its block in a
list grouped by block (:func:`_block_tiles`); the sinks' few keys and values get their
gradients in PyTorch. Every sum runs in a fixed order: repeated backward calls agree.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .kernels import LOG2E, _online_softmax

BIG = 2**30  # a block index past every real block: padding of the selections


@triton.jit
def _rotated(q1, q2, A, freq):
    """Rotate the two halves [BM, BH] of a query tile by the angles A[:, None] * freq."""
    angle = A.to(tl.float32)[:, None] * freq[None, :]
    c = tl.cos(angle)
    s = tl.sin(angle)
    q1f = q1.to(tl.float32)
    q2f = q2.to(tl.float32)
    return (q1f * c - q2f * s).to(q1.dtype), (q2f * c + q1f * s).to(q1.dtype)


@triton.jit
def _halves(base, pos, ok, stride_n, offs_h, h_ok, HALF):
    """Rows ``pos`` of a [*, D] tensor at ``base``, loaded as their two halves [*, BH]."""
    rows = base + pos.to(tl.int64)[:, None] * stride_n
    m = ok[:, None] & h_ok[None, :]
    return tl.load(rows + offs_h[None, :], mask=m, other=0.0), tl.load(rows + HALF + offs_h[None, :], mask=m, other=0.0)


@triton.jit
def _scores(q1, q2, k_base, pos_k, k_ok, stride_kn, offs_h, h_ok, HALF, scale_log2,
            PRECISION: tl.constexpr):
    """Scores (base 2) of the query halves against keys at pos_k, loaded as two halves."""
    k1, k2 = _halves(k_base, pos_k, k_ok, stride_kn, offs_h, h_ok, HALF)
    s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION) + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
    return s * scale_log2


@triton.jit
def _window_tile(k_base, v_base, start, hi, offs_m, offs_d, d_ok, stride_kn, stride_vn, W,
                 BLOCK_N: tl.constexpr):
    """Keys and values start .. start + BLOCK_N - 1 (below hi) of a query tile's window, and
    which (row, key) pairs the window holds (0 <= p - p' < W)."""
    offs_k = start + tl.arange(0, BLOCK_N)
    k_ok = offs_k < hi
    rows = offs_k.to(tl.int64)[:, None]
    m = k_ok[:, None] & d_ok[None, :]
    kt = tl.load(k_base + rows * stride_kn + offs_d[None, :], mask=m, other=0.0)
    vt = tl.load(v_base + rows * stride_vn + offs_d[None, :], mask=m, other=0.0)
    dist = offs_m[:, None] - offs_k[None, :]
    return kt, vt, (dist >= 0) & (dist < W) & k_ok[None, :]


@triton.jit
def _row_selections(SEL, bh, offs_m, m_ok, N, R, RC, BLOCK_R: tl.constexpr):
    """The blocks rows offs_m selected, [BM, BLOCK_R] (padding BIG); RC: SEL's row length."""
    offs_r = tl.arange(0, BLOCK_R)
    return tl.load(SEL + bh.to(tl.int64) * N * RC + offs_m.to(tl.int64)[:, None] * RC + offs_r[None, :],
                   mask=m_ok[:, None] & (offs_r[None, :] < R), other=2**30)


@triton.jit
def _block_rank(sel, blk, r, W):
    """Which rows selected block blk, and the angle A = (r - i + 1) W - 1 at which each row
    sees it (i: its place among the row's r selections)."""
    has = tl.sum((sel == blk).to(tl.int32), 1) > 0
    return has, (r - tl.sum((sel < blk).to(tl.int32), 1) + 1) * W - 1


@triton.jit
def _select_fwd_kernel(
    QW, KW, QC, KB, KS, V, SEL, UNI, UCNT, FREQ, Out, Lse,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_sb, stride_sn, stride_sh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    N, H, BH, R, RC, U, n_sinks, scale_log2,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid % BH
    tile = pid // BH
    b = bh // H
    h = bh % H
    a0 = tile * BLOCK_M
    c = a0 // W
    r = tl.minimum(c, R)  # blocks each row of the tile selected (all rows share one block c); RC: SEL's row length
    HALF: tl.constexpr = HEAD_DIM // 2

    offs_m = a0 + tl.arange(0, BLOCK_M)
    q_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    q_rows = b.to(tl.int64) * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
    k_base_w = KW + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    k_base_b = KB + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1. the window
    qw = tl.load(QW + q_rows + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    lo = (tl.maximum(a0 - W + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(a0 + BLOCK_M, N)
    for start in range(lo, hi, BLOCK_N):
        kt, vt, allowed = _window_tile(k_base_w, v_base, start, hi, offs_m, offs_d, d_ok, stride_kn, stride_vn, W,
                                       BLOCK_N)
        s = tl.dot(qw, tl.trans(kt), input_precision=PRECISION) * scale_log2
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vt, PRECISION)

    # the rows' selected blocks [BM, BLOCK_R] (padding: BIG), and the content query halves
    sel = _row_selections(SEL, bh, offs_m, q_ok, N, R, RC, BLOCK_R)
    qm = q_ok[:, None] & h_ok[None, :]
    q1 = tl.load(QC + q_rows + offs_h[None, :], mask=qm, other=0.0)
    q2 = tl.load(QC + q_rows + HALF + offs_h[None, :], mask=qm, other=0.0)
    freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0)

    # 2. the sinks outside the window and the selected blocks, at (r + 1) W + S - 1 - s
    if n_sinks > 0:
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_sinks
        if ROPE:
            a_sink = tl.zeros([BLOCK_M], tl.int32) + (r + 1) * W + n_sinks - 1
            qs1, qs2 = _rotated(q1, q2, a_sink, freq)
        else:
            qs1, qs2 = q1, q2
        ks_base = KS + b.to(tl.int64) * stride_sb + (h // GROUP) * stride_sh
        s = _scores(qs1, qs2, ks_base, offs_s, s_ok, stride_sn, offs_h, h_ok, HALF, scale_log2, PRECISION)
        sink_block = offs_s // W
        in_sel = tl.sum((sel[:, :, None] == sink_block[None, None, :]).to(tl.int32), 1) > 0
        allowed = (s_ok[None, :] & (offs_s[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_s[None, :] >= W)
                   & ~in_sel)
        vs = tl.load(v_base + offs_s.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                     mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vs, PRECISION)

    # 3. the union of the tile's selected blocks, each read once
    n_union = tl.load(UCNT + bh.to(tl.int64) * tl.cdiv(N, BLOCK_M) + tile)
    for u in range(0, n_union):
        blk = tl.load(UNI + (bh.to(tl.int64) * tl.cdiv(N, BLOCK_M) + tile) * U + u)
        has, angle = _block_rank(sel, blk, r, W)
        if ROPE:
            qb1, qb2 = _rotated(q1, q2, angle, freq)
        else:
            qb1, qb2 = q1, q2
        for j0 in range(0, W, BLOCK_N):
            offs_k = blk * W + j0 + tl.arange(0, BLOCK_N)
            k_ok = offs_k < (blk + 1) * W
            s = _scores(qb1, qb2, k_base_b, offs_k, k_ok, stride_kn, offs_h, h_ok, HALF, scale_log2, PRECISION)
            allowed = has[:, None] & k_ok[None, :] & (offs_m[:, None] - offs_k[None, :] >= W)
            vt = tl.load(v_base + offs_k.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vt, PRECISION)

    l_i = tl.where(q_ok, l_i, 1.0)
    tl.store(Lse + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=q_ok)
    out_ptrs = (Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on
                + offs_d[None, :])
    tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _select_dq_kernel(
    QW, KW, QC, KB, KS, V, DO, Lse, Delta, SEL, UNI, UCNT, FREQ, DQW, DQC,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_sb, stride_sn, stride_sh,
    stride_vb, stride_vn, stride_vh,
    N, H, BH, R, RC, U, n_sinks, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of the window (into DQW) and of the selected blocks and sinks (into DQC, rotated
    back by each row's angle), query-major as the forward: dS = P (dP - delta)."""
    pid = tl.program_id(0)
    bh = pid % BH
    tile = pid // BH
    b = bh // H
    h = bh % H
    a0 = tile * BLOCK_M
    r = tl.minimum(a0 // W, R)
    HALF: tl.constexpr = HEAD_DIM // 2

    offs_m = a0 + tl.arange(0, BLOCK_M)
    q_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    q_rows = b.to(tl.int64) * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
    qd = q_ok[:, None] & d_ok[None, :]
    k_base_w = KW + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    k_base_b = KB + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh
    lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=q_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=q_ok, other=0.0)
    do = tl.load(DO + q_rows + offs_d[None, :], mask=qd, other=0.0)

    # the window
    qw = tl.load(QW + q_rows + offs_d[None, :], mask=qd, other=0.0)
    dqw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = (tl.maximum(a0 - W + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(a0 + BLOCK_M, N)
    for start in range(lo, hi, BLOCK_N):
        kt, vt, allowed = _window_tile(k_base_w, v_base, start, hi, offs_m, offs_d, d_ok, stride_kn, stride_vn, W,
                                       BLOCK_N)
        s = tl.dot(qw, tl.trans(kt), input_precision=PRECISION) * scale_log2
        p = tl.where(allowed & q_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dqw += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    tl.store(DQW + q_rows + offs_d[None, :], (dqw * scale).to(DQW.dtype.element_ty), mask=qd)

    sel = _row_selections(SEL, bh, offs_m, q_ok, N, R, RC, BLOCK_R)
    q1, q2 = _halves(QC + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, q_ok, stride_qn, offs_h, h_ok, HALF)
    freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)

    # the sinks
    if n_sinks > 0:
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_sinks
        a_sink = tl.zeros([BLOCK_M], tl.int32) + (r + 1) * W + n_sinks - 1
        if ROPE:
            qs1, qs2 = _rotated(q1, q2, a_sink, freq)
        else:
            qs1, qs2 = q1, q2
        ks_base = KS + b.to(tl.int64) * stride_sb + (h // GROUP) * stride_sh
        ks1, ks2 = _halves(ks_base, offs_s, s_ok, stride_sn, offs_h, h_ok, HALF)
        s = (tl.dot(qs1, tl.trans(ks1), input_precision=PRECISION)
             + tl.dot(qs2, tl.trans(ks2), input_precision=PRECISION)) * scale_log2
        in_sel = tl.sum((sel[:, :, None] == (offs_s // W)[None, None, :]).to(tl.int32), 1) > 0
        allowed = (s_ok[None, :] & (offs_s[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_s[None, :] >= W)
                   & ~in_sel & q_ok[:, None])
        p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        vs = tl.load(v_base + offs_s.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                     mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        ds = p * (tl.dot(do, tl.trans(vs), input_precision=PRECISION) - delta[:, None])
        t1 = tl.dot(ds.to(ks1.dtype), ks1, input_precision=PRECISION)
        t2 = tl.dot(ds.to(ks1.dtype), ks2, input_precision=PRECISION)
        if ROPE:
            t1, t2 = _rotated(t1, t2, -a_sink, freq)
        dq1 += t1
        dq2 += t2

    # the selected blocks
    n_union = tl.load(UCNT + bh.to(tl.int64) * tl.cdiv(N, BLOCK_M) + tile)
    for u in range(0, n_union):
        blk = tl.load(UNI + (bh.to(tl.int64) * tl.cdiv(N, BLOCK_M) + tile) * U + u)
        has, angle = _block_rank(sel, blk, r, W)
        if ROPE:
            qb1, qb2 = _rotated(q1, q2, angle, freq)
        else:
            qb1, qb2 = q1, q2
        t1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        t2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        for j0 in range(0, W, BLOCK_N):
            offs_k = blk * W + j0 + tl.arange(0, BLOCK_N)
            k_ok = offs_k < (blk + 1) * W
            kb1, kb2 = _halves(k_base_b, offs_k, k_ok, stride_kn, offs_h, h_ok, HALF)
            s = (tl.dot(qb1, tl.trans(kb1), input_precision=PRECISION)
                 + tl.dot(qb2, tl.trans(kb2), input_precision=PRECISION)) * scale_log2
            allowed = has[:, None] & k_ok[None, :] & (offs_m[:, None] - offs_k[None, :] >= W) & q_ok[:, None]
            p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
            vt = tl.load(v_base + offs_k.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            ds = (p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])).to(kb1.dtype)
            t1 += tl.dot(ds, kb1, input_precision=PRECISION)
            t2 += tl.dot(ds, kb2, input_precision=PRECISION)
        if ROPE:
            t1, t2 = _rotated(t1, t2, -angle, freq)
        dq1 += t1
        dq2 += t2
    dq_rows = DQC + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
    qh = q_ok[:, None] & h_ok[None, :]
    tl.store(dq_rows + offs_h[None, :], (dq1 * scale).to(DQC.dtype.element_ty), mask=qh)
    tl.store(dq_rows + HALF + offs_h[None, :], (dq2 * scale).to(DQC.dtype.element_ty), mask=qh)


@triton.jit
def _select_dkdv_kernel(
    QW, KW, QC, KB, V, DO, Lse, Delta, SEL, TILES, OFFS, FREQ, DKW, DKB, DV,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    N, H, BH, R, RC, n_blocks, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr, W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Key-major: for BLOCK_N keys (of one block) and one query head, dk of the window
    (DKW), dk of the selected pass (DKB) and dv, per query head (the caller sums over the
    heads of a group). The queries that selected this block come from a list built
    beforehand (TILES[OFFS[bh, blk] : OFFS[bh, blk + 1]]: their tiles). No sinks here."""
    pid = tl.program_id(0)
    bh = pid % BH
    k0 = (pid // BH) * BLOCK_N
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_k = k0 + tl.arange(0, BLOCK_N)
    k_ok = offs_k < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    kd = k_ok[:, None] & d_ok[None, :]
    k_rows = b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh + offs_k.to(tl.int64)[:, None] * stride_kn
    kw = tl.load(KW + k_rows + offs_d[None, :], mask=kd, other=0.0)
    vt = tl.load(V + b.to(tl.int64) * stride_vb + (h // V_GROUP) * stride_vh + offs_k.to(tl.int64)[:, None] * stride_vn
                 + offs_d[None, :], mask=kd, other=0.0)
    q_head = b.to(tl.int64) * stride_qb + h * stride_qh
    dkw = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # the window: queries p with 0 <= p - j < W
    hi = tl.minimum(N, k0 + BLOCK_N + W - 1)
    for start in range((k0 // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qd = m_ok[:, None] & d_ok[None, :]
        rows = q_head + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
        qw = tl.load(QW + rows, mask=qd, other=0.0)
        do = tl.load(DO + rows, mask=qd, other=0.0)
        lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(kw, tl.trans(qw), input_precision=PRECISION) * scale_log2  # [BN, BM]
        dist = offs_m[None, :] - offs_k[:, None]
        allowed = (dist >= 0) & (dist < W) & m_ok[None, :] & k_ok[:, None]
        pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dst = pt * (tl.dot(vt, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dkw += tl.dot(dst.to(qw.dtype), qw, input_precision=PRECISION)
    tl.store(DKW + q_head + offs_k.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
             (dkw * scale).to(DKW.dtype.element_ty), mask=kd)

    # the selected pass: the query tiles that selected this key block
    blk = k0 // W
    dk1 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    if blk < n_blocks:
        kb1, kb2 = _halves(KB + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh, offs_k, k_ok, stride_kn,
                           offs_h, h_ok, HALF)
        freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0)
        e0 = tl.load(OFFS + bh.to(tl.int64) * n_blocks + blk)
        e1 = tl.load(OFFS + bh.to(tl.int64) * n_blocks + blk + 1)
        for e in range(e0, e1):
            a0 = tl.load(TILES + e) * BLOCK_M
            r = tl.minimum(a0 // W, R)
            offs_m = a0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N
            has, angle = _block_rank(_row_selections(SEL, bh, offs_m, m_ok, N, R, RC, BLOCK_R), blk, r, W)
            q1, q2 = _halves(QC + q_head, offs_m, m_ok, stride_qn, offs_h, h_ok, HALF)
            if ROPE:
                q1, q2 = _rotated(q1, q2, angle, freq)
            rows = q_head + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
            do = tl.load(DO + rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
            st = (tl.dot(kb1, tl.trans(q1), input_precision=PRECISION)
                  + tl.dot(kb2, tl.trans(q2), input_precision=PRECISION)) * scale_log2
            allowed = has[None, :] & m_ok[None, :] & k_ok[:, None] & (offs_m[None, :] - offs_k[:, None] >= W)
            pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dst = (pt * (tl.dot(vt, tl.trans(do), input_precision=PRECISION) - delta[None, :])).to(q1.dtype)
            dk1 += tl.dot(dst, q1, input_precision=PRECISION)
            dk2 += tl.dot(dst, q2, input_precision=PRECISION)
    dk_rows = DKB + q_head + offs_k.to(tl.int64)[:, None] * stride_qn
    kh = k_ok[:, None] & h_ok[None, :]
    tl.store(dk_rows + offs_h[None, :], (dk1 * scale).to(DKB.dtype.element_ty), mask=kh)
    tl.store(dk_rows + HALF + offs_h[None, :], (dk2 * scale).to(DKB.dtype.element_ty), mask=kh)
    tl.store(DV + q_head + offs_k.to(tl.int64)[:, None] * stride_qn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd)


def tile_unions(blocks: torch.Tensor, n_blocks: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks selected by any row of each tile of ``block_m`` queries: ``blocks``
    ``[B, H, N, R]`` (rows' selections, padding >= n_blocks) -> the unions ``[B, H, T, U]``
    in increasing order (padding BIG) and their sizes ``[B, H, T]`` (T = ceil(N / block_m))."""
    B, H, N, R = blocks.shape
    T = triton.cdiv(N, block_m)
    x = torch.full((B, H, T * block_m, R), BIG, dtype=torch.int64, device=blocks.device)
    x[:, :, :N] = torch.where(blocks < n_blocks, blocks, BIG)
    x = torch.sort(x.reshape(B, H, T, block_m * R), dim=-1).values
    repeat = torch.zeros_like(x, dtype=torch.bool)
    repeat[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.sort(torch.where(repeat, BIG, x), dim=-1).values
    count = (x < BIG).sum(-1)
    width = max(1, int(count.max()))
    return x[..., :width].to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def _selections(step, q_content, k_content, scale, block_m):
    """Which blocks each query selects (the reference's ranking, over chunks of queries),
    for the kernels: the rows' selections [B, H, N, max(R, 1)] (padding BIG), the tiles'
    unions and their sizes, and R = min(topk, N // block)."""
    from ..reference import block_means, select_blocks

    B, N, H, D = q_content.shape
    Hkv = k_content.shape[2]
    W = step.block
    n_blocks = N // W
    R = min(step.topk, n_blocks)
    qc = q_content.reshape(B, N, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)
    means = block_means(k_content.permute(0, 2, 1, 3)[:, :, None], W)  # [B, Hkv, n_blocks, D]
    chunks = []
    for start in range(0, N, 16384):
        p = torch.arange(start, min(start + 16384, N), device=q_content.device)
        chunks.append(select_blocks(qc[..., start:start + len(p), :], means, p, W, step.topk, scale)[0])
    blocks = torch.cat(chunks, dim=-2).reshape(B, H, N, R)
    union, count = tile_unions(blocks, n_blocks, block_m)
    sel = torch.full((B, H, N, max(R, 1)), BIG, dtype=torch.int32, device=q_content.device)
    sel[..., :R] = torch.where(blocks < n_blocks, blocks, BIG)
    return sel, union, count, R


def _block_tiles(union, count, n_blocks):
    """For the key-major backward: for each (batch x head, block), the query tiles whose
    union holds the block: ``tiles`` grouped by (batch x head, block), ``offsets`` into it
    ``[B H n_blocks + 1]``."""
    B, H, T, U = union.shape
    device = union.device
    valid = torch.arange(U, device=device) < count[..., None].long()
    bh = torch.arange(B * H, device=device).reshape(B, H, 1, 1).expand(B, H, T, U)
    tile = torch.arange(T, device=device).reshape(1, 1, T, 1).expand(B, H, T, U)
    keys = (bh * n_blocks + union.long())[valid]
    order = torch.sort(keys, stable=True).indices
    tiles = tile[valid][order].to(torch.int32).contiguous()
    offsets = torch.zeros(B * H * n_blocks + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(keys, minlength=B * H * n_blocks), 0)
    return (tiles if tiles.numel() else torch.zeros(1, dtype=torch.int32, device=device)), offsets


def _meta(q, W, block_m, block_n, R, rope):
    D = q.shape[-1]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dict(W=W, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_H=max(16, triton.next_power_of_2(D // 2)), BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_R=max(2, triton.next_power_of_2(max(R, 1))), ROPE=rope,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=4, num_stages=1 if interpreting else 2)


class _SelectedPass(torch.autograd.Function):
    """The selected pass on the Triton kernels, with its backward: the window's q and k, the
    content q, the keys rotated in their block, the sink keys and the values get gradients
    (the ranking is discrete and gets none)."""

    @staticmethod
    def forward(ctx, q_window, k_window, q_content, k_block, k_sink, values, sel, union, count, freq, info):
        B, N, H, D = q_content.shape
        out = torch.empty(B, N, H, D, device=q_content.device, dtype=q_content.dtype)
        lse = torch.empty(B * H, N, device=q_content.device, dtype=torch.float32)
        meta = _meta(q_content, info["W"], info["block_m"], info["block_n"], info["R"], info["rope"])
        grid = (triton.cdiv(N, info["block_m"]) * B * H,)
        _select_fwd_kernel[grid](
            q_window, k_window, q_content, k_block, k_sink, values, sel, union, count, freq, out, lse,
            *q_content.stride()[:3], *k_block.stride()[:3], *k_sink.stride()[:3], *values.stride()[:3],
            *out.stride()[:3],
            N, H, B * H, info["R"], sel.shape[-1], union.shape[-1], info["n_sinks"], info["scale"] * LOG2E,
            GROUP=H // k_block.shape[2], V_GROUP=H // values.shape[2],
            BLOCK_S=max(16, triton.next_power_of_2(max(info["n_sinks"], 1))), **meta,
        )
        ctx.save_for_backward(q_window, k_window, q_content, k_block, k_sink, values, out, lse, sel, union, count,
                              freq)
        ctx.info = info
        return out

    @staticmethod
    def backward(ctx, dout):
        q_window, k_window, q_content, k_block, k_sink, values, out, lse, sel, union, count, freq = ctx.saved_tensors
        info = ctx.info
        B, N, H, D = q_content.shape
        Hkv, Hv, W, R, S = k_block.shape[2], values.shape[2], info["W"], info["R"], info["n_sinks"]
        G = H // Hkv
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).permute(0, 2, 1).reshape(B * H, N).contiguous()
        meta = _meta(q_content, W, info["block_m"], info["block_n"], R, info["rope"])
        scale = info["scale"]
        dqw, dqc = torch.empty_like(q_window), torch.empty_like(q_content)
        _select_dq_kernel[(triton.cdiv(N, info["block_m"]) * B * H,)](
            q_window, k_window, q_content, k_block, k_sink, values, dout, lse, delta, sel, union, count, freq,
            dqw, dqc,
            *q_content.stride()[:3], *k_block.stride()[:3], *k_sink.stride()[:3], *values.stride()[:3],
            N, H, B * H, R, sel.shape[-1], union.shape[-1], S, scale * LOG2E, scale,
            GROUP=G, V_GROUP=H // Hv, BLOCK_S=max(16, triton.next_power_of_2(max(S, 1))), **meta,
        )
        n_blocks = N // W
        tiles, offsets = _block_tiles(union, count, n_blocks)
        per_head = torch.empty(3, B, N, H, D, device=q_content.device, dtype=torch.float32)
        _select_dkdv_kernel[(triton.cdiv(N, info["block_n"]) * B * H,)](
            q_window, k_window, q_content, k_block, values, dout, lse, delta, sel, tiles, offsets, freq,
            per_head[0], per_head[1], per_head[2],
            *q_content.stride()[:3], *k_block.stride()[:3], *values.stride()[:3],
            N, H, B * H, R, sel.shape[-1], n_blocks, scale * LOG2E, scale,
            GROUP=G, V_GROUP=H // Hv, **meta,
        )
        dkw, dkb, dv = per_head.unbind(0)
        dks = None
        if S:  # the sinks' keys and values, in PyTorch: S keys read by every query
            dks, dv_sink = _sink_grads(q_content, k_sink, values, dout, lse, delta, sel, freq, info)
            dv[:, :S] += dv_sink
        dkw, dkb = (x.reshape(B, N, Hkv, G, D).sum(3).to(k_block.dtype) for x in (dkw, dkb))
        dv = (dv.reshape(B, N, Hv, H // Hv, D).sum(3)).to(values.dtype)
        return dqw, dkw, dqc, dkb, dks, dv, None, None, None, None, None


def _sink_grads(q_content, k_sink, values, dout, lse, delta, sel, freq, info):
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
        qs = rotate(qs, angle, freq)
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
    block_m = block_m or min(64, W)
    block_n = block_n or min(64, W)
    if W % block_m or W % block_n:
        raise ValueError(f"the Triton selected pass needs tiles that divide the block ({W}); use a block that is a "
                         "multiple of 16, or the reference backend")
    with torch.no_grad():
        sel, union, count, R = _selections(step, q_content, k_content, scale, block_m)
    n_sinks = min(sinks, N)
    freq = (inv_freq.to(device=q_content.device, dtype=torch.float32) if inv_freq is not None
            else torch.zeros(D // 2, device=q_content.device))
    if not n_sinks:
        k_sink = k_block[:, :1].detach()
    info = dict(W=W, R=R, n_sinks=n_sinks, scale=scale, block_m=block_m, block_n=block_n, rope=inv_freq is not None)
    operands = [x.contiguous() for x in (q_window, k_window, q_content, k_block, k_sink, values)]
    return _SelectedPass.apply(*operands, sel, union, count, freq, info)


def selected_pass(step, q, k, values, *, sinks, scale, positions=None, block_m=None, block_n=None):
    """The selected pass alone on the Triton kernels: q [B, N, H, D], k
    [B, N, Hkv, D] as :func:`tensorized_attention.tensorized_attn` takes them (with
    ``positions``, a :class:`~tensorized_attention.rope.TensorPositions`), values
    [B, N, Hv, D]. Prepares the kernel's operands (one rotated copy of q and two of k)."""
    from ...rope import rotate

    N = q.shape[1]
    n_sinks = min(sinks, N)
    if positions is None:
        return selected_pass_triton(step, q, k, q, k, k, k[:, :n_sinks], values, sinks=sinks, scale=scale,
                                    block_m=block_m, block_n=block_n)
    pos = torch.arange(N, device=q.device)

    def rot(x, at, **kw):  # [B, N, Hx, D] rotated at positions `at` [N]
        return rotate(x.transpose(1, 2), at, positions.inv_freq, **kw).transpose(1, 2).contiguous()

    if positions.rotated:  # a Hugging Face layer's q and k: rotated at 0 .. N-1 and scaled, the window's own
        q_content, k_content, rope_scale = rot(q, pos, inverse=True), rot(k, pos, inverse=True), 1.0
        q_window, k_window = q, k
    else:
        q_content, k_content, rope_scale = q, k, positions.attention_scaling
        q_window, k_window = rot(q_content, pos, scale=rope_scale), rot(k_content, pos, scale=rope_scale)
    k_block = rot(k_content, pos % step.block, scale=rope_scale)
    k_sink = rot(k_content[:, :n_sinks], pos[:n_sinks], scale=rope_scale)
    q_content = (q_content.to(torch.float32) * rope_scale).to(q.dtype).contiguous()
    return selected_pass_triton(step, q_window, k_window, q_content, k_content.contiguous(), k_block, k_sink,
                                values, sinks=sinks, scale=scale, inv_freq=positions.inv_freq,
                                block_m=block_m, block_n=block_n)
