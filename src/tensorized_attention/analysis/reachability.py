"""Which keys a query reads in each pass, and which keys can influence it after all passes
(DESIGN.md §2), as boolean matrices, ASCII art and a picture.

The pass masks are :func:`tensorized_attention.passes.pass_mask`. A value moves one hop per
pass, so the output at ``p`` depends on ``v[p']`` exactly when the boolean product
``M_last ... M_first`` (every mask holds its diagonal, so shorter paths count too) is true
at ``[p, p']``: the *reachability*. Causal ``block`` leaves earlier pairs unreached (about
half of them at 4 x 4 x 4); ``complete`` reaches every ``p' <= p`` in any order.

``print(draw_reachability((4, 4), mode="block", path="reach.png"))`` prints the ASCII art
and draws the picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..fold import check_shape, coordinates
from ..passes import MODES, pass_mask

__all__ = ["default_query", "draw_reachability", "reachable", "unreached_pairs"]

MATRIX_LIMIT = 64  # the full N x N matrix is drawn in ASCII up to this N


def _resolve(shape, mode, causal, order, sinks, seqlen):
    shape = check_shape(shape)
    m = len(shape)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    mode = mode or ("complete" if causal else "block")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "complete" and not causal:
        raise ValueError("mode='complete' is causal only; use mode='block' with causal=False")
    order = tuple(range(m)) if order is None else tuple(order)
    if sorted(order) != list(range(m)):
        raise ValueError(f"order must be a permutation of the dims 0 .. {m - 1}, got {order}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    size = math.prod(shape)
    seqlen = size if seqlen is None else seqlen
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or not 1 <= seqlen <= size:
        raise ValueError(f"seqlen must be an int in [1, prod(shape) = {size}] for the fold {shape}, got {seqlen!r}")
    return shape, mode, order, seqlen


def reachable(shape: Sequence[int], *, mode: str | None = None, causal: bool = True,
                 order: Sequence[int] | None = None, sinks: int = 0, seqlen: int | None = None):
    """The pass masks and the reachability of one call of the operator.

    Returns ``(masks, reach)``: ``masks`` a list of ``[seqlen, seqlen]`` bool tensors, one
    per pass in ``order`` (``[p, p']``: query p reads key p' in that pass, sinks
    included), and ``reach`` ``[seqlen, seqlen]`` bool: the output at p depends on the
    value at p' (the boolean product of the masks, last pass on the left).

    >>> masks, reach = reachable((4, 4), mode="block")
    >>> bool(reach[9, 7]), bool(reachable((4, 4), mode="complete")[1][9, 7])
    (False, True)
    """
    shape, mode, order, seqlen = _resolve(shape, mode, causal, order, sinks, seqlen)
    masks = [pass_mask(seqlen, shape, dim, mode=mode, causal=causal, sinks=sinks) for dim in order]
    reach = torch.eye(seqlen, dtype=torch.bool)
    for mask in masks:
        reach = (mask.to(torch.float64) @ reach.to(torch.float64)) > 0
    return masks, reach


def unreached_pairs(reach: torch.Tensor, causal: bool = True) -> tuple[int, int]:
    """``(unreached, pairs)``: of the pairs a full attention would connect (``p' < p`` when
    causal, ``p' != p`` otherwise), how many ``reach`` misses, and how many there are."""
    n = reach.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed = allowed.tril(-1) if causal else allowed & ~torch.eye(n, dtype=torch.bool)
    return int((allowed & ~reach).sum()), int(allowed.sum())


def default_query(shape: Sequence[int], seqlen: int | None = None) -> int:
    """The query the pictures show unless told: coordinates ``(n_1 // 2, 1, ..., 1)`` (each
    1 capped at ``n_j - 1``), position 9 on a 4 x 4 fold as in the operator's docstring,
    moved to ``seqlen - 1`` when the fold is padded below it.

    >>> default_query((4, 4)), default_query((4, 4, 4))
    (9, 37)
    """
    shape = check_shape(shape)
    st = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    coords = [shape[0] // 2] + [min(1, n - 1) for n in shape[1:]]
    p = sum(c * s for c, s in zip(coords, st, strict=True))
    size = math.prod(shape)
    return min(p, (seqlen if seqlen is not None else size) - 1)


def _grid(shape, seqlen, cell) -> list[str]:
    """Positions laid out as rows of the last dimension (rows: dims 0 .. m-2 flattened)."""
    width = shape[-1]
    rows = math.prod(shape[:-1])
    lines = []
    for r in range(rows):
        cells = [cell(p) if p < seqlen else " " for p in range(r * width, (r + 1) * width)]
        lines.append(" ".join(cells))
    return lines


def draw_reachability(shape: Sequence[int], *, mode: str | None = None, causal: bool = True,
                      order: Sequence[int] | None = None, sinks: int = 0, seqlen: int | None = None,
                      query: int | None = None, path=None, matrix_limit: int = MATRIX_LIMIT) -> str:
    """ASCII art of the passes and the reachability of one call (returned), and, when
    ``path`` is given, the same as a PNG picture (matplotlib).

    The ASCII art has, as the operator's docstring draws it, one panel per pass for the
    query ``query`` (default :func:`default_query`) on the fold laid out as rows of its last
    dimension: ``q`` the query, ``x`` a key it reads, ``s`` a sink it reads beyond its pass
    mask, ``.`` the rest; then a panel of what reaches the query after all passes (``x``
    reached, ``-`` a key full attention would read that no path reaches, ``.`` after the
    query); then, for ``seqlen <= matrix_limit``, the whole ``seqlen x seqlen`` reachability
    (rows: queries, columns: keys, same symbols), and the count of unreached pairs.

    The picture shows every pass mask and the reachability as ``seqlen x seqlen`` images,
    the unreached pairs in red.

    >>> print(draw_reachability((4, 4), mode="block", matrix_limit=0))  # doctest: +NORMALIZE_WHITESPACE
    fold 4x4, mode=block, causal, order 0,1, seqlen 16; query 9 = (2, 1)
    pass along dim 0    pass along dim 1    after all passes
    . x . .             . . . .             x x - -
    . x . .             . . . .             x x - -
    . q . .             x q . .             x q . .
    . . . .             . . . .             . . . .
    unreached pairs (p' < p that no path connects): 36 of 120
    (the 16 x 16 reachability matrix is drawn for seqlen <= matrix_limit = 0)
    """
    shape, mode, order, seqlen = _resolve(shape, mode, causal, order, sinks, seqlen)
    masks, reach = reachable(shape, mode=mode, causal=causal, order=order, sinks=sinks, seqlen=seqlen)
    plain = [pass_mask(seqlen, shape, dim, mode=mode, causal=causal) for dim in order]
    query = default_query(shape, seqlen) if query is None else query
    if isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < seqlen:
        raise ValueError(f"query must be a position in [0, {seqlen - 1}], got {query!r}")

    def pass_cell(t):
        def cell(p):
            if p == query:
                return "q"
            return "x" if plain[t][query, p] else "s" if masks[t][query, p] else "."
        return cell

    def reach_cell(p):
        if p == query:
            return "q"
        if reach[query, p]:
            return "x"
        return "-" if (p < query or not causal) else "."

    panels = [[f"pass along dim {dim}", *_grid(shape, seqlen, pass_cell(t))] for t, dim in enumerate(order)]
    panels.append(["after all passes", *_grid(shape, seqlen, reach_cell)])
    width = max(len(line) for panel in panels for line in panel)
    coords = tuple(coordinates(query, shape).tolist())
    header = (f"fold {'x'.join(map(str, shape))}, mode={mode}, {'causal' if causal else 'bidirectional'}, "
              f"order {','.join(map(str, order))}, seqlen {seqlen}" + (f", sinks {sinks}" if sinks else "")
              + f"; query {query} = {coords}")
    lines = [header]
    for i in range(len(panels[0])):
        lines.append("    ".join(panel[i].ljust(width) for panel in panels).rstrip())
    missing, pairs = unreached_pairs(reach, causal)
    what = "p' < p" if causal else "p' != p"
    lines.append(f"unreached pairs ({what} that no path connects): {missing} of {pairs}")
    if seqlen <= matrix_limit:
        lines.append("reachability (row: query p, column: key p'; x reached, - never reached, . after p):")
        for p in range(seqlen):
            cells = ["x" if reach[p, k] else "-" if (k < p or not causal) else "." for k in range(seqlen)]
            lines.append(f"{p:>4} " + "".join(cells))
    else:
        lines.append(f"(the {seqlen} x {seqlen} reachability matrix is drawn for seqlen <= matrix_limit = "
                     f"{matrix_limit})")
    if path is not None:
        _plot(path, shape, mode, causal, order, sinks, masks, reach, header=header.split(";")[0],
              missing=missing, pairs=pairs)
    return "\n".join(lines)


def _plot(path, shape, mode, causal, order, sinks, masks, reach, *, header, missing, pairs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = reach.shape[0]
    panels = len(masks) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.9), squeeze=False)
    axes = axes[0]
    grey = ListedColormap(["white", "#335"])
    for ax, dim, mask in zip(axes, order, masks, strict=False):
        ax.imshow(mask.numpy(), cmap=grey, interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"pass along dim {dim}: {int(mask.sum())} reads", fontsize=9)
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed = allowed.tril(-1) if causal else allowed & ~torch.eye(n, dtype=torch.bool)
    picture = reach.to(torch.int64) + 2 * (allowed & ~reach).to(torch.int64)  # 0 no, 1 reached, 2 unreached
    axes[-1].imshow(picture.numpy(), cmap=ListedColormap(["white", "#335", "#d62728"]), vmin=0, vmax=2,
                    interpolation="nearest")
    axes[-1].set_title(f"after all passes: {missing} of {pairs}\npairs unreached (red)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("key p'", fontsize=8)
        ax.set_ylabel("query p", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(header, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
