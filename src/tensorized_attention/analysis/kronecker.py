"""The Kronecker structure of an attention matrix for a fold (Van Loan and Pitsianis).

The fold ``shape = (n_1, ..., n_m)`` numbers positions row-major, dimension 1 the coarsest
(:mod:`tensorized_attention.fold`): ``p = i_1 s_1 + ... + i_m s_m``. With the same order
``torch.kron`` uses, ``kron(A_1, ..., A_m)[p, p'] = A_1[i_1, i'_1] ... A_m[i_m, i'_m]``:
``A_1`` acts along the coarsest dimension (the pass along dim 0 in code), ``A_m`` along the
contiguous one. A product of tensorized passes is therefore compared with
``A_1 ⊗ ... ⊗ A_m`` in this order.

Two factors (a split of the fold at dimension ``k``: ``P = n_1 ... n_k`` outer positions,
``Q = n_{k+1} ... n_m`` inner ones, ``N = P Q``): the rearrangement

    R[a P + a', b Q + b'] = A[a Q + b, a' Q + b']      (R is P² x Q²)

turns every Kronecker product ``B ⊗ C`` into the rank-1 matrix ``vec(B) vec(C)ᵀ``
(row-major vec), so the SVD of ``R`` gives the nearest sums of Kronecker products
(Van Loan and Pitsianis, 1993): ``A_r = Σ_{i<=r} σ_i B_i ⊗ C_i`` with
``||A - A_r||_F² = Σ_{i>r} σ_i²``. The singular values of ``R`` are the *Kronecker
spectrum*; the number of nonzero ones the *Kronecker rank* (at that split). For m > 2
factors, the same rearrangement at every dimension gives an order-m tensor with modes of
size ``n_j²`` whose CP decomposition is the m-factor Kronecker sum
(:func:`tensorized_attention.analysis.cp.kronecker_cp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..fold import check_shape

__all__ = [
    "energy_captured",
    "kronecker_approximation",
    "kronecker_rearrange",
    "kronecker_spectrum",
    "matrix_spectrum",
    "nearest_kronecker",
    "numerical_rank",
    "split_sizes",
    "truncation_errors",
]

METHODS = ("svd", "gram")


def _check_matrix(A: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"the attention matrix must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"the attention matrix must be square [N, N], got shape {tuple(A.shape)}")
    if A.is_complex() or not A.is_floating_point():
        raise TypeError(f"the attention matrix must be real floating point, got {A.dtype}")
    if shape is not None and math.prod(shape) != A.shape[0]:
        raise ValueError(
            f"the fold {tuple(shape)} holds {math.prod(shape)} positions but the matrix is "
            f"{A.shape[0]} x {A.shape[0]}; the analysis needs prod(shape) == N exactly (no padding)"
        )
    if not torch.isfinite(A).all():
        raise ValueError("the attention matrix holds NaN or infinite entries")
    return A


def split_sizes(shape: Sequence[int], split: int | None = None) -> tuple[int, int]:
    """``(P, Q)``: the positions of dims ``[0, split)`` and of ``[split, m)``.

    ``split`` defaults to 1 for a 2-dim fold; for other folds it must be given
    (1 <= split <= m - 1).

    >>> split_sizes((4, 8, 2), 2)
    (32, 2)
    """
    shape = check_shape(shape)
    m = len(shape)
    if split is None:
        if m != 2:
            raise ValueError(
                f"a {m}-dim fold {shape} has {max(m - 1, 0)} places to split in two; give split "
                f"(1 .. {m - 1}), or use kronecker_cp for the {m}-factor Kronecker sum"
            )
        split = 1
    if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= m - 1:
        raise ValueError(f"split must be an int in [1, {m - 1}] for the fold {shape}, got {split!r}")
    return math.prod(shape[:split]), math.prod(shape[split:])


def kronecker_rearrange(A: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """The Van Loan–Pitsianis rearrangement ``R`` (``outer² x inner²``) of ``A``
    (``N x N``, ``N = outer * inner``): ``kron(B, C)`` becomes ``outer(B.flatten(), C.flatten())``.

    >>> B, C = torch.randn(3, 3), torch.randn(2, 2)
    >>> torch.allclose(kronecker_rearrange(torch.kron(B, C), 3, 2), torch.outer(B.flatten(), C.flatten()))
    True
    """
    _check_matrix(A)
    if outer * inner != A.shape[0]:
        raise ValueError(f"outer * inner = {outer} * {inner} must equal N = {A.shape[0]}")
    return A.reshape(outer, inner, outer, inner).permute(0, 2, 1, 3).reshape(outer * outer, inner * inner)


def _singular_values(M: torch.Tensor, method: str) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "svd":
        return torch.linalg.svdvals(M)
    # the smaller Gram matrix: its eigenvalues are the squared singular values, exact to
    # about eps * sigma_1**2 (so energies are exact; singular values below ~1e-8 sigma_1 are noise)
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    ev = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
    return ev.sqrt()


def matrix_spectrum(A: torch.Tensor, *, method: str = "svd", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``A`` (descending), computed in ``dtype`` (float64 unless told).
    ``method="gram"``: from the eigenvalues of ``A Aᵀ``, about twice as fast, exact in energy
    (``σ²``) to ``eps σ_1²`` but not for singular values below about ``sqrt(eps) σ_1``."""
    return _singular_values(_check_matrix(A).to(dtype), method)


def kronecker_spectrum(A: torch.Tensor, shape: Sequence[int], split: int | None = None, *,
                       method: str = "svd", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Kronecker spectrum of ``A`` for the fold ``shape`` split at ``split``: the
    singular values (descending) of its rearrangement (:func:`kronecker_rearrange`), computed
    in ``dtype``; ``min(P², Q²)`` of them. ``method`` as for :func:`matrix_spectrum`.

    >>> A = torch.kron(torch.rand(4, 4, dtype=torch.float64), torch.rand(8, 8, dtype=torch.float64))
    >>> s = kronecker_spectrum(A, (4, 8))
    >>> len(s), bool(s[1] < 1e-12 * s[0])
    (16, True)
    """
    shape = check_shape(shape)
    _check_matrix(A, shape)
    P, Q = split_sizes(shape, split)
    return _singular_values(kronecker_rearrange(A.to(dtype), P, Q), method)


def truncation_errors(s: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius errors ``||A - A_r|| / ||A||`` of the best rank-r approximations,
    r = 0 .. len(s), from singular values ``s`` (descending): ``sqrt(Σ_{i>r} s_i² / Σ s_i²)``.

    >>> truncation_errors(torch.tensor([3.0, 4.0])).tolist()
    [1.0, 0.8, 0.0]
    """
    e = s.double() ** 2
    total = e.sum()
    if total <= 0:
        raise ValueError("the matrix is zero: relative errors are undefined")
    tail = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])
    return (tail / total).clamp_min(0).sqrt()


def energy_captured(s: torch.Tensor) -> torch.Tensor:
    """Share of the energy ``||A||_F²`` the best rank-r approximations hold, r = 0 .. len(s):
    ``1 - truncation_errors(s)**2``.

    >>> [round(e, 6) for e in energy_captured(torch.tensor([3.0, 4.0])).tolist()]
    [0.0, 0.36, 1.0]
    """
    return 1 - truncation_errors(s) ** 2


def numerical_rank(s: torch.Tensor, rtol: float = 1e-10) -> int:
    """How many singular values exceed ``rtol`` times the largest.

    >>> numerical_rank(torch.tensor([1.0, 1e-3, 1e-14]))
    2
    """
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def nearest_kronecker(A: torch.Tensor, shape: Sequence[int], rank: int = 1, split: int | None = None):
    """The nearest sum of ``rank`` Kronecker products to ``A`` in the Frobenius norm, for
    the fold ``shape`` split at ``split`` (Van Loan–Pitsianis, exact, by SVD): returns
    ``(factors, s)`` with ``factors`` a list of ``rank`` pairs ``(B_i, C_i)`` (``P x P`` and
    ``Q x Q``, float64, ``σ_i`` split evenly between them) so that
    ``Σ_i kron(B_i, C_i)`` is the approximation, and ``s`` the whole Kronecker spectrum.

    >>> B, C = torch.randn(3, 3, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    >>> [(B1, C1)], s = nearest_kronecker(torch.kron(B, C), (3, 5))
    >>> bool(torch.allclose(torch.kron(B1, C1), torch.kron(B, C)))
    True
    """
    shape = check_shape(shape)
    _check_matrix(A, shape)
    P, Q = split_sizes(shape, split)
    R = kronecker_rearrange(A.double(), P, Q)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(R.shape):
        raise ValueError(f"rank must be an int in [1, {min(R.shape)}] (min(P², Q²)) for P={P}, Q={Q}, got {rank!r}")
    U, s, Vh = torch.linalg.svd(R, full_matrices=False)
    root = s[:rank].sqrt()
    factors = [((U[:, i] * root[i]).reshape(P, P), (Vh[i] * root[i]).reshape(Q, Q)) for i in range(rank)]
    return factors, s


def kronecker_approximation(A: torch.Tensor, shape: Sequence[int], rank: int = 1,
                            split: int | None = None) -> torch.Tensor:
    """``Σ_{i<=rank} B_i ⊗ C_i``, the nearest Kronecker sum of :func:`nearest_kronecker`, as
    an ``N x N`` float64 matrix."""
    factors, _ = nearest_kronecker(A, shape, rank, split)
    return sum(torch.kron(B, C) for B, C in factors)
