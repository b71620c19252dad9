"""Sequence parallelism: tensorized attention over a sequence split across the ranks of a
``torch.distributed`` group (DESIGN.md §6; docs/distributed.md).

Each rank holds a contiguous slice of the sequence (dim 1 of q, k, v, in rank order;
slices may differ in length). :func:`sequence_parallel_tensorized_attn` returns this
rank's slice of exactly what :func:`tensorized_attention.tensorized_attn` computes on the
whole sequence. The passes run one after the other, each classified by
:func:`plan_sequence_parallel` (the one rule, which the operator itself follows):

* ``"local"``: every query's keys (its fiber, or its causal window) lie in its own slice;
* ``"halo"`` (causal only): a rank also needs the last keys and values of the previous
  rank (a bounded window back), sent point to point, when that is fewer bytes than a
  regrouping;
* ``"all_to_all"``: one all-to-all regroups the tokens so that whole fibers (block) or
  whole residue classes mod the pass's stride (complete) are local on one rank, the pass
  runs there, and one all-to-all brings the outputs back.

Every collective is differentiable (gradients travel the reverse way), so the operator
trains under DDP / FSDP like the single-device one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .fold import check_shape, choose_shape
from .passes import MODES, FoldPass, plan_passes
from .rope import TensorPositions, rotate

__all__ = ["PassPlan", "balanced_lengths", "plan_sequence_parallel", "sequence_parallel_tensorized_attn"]

KINDS = ("local", "halo", "all_to_all")


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PassPlan:
    """How one pass runs on ``world_size`` ranks (an entry of :func:`plan_sequence_parallel`).

    Attributes:
        index: the pass's place in ``order``.
        dim, size, stride: the fold dimension it attends along, its size ``n_j`` and stride
            ``s_j`` (the coarsest dimension's size counts only rows that hold a position).
        kind: ``"local"``, ``"halo"`` or ``"all_to_all"``.
        send_bytes: per rank, the bytes it sends to other ranks in the forward pass (a
            halo: its last rows of k and the values; an all-to-all: q, k and the values
            of its tokens that another rank computes, then the outputs it computed for
            tokens another rank holds). A rank's sends to itself are not counted.
        recv_bytes: per rank, the bytes it receives in the forward pass; the backward pass
            sends exactly these back (the gradients of what was received).
        halo: per rank, how many positions before its slice it receives (``"halo"``).
        layout: for ``"all_to_all"``, what each rank computes: ``"ranges"`` (rank d the
            positions ``bounds[d] .. bounds[d + 1] - 1``, whole fibers of a block pass) or
            ``"residues"`` (rank d the positions ``p`` with ``bounds[d] <= p mod stride <
            bounds[d + 1]``); None otherwise.
        bounds: ``world_size + 1`` boundaries of the layout (empty unless all-to-all).
    """

    index: int
    dim: int
    size: int
    stride: int
    kind: str
    send_bytes: tuple[int, ...]
    recv_bytes: tuple[int, ...]
    halo: tuple[int, ...]
    layout: str | None = None
    bounds: tuple[int, ...] = ()


def _split(seqlen: int, world_size: int) -> list[int]:
    """The default slice lengths: as equal as possible, the longer ones first."""
    base, extra = divmod(seqlen, world_size)
    return [base + (r < extra) for r in range(world_size)]


def balanced_lengths(seqlen: int, world_size: int, shape: Sequence[int] | None = None, *, mode: str | None = None,
                     order: Sequence[int] | None = None, causal: bool = True, align: int = 1) -> list[int]:
    """Slice lengths (in rank order, each at least 1) that give every rank the same share of
    the passes' work: the keys its queries read, summed over the passes (a halo's keys are
    read by the receiving rank's queries alone). Causal passes read more keys late in the
    sequence (a complete pass reads ``min(n, p // s + 1)`` keys at position p), so equal
    slices leave the last rank the most work; these lengths give the first ranks longer
    slices instead. Pass them as the ranks' slices to
    :func:`sequence_parallel_tensorized_attn`.

    ``align``: each slice boundary is moved to the nearest multiple of it (when that leaves
    every rank a position). The kernels compute a strided pass in tiles of rows of one
    residue, and a tile costs as much as its longest row whatever rows it holds: with
    ``align`` = the forward's query tile (128 rows on an H100) times the coarsest pass's
    stride, each rank's rows of that pass fill whole tiles (docs/distributed.md)."""
    from .ops.dispatch import _check_order

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < world_size:
        raise ValueError(f"seqlen must be an int >= world_size ({world_size}), got {seqlen!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an int >= 1, got {align!r}")
    shape = check_shape(choose_shape(seqlen) if shape is None else shape, seqlen)
    mode = mode or ("complete" if causal else "block")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    p = torch.arange(seqlen, dtype=torch.int64)
    work = torch.zeros(seqlen, dtype=torch.float64)
    for step in plan_passes(shape, _check_order(order, len(shape)), mode, causal):
        a = p // step.stride
        if mode == "complete":
            work += torch.clamp(a + 1, max=step.size).double()
        elif causal:
            work += (a % step.size + 1).double()
        else:
            work += float(step.size)
    cumulative = torch.cumsum(work, 0)
    targets = cumulative[-1] * torch.arange(1, world_size, dtype=torch.float64) / world_size
    cuts = torch.searchsorted(cumulative, targets).tolist()  # the last position of each rank but the last
    bounds = [0]
    for r, cut in enumerate(cuts):  # each rank keeps at least one position
        bound = cut + 1
        aligned = (bound + align // 2) // align * align
        lowest, highest = bounds[-1] + 1, seqlen - (world_size - 1 - r)
        bound = aligned if lowest <= aligned <= highest else bound
        bounds.append(min(max(bound, lowest), highest))
    bounds.append(seqlen)
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def _count_residues(x: int, s: int, a: int, b: int) -> int:
    """How many p in [0, x) have a <= p mod s < b."""
    return (x // s) * (b - a) + min(max(x % s - a, 0), b - a)


def plan_sequence_parallel(
    shape: Sequence[int] | None,
    seqlen: int,
    world_size: int,
    *,
    mode: str | None = None,
    order: Sequence[int] | None = None,
    causal: bool = True,
    heads: int,
    kv_heads: int,
    headdim: int,
    dtype_bytes: int,
    batch: int = 1,
    lengths: Sequence[int] | None = None,
    max_halo: float | None = None,
) -> list[PassPlan]:
    """How each pass of :func:`sequence_parallel_tensorized_attn` runs, and the bytes it moves.

    Arguments are those of the operator (``shape=None``: :func:`~tensorized_attention.choose_shape`
    of ``seqlen``), the sizes of q (``batch, heads, headdim``) and k, v (``kv_heads``), the
    bytes of one element, and the slice lengths of the ranks (``lengths``, summing to
    ``seqlen``; default: as equal as possible, the longer slices first). Returns one
    :class:`PassPlan` per pass, in order.

    The rule, per pass along dimension j (size n, stride s, fibers of ``n * s`` aligned
    positions), with slice ``r`` starting at ``o_r``:

    1. ``"local"`` when no query needs a key of another slice: ``n = 1``, one rank, or (block
       mode) every ``o_r`` is a multiple of ``n * s``.
    2. Causal passes otherwise need ``h_r`` positions before ``o_r``: ``min(o_r, (n - 1) s)``
       (complete) or ``o_r mod (n s)`` (block). When every ``h_r`` is at most the previous
       slice's length (and, with ``max_halo``, at most ``max_halo`` times its own: the
       halo's keys and values take memory, and on the reference backend a rank computes its
       halo's queries too), the halo moves ``h_r`` rows of k and of the pass's input values; it
       is chosen when that is fewer bytes, summed over ranks, than the all-to-all.
    3. Otherwise ``"all_to_all"``: block passes with at least ``world_size`` fibers' chunks
       give each rank whole chunks (``"ranges"``, boundaries rounded from the slices'),
       others give rank d the residues mod s from ``d s // world_size`` to ``(d + 1) s //
       world_size`` (``"residues"``: whole windows or fibers). Bytes: q, k and the values of
       every token computed by another rank, and its output back.

    The pass's input values have ``kv_heads`` heads in the first pass, ``heads`` after it.
    """
    for name, x in (("seqlen", seqlen), ("world_size", world_size), ("heads", heads), ("kv_heads", kv_heads),
                    ("headdim", headdim), ("dtype_bytes", dtype_bytes), ("batch", batch)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be an int >= 1, got {x!r}")
    if heads % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
    shape = check_shape(choose_shape(seqlen) if shape is None else shape, seqlen)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    mode = ("complete" if causal else "block") if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if mode == "complete" and not causal:
        raise ValueError("mode='complete' is causal only: pass causal=True, or mode='block' for bidirectional")
    from .ops.dispatch import _check_order

    order = _check_order(order, len(shape))
    if lengths is None:
        if seqlen < world_size:
            raise ValueError(f"seqlen ({seqlen}) must be at least world_size ({world_size}): one position per rank")
        lengths = _split(seqlen, world_size)
    lengths = [int(x) for x in lengths]
    if len(lengths) != world_size or sum(lengths) != seqlen or min(lengths) < 1:
        raise ValueError(f"lengths must be {world_size} ints >= 1 summing to seqlen={seqlen}, got {lengths}")
    if max_halo is not None and (isinstance(max_halo, bool) or not isinstance(max_halo, (int, float))
                                 or not max_halo >= 0):
        raise ValueError(f"max_halo must be None or a number >= 0, got {max_halo!r}")
    offsets = [sum(lengths[:r]) for r in range(world_size)]
    steps = plan_passes(_used_shape(shape, seqlen), order, mode, causal)
    plans = []
    for t, step in enumerate(steps):
        value_heads = kv_heads if t == 0 else heads
        row = batch * headdim * dtype_bytes  # bytes of one position of one head
        plans.append(_plan_pass(t, step, seqlen, offsets, lengths, max_halo, q_row=heads * row, k_row=kv_heads * row,
                                v_row=value_heads * row, out_row=heads * row))
    return plans


def _used_shape(shape: tuple[int, ...], seqlen: int) -> tuple[int, ...]:
    """The fold without the rows of its first dimension that hold no position (as the
    reference backend runs it)."""
    s0 = math.prod(shape[1:])
    return (min(shape[0], -(-seqlen // s0)), *shape[1:])


def _halo_rows(step: FoldPass, offsets: list[int]) -> list[int]:
    """Positions before each slice its queries read (causal passes)."""
    n, s = step.size, step.stride
    if step.mode == "complete":
        return [min(o, (n - 1) * s) for o in offsets]
    return [o % (n * s) for o in offsets]


def _plan_pass(t, step, N, offsets, lengths, max_halo, *, q_row, k_row, v_row, out_row) -> PassPlan:
    W = len(lengths)
    n, s = step.size, step.stride
    chunk = n * s
    zeros = (0,) * W
    common = dict(index=t, dim=step.dim, size=n, stride=s)
    if W == 1 or n == 1 or (step.mode == "block" and all(o % chunk == 0 for o in offsets)):
        return PassPlan(kind="local", send_bytes=zeros, recv_bytes=zeros, halo=zeros, **common)
    # the all-to-all: who computes what, and the bytes it moves
    chunks = -(-N // chunk)
    if step.mode == "block" and chunks >= W:
        cuts = [0] + [min(chunks, (o + chunk // 2) // chunk) for o in offsets[1:]] + [chunks]
        layout, bounds = "ranges", tuple(min(c * chunk, N) for c in cuts)

        def count(r: int, d: int) -> int:  # positions of slice r computed by rank d
            lo, hi = max(offsets[r], bounds[d]), min(offsets[r] + lengths[r], bounds[d + 1])
            return max(hi - lo, 0)
    else:
        layout, bounds = "residues", tuple(d * s // W for d in range(W + 1))

        def count(r: int, d: int) -> int:
            a, b = bounds[d], bounds[d + 1]
            return _count_residues(offsets[r] + lengths[r], s, a, b) - _count_residues(offsets[r], s, a, b)
    there = q_row + k_row + v_row
    send = [sum(count(r, d) * there + count(d, r) * out_row for d in range(W) if d != r) for r in range(W)]
    recv = [sum(count(d, r) * there + count(r, d) * out_row for d in range(W) if d != r) for r in range(W)]
    if step.causal:
        halo = _halo_rows(step, offsets)
        if all(halo[r] <= lengths[r - 1] and (max_halo is None or halo[r] <= max_halo * lengths[r])
               for r in range(1, W)):
            halo_send = [halo[r + 1] * (k_row + v_row) if r + 1 < W else 0 for r in range(W)]
            if sum(halo_send) < sum(send):
                return PassPlan(kind="halo", send_bytes=tuple(halo_send),
                                recv_bytes=tuple(h * (k_row + v_row) for h in halo), halo=tuple(halo), **common)
    return PassPlan(kind="all_to_all", send_bytes=tuple(send), recv_bytes=tuple(recv), halo=zeros, layout=layout,
                    bounds=bounds, **common)


# ----------------------------------------------------------------------------- collectives with autograd


class _Broadcast(torch.autograd.Function):
    """Broadcast from group rank 0; the backward sums the gradients of every rank into rank 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone().contiguous()
        dist.broadcast(x, group=group, group_src=0)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.reduce(grad, group=ctx.group, group_dst=0)
        if dist.get_rank(ctx.group) != 0:
            grad.zero_()
        return grad, None


class _WithHalo(torch.autograd.Function):
    """Keys and values with the previous rank's last ``h`` rows before this rank's own:
    ``k [B, L, Hk, D]``, ``values [B, L, Hv, D]`` -> ``[B, h + L, *, D]`` each. Each rank
    sends its last ``nxt`` rows of both to the next rank, which receives them straight into
    its buffers (nothing is packed or concatenated). The backward sends the gradients of
    the received rows back, and adds those the next rank sends to the last rows'."""

    @staticmethod
    def forward(ctx, k, values, h, nxt, group):
        ctx.group, ctx.h, ctx.nxt = group, h, nxt
        L = k.shape[1]
        sent = [x[:, L - nxt:] for x in (k, values)] if nxt else None
        if not h:
            _exchange(group, None, sent, forward=True)
            return k.view_as(k), values.view_as(values)
        out = [x.new_empty((x.shape[0], h + L, *x.shape[2:])) for x in (k, values)]
        for o, x in zip(out, (k, values), strict=True):
            o[:, h:] = x  # queued before the receive's wait: it overlaps the transfer
        _exchange(group, [o[:, :h] for o in out], sent, forward=True)
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_k, grad_values):
        h = ctx.h
        grads = _halo_backward(ctx.group, [g[:, h:] for g in (grad_k, grad_values)],
                               [g[:, :h] for g in (grad_k, grad_values)], ctx.nxt)
        return grads[0], grads[1], None, None, None


class _HaloApart(torch.autograd.Function):
    """:class:`_WithHalo` with the halo apart: ``k, values -> (k, values, k_halo,
    v_halo)``, the halo ``[B, h, *, D]`` in buffers of its own, and its receive left in
    flight (a function that waits for it is appended to ``pending``), so that a rank can
    compute with its own keys while the halo travels."""

    @staticmethod
    def forward(ctx, k, values, h, nxt, group, pending):
        ctx.group, ctx.nxt = group, nxt
        L = k.shape[1]
        halo = [x.new_empty((x.shape[0], h, *x.shape[2:])) for x in (k, values)]
        sent = [x[:, L - nxt:] for x in (k, values)] if nxt else None
        _exchange(group, halo if h else None, sent, forward=True, pending=pending)
        return k.view_as(k), values.view_as(values), *halo

    @staticmethod
    def backward(ctx, grad_k, grad_values, grad_k_halo, grad_v_halo):
        grads = _halo_backward(ctx.group, [grad_k, grad_values], [grad_k_halo, grad_v_halo], ctx.nxt)
        return grads[0], grads[1], None, None, None, None


def _halo_backward(group, grads, halo_grads, nxt):
    """The backward of a halo: the gradients of the received rows (``halo_grads``) go back
    to the previous rank; the next rank's gradients of the ``nxt`` rows sent to it are
    added to the last rows of ``grads`` (a copy)."""
    back = [g.new_empty((g.shape[0], nxt, *g.shape[2:])) for g in grads] if nxt else None
    _exchange(group, back, halo_grads if halo_grads[0].shape[1] else None, forward=False)
    if nxt:
        grads = [g.clone() for g in grads]
        for g, b in zip(grads, back, strict=True):
            g[:, g.shape[1] - nxt:] += b
    return grads


_PENDING_SENDS: list = []  # this rank's forward halo sends in flight: waited for at the end of the call


def _exchange(group, recv_buffers, send_tensors, *, forward: bool, pending: list | None = None) -> None:
    """Point to point between neighbours: forward, send ``send_tensors`` to the next rank
    and receive ``recv_buffers`` (filled in place) from the previous; backward, the other
    way (None: nothing). A rank that only sends in the forward does not wait for it here:
    its computation goes on while the rows travel, and :func:`_finish_sends` waits at the
    end of the call. ``pending``: nothing is waited for here either; a function that waits
    (and fills the buffers) is appended to it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    to, frm = (rank + 1, rank - 1) if forward else (rank - 1, rank + 1)
    ops, sent, copies = [], [], []
    if send_tensors is not None and 0 <= to < world:
        sent = [x.contiguous() for x in send_tensors]
        ops += [dist.P2POp(dist.isend, x, dist.get_global_rank(group, to), group) for x in sent]
    if recv_buffers is not None and 0 <= frm < world:
        for buffer in recv_buffers:  # straight into the buffer where it is contiguous (batch 1)
            target = buffer if buffer.is_contiguous() else torch.empty_like(buffer, memory_format=torch.contiguous_format)
            if target is not buffer:
                copies.append((buffer, target))
            ops.append(dist.P2POp(dist.irecv, target, dist.get_global_rank(group, frm), group))
    if not ops:
        return
    requests = dist.batch_isend_irecv(ops)
    if forward and len(ops) == len(sent):
        _PENDING_SENDS.append((requests, sent))
        return

    def finish():
        for request in requests:
            request.wait()
        for buffer, target in copies:
            buffer.copy_(target)

    if pending is None:
        finish()
    else:
        pending.append(finish)


def _finish_sends() -> None:
    """Wait for this rank's forward halo sends (its stream waits; its computation is queued by now)."""
    while _PENDING_SENDS:
        requests, _ = _PENDING_SENDS.pop()
        for request in requests:
            request.wait()


class _AllToAll(torch.autograd.Function):
    """One all-to-all of rows (dim 0): ``send_counts[d]`` rows to rank d, ``recv_counts[d]``
    rows from it; the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        back = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), send_counts, recv_counts, group=ctx.group)
        return back, None, None, None


def _all_to_all(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(rows, send_counts, recv_counts, group)


# ----------------------------------------------------------------------------- the operator


@dataclass
class _Run:
    """What every pass of one call needs."""

    group: object
    rank: int
    world: int
    offsets: list[int]
    lengths: list[int]
    seqlen: int
    shape: tuple[int, ...]
    causal: bool
    mode: str
    gate: torch.Tensor | None
    sinks: int
    scale: float
    positions: TensorPositions | None
    backend: str


def sequence_parallel_tensorized_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: Sequence[int] | None = None,
    *,
    group=None,
    causal: bool = True,
    mode: str | None = None,
    order: Sequence[int] | None = None,
    gate: torch.Tensor | None = None,
    sinks: int = 0,
    softmax_scale: float | None = None,
    positions: TensorPositions | None = None,
    select=None,
    relay: bool = False,
    backend: str = "auto",
    max_halo: float | None = None,
) -> torch.Tensor:
    """:func:`tensorized_attention.tensorized_attn` over a sequence split across the ranks of
    ``group`` (default: the whole world); call it on every rank of the group.

    Rank r holds positions ``offset_r .. offset_r + len_r - 1`` of the global sequence of
    ``seqlen = sum(len_r)`` positions, in rank order: q ``[batch, len_r, heads, headdim]``,
    k, v ``[batch, len_r, kv_heads, headdim]`` (lengths may differ between ranks; each is
    at least 1). Returns this rank's ``[batch, len_r, heads, headdim]`` of the operator's
    output on the whole sequence, in q's dtype.

    Options are the operator's and mean the same on the whole sequence (``shape=None``:
    ``choose_shape(seqlen)``; positions are global). Every rank must pass the same options
    and the same sizes but the length: a disagreement raises the same ValueError on every
    rank. Not supported: ``select`` and ``relay`` (NotImplementedError).

    ``gate``: the same tensor on every rank (a replicated parameter). Its gradient on each
    rank is that rank's share, the passes it computed; the sum over ranks is the gradient
    of the single-device operator, which is what DDP and FSDP compute when they reduce
    gradients. ``sinks``: rank 0 must hold the first ``min(sinks, seqlen)`` positions; their
    keys are broadcast once and the input values of each pass once per pass, and the
    gradients of those flow back to rank 0.

    ``backend``: as the single-device operator chooses it. The Triton backend runs every
    pass but those with sinks; with ``sinks > 0`` ``"auto"`` runs the reference
    (``"triton"`` raises NotImplementedError).

    ``max_halo``: how each pass runs is :func:`plan_sequence_parallel`'s rule; with a
    number, a pass takes a halo only when no rank's halo exceeds ``max_halo`` times its
    slice (else it regroups: less work and memory on the later ranks, more bytes).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_tensorized_attn needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group); for one device use tensorized_attn")
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    meta, error = _local_meta(q, k, v, shape, causal, mode, order, gate, sinks, softmax_scale, positions, select,
                              relay, backend, max_halo)
    metas: list = [None] * world
    dist.all_gather_object(metas, (meta, error), group=group)
    _raise_disagreements(metas)
    lengths = [m["seqlen"] for m, _ in metas]
    N = sum(lengths)
    B, L, H, D = q.shape
    Hkv = k.shape[2]

    from .ops.dispatch import _check_gate, _check_order, _check_positions, _choose_backend

    shape = check_shape(choose_shape(N) if shape is None else shape, N)
    if mode is None:
        mode = "complete" if causal else "block"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if mode == "complete" and not causal:
        raise ValueError("mode='complete' is causal only: pass causal=True, or mode='block' for bidirectional")
    order = _check_order(order, len(shape))
    gate = _check_gate(gate, H, len(order), q.device)
    _check_positions(positions, D, q.device)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    sink_count = min(sinks, N)
    if sink_count > lengths[0]:
        raise ValueError(f"sinks={sinks}: rank 0 must hold the first {sink_count} positions (the sinks), "
                         f"but its slice has {lengths[0]}; give rank 0 a longer slice or use fewer sinks")
    chosen = _choose_backend(backend, q)
    if chosen == "triton" and sink_count:
        if backend == "triton":
            raise NotImplementedError("sequence_parallel_tensorized_attn runs sinks on the reference backend only; "
                                      "pass backend='auto' or 'reference', or sinks=0")
        chosen = "reference"
    plan = plan_sequence_parallel(shape, N, world, mode=mode, order=order, causal=causal, heads=H, kv_heads=Hkv,
                                  headdim=D, dtype_bytes=q.element_size(), batch=B, lengths=lengths, max_halo=max_halo)
    offsets = [sum(lengths[:r]) for r in range(world)]
    if positions is not None and positions.rotated:  # back to unrotated, at the global positions
        pos = torch.arange(offsets[rank], offsets[rank] + L, device=q.device)[:, None]
        q, k = (rotate(x, pos, positions.inv_freq, inverse=True) for x in (q, k))
        positions = TensorPositions(positions.inv_freq, attention_scaling=1.0, rotated=False)
    run = _Run(group, rank, world, offsets, lengths, N, shape, causal, mode, gate, sinks, float(softmax_scale),
               positions, chosen)
    sink_k = None
    if sink_count:
        sink_k = _Broadcast.apply(_sink_rows(k, sink_count, rank), group)
    steps = plan_passes(_used_shape(shape, N), order, mode, causal)
    values = v
    for t, (step, entry) in enumerate(zip(steps, plan, strict=True)):
        sink_v = None
        if sink_count:
            sink_v = _Broadcast.apply(_sink_rows(values, sink_count, rank), group)
        if entry.kind == "all_to_all":
            values = _regrouped_pass(run, t, step, entry, q, k, values, sink_k, sink_v)
        else:
            values = _halo_pass(run, t, step, entry, q, k, values, sink_k, sink_v)
    _finish_sends()
    return values.to(q.dtype)


def _sink_rows(x: torch.Tensor, count: int, rank: int) -> torch.Tensor:
    """What a rank hands the sinks' broadcast: rank 0 its first ``count`` rows, the others a
    placeholder of that shape taken from their own rows, so that the autograd graph is alike
    on every rank (each rank runs the broadcast's backward, in the same order)."""
    if rank == 0:
        return x[:, :count]
    return x[:, :1].expand(-1, count, -1, -1)


def _local_meta(q, k, v, shape, causal, mode, order, gate, sinks, softmax_scale, positions, select, relay, backend,
                max_halo):
    """What every rank must agree on, and this rank's input error (type name, message) if any."""
    from .ops.dispatch import _check_tensors

    error = None
    try:
        if select is not None or relay is not False:
            raise NotImplementedError("sequence_parallel_tensorized_attn has no select or relay (content-addressed "
                                      "passes): pass select=None, relay=False, or run tensorized_attn on one device")
        _check_tensors(q, k, v)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                          or not isinstance(softmax_scale, (int, float))):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if shape is not None:
            shape = check_shape(shape)
        if order is not None:
            order = tuple(order) if isinstance(order, Sequence) and not isinstance(order, (str, bytes)) else order
        if gate is not None and not isinstance(gate, torch.Tensor):
            raise TypeError(f"gate must be None or a torch.Tensor, got {type(gate).__name__}")
        if positions is not None and not isinstance(positions, TensorPositions):
            raise TypeError(f"positions must be None or a TensorPositions, got {type(positions).__name__}")
    except (TypeError, ValueError, NotImplementedError) as exc:
        error = (type(exc).__name__, str(exc))
        return {"seqlen": 0}, error
    meta = {
        "seqlen": q.shape[1],
        "batch": q.shape[0], "heads": q.shape[2], "kv_heads": k.shape[2], "headdim": q.shape[3],
        "dtype": str(q.dtype), "device type": q.device.type,
        "requires_grad (grad mode, q, k, v, gate)": (torch.is_grad_enabled(), q.requires_grad, k.requires_grad,
                                                     v.requires_grad, gate is not None and gate.requires_grad),
        "shape": shape, "causal": causal, "mode": mode,
        "order": order, "sinks": sinks, "softmax_scale": softmax_scale, "backend": backend, "max_halo": max_halo,
        "gate": None if gate is None else (tuple(gate.shape), str(gate.dtype), tuple(gate.detach().flatten().tolist())),
        "positions": None if positions is None else (
            tuple(positions.inv_freq.detach().flatten().tolist()), positions.attention_scaling, positions.rotated),
    }
    return meta, error


_ERRORS = {"TypeError": TypeError, "ValueError": ValueError, "NotImplementedError": NotImplementedError}


def _raise_disagreements(metas: list) -> None:
    """Raise, on every rank alike, the first rank's input error, or the options the ranks
    disagree on."""
    for r, (_, error) in enumerate(metas):
        if error is not None:
            kind, message = error
            raise _ERRORS[kind](f"sequence_parallel_tensorized_attn: rank {r}: {message}")
    first = metas[0][0]
    for key in first:
        if key == "seqlen":
            continue
        values = [m[key] for m, _ in metas]
        if any(x != values[0] for x in values):
            shown = ", ".join(f"rank {r}: {_short(x)}" for r, x in enumerate(values))
            raise ValueError(f"sequence_parallel_tensorized_attn: the ranks disagree on {key} ({shown}); every rank "
                             f"must pass the same options and sizes, only the sequence length (dim 1) may differ")


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _halo_pass(run: _Run, t, step, entry: PassPlan, q, k, values, sink_k, sink_v):
    """A local pass, with the previous rank's last keys and values when it is a halo pass
    (the reference backend computes the halo's queries too, and drops their rows)."""
    L = q.shape[1]
    h = entry.halo[run.rank]
    if entry.kind == "halo":
        nxt = entry.halo[run.rank + 1] if run.rank + 1 < run.world else 0
        if run.backend == "triton":
            return _split_halo_pass(run, t, step, q, k, values, h, nxt)
        k, values = _WithHalo.apply(k, values, h, nxt, run.group)
    start = run.offsets[run.rank] - h
    slots = torch.arange(start, start + h + L, device=q.device)
    q_l = F.pad(q, (0, 0, 0, 0, h, 0)) if h else q
    out = _local_pass(run, t, step, step.stride, q_l, k, values, slots, h + L, sink_k, sink_v)
    return out[:, h:]


def _split_halo_pass(run: _Run, t, step, q, k, values, h, nxt):
    """A halo pass on the Triton backend (no sinks). This rank's last ``nxt`` rows of k and
    the values go to the next rank; the previous rank's last ``h`` are received into
    buffers of their own while the kernels attend this rank's queries to its own keys, and
    their keys are then folded in by log-sum-exp (:func:`~.ops.triton.launch.split_pass_triton`):
    the transfer overlaps the computation instead of holding it up. With rotary tensor
    positions each rank rotates its q and k at the global fiber indices ``p // s`` first
    (the keys it sends with them): a pass's scores depend only on the difference of the
    indices of two positions of one residue, the same in every rank's frame."""
    from .ops.triton.launch import split_pass_triton

    L = q.shape[1]
    o = run.offsets[run.rank]
    n, s = step.size, step.stride
    positions = run.positions
    if positions is not None:
        rows = torch.arange(o, o + L, device=q.device) // s
        q, k = (rotate(x.transpose(1, 2), rows, positions.inv_freq, scale=positions.attention_scaling).transpose(1, 2)
                for x in (q, k))
        run = dataclasses.replace(run, positions=None)
    pending: list = []
    k, values, k_halo, v_halo = _HaloApart.apply(k, values, h, nxt, run.group, pending)
    if not h:
        return _local_pass(run, t, step, s, q, k, values, torch.arange(o, o + L, device=q.device), L, None, None)
    gate = None if run.gate is None else run.gate[:, t].to(torch.float32).contiguous()

    def wait():
        for finish in pending:
            finish()

    return split_pass_triton(q, k, values, k_halo, v_halo, wait, (-(-(h + L) // (n * s)), n, s), causal=run.causal,
                             mode=run.mode, gate=gate, softmax_scale=run.scale)


def _regrouped_pass(run: _Run, t, step, entry: PassPlan, q, k, values, sink_k, sink_v):
    """One all-to-all to the layout of ``entry``, the pass, and one all-to-all back."""
    L = q.shape[1]
    device = q.device
    mine = torch.arange(run.offsets[run.rank], run.offsets[run.rank] + L, device=device)
    dest = _computing_rank(entry, mine)
    send_order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=run.world).tolist()
    slots, layout_stride, real = _layout(entry, run.seqlen, run.rank, device)
    # the real slots are a prefix, in increasing position: their owners are in rank order,
    # which is the order the all-to-all delivers them in (each rank sends its rows in order)
    recv_counts = torch.bincount(_owner(run.offsets, slots[:real]), minlength=run.world).tolist()

    def there(x):
        """[B, L, h, D] -> [B, slots, h, D]: each token's row to the rank that computes its
        pass (one gather copy, then the all-to-all; padding slots are zeros)."""
        got = _all_to_all(x.transpose(0, 1).index_select(0, send_order), send_counts, recv_counts, run.group)
        if real < len(slots):
            got = F.pad(got, (0, 0, 0, 0, 0, 0, 0, len(slots) - real))
        return got.transpose(0, 1)

    q_l, k_l, v_l = there(q), there(k), there(values)
    out = _local_pass(run, t, step, layout_stride, q_l, k_l, v_l, slots, real, sink_k, sink_v)
    # back: each output to the rank that holds its token
    back = _all_to_all(out.transpose(0, 1)[:real], recv_counts, send_counts, run.group)
    return back.new_empty(back.shape).index_copy(0, send_order, back).transpose(0, 1)


def _layout(entry: PassPlan, N: int, d: int, device) -> tuple[torch.Tensor, int, int]:
    """What rank d computes in an all-to-all pass: the positions of its slots (``>= N``:
    padding; whole fibers of the pass), the layout's stride, and how many slots (a prefix)
    hold a position."""
    n, s = entry.size, entry.stride
    lo, hi = entry.bounds[d], entry.bounds[d + 1]
    if entry.layout == "ranges":
        count = -(-(hi - lo) // (n * s)) * n * s
        slots = torch.arange(lo, lo + count, device=device)
        return torch.where(slots < hi, slots, N + slots), s, hi - lo
    R = hi - lo
    rows = -(-N // (n * s)) * n
    slots = (torch.arange(rows, device=device)[:, None] * s + torch.arange(lo, hi, device=device)).flatten()
    real = int((slots < N).sum())
    return torch.where(slots < N, slots, N + slots), R, real


def _computing_rank(entry: PassPlan, positions: torch.Tensor) -> torch.Tensor:
    """The rank that computes the pass at each position (all-to-all passes)."""
    bounds = torch.tensor(entry.bounds[1:-1], device=positions.device, dtype=positions.dtype)
    key = positions if entry.layout == "ranges" else positions % entry.stride
    return torch.bucketize(key, bounds, right=True)


def _owner(offsets: list[int], positions: torch.Tensor) -> torch.Tensor:
    """The rank whose slice holds each position."""
    bounds = torch.tensor(offsets[1:], device=positions.device, dtype=positions.dtype)
    return torch.bucketize(positions, bounds, right=True)


def _local_pass(run: _Run, t, step, layout_stride, q_l, k_l, v_l, slots, real, sink_k, sink_v):
    """Pass ``step`` over this rank's slots (``real``: the prefix that holds positions);
    returns ``[B, len(slots), H, D]`` (exact where every key of a slot is present)."""
    B, P, H, D = k_l.shape[0], k_l.shape[1], q_l.shape[2], q_l.shape[3]
    if real == 0:
        return q_l.new_zeros((B, P, H, D))
    n = step.size
    whole = n * layout_stride
    gate = None if run.gate is None else run.gate[:, t]
    if run.backend == "triton":
        from .ops.triton import tensorized_attn_triton

        local_shape = (-(-real // whole), n, layout_stride)
        out = tensorized_attn_triton(q_l[:, :real], k_l[:, :real], v_l[:, :real], local_shape, causal=run.causal,
                                     mode=run.mode, order=(1,), gate=None if gate is None else gate[:, None],
                                     sinks=0, softmax_scale=run.scale, positions=run.positions)
        return out if P == real else F.pad(out, (0, 0, 0, 0, 0, P - real))
    from .ops.reference import fold_pass_reference

    extra = -P % whole
    if extra:  # whole fibers: padding at the end
        q_l, k_l, v_l = (F.pad(x, (0, 0, 0, 0, 0, extra)) for x in (q_l, k_l, v_l))
        pad = torch.arange(P, P + extra, device=slots.device)
        slots = torch.cat([slots, run.seqlen + pad])
    out = fold_pass_reference(q_l, k_l, v_l, step, slots, layout_stride=layout_stride, seqlen=run.seqlen,
                              shape=run.shape, sinks=run.sinks, sink_k=sink_k, sink_v=sink_v, gate=gate,
                              softmax_scale=run.scale, positions=run.positions)
    return out[:, :P]
