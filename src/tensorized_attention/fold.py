"""The fold: how a sequence of ``seqlen`` positions is laid out as an order-m tensor.

A fold ``shape = (n_1, ..., n_m)`` maps position ``p`` to coordinates
``(i_1, ..., i_m)`` in row-major order: ``p = sum_j i_j * s_j`` with stride
``s_j = n_{j+1} * ... * n_m``. The last dimension is contiguous (local), the first
is the coarsest. When ``prod(shape) > seqlen`` the fold is padded at the end.

Dimensions are numbered from 0 in code (``0 .. m-1``); DESIGN.md numbers them from 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_shape",
    "choose_shape",
    "coordinates",
    "fold_size",
    "strides",
]


def check_shape(shape, seqlen: int | None = None, *, name: str = "shape") -> tuple[int, ...]:
    """Validate a fold and return it as a tuple of Python ints.

    Raises TypeError for a non-sequence or non-integer entries, ValueError for an empty
    fold, entries < 1, or (when ``seqlen`` is given) a fold smaller than ``seqlen``.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(
            f"{name} must be a sequence of positive ints (n_1, ..., n_m), got {type(shape).__name__}"
        )
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension, got {tuple(shape)}")
    out = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} entries must be Python ints, got {tuple(shape)!r}")
        if n < 1:
            raise ValueError(f"{name} entries must be >= 1, got {tuple(shape)}")
        out.append(int(n))
    shape = tuple(out)
    if seqlen is not None and math.prod(shape) < seqlen:
        raise ValueError(
            f"{name}={shape} holds prod({name})={math.prod(shape)} positions, fewer than "
            f"seqlen={seqlen}; the fold must hold at least seqlen positions"
        )
    return shape


def fold_size(shape: Sequence[int]) -> int:
    """Number of positions the fold holds, ``prod(shape)`` (seqlen plus padding)."""
    return math.prod(shape)


def strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides ``s_j = prod(shape[j+1:])``; the last is 1.

    >>> strides((4, 3, 2))
    (6, 2, 1)
    """
    out = []
    s = 1
    for n in reversed(shape):
        out.append(s)
        s *= n
    return tuple(reversed(out))


def coordinates(positions: torch.Tensor | int, shape: Sequence[int]) -> torch.Tensor:
    """Coordinates ``(..., m)`` of integer positions in the fold.

    >>> coordinates(torch.tensor([0, 5, 11]), (4, 3)).tolist()
    [[0, 0], [1, 2], [3, 2]]
    """
    positions = torch.as_tensor(positions)
    if positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    coords = [(positions // s) % n for n, s in zip(shape, strides(shape), strict=True)]
    return torch.stack(coords, dim=-1)


def _power_of_two_split(exponent: int, ndim: int) -> list[int]:
    """Split ``2**exponent`` into ``ndim`` powers of two as evenly as possible,
    the larger ones first (coarsest dimensions)."""
    base, extra = divmod(exponent, ndim)
    return [2 ** (base + (1 if j < extra else 0)) for j in range(ndim)]


def choose_shape(seqlen: int, ndim: int = 2, *, local: int | None = None) -> tuple[int, ...]:
    """The library's fold for ``seqlen`` positions (deterministic).

    Rule:

    1. ``local=None``: take ``P = 2**ceil(log2(seqlen))`` and split its exponent over the
       ``ndim`` dimensions as evenly as possible, the extra factors of two going to the
       coarsest dimensions (131072 with ``ndim=2`` gives 512 x 256; with ``ndim=3``,
       64 x 64 x 32).
       ``local=W``: the contiguous (last) dimension is ``W``, and the other ``ndim - 1``
       dimensions follow step 1 for ``ceil(seqlen / W)`` positions.
    2. The coarsest dimension is then shrunk to ``ceil(seqlen / prod(rest))``, so that the
       padding is smaller than one slice of the coarsest dimension.

    >>> choose_shape(131072)
    (512, 256)
    >>> choose_shape(131072, 3)
    (64, 64, 32)
    >>> choose_shape(100000)
    (391, 256)
    >>> choose_shape(100000, local=256)
    (391, 256)
    >>> choose_shape(5000, 3, local=64)
    (10, 8, 64)
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be an int >= 1, got {seqlen!r}")
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim must be an int >= 1, got {ndim!r}")
    if local is not None:
        if isinstance(local, bool) or not isinstance(local, int) or local < 1:
            raise ValueError(f"local must be None or an int >= 1, got {local!r}")
        if ndim == 1:
            raise ValueError("local needs ndim >= 2 (the contiguous dimension plus at least one more)")
        outer = choose_shape(-(-seqlen // local), ndim - 1)
        return (*outer, local)
    dims = _power_of_two_split(max(seqlen - 1, 0).bit_length(), ndim)
    rest = math.prod(dims[1:])
    dims[0] = -(-seqlen // rest)
    return tuple(dims)
