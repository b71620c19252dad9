"""Tensor positions (DESIGN.md §3) against a dense oracle that rotates with complex numbers."""

from __future__ import annotations

import pytest
import torch

from conftest import random_qkv
from oracle import dense_pass_mask, oracle, oracle_with_positions
from tensorized_attention import TensorPositions, tensorized_attn
from tensorized_attention.fold import strides
from tensorized_attention.rope import pass_positions, rotate, sink_distances


def _inv_freq(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)).float()


@pytest.mark.parametrize(
    "shape,N,mode,order,sinks,gate,rotated,scaling",
    [
        ((4, 5), 20, "complete", None, 0, False, False, 1.0),
        ((4, 5), 17, "complete", (1, 0), 3, True, True, 1.0),
        ((3, 4, 5), 55, "block", (2, 0, 1), 2, True, True, 1.3),
        ((3, 4, 5), 60, "complete", None, 4, False, False, 0.8),
        ((6, 7), 40, "block", None, 100, True, True, 1.0),
        ((9, 5), 17, "complete", None, 3, True, True, 1.0),  # rows 4..8 hold no position
        ((7, 2, 3), 10, "block", (0, 2, 1), 2, False, True, 1.0),
    ],
)
def test_matches_oracle(shape, N, mode, order, sinks, gate, rotated, scaling):
    q, k, v = random_qkv(2, N, 4, 2, 16)
    inv = _inv_freq(16)
    g = torch.rand(4, len(shape), dtype=torch.float64) if gate else None
    opts = dict(mode=mode, order=order, sinks=sinks, gate=g)
    if rotated:  # as a Hugging Face layer hands them over: rotated (and scaled) at 0 .. N-1
        q, k = (rotate(x.transpose(1, 2), torch.arange(N), inv, scale=scaling).transpose(1, 2) for x in (q, k))
    pos = TensorPositions(inv, attention_scaling=scaling, rotated=rotated)
    out = tensorized_attn(q, k, v, shape, positions=pos, **opts)
    ref = oracle_with_positions(q, k, v, shape, inv, rotated=rotated, attention_scaling=scaling, **opts)
    # the library's angles are float32 (as Hugging Face computes them), the oracle's float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_contiguous_pass_only_is_ordinary_rope():
    """A one-dimensional fold has s = 1: tensor positions are sequence positions, and
    rotated inputs come out exactly as full causal attention over them."""
    N = 23
    q, k, v = random_qkv(1, N, 2, 1, 16)
    inv = _inv_freq(16)
    qr, kr = (rotate(x.transpose(1, 2), torch.arange(N), inv).transpose(1, 2) for x in (q, k))
    out = tensorized_attn(qr, kr, v, (N,), positions=TensorPositions(inv, rotated=True))
    torch.testing.assert_close(out, oracle(qr, kr, v, (N,)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,mode", [((8, 8), "complete"), ((4, 4, 4), "block"), ((5, 3, 4), "complete")])
def test_no_pass_sees_a_distance_of_its_size_or_more(shape, mode):
    """Every pair a pass reads is at tensor distance 0 .. n_j - 1; sinks at n_j + S - 1 - i."""
    N = 1
    for n in shape:
        N *= n
    pos = torch.arange(N)
    for dim, s in enumerate(strides(shape)):
        read = dense_pass_mask(N, shape, dim, mode, True, 0)
        tp = pass_positions(pos, s)
        dist = (tp[:, None] - tp[None, :])[read]
        assert dist.min() >= 0 and dist.max() == shape[dim] - 1
    assert sink_distances(6, 4).tolist() == [9, 8, 7, 6]


def test_without_positions_unchanged():
    q, k, v = random_qkv(1, 30, 2, 2, 8)
    torch.testing.assert_close(tensorized_attn(q, k, v, (5, 6), positions=None), oracle(q, k, v, (5, 6)))


def test_bad_positions():
    q, k, v = random_qkv(1, 10, 2, 2, 8)
    with pytest.raises(TypeError, match="positions must be None or a TensorPositions"):
        tensorized_attn(q, k, v, (2, 5), positions=torch.ones(4))
    with pytest.raises(ValueError, match=r"inv_freq must be a tensor of shape \[headdim // 2\] = \[4\]"):
        tensorized_attn(q, k, v, (2, 5), positions=TensorPositions(torch.ones(3)))
