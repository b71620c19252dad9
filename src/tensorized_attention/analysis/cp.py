"""CP decompositions of an attention matrix folded into tensors (TensorLy), and the share of
its energy each form captures against the parameters it needs.

For a fold ``shape = (n_1, ..., n_m)`` of ``N = n_1 ... n_m`` positions (row-major, see
:mod:`tensorized_attention.analysis.kronecker`), the ``N x N`` matrix ``A`` is read as:

- the **order-2m tensor** ``T[i_1, ..., i_m, i'_1, ..., i'_m] = A[p, p']``
  (:func:`fold_matrix`). A CP component is an outer product of 2m vectors, one per
  coordinate of the query and of the key; as a matrix it is the rank-1
  ``(u_1 ⊗ ... ⊗ u_m)(w_1 ⊗ ... ⊗ w_m)ᵀ``: ``2 (n_1 + ... + n_m)`` parameters.
  :func:`attention_cp`.
- the **order-m paired tensor** with modes of size ``n_j²``, mode j indexed by
  ``i_j n_j + i'_j`` (:func:`paired_tensor`). A CP component is one Kronecker product
  ``A_1 ⊗ ... ⊗ A_m`` of ``n_j x n_j`` matrices (2-D blocks), ``n_1² + ... + n_m²``
  parameters; rank r is the m-factor Kronecker sum. :func:`kronecker_cp`. For m = 2 this is
  the Van Loan–Pitsianis SVD (:func:`~tensorized_attention.analysis.kronecker.nearest_kronecker`),
  exact; for m > 2 ALS finds a local optimum.
- the **matrix** itself: a rank-1 SVD term costs ``2N`` parameters.

The CP fits are TensorLy's ``parafac`` (alternating least squares, NumPy backend, float64,
seeded random initialisation). TensorLy is the ``analysis`` extra:
``pip install "tensorized-attention[analysis]"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..fold import check_shape
from .kronecker import _check_matrix, energy_captured, kronecker_spectrum, matrix_spectrum

__all__ = [
    "CPFit",
    "attention_cp",
    "energy_curves",
    "fold_matrix",
    "kronecker_cp",
    "paired_tensor",
    "parameters",
]

FORMS = ("matrix", "kronecker", "cp")


def _tensorly():
    try:
        import tensorly
        from tensorly.decomposition import parafac
    except ImportError as err:  # pragma: no cover - tensorly is in the dev extra
        raise ImportError(
            "CP decompositions need TensorLy: pip install 'tensorized-attention[analysis]' (or pip install tensorly)"
        ) from err
    return tensorly, parafac


def fold_matrix(A: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``A`` (``N x N``) as the order-2m tensor ``[n_1, ..., n_m, n_1, ..., n_m]``: the query's
    coordinates, then the key's.

    >>> fold_matrix(torch.eye(6), (2, 3)).shape
    torch.Size([2, 3, 2, 3])
    """
    shape = check_shape(shape)
    _check_matrix(A, shape)
    return A.reshape(*shape, *shape)


def paired_tensor(A: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``A`` as the order-m tensor with modes ``n_j²``, mode j indexed by ``i_j * n_j + i'_j``:
    a Kronecker product ``kron(A_1, ..., A_m)`` becomes the outer product of the flattened
    ``A_j``.

    >>> A1, A2 = torch.randn(2, 2), torch.randn(3, 3)
    >>> T = paired_tensor(torch.kron(A1, A2), (2, 3))
    >>> torch.allclose(T, torch.outer(A1.flatten(), A2.flatten()))
    True
    """
    shape = check_shape(shape)
    m = len(shape)
    order = [d for j in range(m) for d in (j, m + j)]
    return fold_matrix(A, shape).permute(order).reshape([n * n for n in shape])


def parameters(form: str, shape: Sequence[int], rank: int) -> int:
    """Parameters of a rank-``rank`` approximation of an ``N x N`` matrix in ``form``:
    ``matrix`` (SVD) ``2 N rank``; ``kronecker`` (sum of Kronecker products)
    ``rank Σ n_j²``; ``cp`` (order-2m CP) ``2 rank Σ n_j`` (component weights folded into
    the factors).

    >>> [parameters(f, (32, 64), 1) for f in ("matrix", "kronecker", "cp")]
    [4096, 5120, 192]
    """
    shape = check_shape(shape)
    if form == "matrix":
        return 2 * math.prod(shape) * rank
    if form == "kronecker":
        return rank * sum(n * n for n in shape)
    if form == "cp":
        return 2 * rank * sum(shape)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


@dataclass
class CPFit:
    """A CP fit: ``weights`` ``[rank]`` and ``factors`` (one ``[mode size, rank]`` float64
    tensor per mode, unit columns), ``error`` ``||T - T̂|| / ||T||``, ``energy`` =
    ``1 - error²``, ``iterations`` of ALS, ``parameters`` of the form (:func:`parameters`)."""

    form: str
    shape: tuple[int, ...]
    rank: int
    weights: torch.Tensor
    factors: list[torch.Tensor]
    error: float
    iterations: int

    @property
    def energy(self) -> float:
        return 1.0 - self.error**2

    @property
    def parameters(self) -> int:
        return parameters(self.form, self.shape, self.rank)

    def tensor(self) -> torch.Tensor:
        """The fitted tensor (the shape the CP was fitted in)."""
        out = torch.zeros([f.shape[0] for f in self.factors], dtype=torch.float64)
        for r in range(self.rank):
            term = self.weights[r]
            for f in self.factors:
                term = torch.tensordot(torch.as_tensor(term), f[:, r], dims=0)
            out += term
        return out

    def matrix(self) -> torch.Tensor:
        """The fitted ``N x N`` matrix."""
        N = math.prod(self.shape)
        m = len(self.shape)
        T = self.tensor()
        if self.form == "cp":
            return T.reshape(N, N)
        T = T.reshape([d for n in self.shape for d in (n, n)])  # i_1, i'_1, i_2, i'_2, ...
        back = [2 * j for j in range(m)] + [2 * j + 1 for j in range(m)]
        return T.permute(back).reshape(N, N)

    def kronecker_factors(self, component: int) -> list[torch.Tensor]:
        """The ``n_j x n_j`` matrices of one component of a ``kronecker`` fit (unit norm;
        the component's size is ``weights[component]``)."""
        if self.form != "kronecker":
            raise ValueError(f"kronecker_factors needs a 'kronecker' fit, this one is {self.form!r}")
        if not 0 <= component < self.rank:
            raise ValueError(f"component must lie in [0, {self.rank - 1}], got {component}")
        return [f[:, component].reshape(n, n) for f, n in zip(self.factors, self.shape, strict=True)]


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return rank


def _parafac(T: torch.Tensor, rank: int, form: str, shape, *, n_iter_max: int, tol: float, seed: int) -> CPFit:
    tensorly, parafac = _tensorly()
    array = T.detach().double().cpu().numpy()
    norm = float(torch.linalg.vector_norm(T.double()))
    if norm == 0:
        raise ValueError("the attention matrix is zero: nothing to decompose")
    with tensorly.backend_context("numpy"):
        (weights, factors), errors = parafac(
            array, rank, n_iter_max=n_iter_max, init="random", random_state=seed, tol=tol,
            normalize_factors=True, return_errors=True,
        )
        fitted = tensorly.cp_to_tensor((weights, factors))
    error = float(((fitted - array) ** 2).sum() ** 0.5) / norm
    return CPFit(form=form, shape=tuple(shape), rank=rank, weights=torch.from_numpy(weights.copy()),
                 factors=[torch.from_numpy(f.copy()) for f in factors], error=error,
                 iterations=len(errors))


def attention_cp(A: torch.Tensor, shape: Sequence[int], rank: int, *, n_iter_max: int = 200,
                 tol: float = 1e-10, seed: int = 0) -> CPFit:
    """Rank-``rank`` CP decomposition (TensorLy ``parafac``) of ``A`` folded into the
    order-2m tensor :func:`fold_matrix`. Returns a :class:`CPFit` of form ``cp``.

    >>> u = [torch.rand(n, dtype=torch.float64) for n in (2, 3, 2, 3)]
    >>> A = torch.kron(u[0], u[1])[:, None] * torch.kron(u[2], u[3])[None, :]
    >>> attention_cp(A, (2, 3), 1).error < 1e-8
    True
    """
    shape = check_shape(shape)
    return _parafac(fold_matrix(A, shape), _check_rank(rank), "cp", shape, n_iter_max=n_iter_max, tol=tol,
                    seed=seed)


def kronecker_cp(A: torch.Tensor, shape: Sequence[int], rank: int, *, n_iter_max: int = 200,
                 tol: float = 1e-10, seed: int = 0) -> CPFit:
    """The m-factor Kronecker sum ``A ≈ Σ_r w_r A_1^r ⊗ ... ⊗ A_m^r``: rank-``rank`` CP
    decomposition (TensorLy ``parafac``) of :func:`paired_tensor`. Returns a :class:`CPFit`
    of form ``kronecker``; :meth:`CPFit.kronecker_factors` gives the matrices of a
    component. For a 2-dim fold the fit is the SVD of the order-2 tensor (exact,
    ``iterations`` 0), for m > 2 TensorLy's ALS.

    >>> A = torch.kron(torch.rand(3, 3, dtype=torch.float64), torch.rand(2, 2, dtype=torch.float64))
    >>> fit = kronecker_cp(torch.kron(A, torch.rand(4, 4, dtype=torch.float64)), (3, 2, 4), 1)
    >>> fit.error < 1e-8, [tuple(F.shape) for F in fit.kronecker_factors(0)]
    (True, [(3, 3), (2, 2), (4, 4)])
    """
    shape = check_shape(shape)
    rank = _check_rank(rank)
    T = paired_tensor(A, shape)
    if len(shape) == 2:  # an order-2 tensor: its CP is the SVD, exact (Van Loan–Pitsianis)
        limit = min(T.shape)
        if rank > limit:
            raise ValueError(f"rank must be at most min(n_1², n_2²) = {limit} for the fold {shape}, got {rank}")
        T = T.double()
        U, s, Vh = torch.linalg.svd(T, full_matrices=False)
        fitted = (U[:, :rank] * s[:rank]) @ Vh[:rank]
        error = float(torch.linalg.vector_norm(fitted - T) / torch.linalg.vector_norm(T))
        return CPFit(form="kronecker", shape=shape, rank=rank, weights=s[:rank].clone(),
                     factors=[U[:, :rank].clone(), Vh[:rank].T.clone()], error=error, iterations=0)
    return _parafac(T, rank, "kronecker", shape, n_iter_max=n_iter_max, tol=tol, seed=seed)


def energy_curves(A: torch.Tensor, shape: Sequence[int], ranks: Sequence[int], *, forms: Sequence[str] = FORMS,
                  seed: int = 0, n_iter_max: int = 200, spectrum_method: str = "svd") -> dict[str, list[dict]]:
    """Energy captured against parameters for each of ``forms`` at each rank of ``ranks``:
    ``{form: [{"rank", "parameters", "energy", "error"}, ...]}``.

    ``matrix``: truncated SVD (exact). ``kronecker``: for a 2-dim fold the Van Loan–Pitsianis
    SVD (exact, every rank up to ``min(n_1², n_2²)``), for m > 2 :func:`kronecker_cp`.
    ``cp``: :func:`attention_cp`. Ranks beyond what a form can hold are left out.
    """
    shape = check_shape(shape)
    _check_matrix(A, shape)
    bad = [f for f in forms if f not in FORMS]
    if bad:
        raise ValueError(f"forms must be among {FORMS}, got {bad}")
    ranks = sorted({_check_rank(r) for r in ranks})
    out: dict[str, list[dict]] = {}

    def row(form, r, energy):
        energy = float(energy)
        return {"rank": r, "parameters": parameters(form, shape, r), "energy": energy,
                "error": max(1.0 - energy, 0.0) ** 0.5}

    if "matrix" in forms:
        e = energy_captured(matrix_spectrum(A, method=spectrum_method))
        out["matrix"] = [row("matrix", r, e[r]) for r in ranks if r < len(e)]
    if "kronecker" in forms:
        if len(shape) == 2:
            e = energy_captured(kronecker_spectrum(A, shape, method=spectrum_method))
            out["kronecker"] = [row("kronecker", r, e[r]) for r in ranks if r < len(e)]
        else:
            out["kronecker"] = []
            for r in ranks:
                fit = kronecker_cp(A, shape, r, seed=seed, n_iter_max=n_iter_max)
                out["kronecker"].append(row("kronecker", r, fit.energy))
    if "cp" in forms:
        out["cp"] = []
        for r in ranks:
            fit = attention_cp(A, shape, r, seed=seed, n_iter_max=n_iter_max)
            out["cp"].append(row("cp", r, fit.energy))
    return out
