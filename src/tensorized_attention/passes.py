"""The passes of tensorized attention: what each one reads (DESIGN.md §2).

A plan is a list of passes, run one after the other; each reads q and k (never
changed) and the values left by the pass before it. A pass kind is a small dataclass;
backends dispatch on it, so new kinds (selected, pooled, ...) join the list without a
rewrite of the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fold import coordinates, strides

__all__ = ["FoldPass", "PooledPass", "SelectedPass", "plan_passes", "pass_mask", "draw_passes"]

MODES = ("block", "complete")


@dataclass(frozen=True)
class FoldPass:
    """Attention along one dimension ``dim`` of the fold.

    ``mode="block"``: a query reads the keys of its fiber (every coordinate but ``dim``
    equal), the earlier ones only when causal. ``mode="complete"`` (causal only): a query
    at ``p`` reads ``p - t * stride`` for ``0 <= t < size``: a causal sliding window of
    ``size`` keys dilated by ``stride``.
    """

    dim: int
    size: int  # n_dim
    stride: int  # s_dim
    mode: str
    causal: bool

    def reads(self, p: torch.Tensor, key: torch.Tensor, shape) -> torch.Tensor:
        """Whether position(s) ``p`` may read ``key`` in this pass (broadcasting)."""
        if self.mode == "complete":
            d = p - key
            return (d >= 0) & (d % self.stride == 0) & (d // self.stride < self.size)
        cp, ck = coordinates(p, shape), coordinates(key, shape)
        others = [j for j in range(len(shape)) if j != self.dim]
        same = (cp[..., others] == ck[..., others]).all(-1)
        if self.causal:
            same &= ck[..., self.dim] <= cp[..., self.dim]
        return same


@dataclass(frozen=True)
class SelectedPass:
    """A content-addressed pass (DESIGN.md §8): each query reads its causal window, every
    token of the ``topk`` earlier blocks it ranks highest, and the sinks. Causal only.

    Blocks: block ``b`` holds positions ``b * block .. (b + 1) * block - 1``. The query at
    ``p``, in block ``c = p // block``, reads, each key once, in one softmax:

    * its window: the keys ``p'`` with ``0 <= p - p' < block``;
    * its selected blocks: the candidates are the blocks ``b < c`` (all whole and before
      ``p``'s block); block ``b`` scores, with q and k unrotated (content alone),
      ``score="mean"``: ``softmax_scale * q_p . mean(k over block b)``, or
      ``score="bound"``: ``softmax_scale * sum_d max(q_pd kmax_bd, q_pd kmin_bd)``, with
      ``kmax_b``, ``kmin_b`` the channel-wise max and min of the block's keys (an upper
      bound of the block's best ``q . k``, which filler does not dilute);
      the query selects the ``r = min(topk, c)`` best (of equal scores, the later block)
      and reads their tokens not in its window;
    * the sinks ``0 .. S-1`` (``<= p``) in neither.

    The ranking has no gradient (the choice of blocks is discrete); the attention over what
    it chose does. As the last pass after the fold passes it reads their output values;
    alone (``order=()``) it reads v.

    Positions (with rotary tensor positions): a window key is seen at its distance
    ``p - p'``; the selected blocks ``b_0 < ... < b_{r-1}`` are seen just before the window,
    in their order: token ``j`` of ``b_i`` at distance ``(r - i + 1) * block - 1 - j``;
    sink ``s`` at ``(r + 1) * block + S - 1 - s``. No distance reaches
    ``(topk + 1) * block + S``, whatever the length.
    """

    block: int
    topk: int
    score: str = "mean"

    def __post_init__(self):
        for name in ("block", "topk"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"SelectedPass.{name} must be an int >= 1, got {x!r}")
        if self.score not in SCORES:
            raise ValueError(f"SelectedPass.score must be one of {SCORES}, got {self.score!r}")


SCORES = ("mean", "bound")  # how a SelectedPass ranks blocks


@dataclass(frozen=True)
class PooledPass:
    """A content-addressed pass that reads summaries (DESIGN.md §8), causal: each query reads
    its causal window, one summary of every earlier block, and the sinks.

    Blocks as in :class:`SelectedPass`. The query at ``p`` (block ``c = p // block``) reads,
    in one softmax: its window (``0 <= p - p' < block``); for every block ``b < c`` one
    summary, whose key is the mean of the block's keys and whose value the mean of the
    block's input values; and the sinks ``0 .. S-1`` (``<= p``) outside its window. With
    rotary positions the window keys are seen at their distance, the summaries without
    rotation (by content alone, as the query at distance 0), sink ``s`` at ``block + S - 1 -
    s``. Cost per query: ``block + p // block + S`` keys.
    """

    block: int

    def __post_init__(self):
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"PooledPass.block must be an int >= 1, got {self.block!r}")


def plan_passes(shape, order, mode: str, causal: bool) -> list[FoldPass]:
    """The passes of one call, in the order they run. Inputs are assumed validated."""
    st = strides(shape)
    return [FoldPass(dim=j, size=shape[j], stride=st[j], mode=mode, causal=causal) for j in order]


def pass_mask(seqlen: int, shape, dim: int, *, mode: str, causal: bool, sinks: int = 0) -> torch.Tensor:
    """Dense boolean ``(seqlen, seqlen)`` mask of one pass: ``[p, key]`` is True when
    query ``p`` reads ``key`` (sinks included). O(seqlen^2): for pictures and tests."""
    (plan,) = plan_passes(shape, [dim], mode, causal)
    pos = torch.arange(seqlen)
    p, key = pos[:, None], pos[None, :]
    mask = plan.reads(p, key, shape)
    sink = (key < sinks) & (key <= p if causal else True)
    return mask | sink


def draw_passes(shape, position: int, *, mode: str, causal: bool = True, sinks: int = 0, order=None) -> str:
    """ASCII picture of which positions query ``position`` reads in each pass.

    Only 2-dim folds are drawn as grids (rows: dim 0, columns: dim 1). ``q`` marks the
    query, ``x`` a key it reads, ``s`` a sink it reads beyond its pass mask, ``.`` the rest.
    """
    if len(shape) != 2:
        raise ValueError(f"draw_passes draws 2-dim folds, got shape={tuple(shape)}")
    order = list(range(len(shape))) if order is None else list(order)
    n1, n2 = shape
    size = n1 * n2
    panels = []
    for dim in order:
        mask = pass_mask(size, shape, dim, mode=mode, causal=causal, sinks=sinks)[position]
        plain = pass_mask(size, shape, dim, mode=mode, causal=causal)[position]
        rows = [f"pass along dim {dim}".ljust(2 * n2 + 1)]
        for i in range(n1):
            cells = []
            for c in range(n2):
                p = i * n2 + c
                cells.append("q" if p == position else "x" if plain[p] else "s" if mask[p] else ".")
            rows.append(" ".join(cells).ljust(2 * n2 + 1))
        panels.append(rows)
    width = max(len(r) for rows in panels for r in rows)
    lines = ["    ".join(rows[i].ljust(width) for rows in panels).rstrip() for i in range(n1 + 1)]
    return "\n".join(lines)
