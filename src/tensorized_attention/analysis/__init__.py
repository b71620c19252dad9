"""The structure of attention under a fold: Kronecker and CP analysis, reachability, real maps.

- :mod:`.kronecker`: the nearest Kronecker product of an attention matrix for a fold (Van
  Loan–Pitsianis rearrangement + SVD), the Kronecker spectrum beside the singular values,
  relative errors and energies of rank-r approximations.
- :mod:`.cp`: CP decompositions (TensorLy) of the matrix folded into an order-2m tensor, the
  m-factor Kronecker sum, and energy captured against parameters for the three forms.
- :mod:`.reachability`: the masks of each pass and which keys reach which queries after all
  passes, as ASCII art and pictures, from one function.
- :mod:`.maps`: attention maps of a Hugging Face model, per layer and head, with hooks, and
  the attention a fold would compute from them.
- :mod:`.command`: ``tensorized-attention analyze``, which puts these together for a model,
  a text and folds (see docs/analysis.md).

TensorLy (for the CP fits) is the ``analysis`` extra; the rest needs only torch.
"""

from . import cp, kronecker, maps, reachability
from .cp import CPFit, attention_cp, energy_curves, fold_matrix, kronecker_cp, paired_tensor
from .kronecker import (
    energy_captured,
    kronecker_approximation,
    kronecker_rearrange,
    kronecker_spectrum,
    matrix_spectrum,
    nearest_kronecker,
    numerical_rank,
    truncation_errors,
)
from .maps import attention_maps, tensorized_operator
from .reachability import draw_reachability, reachable

__all__ = [
    "CPFit",
    "attention_cp",
    "attention_maps",
    "cp",
    "draw_reachability",
    "energy_captured",
    "energy_curves",
    "fold_matrix",
    "kronecker",
    "kronecker_approximation",
    "kronecker_cp",
    "kronecker_rearrange",
    "kronecker_spectrum",
    "maps",
    "matrix_spectrum",
    "nearest_kronecker",
    "numerical_rank",
    "paired_tensor",
    "reachability",
    "reachable",
    "tensorized_operator",
    "truncation_errors",
]
