"""Reference backend: tensorized attention in plain PyTorch (any device, autograd).

The readable definition of DESIGN.md §2. Each pass gathers the fibers of its dimension
with a reshape and a permute (a copy of q, k and the values per pass: the price of
clarity), attends inside them, and scatters the result back. Memory is linear in the
sequence length: a ``block`` pass scores ``n_j`` keys per query, a ``complete`` pass
``2 n_j`` (its fiber and the one before it), plus the sinks; no N x N tensor is built.

Grouped-query attention: the ``G = H / H_kv`` query heads of one kv head are a separate
axis, so k (and the values of the first pass) broadcast over it without being repeated.

Inputs here are already validated by :func:`tensorized_attention.tensorized_attn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fold import fold_size, strides
from ..passes import FoldPass, PooledPass, SelectedPass, plan_passes
from ..rope import TensorPositions, pass_positions, rotate, sink_distances

__all__ = ["fold_pass_reference", "tensorized_attn_reference"]


def tensorized_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: tuple[int, ...],
    *,
    causal: bool,
    mode: str,
    order: tuple[int, ...],
    gate: torch.Tensor | None,
    sinks: int,
    softmax_scale: float,
    positions: TensorPositions | None = None,
    select: SelectedPass | None = None,
    relay: bool = False,
    return_values: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """q: [B, N, H, D]; k, v: [B, N, H_kv, D]; gate: [H, passes] or None; select: a
    SelectedPass run after the fold passes (or alone, order=()); relay: each fold pass mixes
    the keys as it mixes the values. Returns [B, N, H, D] (and, with ``return_values``, the
    outputs of every pass but the last, each [B, N, H, D])."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    # Rows of the first dimension that hold no real position are never read by a real query
    # and change no real output: drop them (a fold sized for a long capacity costs nothing
    # on a short input). The nominal size of each dimension still sets the sinks' distance.
    nominal = shape
    shape = (min(shape[0], -(-N // strides(shape)[0])), *shape[1:])
    P = fold_size(shape)

    def to_internal(x: torch.Tensor, groups: int) -> torch.Tensor:
        # [B, N, Hx, D] -> [B, H_kv, groups, P, D], zero-padded at the end of the sequence
        x = x.reshape(B, N, Hkv, groups, D).permute(0, 2, 3, 1, 4)
        return F.pad(x, (0, 0, 0, P - N)) if P > N else x

    qi, ki, values = to_internal(q, G), to_internal(k, 1), to_internal(v, 1)
    sink_count = min(sinks, N)
    pos = torch.arange(P, device=q.device)
    if positions is not None:
        rope_scale = 1.0 if positions.rotated else positions.attention_scaling
        if positions.rotated:  # back to unrotated (times the model's attention scaling)
            qi, ki = (rotate(x, pos, positions.inv_freq, inverse=True) for x in (qi, ki))
    plan = plan_passes(shape, order, mode, causal)
    passes = []
    keys = ki  # the keys the next pass scores against (mixed by each pass with key relay)
    for t, step in enumerate(plan):
        g = None if gate is None else gate[:, t].reshape(Hkv, G, 1, 1)
        q_t, k_t, sink_q, sink_k = qi, keys, None, None
        if positions is not None:  # one rotated copy of q and k at a time (DESIGN.md §3)
            tensor_pos = pass_positions(pos, step.stride)
            q_t, k_t = (rotate(x, tensor_pos, positions.inv_freq, scale=rope_scale) for x in (qi, keys))
            if sink_count:
                sink_q = (qi.to(torch.float32) * rope_scale).to(qi.dtype)  # rotated at 0
                dist = sink_distances(nominal[step.dim], sinks)[:sink_count].to(q.device)
                sink_k = rotate(keys[..., :sink_count, :], -dist, positions.inv_freq, scale=rope_scale)
        if relay:  # the pass mixes the keys with the weights it mixes the values with
            mixed = _fold_pass(step, q_t, k_t, torch.cat([values, keys], dim=-1), g, shape, N, sink_count, pos,
                               softmax_scale, sink_q, sink_k)
            values, keys = mixed.split(D, dim=-1)
        else:
            values = _fold_pass(step, q_t, k_t, values, g, shape, N, sink_count, pos, softmax_scale, sink_q, sink_k)
        passes.append(values)
    if select is not None:
        g = None if gate is None else gate[:, len(plan)].reshape(Hkv, G, 1, 1)
        q_c, inv_freq = qi[..., :N, :], None
        if positions is not None:  # content q and k, the keys rotated at minus their distance
            q_c = (q_c.to(torch.float32) * rope_scale).to(qi.dtype)
            inv_freq = positions.inv_freq
        values = _content_pass(select, q_c, ki[..., :N, :], values[..., :N, :], g, sink_count, sinks,
                                softmax_scale, inv_freq, None if positions is None else rope_scale)
        passes.append(values)
    out = _to_output(values, N)
    if return_values:
        return out, [_to_output(x, N) for x in passes[:-1]]
    return out


def fold_pass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    step: FoldPass,
    slot_positions: torch.Tensor,
    *,
    layout_stride: int,
    seqlen: int,
    shape: tuple[int, ...],
    sinks: int,
    sink_k: torch.Tensor | None,
    sink_v: torch.Tensor | None,
    gate: torch.Tensor | None,
    softmax_scale: float,
    positions: TensorPositions | None = None,
) -> torch.Tensor:
    """One fold pass of the operator over a subset of the positions of a longer sequence
    (what a rank of a sequence-parallel group computes: :mod:`tensorized_attention.distributed`).

    The ``P`` slots hold the positions ``slot_positions [P]`` (int64) of a sequence of
    ``seqlen`` positions folded as ``shape``; a slot at ``>= seqlen`` is padding. They must be
    laid out as whole fibers of ``step`` (the pass of the whole sequence, :class:`FoldPass`):
    slot ``(c * step.size + t) * layout_stride + r`` holds coordinate ``t`` of ``step.dim``, and
    its window (``complete``) or fiber (``block``) lies in the slots ``(c' * step.size + t') *
    layout_stride + r`` with the same ``r``, ordered as in the sequence. Outputs are exact
    for every slot whose keys are all present (the others are the caller's to drop).

    q ``[B, P, H, D]``, k ``[B, P, H_kv, D]``, values (the pass's input) ``[B, P, H_kv or H,
    D]``; sink_k ``[B, S, H_kv, D]`` and sink_v ``[B, S, H_kv or H, D]``: the keys and input
    values of positions ``0 .. S-1`` (``S = min(sinks, seqlen)``; None when ``S = 0``); gate:
    this pass's ``[H]`` or None; positions: rotary tensor positions with q and k unrotated
    (``rotated=False``), pass ``step`` rotating slot ``i`` at ``slot_positions[i] //
    step.stride``. Returns ``[B, P, H, D]`` in q's dtype."""
    B, P, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    if P % (step.size * layout_stride):
        raise ValueError(f"{P} slots are not whole fibers of {step.size} x {layout_stride} slots")
    if positions is not None and positions.rotated:
        raise ValueError("fold_pass_reference takes unrotated q and k (positions.rotated=False)")

    def internal(x: torch.Tensor) -> torch.Tensor:  # [B, P, Hx, D] -> [B, H_kv, Hx / H_kv, P, D]
        return x.reshape(B, x.shape[1], Hkv, x.shape[2] // Hkv, D).permute(0, 2, 3, 1, 4)

    qi, ki, vi = internal(q), internal(k), internal(values)
    sink_count = 0 if sink_k is None else sink_k.shape[1]
    sk = None if sink_k is None else internal(sink_k)
    sv = None if sink_v is None else internal(sink_v)
    sq = None
    if positions is not None:
        rope_scale = positions.attention_scaling
        tensor_pos = pass_positions(slot_positions, step.stride)
        qi, ki = (rotate(x, tensor_pos, positions.inv_freq, scale=rope_scale) for x in (qi, ki))
        if sink_count:
            sq = (internal(q).to(torch.float32) * rope_scale).to(q.dtype)  # rotated at 0
            dist = sink_distances(shape[step.dim], sinks)[:sink_count].to(q.device)
            sk = rotate(sk, -dist, positions.inv_freq, scale=rope_scale)
    layout = FoldPass(dim=step.dim, size=step.size, stride=layout_stride, mode=step.mode, causal=step.causal)
    g = None if gate is None else gate.reshape(Hkv, G, 1, 1)
    out = _fold_pass(layout, qi, ki, vi, g, shape, seqlen, sink_count, slot_positions, softmax_scale, sq, sk,
                     sink_v=sv, mask_step=step)
    return out.permute(0, 3, 1, 2, 4).reshape(B, P, H, D)


def _to_output(x: torch.Tensor, seqlen: int) -> torch.Tensor:
    """[B, H_kv, G, P, D] -> [B, seqlen, H_kv * G, D]."""
    B, Hkv, G, _, D = x.shape
    return x[:, :, :, :seqlen].permute(0, 3, 1, 2, 4).reshape(B, seqlen, Hkv * G, D)


def _fibers(x: torch.Tensor, step: FoldPass) -> torch.Tensor:
    """[..., P, D] -> [..., C, s, n, D]: the fibers of the pass's dimension (n = size,
    s = stride, C = P / (n s) = the product of the coarser dimensions)."""
    *lead, P, D = x.shape
    n, s = step.size, step.stride
    return x.reshape(*lead, P // (n * s), n, s, D).transpose(-3, -2)


def _unfibers(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_fibers`."""
    *lead, C, s, n, D = x.shape
    return x.transpose(-3, -2).reshape(*lead, C * n * s, D)


def _fold_pass(step, q, k, values, gate, shape, seqlen, sink_count, positions, scale, sink_q=None, sink_k=None,
               sink_v=None, mask_step=None):
    """One FoldPass. q: [B, Hkv, G, P, D]; k: [B, Hkv, 1 or G, P, D]; values: [B, Hkv, 1 or
    G, P, D]. The sinks are scored with ``sink_q`` and ``sink_k [B, Hkv, 1 or G, S, D]`` when
    given (tensor positions), else with q and the first keys of k; their values are
    ``sink_v [B, Hkv, 1 or G, S, D]`` when given, else the first rows of ``values``.

    ``positions [P]``: the position in the sequence of each slot (``arange(P)`` for the whole
    fold; a subset of a longer sequence laid out as fibers of ``step`` otherwise, slots at
    ``>= seqlen`` being padding). ``step`` lays out the fibers; ``mask_step`` (default
    ``step``) is the pass of the whole sequence, which decides which sinks a query's pass
    mask already holds."""
    n = step.size
    mask_step = step if mask_step is None else mask_step
    qf, kf, vf = _fibers(q, step), _fibers(k, step), _fibers(values, step)
    pos = _fibers(positions[:, None], step)[..., 0]  # [C, s, n]: position of each fiber slot
    if step.mode == "complete":
        # keys: the previous fiber (same residue mod s, one slot of the coarser dims back)
        # followed by this one; query slot i reads key slot j iff 0 <= (i + n) - j < n.
        kf = torch.cat([_shift_fibers(kf), kf], dim=-2)
        vf = torch.cat([_shift_fibers(vf), vf], dim=-2)
        before = F.pad(pos, (0, 0, 0, 0, 1, 0), value=-1)[:-1]  # the previous fiber's positions; -1: none
        key_pos = torch.cat([before, pos], dim=-1)  # [C, s, 2n]; negative: no key
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(2 * n, device=q.device)[None, :]
        allowed = ((i + n - j) >= 0) & ((i + n - j) < n)  # [n, 2n]
        allowed = allowed & (key_pos[..., None, :] >= 0)  # [C, s, n, 2n]
    else:
        key_pos = pos
        if step.causal:
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        else:
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        # padded keys are never read by a real query (padded queries may read them:
        # their outputs are dropped, and this keeps every row non-empty)
        real_key = key_pos[..., None, :] < seqlen
        padded_query = pos[..., :, None] >= seqlen
        allowed = allowed & (real_key | padded_query)  # [C, s, n, n]

    # scores [B, Hkv, G, C, s, n, keys], computed in the input dtype, softmax in float32
    if kf.shape[2] == 1:  # keys shared by the G query heads of a kv head
        scores = torch.einsum("bhgcsid,bhcsjd->bhgcsij", qf, kf[:, :, 0]) * scale
    else:  # keys of each query head (relayed keys)
        scores = torch.einsum("bhgcsid,bhgcsjd->bhgcsij", qf, kf) * scale
    acc = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(acc).masked_fill(~allowed, float("-inf"))
    if sink_count:
        sq = qf if sink_q is None else _fibers(sink_q, step)
        sk = k[..., :sink_count, :] if sink_k is None else sink_k  # [B, Hkv, 1 or G, S, D]
        if sk.shape[2] == 1:
            sink_scores = torch.einsum("bhgcsid,bhjd->bhgcsij", sq, sk[:, :, 0]) * scale
        else:
            sink_scores = torch.einsum("bhgcsid,bhgjd->bhgcsij", sq, sk) * scale
        p = pos[..., None]  # [C, s, n, 1]
        sink = torch.arange(sink_count, device=q.device)
        sink_allowed = ~mask_step.reads(p, sink, shape)
        if step.causal:
            sink_allowed &= sink <= p
        sink_scores = sink_scores.to(acc).masked_fill(~sink_allowed, float("-inf"))
        scores = torch.cat([scores, sink_scores], dim=-1)
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    n_keys = kf.shape[-2]
    out = _mix(weights[..., :n_keys], vf)
    if sink_count:
        sv = values[..., :sink_count, :] if sink_v is None else sink_v
        out = out + _mix_sinks(weights[..., n_keys:], sv)
    out = _unfibers(out)  # [B, Hkv, G, P, D]
    if gate is not None:
        g = gate.to(acc)
        out = (g * values.to(acc) + (1 - g) * out.to(acc)).to(values.dtype)
    return out


def _shift_fibers(x: torch.Tensor) -> torch.Tensor:
    """[..., C, s, n, D] -> the same with fiber c replaced by fiber c - 1 (zeros for c = 0)."""
    return F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[..., :-1, :, :, :]


def _mix(weights: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
    """weights [B, Hkv, G, C, s, n, keys] times values [B, Hkv, 1 or G, C, s, keys, D]."""
    if vf.shape[2] == 1:
        return torch.einsum("bhgcsij,bhcsjd->bhgcsid", weights, vf[:, :, 0])
    return torch.einsum("bhgcsij,bhgcsjd->bhgcsid", weights, vf)


def _mix_sinks(weights: torch.Tensor, sink_values: torch.Tensor) -> torch.Tensor:
    """weights [B, Hkv, G, C, s, n, S] times sink values [B, Hkv, 1 or G, S, D]."""
    if sink_values.shape[2] == 1:
        return torch.einsum("bhgcsij,bhjd->bhgcsid", weights, sink_values[:, :, 0])
    return torch.einsum("bhgcsij,bhgjd->bhgcsid", weights, sink_values)


# Elements of the largest gathered tensor (queries x keys per query x heads x headdim) in
# one chunk of queries of a selected pass: bounds its memory at any length.
SELECT_CHUNK_ELEMENTS = 1 << 27


def block_means(k: torch.Tensor, block: int) -> torch.Tensor:
    """The mean key of every whole block of ``k [B, Hkv, 1, N, D]``: ``[B, Hkv, N // block,
    D]``, in float32 (float64 for float64 keys); what the selected pass ranks blocks by."""
    B, Hkv, _, N, D = k.shape
    n_blocks = N // block
    acc = torch.promote_types(k.dtype, torch.float32)
    with torch.no_grad():
        return k[:, :, 0, : n_blocks * block].to(acc).reshape(B, Hkv, n_blocks, block, D).mean(-2)


def block_bounds(k: torch.Tensor, block: int) -> torch.Tensor:
    """The channel-wise max and min key of every whole block of ``k [B, Hkv, 1, N, D]``:
    ``[B, Hkv, n_blocks, 2, D]`` in float32 (float64 for float64 keys); what the selected
    pass with ``score="bound"`` ranks blocks by."""
    B, Hkv, _, N, D = k.shape
    n_blocks = N // block
    acc = torch.promote_types(k.dtype, torch.float32)
    with torch.no_grad():
        x = k[:, :, 0, : n_blocks * block].to(acc).reshape(B, Hkv, n_blocks, block, D)
        return torch.stack([x.amax(-2), x.amin(-2)], dim=-2)


def block_summaries(k: torch.Tensor, step: SelectedPass) -> torch.Tensor:
    """What ``step`` ranks the blocks of ``k [B, Hkv, 1, N, D]`` by: their mean keys
    (:func:`block_means`) or their channel-wise bounds (:func:`block_bounds`)."""
    return block_bounds(k, step.block) if step.score == "bound" else block_means(k, step.block)


def select_blocks(q: torch.Tensor, summaries: torch.Tensor, positions: torch.Tensor, block: int, topk: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each query selects (SelectedPass): q ``[B, Hkv, G, Q, D]`` (content, at
    ``positions [Q]``) against the blocks' mean keys ``[B, Hkv, n_blocks, D]``
    (:func:`block_means`) or channel-wise bounds ``[B, Hkv, n_blocks, 2, D]``
    (:func:`block_bounds`). Returns the selected block indices in increasing order
    ``[B, Hkv, G, Q, r_max]`` and how many each query has, ``[Q]`` (slots ``>= r`` hold an
    index past the last block)."""
    n_blocks = summaries.shape[2]
    r_max = min(topk, n_blocks)
    count = torch.clamp(torch.div(positions, block, rounding_mode="floor"), max=r_max)
    if r_max == 0:
        return positions.new_zeros((*q.shape[:-1], 0)), count
    with torch.no_grad():
        q = q.to(summaries.dtype)
        if summaries.ndim == 4:  # mean keys
            scores = torch.einsum("bhgqd,bhnd->bhgqn", q, summaries) * scale
        else:  # per channel, the larger of q_d max_d and q_d min_d
            scores = (torch.einsum("bhgqd,bhnd->bhgqn", q.clamp(min=0), summaries[..., 0, :])
                      + torch.einsum("bhgqd,bhnd->bhgqn", q.clamp(max=0), summaries[..., 1, :])) * scale
        own = torch.div(positions, block, rounding_mode="floor")
        candidate = torch.arange(n_blocks, device=q.device)[None, :] < own[:, None]  # [Q, n_blocks]
        scores = scores.masked_fill(~candidate, float("-inf"))
        # best first; of equal scores the later block: a stable sort over the blocks reversed
        best = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :r_max]
        chosen = n_blocks - 1 - best
        slot = torch.arange(r_max, device=q.device)
        chosen = torch.where(slot < count[:, None], chosen, n_blocks)
        return torch.sort(chosen, dim=-1).values, count


def _content_pass(step, q, k, values, gate, sink_count, sinks, scale, inv_freq=None, rope_scale=None,
                  query_positions=None):
    """One SelectedPass or PooledPass. q: [B, Hkv, G, Q, D] (content: unrotated), the
    queries at ``query_positions`` (default: all N positions, in order); k: [B, Hkv, 1, N,
    D]; values: [B, Hkv, 1 or G, N, D]; inv_freq: rotary frequencies (each key rotated at
    minus its distance and scaled by rope_scale, the query at 0) or None. Returns
    [B, Hkv, G, Q, D].

    Each query reads, in one softmax: its window, the pass's own keys (the tokens of its
    selected blocks; or one summary per earlier block), and the sinks in neither."""
    B, Hkv, G, _, D = q.shape
    N = k.shape[-2]
    W, device = step.block, q.device
    if query_positions is None:
        query_positions = torch.arange(N, device=device)
    acc = torch.promote_types(q.dtype, torch.float32)
    n_blocks = N // W
    pooled = isinstance(step, PooledPass)
    extra = n_blocks if pooled else W * min(step.topk, n_blocks)
    chunk = max(1, SELECT_CHUNK_ELEMENTS // (B * Hkv * G * (W + extra + sink_count) * D))
    window_offsets = torch.arange(W, device=device)
    sink_pos = torch.arange(sink_count, device=device)
    if pooled:  # one summary per whole block: the mean key and the mean value
        k_sum = k[..., : n_blocks * W, :].reshape(B, Hkv, 1, n_blocks, W, D).mean(-2)
        v_sum = values[..., : n_blocks * W, :].reshape(B, Hkv, values.shape[2], n_blocks, W, D).mean(-2)
    else:
        summaries = block_summaries(k, step)  # once: every chunk of queries ranks against them
    outputs = []
    for start in range(0, len(query_positions), chunk):
        p = query_positions[start:start + chunk]  # [Q]
        Q = len(p)
        qc = q[..., start:start + Q, :]
        own = torch.div(p, W, rounding_mode="floor")
        # the window: key p - j at distance j
        win_pos = p[:, None] - window_offsets[None, :]  # [Q, W]
        win_ok = win_pos >= 0
        win_pos = win_pos.clamp(min=0)
        k_win, v_win = k[..., win_pos, :], values[..., win_pos, :]  # [B, Hkv, 1 | Gv, Q, W, D]
        if pooled:  # every earlier whole block, position-free (content alone)
            k_x = k_sum[:, :, :, None].expand(B, Hkv, 1, Q, n_blocks, D)
            v_x = v_sum[:, :, :, None].expand(-1, -1, -1, Q, -1, -1)
            x_ok = torch.arange(n_blocks, device=device)[None, :] < own[:, None]  # [Q, n_blocks]
            x_dist, count, blocks = None, None, None
            sink_base = torch.full((Q,), W, device=device)
        else:  # the selected blocks, placed just before the window in their order
            blocks, count = select_blocks(qc, summaries, p, W, step.topk, scale)  # [B, Hkv, G, Q, R], [Q]
            R = blocks.shape[-1]
            slot = torch.arange(R, device=device)[:, None]
            chosen = slot < count[:, None, None]  # [Q, R, 1]
            x_pos = blocks[..., None] * W + window_offsets  # [B, Hkv, G, Q, R, W]
            x_ok = (chosen & (p[:, None, None] - x_pos >= W)).reshape(B, Hkv, G, Q, R * W)
            x_dist = ((count[:, None, None] - slot + 1) * W - 1 - window_offsets).expand_as(x_pos)
            x_dist = x_dist.reshape(B, Hkv, G, Q, R * W)
            index = torch.where(chosen, x_pos, 0).reshape(B, Hkv, G, Q * R * W, 1).expand(-1, -1, -1, -1, D)
            k_x = torch.gather(k.expand(B, Hkv, G, N, D), 3, index).reshape(B, Hkv, G, Q, R * W, D)
            v_x = torch.gather(values.expand(B, Hkv, G, N, D), 3, index).reshape(B, Hkv, G, Q, R * W, D)
            sink_base = (count + 1) * W
        # the sinks in neither the window nor a selected block, just before the pass's other keys
        sink_ok = (sink_pos[None, :] <= p[:, None]) & (p[:, None] - sink_pos[None, :] >= W)  # [Q, S]
        if blocks is not None:
            sink_block = torch.div(sink_pos, W, rounding_mode="floor")
            sink_ok = sink_ok & ~(blocks[..., None, :] == sink_block[:, None]).any(-1)  # [B, Hkv, G, Q, S]
        sink_dist = sink_base[:, None] + sinks - 1 - sink_pos[None, :]  # [Q, S]
        k_sink = k[..., :sink_count, :][..., None, :, :]  # [B, Hkv, 1, 1, S, D]
        if inv_freq is not None:
            k_win = rotate(k_win, -window_offsets, inv_freq, scale=rope_scale)
            k_sink = rotate(k_sink, -sink_dist, inv_freq, scale=rope_scale)
            k_x = (k_x * rope_scale).to(k.dtype) if pooled else rotate(k_x, -x_dist, inv_freq, scale=rope_scale)
        k_sink = k_sink.expand(B, Hkv, 1, Q, sink_count, D)
        parts = [(k_win, v_win, win_ok), (k_x, v_x, x_ok), (k_sink, values[..., :sink_count, :][..., None, :, :]
                                                            .expand(-1, -1, -1, Q, -1, -1), sink_ok)]
        scores = torch.cat([_scores(qc, kx, scale).to(acc).masked_fill(~ok, float("-inf")) for kx, _, ok in parts],
                           dim=-1)
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        sizes = [kx.shape[-2] for kx, _, _ in parts]
        out = sum(_weighted(w, vx) for w, (_, vx, _) in zip(weights.split(sizes, dim=-1), parts, strict=True))
        outputs.append(out)
    out = torch.cat(outputs, dim=-2)
    if gate is not None:
        g = gate.to(acc)
        out = (g * values[..., query_positions, :].to(acc) + (1 - g) * out.to(acc)).to(values.dtype)
    return out


def _scores(q, keys, scale):
    """q [B, Hkv, G, Q, D] against per-query keys [B, Hkv, 1 or G, Q, K, D]: [B, Hkv, G, Q, K]."""
    if keys.shape[2] == 1:
        return torch.einsum("bhgqd,bhqkd->bhgqk", q, keys[:, :, 0]) * scale
    return torch.einsum("bhgqd,bhgqkd->bhgqk", q, keys) * scale


def _weighted(weights, vals):
    """weights [B, Hkv, G, Q, K] times per-query values [B, Hkv, 1 or G, Q, K, D]."""
    if vals.shape[2] == 1:
        return torch.einsum("bhgqk,bhqkd->bhgqd", weights, vals[:, :, 0])
    return torch.einsum("bhgqk,bhgqkd->bhgqd", weights, vals)
