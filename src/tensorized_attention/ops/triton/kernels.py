"""Triton kernels of one tensorized-attention pass: forward, and backward (dq; dk, dv).

Supports: both modes (block, complete), causal and bidirectional, any pass order,
grouped-query attention (kv heads read in place), padding (positions >= seqlen are
masked, never copied), a per-head gate applied in the epilogue, attention sinks,
float16 / bfloat16 / float32, head dims up to 256 (padded to a power of two in
registers); with rotary tensor positions, the caller's rotated q and k of each pass and
the sinks' own queries and keys; and a pass split into two launches over two ranges of
keys, the second folding its keys into the first's output (a rank of the sequence-parallel
operator, whose earlier keys arrive from another rank meanwhile). Tested under
TRITON_INTERPRET=1 on the CPU and on Hopper GPUs (see docs/benchmarks.md).

How a pass is tiled. A pass along a fold dimension of size ``n`` and stride ``s``
splits positions ``p = a * s + r`` by residue ``r = p mod s``: for one residue the
positions ``a = 0, 1, ..., A - 1`` (``A = prod(shape) / s``) form a 1-D sequence, and

* ``block``: ``a`` reads ``a'`` iff ``a // n == a' // n`` (and ``a' <= a`` when causal);
* ``complete``: ``a`` reads ``a'`` iff ``0 <= a - a' < n`` (a causal sliding window).

A program owns ``BLOCK_M`` consecutive ``a`` of one residue and one query head, and
visits only the key tiles its rows can read: about ``n + BLOCK_M`` keys for
``complete``, the fiber for ``block``. Rows are read where they lie in the
``[batch, seqlen, heads, headdim]`` tensors (one ``headdim`` vector per row), so no
pass transposes or copies q, k or the values.

Sinks (positions ``0 .. S-1``) are one extra key tile (after the key tiles in the forward,
before them in the dq kernel: each the faster order measured), masked to the
queries whose pass mask does not already hold them. With rotary tensor positions the
caller gives the sinks their own queries and keys (``SQ``, ``SK``): a sink sits at a fixed
distance from every query, which no single rotation of q and k can express.

Softmax statistics are kept in base 2: ``lse2 = log2(sum(exp2(scores * scale * log2 e)))``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _pass_mask(offs_a, offs_k, n, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr):
    """[BM, BN] bool: query slot a (rows) reads key slot a' (columns), same residue."""
    d = offs_a[:, None] - offs_k[None, :]
    if COMPLETE:
        mask = (d >= 0) & (d < n)
    else:
        mask = (offs_a[:, None] // n) == (offs_k[None, :] // n)
        if CAUSAL:
            mask = mask & (d >= 0)
    return mask


@triton.jit
def _sink_mask(offs_a, pos_q, r, offs_s, n_sinks, n, s, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr):
    """[BM, BS] bool: query reads sink position i as a sink (not already in its pass mask)."""
    a_s = offs_s // s
    same_r = (offs_s % s) == r
    in_pass = same_r[None, :] & _pass_mask(offs_a, a_s, n, COMPLETE, CAUSAL)
    mask = (offs_s[None, :] < n_sinks) & (~in_pass)
    if CAUSAL:
        mask = mask & (offs_s[None, :] <= pos_q[:, None])
    return mask


@triton.jit
def _sink_tile(q, SQ, SK, v_base, b, h, hk, offs_a, pos_q, q_ok, r, offs_d, d_ok, n_sinks, n, s, scale_log2,
               stride_sqb, stride_sqn, stride_sqh, stride_skb, stride_skn, stride_skh, stride_vn,
               BLOCK_S: tl.constexpr, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr, SINK_Q: tl.constexpr,
               PRECISION: tl.constexpr):
    """The sink tile of a query tile: (scores [BM, BS] in base 2, which of them are read,
    the sink keys, the sink values). Scored with the queries SQ when SINK_Q, else q."""
    offs_s = tl.arange(0, BLOCK_S)
    sm = (offs_s < n_sinks)[:, None] & d_ok[None, :]
    rows_s = offs_s.to(tl.int64)[:, None]
    ks = tl.load(SK + b.to(tl.int64) * stride_skb + hk * stride_skh + rows_s * stride_skn + offs_d[None, :],
                 mask=sm, other=0.0)
    vs = tl.load(v_base + rows_s * stride_vn + offs_d[None, :], mask=sm, other=0.0)
    if SINK_Q:
        qs = tl.load(SQ + b.to(tl.int64) * stride_sqb + h * stride_sqh + pos_q.to(tl.int64)[:, None] * stride_sqn
                     + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        qs = q
    scores = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_log2
    allowed = _sink_mask(offs_a, pos_q, r, offs_s, n_sinks, n, s, COMPLETE, CAUSAL) & q_ok[:, None]
    return scores, allowed, ks, vs


@triton.jit
def _key_range(a0, n, A, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr):
    """Key slots [lo, hi) that rows a0 .. a0 + BLOCK_M - 1 may read; lo aligned to BLOCK_N."""
    if COMPLETE:
        lo = tl.maximum(a0 - n + 1, 0)
        hi = tl.minimum(a0 + BLOCK_M, A)
    else:
        lo = (a0 // n) * n
        if CAUSAL:
            hi = tl.minimum(a0 + BLOCK_M, A)
        else:
            hi = tl.minimum(((a0 + BLOCK_M - 1) // n + 1) * n, A)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(k0, n, A, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr):
    """Query slots [lo, hi) that may read key slots k0 .. k0 + BLOCK_N - 1; lo aligned to BLOCK_M."""
    if COMPLETE:
        lo = k0
        hi = tl.minimum(k0 + BLOCK_N + n - 1, A)
    else:
        if CAUSAL:
            lo = k0
        else:
            lo = (k0 // n) * n
        hi = tl.minimum(((k0 + BLOCK_N - 1) // n + 1) * n, A)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def _tile_and_residue(tile, A, s, BLOCK: tl.constexpr, RESIDUE_MAJOR: tl.constexpr):
    """The tile index (0 .. cdiv(A, BLOCK) - 1) and the residue of launch slot ``tile``.
    RESIDUE_MAJOR: the tiles of one residue are launched one after another, so the keys and
    values they share (a fiber of a strided pass) are read once from memory and then from
    the L2 cache; else the residues of one tile index are."""
    if RESIDUE_MAJOR:
        T = tl.cdiv(A, BLOCK)
        return tile % T, tile // T
    return tile // s, tile % s


@triton.jit
def _query_program(BH, H, A, s, BLOCK_M: tl.constexpr, RESIDUE_MAJOR: tl.constexpr):
    """What a query-major program owns: BLOCK_M consecutive slots from a0 of residue r, for
    one (batch b, query head h) = bh. The heads vary fastest, so that programs sharing a kv
    head run side by side; the last slots, which read the most keys, are launched first."""
    pid = tl.program_id(0)
    bh = pid % BH
    i, r = _tile_and_residue(pid // BH, A, s, BLOCK_M, RESIDUE_MAJOR)
    a0 = (tl.cdiv(A, BLOCK_M) - 1 - i) * BLOCK_M
    return bh, bh // H, bh % H, a0, r


@triton.jit
def _fwd_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, offs_a, offs_d, d_ok, r,
              k_start, k_end, n, s, stride_kn, stride_vn, scale_log2,
              BLOCK_N: tl.constexpr, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr, KEY_RANGE: tl.constexpr,
              PRECISION: tl.constexpr):
    """One key tile of the online softmax (key slots start .. start + BLOCK_N - 1, residue r;
    keys at positions k_start .. k_end - 1 only when KEY_RANGE, else below k_end)."""
    offs_k = start + tl.arange(0, BLOCK_N)
    pos_k = offs_k * s + r
    if KEY_RANGE:
        k_ok = (offs_k < hi) & (pos_k < k_end) & (pos_k >= k_start)
    else:
        k_ok = (offs_k < hi) & (pos_k < k_end) & (offs_k >= 0)
    kt = tl.load(k_base + pos_k.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                 mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    vt = tl.load(v_base + pos_k.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                 mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    scores = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale_log2
    allowed = _pass_mask(offs_a, offs_k, n, COMPLETE, CAUSAL) & k_ok[None, :]
    return _online_softmax(acc, m_i, l_i, tl.where(allowed, scores, float("-inf")), vt, PRECISION)


@triton.jit
def _online_softmax(acc, m_i, l_i, scores, vt, PRECISION: tl.constexpr):
    """Fold one tile of (masked, base-2) scores and its values into the running max m_i,
    sum l_i and output acc. The scores are taken in float32 whatever the scale's type (a
    compiled graph may hand the kernel a float64 scale), so the loop's state keeps its type."""
    scores = scores.to(tl.float32)
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # a row with nothing allowed yet keeps m = -inf: exponentiate against 0 instead
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["K_START"])  # a runtime int even when 1 (converted to int64 below)
def _fwd_kernel(
    Q, K, V, Out, Attn, Lse, Gate, SQ, SK,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_sqb, stride_sqn, stride_sqh,
    stride_skb, stride_skn, stride_skh,
    stride_gh, gate_col,
    N, Q0, K_START, K_END, H, BH, A, n, s, n_sinks, scale_log2,
    GROUP: tl.constexpr,  # query heads per kv head
    V_GROUP: tl.constexpr,  # query heads per value head: GROUP for the first pass, 1 after
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    COMPLETE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_SINKS: tl.constexpr, SINK_Q: tl.constexpr, STORE_ATTN: tl.constexpr,
    KEY_RANGE: tl.constexpr, PRIOR: tl.constexpr, PRECISION: tl.constexpr, RESIDUE_MAJOR: tl.constexpr,
):
    """One pass. The sinks are scored with the queries SQ when SINK_Q (else Q) against the
    keys SK (rows 0 .. n_sinks - 1; SK is K itself unless the caller gives other sink keys).
    Only positions Q0 .. N - 1 are queries: Q, Out, Attn and Lse hold their rows (row
    p - Q0). With KEY_RANGE only positions K_START .. K_END - 1 are keys: K and V hold
    their rows (row p - K_START); else every position is (K_START = 0, K_END = N).

    PRIOR: Out and Lse already hold each query's attention over other keys (the keys of a
    split pass read by an earlier launch), and this launch folds its keys into them in
    place; a query tile that reads none of its keys is left as it is. KEY_RANGE and PRIOR
    take no gate and no sinks."""
    bh, b, h, a0, r = _query_program(BH, H, A, s, BLOCK_M, RESIDUE_MAJOR)
    if a0 * s + r >= N or (a0 + BLOCK_M - 1) * s + r < Q0:
        return
    if KEY_RANGE:
        lo, hi = _key_range(a0, n, A, BLOCK_M, BLOCK_N, COMPLETE, CAUSAL)
        lo = tl.maximum(lo, ((K_START - r + s - 1) // s // BLOCK_N) * BLOCK_N)  # the first slot at or after K_START
        hi = tl.minimum(hi, (K_END - r + s - 1) // s)  # the first slot at or after K_END
        if PRIOR:
            if lo >= hi:
                return
    hk = h // GROUP
    hv = h // V_GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hv * stride_vh
    if KEY_RANGE:
        k_base -= K_START.to(tl.int64) * stride_kn
        v_base -= K_START.to(tl.int64) * stride_vn

    offs_a = a0 + tl.arange(0, BLOCK_M)
    pos_q = offs_a * s + r
    q_ok = (pos_q < N) & (pos_q >= Q0)
    row_q = pos_q - Q0
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + row_q.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    if PRIOR:  # the earlier launch's normalized output and base-2 log-sum-exp: m = lse, l = 1
        m_i = tl.load(Lse + bh.to(tl.int64) * (N - Q0) + row_q, mask=q_ok, other=float("-inf"))
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.load(Out + b.to(tl.int64) * stride_ob + h * stride_oh + row_q.to(tl.int64)[:, None] * stride_on
                      + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if not KEY_RANGE:
        lo, hi = _key_range(a0, n, A, BLOCK_M, BLOCK_N, COMPLETE, CAUSAL)
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, k_base, v_base, start, hi, offs_a, offs_d, d_ok, r,
                                  K_START, K_END, n, s, stride_kn, stride_vn, scale_log2, BLOCK_N, COMPLETE, CAUSAL,
                                  KEY_RANGE, PRECISION)

    # the sinks last: with their own queries (SINK_Q), q is no longer live when those are loaded
    if HAS_SINKS:
        scores, allowed, ks, vs = _sink_tile(q, SQ, SK, v_base, b, h, hk, offs_a, pos_q, q_ok, r, offs_d, d_ok,
                                             n_sinks, n, s, scale_log2, stride_sqb, stride_sqn, stride_sqh,
                                             stride_skb, stride_skn, stride_skh, stride_vn,
                                             BLOCK_S, COMPLETE, CAUSAL, SINK_Q, PRECISION)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, scores, float("-inf")), vs, PRECISION)

    # rows past seqlen read nothing (l = 0): give them 1 so nothing divides by zero
    l_i = tl.where(q_ok, l_i, 1.0)
    attn = acc / l_i[:, None]
    tl.store(Lse + bh.to(tl.int64) * (N - Q0) + row_q, m_i + tl.math.log2(l_i), mask=q_ok)
    out_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + row_q.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    io_mask = q_ok[:, None] & d_ok[None, :]
    if HAS_GATE:
        g = tl.load(Gate + h * stride_gh + gate_col).to(tl.float32)
        v_in = tl.load(v_base + pos_q.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=io_mask, other=0.0)
        res = g * v_in.to(tl.float32) + (1.0 - g) * attn
        if STORE_ATTN:
            tl.store(Attn + b.to(tl.int64) * stride_ob + h * stride_oh + row_q.to(tl.int64)[:, None] * stride_on
                     + offs_d[None, :], attn.to(Attn.dtype.element_ty), mask=io_mask)
    else:
        res = attn
    tl.store(out_ptrs, res.to(Out.dtype.element_ty), mask=io_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, start, hi, offs_a, offs_d, d_ok, q_ok, r,
             N, n, s, stride_kn, stride_vn, scale_log2,
             BLOCK_N: tl.constexpr, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS k over one key tile."""
    offs_k = start + tl.arange(0, BLOCK_N)
    pos_k = offs_k * s + r
    k_ok = (offs_k < hi) & (pos_k < N) & (offs_k >= 0)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kt = tl.load(k_base + pos_k.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    vt = tl.load(v_base + pos_k.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale_log2
    allowed = _pass_mask(offs_a, offs_k, n, COMPLETE, CAUSAL) & k_ok[None, :] & q_ok[:, None]
    p = tl.where(allowed, tl.math.exp2(scores - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, kt, vt, q_base, o_base, Lse, Delta, bh, gh, start, hi, offs_k, k_ok, offs_d, d_ok, r,
               N, Q0, n, s, stride_qn, stride_on, scale_log2,
               BLOCK_M: tl.constexpr, COMPLETE: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
               PRECISION: tl.constexpr):
    """dk += dS^T q and dv += P^T dO over one query tile (queries: positions from Q0)."""
    offs_a = start + tl.arange(0, BLOCK_M)
    pos_q = offs_a * s + r
    q_ok = (offs_a < hi) & (pos_q < N) & (pos_q >= Q0)
    row_q = (pos_q - Q0).to(tl.int64)[:, None]
    qm = q_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + row_q * stride_qn + offs_d[None, :], mask=qm, other=0.0)
    do = tl.load(o_base + row_q * stride_on + offs_d[None, :], mask=qm, other=0.0)
    if HAS_GATE:
        do = ((1.0 - gh) * do.to(tl.float32)).to(q.dtype)
    lse = tl.load(Lse + bh.to(tl.int64) * (N - Q0) + (pos_q - Q0), mask=q_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * (N - Q0) + (pos_q - Q0), mask=q_ok, other=0.0)
    # transposed scores: [BLOCK_N keys, BLOCK_M queries]; lse = inf zeroes padded rows
    st = tl.dot(kt, tl.trans(q), input_precision=PRECISION) * scale_log2
    allowed = tl.trans(_pass_mask(offs_a, offs_k, n, COMPLETE, CAUSAL)) & k_ok[:, None]
    pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Attn, Lse, Delta, DgPart, DQ, Gate, SQ, SK, DQS,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_sqb, stride_sqn, stride_sqh,
    stride_skb, stride_skn, stride_skh,
    stride_gh, gate_col,
    N, Q0, H, BH, A, n, s, n_sinks, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    COMPLETE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_SINKS: tl.constexpr, SINK_Q: tl.constexpr,
    ACCUMULATE: tl.constexpr, ACCUMULATE_SINK_Q: tl.constexpr,
    PRECISION: tl.constexpr, RESIDUE_MAJOR: tl.constexpr,
):
    """Query-major backward of one pass: delta = rowsum(dO * O), the gate's per-row
    gradient, and dq (added to DQ when ACCUMULATE). DOut is the gradient of the pass's
    output V_t; dO = (1 - g) DOut is the gradient of its attention output O = Attn.
    With SINK_Q the sinks were scored with the queries SQ: their share of the gradient goes
    to DQS (added when ACCUMULATE_SINK_Q) instead of DQ.
    DQ, DQS, DOut and Attn share the [batch, seqlen, heads, headdim] strides (stride_o*).
    Queries from position Q0 (as in _fwd_kernel: the query-side tensors hold rows p - Q0)."""
    bh, b, h, a0, r = _query_program(BH, H, A, s, BLOCK_M, RESIDUE_MAJOR)
    if a0 * s + r >= N or (a0 + BLOCK_M - 1) * s + r < Q0:
        return
    hk = h // GROUP
    hv = h // V_GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hv * stride_vh
    o_off = b.to(tl.int64) * stride_ob + h * stride_oh

    offs_a = a0 + tl.arange(0, BLOCK_M)
    pos_q = offs_a * s + r
    q_ok = (pos_q < N) & (pos_q >= Q0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = q_ok[:, None] & d_ok[None, :]
    row_q = (pos_q - Q0).to(tl.int64)[:, None]
    NQ = N - Q0
    q = tl.load(q_base + row_q * stride_qn + offs_d[None, :], mask=io_mask, other=0.0)
    dout = tl.load(DOut + o_off + row_q * stride_on + offs_d[None, :], mask=io_mask, other=0.0).to(tl.float32)
    attn = tl.load(Attn + o_off + row_q * stride_on + offs_d[None, :], mask=io_mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(Gate + h * stride_gh + gate_col).to(tl.float32)
        v_in = tl.load(v_base + pos_q.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=io_mask,
                       other=0.0).to(tl.float32)
        tl.store(DgPart + bh.to(tl.int64) * NQ + (pos_q - Q0), tl.sum(dout * (v_in - attn), 1), mask=q_ok)
        do = (1.0 - g) * dout
    else:
        do = dout
    # delta from dO as the dots will see it (rounded to the input dtype), so that each row's
    # dS = P (dP - delta) sums to zero as it must; the dk/dv and sink kernels round alike
    do = do.to(Q.dtype.element_ty)
    delta = tl.sum(do.to(tl.float32) * attn, 1)
    tl.store(Delta + bh.to(tl.int64) * NQ + (pos_q - Q0), delta, mask=q_ok)
    lse = tl.load(Lse + bh.to(tl.int64) * NQ + (pos_q - Q0), mask=q_ok, other=float("inf"))
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # the sinks first here: measured faster than after the key loop (the forward does the opposite)
    if HAS_SINKS:
        scores, allowed, ks, vs = _sink_tile(q, SQ, SK, v_base, b, h, hk, offs_a, pos_q, q_ok, r, offs_d, d_ok,
                                             n_sinks, n, s, scale_log2, stride_sqb, stride_sqn, stride_sqh,
                                             stride_skb, stride_skn, stride_skh, stride_vn,
                                             BLOCK_S, COMPLETE, CAUSAL, SINK_Q, PRECISION)
        p = tl.where(allowed, tl.math.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vs), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SINK_Q:
            dqs = tl.dot(ds.to(ks.dtype), ks, input_precision=PRECISION) * scale
            dqs_ptrs = DQS + o_off + row_q * stride_on + offs_d[None, :]
            if ACCUMULATE_SINK_Q:
                dqs += tl.load(dqs_ptrs, mask=io_mask, other=0.0).to(tl.float32)
            tl.store(dqs_ptrs, dqs.to(DQS.dtype.element_ty), mask=io_mask)
        else:
            dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PRECISION)

    lo, hi = _key_range(a0, n, A, BLOCK_M, BLOCK_N, COMPLETE, CAUSAL)
    for start in range(lo, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, start, hi, offs_a, offs_d, d_ok, q_ok, r,
                      N, n, s, stride_kn, stride_vn, scale_log2, BLOCK_N, COMPLETE, CAUSAL, PRECISION)

    dq = dq * scale
    dq_ptrs = DQ + o_off + row_q * stride_on + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Gate,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_gh, gate_col,
    N, Q0, H, BHKV, A, n, s, scale_log2, scale,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPLETE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr, RESIDUE_MAJOR: tl.constexpr,
):
    """Key-major backward of one pass: dk (added to DK when ACCUMULATE) and the gradient
    of the pass's input values DV (the gate's direct share included). A program owns
    BLOCK_N key slots of one residue and one (batch, kv head), and visits, for each of the
    GROUP query heads of that kv head, the query tiles that read those keys (sinks read
    outside the pass mask are handled by _bwd_sink_kernel). Queries from position Q0 (as in
    _fwd_kernel); DOut holds their rows, DK and DV every key's."""
    pid = tl.program_id(0)
    bhk = pid % BHKV
    tile = pid // BHKV
    HKV = H // GROUP
    b = bhk // HKV
    hk = bhk % HKV
    i, r = _tile_and_residue(tile, A, s, BLOCK_N, RESIDUE_MAJOR)
    k0 = i * BLOCK_N
    if k0 * s + r >= N:
        return
    offs_k = k0 + tl.arange(0, BLOCK_N)
    pos_k = offs_k * s + r
    k_ok = pos_k < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = k_ok[:, None] & d_ok[None, :]
    row_k = pos_k.to(tl.int64)[:, None]
    kt = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh + row_k * stride_kn + offs_d[None, :],
                 mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _query_range(k0, n, A, BLOCK_M, BLOCK_N, COMPLETE, CAUSAL)
    first = tl.maximum(Q0 - r + s - 1, 0) // s  # the first slot of residue r that is a query
    lo = tl.maximum(lo, (first // BLOCK_M) * BLOCK_M)
    hi = tl.minimum(hi, (N - r + s - 1) // s)  # past the last position of residue r: padding, no query
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        hv = h // V_GROUP
        vt = tl.load(V + b.to(tl.int64) * stride_vb + hv * stride_vh + row_k * stride_vn + offs_d[None, :],
                     mask=kv_mask, other=0.0)
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        o_base = DOut + b.to(tl.int64) * stride_ob + h * stride_oh
        if HAS_GATE:
            gh = tl.load(Gate + h * stride_gh + gate_col).to(tl.float32)
        else:
            gh = 0.0
        for start in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, kt, vt, q_base, o_base, Lse, Delta, bh, gh, start, hi, offs_k, k_ok,
                                offs_d, d_ok, r, N, Q0, n, s, stride_qn, stride_on, scale_log2,
                                BLOCK_M, COMPLETE, CAUSAL, HAS_GATE, PRECISION)
        if HAS_GATE:  # the gate's direct share, at the keys that are queries too
            dv += gh * tl.load(o_base + (row_k - Q0) * stride_on + offs_d[None, :],
                               mask=kv_mask & (pos_k >= Q0)[:, None], other=0.0).to(tl.float32)
        if V_GROUP == 1:
            tl.store(DV + b.to(tl.int64) * stride_dvb + h * stride_dvh + row_k * stride_dvn + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=kv_mask)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if V_GROUP != 1:
        tl.store(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + row_k * stride_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)
    dk = dk * scale
    dk_ptrs = DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + row_k * stride_dkn + offs_d[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_sink_kernel(
    Q, K, V, DOut, Lse, Delta, DKS, DVS, Gate,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_gh, gate_col,
    N, H, BH, n, s, n_sinks, scale_log2, chunk,
    GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    COMPLETE: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Gradients of the sink keys and values for the reads outside the pass mask: one
    program sums over a chunk of consecutive positions of one (batch, query head) and
    writes its partial [BLOCK_S, headdim] sums to DKS / DVS[program] (reduced by the
    caller, in a fixed order, so results are deterministic). Q and K are the queries and
    keys the sinks were scored with (the pass's own, or the sink queries and keys)."""
    pid = tl.program_id(0)
    bh = pid % BH
    c = pid // BH
    b = bh // H
    h = bh % H
    hk = h // GROUP
    hv = h // V_GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_sinks
    sm = s_ok[:, None] & d_ok[None, :]
    ks = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh + offs_s.to(tl.int64)[:, None] * stride_kn
                 + offs_d[None, :], mask=sm, other=0.0)
    vs = tl.load(V + b.to(tl.int64) * stride_vb + hv * stride_vh + offs_s.to(tl.int64)[:, None] * stride_vn
                 + offs_d[None, :], mask=sm, other=0.0)
    if HAS_GATE:
        gh = tl.load(Gate + h * stride_gh + gate_col).to(tl.float32)
    else:
        gh = 0.0
    dks = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dvs = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for start in range(c * chunk, tl.minimum(c * chunk + chunk, N), BLOCK_M):
        pos_q = start + tl.arange(0, BLOCK_M)
        q_ok = pos_q < N
        offs_a = pos_q // s
        r = pos_q % s
        row_q = pos_q.to(tl.int64)[:, None]
        qm = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + row_q * stride_qn + offs_d[None, :],
                    mask=qm, other=0.0)
        do = tl.load(DOut + b.to(tl.int64) * stride_ob + h * stride_oh + row_q * stride_on + offs_d[None, :],
                     mask=qm, other=0.0)
        do = ((1.0 - gh) * do.to(tl.float32)).to(Q.dtype.element_ty)
        lse = tl.load(Lse + bh.to(tl.int64) * N + pos_q, mask=q_ok, other=0.0)
        delta = tl.load(Delta + bh.to(tl.int64) * N + pos_q, mask=q_ok, other=0.0)
        # the sink mask with a per-row residue
        a_s = offs_s // s
        same_r = (offs_s % s)[None, :] == r[:, None]
        in_pass = same_r & _pass_mask(offs_a, a_s, n, COMPLETE, CAUSAL)
        allowed = s_ok[None, :] & (~in_pass) & q_ok[:, None]
        if CAUSAL:
            allowed = allowed & (offs_s[None, :] <= pos_q[:, None])
        scores = tl.dot(q, tl.trans(ks), input_precision=PRECISION) * scale_log2
        p = tl.where(allowed, tl.math.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vs), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dvs += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dks += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out_off = pid.to(tl.int64) * BLOCK_S * BLOCK_D + offs_s[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(DKS + out_off, dks)
    tl.store(DVS + out_off, dvs)
