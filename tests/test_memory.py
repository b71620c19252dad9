"""The reference backend never builds an N x N tensor: its largest allocation, forward and
backward, grows linearly in seqlen at a fixed fold rule (counted by a dispatch mode that
sees every tensor any op produces, not by timing or allocator statistics)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tensorized_attention import choose_shape, tensorized_attn

B, H, HKV, D, SINKS = 1, 2, 1, 8, 4


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor produced by any aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(fn, seqlen) -> tuple[int, int]:
    """(largest numel, op count) over forward + backward of ``fn(q, k, v)`` at ``seqlen``."""
    q = torch.randn(B, seqlen, H, D, requires_grad=True)
    k, v = (torch.randn(B, seqlen, HKV, D, requires_grad=True) for _ in range(2))
    with LargestTensor() as mode:
        out = fn(q, k, v)
        out.backward(torch.randn_like(out))
    assert q.grad is not None and k.grad is not None
    return mode.largest, mode.ops


def dense_attention(q, k, v):
    """Plain softmax(q k^T) v with an N x N score matrix (the control)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(H // HKV, 1), vh.repeat_interleave(H // HKV, 1)
    return (torch.softmax(qh @ kh.transpose(-1, -2) / D**0.5, dim=-1) @ vh).transpose(1, 2)


FOLD_RULES = {
    "2dims-local64": lambda n: choose_shape(n, local=64),
    "3dims-local16": lambda n: choose_shape(n, 3, local=16),
    "last64-coarsest-doubling": lambda n: (n // 256, 4, 64),
}


@pytest.mark.parametrize("mode", ["complete", "block"])
@pytest.mark.parametrize("rule", list(FOLD_RULES))
def test_largest_allocation_grows_linearly(rule, mode):
    """Doubling seqlen (2048 -> 4096) at a fixed fold rule at most ~doubles the largest
    tensor of forward + backward (gate and sinks on); it also stays within the documented
    per-query budget, 2 max(n_j) scores (+ sinks) per query and head."""
    sizes = {}
    for n in (2048, 4096):
        shape = FOLD_RULES[rule](n)
        gate = torch.full((len(shape),), 0.5)

        def fn(q, k, v, shape=shape, gate=gate):
            return tensorized_attn(q, k, v, shape, mode=mode, gate=gate, sinks=SINKS)

        sizes[n], ops = largest_tensor(fn, n)
        assert ops > 50, "the dispatch mode should see the forward and backward ops"
        per_query = max(2 * max(shape) + SINKS, D)
        assert sizes[n] <= B * H * n * per_query, (shape, sizes[n])
    assert sizes[4096] <= 2.2 * sizes[2048], sizes


def test_dense_control_quadruples():
    """The same measurement on dense N x N attention does quadruple: the check can fail."""
    small, _ = largest_tensor(dense_attention, 2048)
    large, _ = largest_tensor(dense_attention, 4096)
    assert small >= B * H * 2048 * 2048
    assert large >= 3.8 * small
