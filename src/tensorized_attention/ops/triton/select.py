"""Triton forward of the selected pass (passes.SelectedPass, DESIGN.md §8).

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
Forward only: the backward is the next step (the pass trains on the reference backend).
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
def _scores(q1, q2, k_base, pos_k, k_ok, stride_kn, offs_h, h_ok, HALF, scale_log2,
            PRECISION: tl.constexpr):
    """Scores (base 2) of the query halves against keys at pos_k, loaded as two halves."""
    rows = k_base + pos_k.to(tl.int64)[:, None] * stride_kn
    m = k_ok[:, None] & h_ok[None, :]
    k1 = tl.load(rows + offs_h[None, :], mask=m, other=0.0)
    k2 = tl.load(rows + HALF + offs_h[None, :], mask=m, other=0.0)
    s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION) + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
    return s * scale_log2


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
        offs_k = start + tl.arange(0, BLOCK_N)
        k_ok = offs_k < hi
        kv_rows = offs_k.to(tl.int64)[:, None]
        kt = tl.load(k_base_w + kv_rows * stride_kn + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        vt = tl.load(v_base + kv_rows * stride_vn + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qw, tl.trans(kt), input_precision=PRECISION) * scale_log2
        dist = offs_m[:, None] - offs_k[None, :]
        allowed = (dist >= 0) & (dist < W) & k_ok[None, :]
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.where(allowed, s, float("-inf")), vt, PRECISION)

    # the rows' selected blocks [BM, BLOCK_R] (padding: BIG), and the content query halves
    offs_r = tl.arange(0, BLOCK_R)
    sel = tl.load(SEL + bh.to(tl.int64) * N * RC + offs_m.to(tl.int64)[:, None] * RC + offs_r[None, :],
                  mask=q_ok[:, None] & (offs_r[None, :] < R), other=2**30)
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
        has = tl.sum((sel == blk).to(tl.int32), 1) > 0
        rank = tl.sum((sel < blk).to(tl.int32), 1)
        if ROPE:
            qb1, qb2 = _rotated(q1, q2, (r - rank + 1) * W - 1, freq)
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


def selected_pass_triton(step, q_window, k_window, q_content, k_content, k_block, k_sink, values, *, sinks,
                         scale, inv_freq=None, block_m=None, block_n=None):
    """The forward of one selected pass (no autograd). q_window, q_content [B, N, H, D];
    k_window, k_content, k_block [B, N, Hkv, D]; k_sink [B, S, Hkv, D] (S = min(sinks, N));
    values [B, N, Hv, D] (Hv = Hkv or H). q_content and k_content (unrotated) rank the
    blocks. With ``inv_freq`` (rotary positions): q_window and k_window rotated at their
    positions, k_block rotated at each position's offset in its block, k_sink at its
    position; without, q_window = q_content and k_window = k_block = k_content. Returns
    [B, N, H, D]."""
    from ..reference import select_blocks

    B, N, H, D = q_content.shape
    Hkv = k_block.shape[2]
    W = step.block
    if D % 2 or D > 256:
        raise ValueError(f"the Triton selected pass takes an even headdim <= 256, got {D}")
    block_m = block_m or min(64, W)
    block_n = block_n or min(64, W)
    if W % block_m or W % block_n:
        raise ValueError(f"the Triton selected pass needs tiles that divide the block ({W}); use a block that is a "
                         "multiple of 16, or the reference backend")
    n_blocks = N // W
    G = H // Hkv
    # the ranking, in PyTorch (as the reference), over chunks of queries
    qc = q_content.reshape(B, N, Hkv, G, D).permute(0, 2, 3, 1, 4)
    kc = k_content.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, N, D]
    R = min(step.topk, n_blocks)
    chunks = []
    for start in range(0, N, 16384):
        p = torch.arange(start, min(start + 16384, N), device=q_content.device)
        chunks.append(select_blocks(qc[..., start:start + len(p), :], kc, p, W, step.topk, scale)[0])
    blocks = torch.cat(chunks, dim=-2).reshape(B, H, N, R)
    union, count = tile_unions(blocks, n_blocks, block_m)
    # the rows' selections for the kernel: padding BIG, at least one column
    sel = torch.full((B, H, N, max(R, 1)), BIG, dtype=torch.int32, device=q_content.device)
    sel[..., :R] = torch.where(blocks < n_blocks, blocks, BIG)

    out = torch.empty(B, N, H, D, device=q_content.device, dtype=q_content.dtype)
    lse = torch.empty(B * H, N, device=q_content.device, dtype=torch.float32)
    n_sinks = min(sinks, N)
    freq = inv_freq.to(device=q_content.device, dtype=torch.float32) if inv_freq is not None else \
        torch.zeros(D // 2, device=q_content.device)
    k_sink = k_sink if n_sinks else k_block[:, :1]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    grid = (triton.cdiv(N, block_m) * B * H,)
    _select_fwd_kernel[grid](
        q_window, k_window, q_content, k_block, k_sink, values, sel, union, count, freq, out, lse,
        q_content.stride(0), q_content.stride(1), q_content.stride(2),
        k_block.stride(0), k_block.stride(1), k_block.stride(2),
        k_sink.stride(0), k_sink.stride(1), k_sink.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        N, H, B * H, R, sel.shape[-1], union.shape[-1], n_sinks, scale * LOG2E,
        GROUP=G, V_GROUP=H // values.shape[2], W=W,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_H=max(16, triton.next_power_of_2(D // 2)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=max(16, triton.next_power_of_2(max(n_sinks, 1))),
        BLOCK_R=max(2, triton.next_power_of_2(max(R, 1))), ROPE=inv_freq is not None,
        PRECISION="ieee" if q_content.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=1 if interpreting else 2,
    )
    return out


def selected_pass_forward(step, q, k, values, *, sinks, scale, positions=None, block_m=None, block_n=None):
    """The selected pass alone on the Triton kernel, forward only: q [B, N, H, D], k
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

    if positions.rotated:  # a Hugging Face layer's q and k: rotated at 0 .. N-1, scaled
        q_content, k_content, rope_scale = rot(q, pos, inverse=True), rot(k, pos, inverse=True), 1.0
    else:
        q_content, k_content, rope_scale = q, k, positions.attention_scaling
    q_window, k_window = rot(q_content, pos, scale=rope_scale), rot(k_content, pos, scale=rope_scale)
    k_block = rot(k_content, pos % step.block, scale=rope_scale)
    k_sink = rot(k_content[:, :n_sinks], pos[:n_sinks], scale=rope_scale)
    q_content = (q_content.to(torch.float32) * rope_scale).to(q.dtype).contiguous()
    return selected_pass_triton(step, q_window, k_window, q_content, k_content.contiguous(), k_block, k_sink,
                                values, sinks=sinks, scale=scale, inv_freq=positions.inv_freq,
                                block_m=block_m, block_n=block_n)
