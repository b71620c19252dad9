"""Tensor positions for rotary embeddings (DESIGN.md §3).

In the pass along dimension j (stride s_j, size n_j), position p is rotated at its
*tensor position* ``p // s_j`` instead of ``p``: two tokens of one fiber or window then
differ by less than n_j, whatever the sequence length, so no pass meets a rotary distance
it was not trained on. The contiguous pass (s = 1) is ordinary RoPE. A sink i is seen
from every query at the fixed distance ``n_j + S - 1 - i`` (just beyond the fiber).

Rotations use the Llama ("rotate_half") layout: the two halves of the head dimension are
the two coordinates of each rotated pair; angles are ``position * inv_freq`` in float32,
exactly as Hugging Face models compute them, so q and k that arrive already rotated at
their sequence positions (``rotated=True``) are first rotated back by the very same
angles. Frequencies given in float64 give angles in float64 (exact rotations, for
reference computations in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorPositions", "rotate", "pass_positions", "sink_distances"]


@dataclass(frozen=True, eq=False)
class TensorPositions:
    """Rotary tensor positions, an option of :func:`tensorized_attention.tensorized_attn`.

    Args:
        inv_freq: ``[headdim // 2]`` rotary frequencies (the model's own, scaling included,
            e.g. ``model.model.rotary_emb.inv_freq``).
        attention_scaling: the factor Hugging Face multiplies cos and sin by (1 for plain
            RoPE; YaRN-style scalings use another value).
        rotated: q and k arrive already rotated at their sequence positions ``0 .. N-1``
            (as inside a Hugging Face attention layer); they are rotated back first.
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    rotated: bool = False


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The angles ``[..., D/2]`` of ``positions``: ``position * inv_freq`` in float32 (float64
    for float64 frequencies)."""
    dtype = torch.promote_types(inv_freq.dtype, torch.float32)
    return positions.to(dtype)[..., None] * inv_freq.to(device=positions.device, dtype=dtype)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines and sines ``[..., D]`` of the angles of ``positions`` (both halves), as
    :func:`rotate` uses them; :func:`rotate_by` takes them."""
    angles = rotary_angles(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [..., D]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, scale: float = 1.0,
           inverse: bool = False) -> torch.Tensor:
    """Rotate ``x [..., P, D]`` at integer ``positions [P]`` (or any shape that broadcasts
    against ``x.shape[:-1]``; inverse: by minus the angle), computed in float32 (float64 for
    float64 x or inv_freq) and returned in x's dtype."""
    cos, sin = cos_sin(positions, inv_freq)
    if inverse:
        sin = -sin
    return rotate_by(x, cos, sin, scale=scale)


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """:func:`rotate` with the cosines and sines ``[..., D]`` of its angles given (both
    halves), computed in float32 (float64 for float64 x or tables) and returned in x's dtype."""
    xf = x.to(torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32))
    half = xf.shape[-1] // 2
    rotated_half = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return ((xf * cos + rotated_half * sin) * scale).to(x.dtype)


def pass_positions(positions: torch.Tensor, stride: int) -> torch.Tensor:
    """Tensor positions of a pass of stride ``stride``: ``p // stride``."""
    return torch.div(positions, stride, rounding_mode="floor")


def sink_distances(size: int, sinks: int) -> torch.Tensor:
    """The fixed distance at which each sink ``i < sinks`` is seen in a pass of fiber size
    ``size``: ``size + sinks - 1 - i``."""
    return size + sinks - 1 - torch.arange(sinks)
