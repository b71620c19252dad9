"""The fold (strides, coordinates, check_shape, choose_shape) and the pass masks
(passes.pass_mask against the oracle's dense masks, draw_passes against the pictures
in the tensorized_attn docstring)."""

from __future__ import annotations

import inspect
import itertools
import math
import re
import textwrap

import pytest
import torch

from oracle import dense_pass_mask
from tensorized_attention import (
    choose_shape,
    coordinates,
    draw_passes,
    fold_size,
    pass_mask,
    strides,
    tensorized_attn,
)
from tensorized_attention.fold import check_shape

FOLDS = [(5,), (4, 4), (3, 7), (1, 5), (6, 1), (3, 4, 5), (2, 3, 2, 3), (2, 1, 3)]

# ----------------------------------------------------------------------------- helpers


def literal_blocks(doc: str) -> list[str]:
    """The reStructuredText literal blocks (after a line ending in ``::``) of a docstring,
    each dedented, trailing blank lines dropped."""
    lines = inspect.cleandoc(doc).splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        base = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= base:
                break
            body.append(nxt)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


# ----------------------------------------------------------------------------- strides, coordinates


@pytest.mark.parametrize("shape", FOLDS, ids=str)
def test_strides_are_row_major(shape):
    """s_j = prod(shape[j+1:]); the last is 1; s_0 * n_0 = prod(shape) = fold_size."""
    st = strides(shape)
    assert st == tuple(math.prod(shape[j + 1 :]) for j in range(len(shape)))
    assert st[-1] == 1 and st[0] * shape[0] == fold_size(shape) == math.prod(shape)
    assert all(isinstance(s, int) for s in st)


@pytest.mark.parametrize("shape", FOLDS, ids=str)
def test_coordinates_round_trip(shape):
    """p -> coordinates -> sum_j i_j s_j gives p back, each coordinate in [0, n_j), and the
    coordinates enumerate the fold in row-major (lexicographic) order."""
    positions = torch.arange(fold_size(shape))
    coords = coordinates(positions, shape)
    assert coords.shape == (len(positions), len(shape))
    assert torch.equal((coords * torch.tensor(strides(shape))).sum(-1), positions)
    assert ((coords >= 0) & (coords < torch.tensor(shape))).all()
    assert coords.tolist() == [list(c) for c in itertools.product(*(range(n) for n in shape))]


def test_coordinates_of_an_int_and_of_batched_positions():
    """A Python int gives one coordinate vector; any leading batch shape is kept."""
    assert coordinates(11, (4, 3)).tolist() == [3, 2]
    batched = torch.tensor([[0, 5], [11, 7]])
    assert coordinates(batched, (4, 3)).tolist() == [[[0, 0], [1, 2]], [[3, 2], [2, 1]]]


def test_coordinates_reject_float_positions():
    with pytest.raises(TypeError, match="positions must be integers, got dtype torch.float32"):
        coordinates(torch.tensor([1.0]), (4, 3))


# ----------------------------------------------------------------------------- check_shape


@pytest.mark.parametrize("given", [(4, 4), [4, 4], torch.Size([4, 4]), range(4, 6)], ids=type)
def test_check_shape_returns_a_tuple_of_ints(given):
    out = check_shape(given, 16)
    assert out == tuple(given) and type(out) is tuple
    assert all(type(n) is int for n in out)


@pytest.mark.parametrize(
    ("shape", "seqlen", "exc", "pattern"),
    [
        ((4, 3), 13, ValueError, r"shape=\(4, 3\) holds prod\(shape\)=12 positions, fewer than seqlen=13"),
        ((0, 3), None, ValueError, r"shape entries must be >= 1, got \(0, 3\)"),
        ((), None, ValueError, r"shape must have at least one dimension, got \(\)"),
        ((2.0,), None, TypeError, r"shape entries must be Python ints, got \(2\.0,\)"),
        ((False, 2), None, TypeError, r"shape entries must be Python ints"),
        (5, None, TypeError, r"shape must be a sequence of positive ints .* got int"),
        (b"\x02", None, TypeError, r"shape must be a sequence of positive ints .* got bytes"),
    ],
)
def test_check_shape_rejects(shape, seqlen, exc, pattern):
    with pytest.raises(exc, match=pattern):
        check_shape(shape, seqlen)


def test_check_shape_names_the_argument():
    """The name= argument appears in the message (callers validating other folds)."""
    with pytest.raises(ValueError, match=r"fold entries must be >= 1"):
        check_shape((2, -1), name="fold")


# ----------------------------------------------------------------------------- choose_shape


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((131072,), {}, (512, 256)),
        ((131072, 3), {}, (64, 64, 32)),
        ((100000,), {}, (391, 256)),
        ((100000,), dict(local=256), (391, 256)),
        ((5000, 3), dict(local=64), (10, 8, 64)),
        ((1,), {}, (1, 1)),
        ((2,), {}, (2, 1)),
        ((1024,), {}, (32, 32)),
        ((1025,), {}, (33, 32)),
        ((4096, 1), {}, (4096,)),
    ],
)
def test_choose_shape_examples(args, kwargs, expected):
    """The docstring's examples, and small / boundary lengths, by the documented rule."""
    assert choose_shape(*args, **kwargs) == expected


def test_choose_shape_docstring_examples_are_tested_here():
    """Every ``>>> choose_shape(...)`` example in the docstring is one of the cases above
    (so changing the docstring without the rule, or vice versa, is caught)."""
    examples = re.findall(r">>> (choose_shape\(.*\))\n\s*(\(.*\))", choose_shape.__doc__)
    assert len(examples) >= 5
    for call, result in examples:
        assert eval(call, {"choose_shape": choose_shape}) == eval(result)  # noqa: S307


def _expected_shape(seqlen, ndim, local=None):
    """The documented rule, written independently: split the exponent of the next power of
    two evenly (extra factors to the coarsest dims), then shrink the coarsest dim."""
    if local is not None:
        return (*_expected_shape(-(-seqlen // local), ndim - 1), local)
    e = math.ceil(math.log2(seqlen)) if seqlen > 1 else 0
    dims = [2 ** (e // ndim + (1 if j < e % ndim else 0)) for j in range(ndim)]
    rest = math.prod(dims[1:])
    dims[0] = math.ceil(seqlen / rest)
    return tuple(dims)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("local", [None, 16, 100])
def test_choose_shape_rule(ndim, local):
    """For many lengths: deterministic, ndim dims, prod >= seqlen, padding smaller than one
    slice of the coarsest dim, finer dims powers of two in non-increasing order, local=
    fixes the last dim, and the result equals the documented rule."""
    if local is not None and ndim == 1:
        with pytest.raises(ValueError, match="local needs ndim >= 2"):
            choose_shape(100, 1, local=local)
        return
    lengths = sorted(
        {1, 2, 3, 63, 64, 65, 1000, 4097, 131071, 131072, 131073, *torch.randint(1, 300000, (40,)).tolist()}
    )
    for n in lengths:
        shape = choose_shape(n, ndim, local=local)
        assert shape == choose_shape(n, ndim, local=local)
        assert len(shape) == ndim and all(type(x) is int and x >= 1 for x in shape)
        size = math.prod(shape)
        assert size >= n
        slice_ = math.prod(shape[1:])
        assert size - n < slice_, (n, shape)
        fine = shape[1:-1] if local is not None else shape[1:]
        assert all(x & (x - 1) == 0 for x in fine), (n, shape)
        assert list(fine) == sorted(fine, reverse=True)
        if local is not None:
            assert shape[-1] == local
        assert shape == _expected_shape(n, ndim, local), n


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((0,), {}, "seqlen must be an int >= 1, got 0"),
        ((10.0,), {}, "seqlen must be an int >= 1, got 10.0"),
        ((True,), {}, "seqlen must be an int >= 1, got True"),
        ((10, 0), {}, "ndim must be an int >= 1, got 0"),
        ((10, 2.0), {}, r"ndim must be an int >= 1, got 2\.0"),
        ((10,), dict(local=0), "local must be None or an int >= 1, got 0"),
        ((10,), dict(local=8.0), r"local must be None or an int >= 1, got 8\.0"),
    ],
)
def test_choose_shape_rejects(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        choose_shape(*args, **kwargs)


# ----------------------------------------------------------------------------- pass masks

MASK_CASES = [
    ((4, 4), 16, "complete", True),
    ((4, 4), 13, "block", True),
    ((4, 4), 14, "block", False),
    ((3, 7), 19, "complete", True),
    ((3, 4, 5), 60, "block", True),
    ((3, 4, 5), 47, "complete", True),
    ((2, 3, 2, 3), 31, "block", False),
    ((5,), 4, "block", True),
    ((6, 1), 5, "complete", True),
]


@pytest.mark.parametrize("sinks", [0, 1, 3, 100])
@pytest.mark.parametrize(("shape", "seqlen", "mode", "causal"), MASK_CASES)
def test_pass_mask_matches_oracle(shape, seqlen, mode, causal, sinks):
    """passes.pass_mask equals the oracle's dense mask of every pass, sinks included."""
    for dim in range(len(shape)):
        got = pass_mask(seqlen, shape, dim, mode=mode, causal=causal, sinks=sinks)
        assert got.dtype == torch.bool and got.shape == (seqlen, seqlen)
        assert torch.equal(got, dense_pass_mask(seqlen, shape, dim, mode, causal, sinks)), dim


def test_complete_pass_is_a_dilated_window():
    """complete, 3 x 4 x 5, along dim 1 (n = 4, s = 5): query 37 reads 37, 32, 27, 22."""
    row = pass_mask(60, (3, 4, 5), 1, mode="complete", causal=True)[37]
    assert row.nonzero().flatten().tolist() == [22, 27, 32, 37]


# ----------------------------------------------------------------------------- pictures

PICTURES = [
    dict(mode="block", causal=True),
    dict(mode="complete", causal=True),
    dict(mode="block", causal=False),
    dict(mode="complete", causal=True, sinks=2),
]


def test_docstring_pictures_are_drawn_by_draw_passes():
    """Each picture in the tensorized_attn docstring is exactly draw_passes((4, 4), 9, ...)
    for its options, and the docstring holds no other pass picture (no drift)."""
    drawn = [draw_passes((4, 4), 9, **opts) for opts in PICTURES]
    in_doc = [b for b in literal_blocks(tensorized_attn.__doc__) if b.startswith("pass along")]
    assert in_doc == drawn


def test_draw_passes_marks_and_order():
    """q marks the query, x its pass keys, s a sink beyond the pass mask; panels follow
    ``order``. (2 x 3 fold, query 4 = (1, 1), complete, one sink.)"""
    pic = draw_passes((2, 3), 4, mode="complete", sinks=1, order=(1, 0))
    assert pic.splitlines() == [
        "pass along dim 1    pass along dim 0",
        "s . x               s x .",
        "x q .               . q .",
    ]


def test_draw_passes_only_draws_two_dims():
    with pytest.raises(ValueError, match=r"draw_passes draws 2-dim folds, got shape=\(2, 2, 2\)"):
        draw_passes((2, 2, 2), 3, mode="block")
