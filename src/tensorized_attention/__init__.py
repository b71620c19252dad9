"""tensorized-attention: attention over long sequences folded into tensors.

See :func:`tensorized_attn` for the operator and its exact semantics.
"""

from . import fold, ops, passes, rope
from .fold import choose_shape, coordinates, fold_size, strides
from .ops import available_backends, tensorized_attn
from .passes import SelectedPass, draw_passes, pass_mask
from .rope import TensorPositions

__version__ = "0.1.0"

__all__ = [
    "SelectedPass",
    "TensorPositions",
    "__version__",
    "available_backends",
    "choose_shape",
    "coordinates",
    "draw_passes",
    "fold",
    "fold_size",
    "ops",
    "pass_mask",
    "passes",
    "rope",
    "strides",
    "tensorized_attn",
]
