"""Structural properties of DESIGN.md §2, checked on the reference backend itself.

Causality (a later token never changes an earlier output) and reachability (which
earlier tokens an output depends on at all): read off exact zeros of gradients and
compared with the composition of the dense pass masks of tests/oracle.py.

Padding needs no test here: a real query never depending on anything past seqlen, and
seqlen = prod(shape) - 1, are covered by the oracle equality of test_reference.py
(test_seqlen_padding), since the oracle never sees padded positions.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import random_qkv
from oracle import dense_pass_mask
from tensorized_attention import tensorized_attn

# ----------------------------------------------------------------------------- helpers


def predicted_reach(seqlen, shape, order, *, mode, causal, sinks=0) -> torch.Tensor:
    """[seqlen, seqlen] bool: [p, p2] when output p can depend on v[p2], i.e. the boolean
    product M_last ... M_first of the dense pass masks (every mask holds its diagonal,
    so shorter paths are included)."""
    reach = torch.eye(seqlen, dtype=torch.bool)
    for dim in order:
        mask = dense_pass_mask(seqlen, shape, dim, mode, causal, sinks)
        reach = (mask.double() @ reach.double()) > 0
    return reach


def gradient_support(fn, x, rows) -> torch.Tensor:
    """[len(rows), seqlen] bool: [r, p2] when d(sum out[:, rows[r]]) / d x[:, p2] is not
    exactly zero (fn maps the leaf x to an output [batch, seqlen, heads, headdim])."""
    out = fn(x)
    support = []
    for p in rows:
        (g,) = torch.autograd.grad(out[:, p].sum(), x, retain_graph=True)
        support.append(g.ne(0).any(dim=(0, 2, 3)))
    return torch.stack(support)


def support_for(which, seqlen, shape, order, rows, **kwargs):
    """Gradient support of the outputs at ``rows`` w.r.t. ``which`` in "qkv" (float64)."""
    q, k, v = random_qkv(1, seqlen, 2, 1, 4)
    inputs = {"q": q, "k": k, "v": v}
    leaf = inputs[which].requires_grad_()

    def fn(x):
        args = {**inputs, which: x}
        return tensorized_attn(args["q"], args["k"], args["v"], shape, order=order, **kwargs)

    return gradient_support(fn, leaf, rows)


def _case_id(value) -> str:
    """Readable test ids: tuples as 4x4, the rest as str."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# ----------------------------------------------------------------------------- causality

CAUSAL_CASES = [
    ("complete", (4, 2, 4), 30, (0, 1, 2), 0, None),
    ("complete", (4, 2, 4), 30, (2, 0, 1), 3, "heads"),
    ("complete", (5, 6), 27, (1, 0), 1, "shared"),
    ("block", (4, 2, 4), 30, (0, 1, 2), 0, None),
    ("block", (4, 2, 4), 32, (1, 2, 0), 3, "heads"),
    ("block", (5, 6), 27, (1, 0), 2, "shared"),
]


@pytest.mark.parametrize(("mode", "shape", "seqlen", "order", "sinks", "gate"), CAUSAL_CASES, ids=_case_id)
def test_causal_outputs_ignore_later_tokens(mode, shape, seqlen, order, sinks, gate):
    """Replacing q, k and v at every position >= cut leaves outputs before cut bit-identical
    (and changes the output at cut), for several cuts; complete and causal block, with
    sinks and gates."""
    q, k, v = random_qkv(2, seqlen, 4, 2, 8)
    m = len(shape)
    g = None if gate is None else torch.rand((4, m) if gate == "heads" else (m,), dtype=torch.float64)
    kwargs = dict(causal=True, mode=mode, order=order, sinks=sinks, gate=g)
    out = tensorized_attn(q, k, v, shape, **kwargs)
    for cut in (1, seqlen // 2, seqlen - 1, *torch.randint(1, seqlen, (3,)).tolist()):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, cut:] = torch.randn_like(x[:, cut:])
        out2 = tensorized_attn(q2, k2, v2, shape, **kwargs)
        assert torch.equal(out2[:, :cut], out[:, :cut]), f"cut={cut}"
        assert not torch.allclose(out2[:, cut], out[:, cut]), f"cut={cut}"


# ----------------------------------------------------------------------------- reachability

COMPLETE_FOLDS = [((4, 4), 16), ((3, 5), 14), ((2, 3, 4), 24), ((3, 3, 3), 25)]


def _orders(m):
    return list(itertools.permutations(range(m)))


@pytest.mark.parametrize(
    ("shape", "seqlen", "order"),
    [(s, n, o) for s, n in COMPLETE_FOLDS for o in _orders(len(s))],
    ids=_case_id,
)
def test_complete_reaches_every_earlier_token(shape, seqlen, order):
    """complete, any order, m = 2 and 3: every output depends on v at every position <= its
    own (and at none after); the last output depends on k at every position too."""
    tril = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    reach_v = support_for("v", seqlen, shape, order, range(seqlen), mode="complete")
    assert torch.equal(reach_v, tril)
    reach_k = support_for("k", seqlen, shape, order, [seqlen - 1], mode="complete")
    assert reach_k.all()
    # the prediction from the pass masks says the same (the spec's claim)
    assert torch.equal(predicted_reach(seqlen, shape, order, mode="complete", causal=True), tril)


BLOCK_CASES = [
    ((4, 4), 16, (0, 1), 0),
    ((4, 4), 16, (1, 0), 0),
    ((3, 5), 13, (1, 0), 0),
    ((2, 3, 4), 24, (0, 1, 2), 0),
    ((2, 3, 4), 21, (2, 0, 1), 0),
    ((3, 3, 3), 27, (1, 2, 0), 1),
    ((4, 4), 15, (0, 1), 2),
]


@pytest.mark.parametrize(("shape", "seqlen", "order", "sinks"), BLOCK_CASES, ids=_case_id)
def test_causal_block_reaches_exactly_the_predicted_tokens(shape, seqlen, order, sinks):
    """Causal block: the positions where d out[p] / d v is nonzero are exactly the boolean
    product of the pass masks, which misses some earlier positions; d/dk and d/dq are
    zero outside that set."""
    kwargs = dict(mode="block", causal=True, sinks=sinks)
    predicted = predicted_reach(seqlen, shape, order, **kwargs)
    earlier_or_same = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    assert (earlier_or_same & ~predicted).any(), "the fold should leave some earlier token unreachable"
    assert not (predicted & ~earlier_or_same).any(), "causal: nothing later is reachable"
    rows = range(seqlen)
    assert torch.equal(support_for("v", seqlen, shape, order, rows, **kwargs), predicted)
    for which in "kq":
        assert not (support_for(which, seqlen, shape, order, rows, **kwargs) & ~predicted).any(), which


def test_causal_block_gap_named_in_design():
    """DESIGN.md §2: (i_1, 0) never reads (i_1 - 1, n_2 - 1), at any depth (4 x 4, both
    orders), nor (2, 1) = 9 reads (1, 3) = 7 (the tensorized_attn docstring); and about
    half the causal pairs of 4 x 4 x 4 are unreachable."""
    for order in [(0, 1), (1, 0)]:
        reach = support_for("v", 16, (4, 4), order, range(16), mode="block")
        for i in range(1, 4):
            assert not reach[4 * i, 4 * i - 1]
        assert not reach[9, 7]
    pairs = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    for order in [(0, 1, 2), (2, 1, 0)]:
        missing = (pairs & ~predicted_reach(64, (4, 4, 4), order, mode="block", causal=True)).sum()
        assert 0.4 < missing / pairs.sum() < 0.6


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (0, 1, 2), (2, 0, 1)], ids=str)
def test_bidirectional_block_reaches_everything(order):
    """Bidirectional block, seqlen = prod(shape): every output depends on v at every position
    (m hops); with padding the support is exactly the predicted one."""
    shape = (4, 5) if len(order) == 2 else (2, 3, 4)
    size = math.prod(shape)
    reach = support_for("v", size, shape, order, range(size), mode="block", causal=False)
    assert reach.all()
    padded = size - 3
    predicted = predicted_reach(padded, shape, order, mode="block", causal=False)
    assert torch.equal(
        support_for("v", padded, shape, order, range(padded), mode="block", causal=False), predicted
    )
