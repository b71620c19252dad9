"""Every bad input to tensorized_attn raises ValueError or TypeError, with a message that
names the argument, what was given and what is allowed (matched on those parts)."""

from __future__ import annotations

import re

import pytest
import torch

from tensorized_attention import available_backends, tensorized_attn

# ----------------------------------------------------------------------------- helpers

B, N, H, HKV, D = 1, 8, 4, 2, 16
SHAPE = (2, 4)


def valid_args():
    """A valid call: q [1, 8, 4, 16], k and v [1, 8, 2, 16] float32, fold (2, 4)."""
    return dict(
        q=torch.randn(B, N, H, D),
        k=torch.randn(B, N, HKV, D),
        v=torch.randn(B, N, HKV, D),
        shape=SHAPE,
    )


def call(**overrides):
    args = {**valid_args(), **overrides}
    return tensorized_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("shape"), **args)


def kv(*shape, **kw):
    """k and v overrides of one shape."""
    return dict(k=torch.randn(*shape, **kw), v=torch.randn(*shape, **kw))


def esc(text: str) -> str:
    return re.escape(text)


# (id, overrides, exception, regex on the message)
BAD_INPUTS = [
    # tensors: type and rank
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor, got list"),
    (
        "q-3d",
        dict(q=torch.randn(N, H, D)),
        ValueError,
        esc("q must be 4-D [batch, seqlen, heads, headdim], got shape (8, 4, 16)"),
    ),
    (
        "k-5d",
        dict(k=torch.randn(B, N, HKV, D, 1)),
        ValueError,
        esc("k must be 4-D [batch, seqlen, heads, headdim], got shape (1, 8, 2, 16, 1)"),
    ),
    (
        "v-3d",
        dict(v=torch.randn(N, HKV, D)),
        ValueError,
        esc("v must be 4-D [batch, seqlen, heads, headdim], got shape (8, 2, 16)"),
    ),
    # tensors: sizes
    ("batch-mismatch", kv(2, N, HKV, D), ValueError, esc("batch of k/v (2) must equal batch of q (1)")),
    (
        "seqlen-mismatch",
        kv(B, N + 1, HKV, D),
        ValueError,
        esc("seqlen of k/v (9) must equal seqlen of q (8)"),
    ),
    (
        "headdim-mismatch",
        kv(B, N, HKV, 8),
        ValueError,
        esc("headdim of k/v (8) must equal headdim of q (16)"),
    ),
    (
        "k-v-differ",
        dict(v=torch.randn(B, N, 1, D)),
        ValueError,
        esc("k and v must have the same shape, got k (1, 8, 2, 16), v (1, 8, 1, 16)"),
    ),
    (
        "heads-not-multiple",
        kv(B, N, 3, D),
        ValueError,
        esc("number of heads in k/v (3) must divide number of heads in q (4)"),
    ),
    (
        "seqlen-zero",
        dict(q=torch.randn(B, 0, H, D), **kv(B, 0, HKV, D)),
        ValueError,
        esc("batch, seqlen and headdim must be >= 1, got q shape (1, 0, 4, 16)"),
    ),
    # tensors: dtypes and devices
    (
        "q-int",
        dict(q=torch.ones(B, N, H, D, dtype=torch.int64)),
        TypeError,
        "q must have a floating dtype in .*, got torch.int64",
    ),
    (
        "k-int32",
        dict(k=torch.ones(B, N, HKV, D, dtype=torch.int32)),
        TypeError,
        "k must have a floating dtype in .*, got torch.int32",
    ),
    (
        "v-bool",
        dict(v=torch.ones(B, N, HKV, D, dtype=torch.bool)),
        TypeError,
        "v must have a floating dtype in .*, got torch.bool",
    ),
    (
        "mixed-dtypes",
        dict(v=torch.randn(B, N, HKV, D, dtype=torch.float64)),
        TypeError,
        esc("q, k, v must share one dtype, got q torch.float32, k torch.float32, v torch.float64"),
    ),
    (
        "mixed-devices",
        dict(k=torch.randn(B, N, HKV, D, device="meta")),
        ValueError,
        esc("q, k, v must be on one device, got q cpu, k meta, v cpu"),
    ),
    # shape
    (
        "shape-too-small",
        dict(shape=(2, 3)),
        ValueError,
        esc("shape=(2, 3) holds prod(shape)=6 positions, fewer than seqlen=8"),
    ),
    ("shape-zero", dict(shape=(0, 8)), ValueError, esc("shape entries must be >= 1, got (0, 8)")),
    ("shape-negative", dict(shape=(-2, 4)), ValueError, esc("shape entries must be >= 1, got (-2, 4)")),
    ("shape-float", dict(shape=(2.0, 4)), TypeError, esc("shape entries must be Python ints, got (2.0, 4)")),
    ("shape-bool", dict(shape=(True, 8)), TypeError, esc("shape entries must be Python ints, got (True, 8)")),
    ("shape-empty", dict(shape=()), ValueError, esc("shape must have at least one dimension, got ()")),
    (
        "shape-int",
        dict(shape=8),
        TypeError,
        esc("shape must be a sequence of positive ints (n_1, ..., n_m), got int"),
    ),
    (
        "shape-str",
        dict(shape="24"),
        TypeError,
        esc("shape must be a sequence of positive ints (n_1, ..., n_m), got str"),
    ),
    (
        "shape-set",
        dict(shape={2, 4}),
        TypeError,
        esc("shape must be a sequence of positive ints (n_1, ..., n_m), got set"),
    ),
    # order
    (
        "order-short",
        dict(order=(0,)),
        ValueError,
        esc("order must be a permutation of range(2) (one entry per fold dimension), got (0,)"),
    ),
    (
        "order-long",
        dict(order=(0, 1, 2)),
        ValueError,
        esc("order must be a permutation of range(2)") + r".*got \(0, 1, 2\)",
    ),
    (
        "order-repeated",
        dict(order=(1, 1)),
        ValueError,
        esc("order must be a permutation of range(2)") + r".*got \(1, 1\)",
    ),
    (
        "order-out-of-range",
        dict(order=(0, 2)),
        ValueError,
        esc("order must be a permutation of range(2)") + r".*got \(0, 2\)",
    ),
    (
        "order-negative",
        dict(order=(-1, 0)),
        ValueError,
        esc("order must be a permutation of range(2)") + r".*got \(-1, 0\)",
    ),
    (
        "order-float",
        dict(order=(0.0, 1)),
        ValueError,
        esc("order must be a permutation of range(2)") + r".*got \(0\.0, 1\)",
    ),
    (
        "order-bool",
        dict(order=(False, True)),
        ValueError,
        esc("order must be a permutation of range(2)") + r".*got \(False, True\)",
    ),
    (
        "order-str",
        dict(order="01"),
        TypeError,
        esc("order must be a sequence of ints, a permutation of range(2), got '01'"),
    ),
    (
        "order-int",
        dict(order=1),
        TypeError,
        esc("order must be a sequence of ints, a permutation of range(2), got 1"),
    ),
    # mode, causal, backend
    (
        "mode-unknown",
        dict(mode="full"),
        ValueError,
        esc("mode must be one of ('block', 'complete') or None, got 'full'"),
    ),
    (
        "complete-bidirectional",
        dict(mode="complete", causal=False),
        ValueError,
        esc("mode='complete' is causal only: pass causal=True, or mode='block' for bidirectional"),
    ),
    ("causal-int", dict(causal=1), TypeError, esc("causal must be a bool, got 1")),
    ("causal-str", dict(causal="yes"), TypeError, esc("causal must be a bool, got 'yes'")),
    (
        "backend-unknown",
        dict(backend="flash"),
        ValueError,
        r"backend must be 'auto' or one of \(.*'reference'.*\), got 'flash'",
    ),
    (
        "backend-not-str",
        dict(backend=None),
        ValueError,
        r"backend must be 'auto' or one of \(.*'reference'.*\), got None",
    ),
    # gate
    (
        "gate-list",
        dict(gate=[0.5, 0.5]),
        TypeError,
        esc("gate must be None or a torch.Tensor of shape [4, 2] or [2], got list"),
    ),
    (
        "gate-shape-m",
        dict(gate=torch.full((3,), 0.5)),
        ValueError,
        esc("gate must have shape [heads, m] = [4, 2] or [m] = [2], got (3,)"),
    ),
    (
        "gate-shape-transposed",
        dict(gate=torch.full((2, 4), 0.5)),
        ValueError,
        esc("gate must have shape [heads, m] = [4, 2] or [m] = [2], got (2, 4)"),
    ),
    (
        "gate-shape-kv-heads",
        dict(gate=torch.full((HKV, 2), 0.5)),
        ValueError,
        esc("gate must have shape [heads, m] = [4, 2] or [m] = [2], got (2, 2)"),
    ),
    (
        "gate-int",
        dict(gate=torch.zeros(H, 2, dtype=torch.int64)),
        TypeError,
        esc("gate must have a floating dtype, got torch.int64"),
    ),
    (
        "gate-bool",
        dict(gate=torch.zeros(2, dtype=torch.bool)),
        TypeError,
        esc("gate must have a floating dtype, got torch.bool"),
    ),
    (
        "gate-meta",
        dict(gate=torch.full((2,), 0.5, device="meta")),
        ValueError,
        esc("gate must be on q's device cpu, got meta"),
    ),
    ("gate-above-1", dict(gate=torch.tensor([0.5, 1.5])), ValueError, esc("gate values must lie in [0, 1]")),
    (
        "gate-below-0",
        dict(gate=torch.full((H, 2), 0.5).index_fill(0, torch.tensor([3]), -0.1)),
        ValueError,
        esc("gate values must lie in [0, 1]"),
    ),
    (
        "gate-nan",
        dict(gate=torch.tensor([0.5, float("nan")])),
        ValueError,
        esc("gate values must lie in [0, 1]"),
    ),
    # sinks
    ("sinks-negative", dict(sinks=-1), ValueError, esc("sinks must be an int >= 0, got -1")),
    ("sinks-float", dict(sinks=1.0), ValueError, esc("sinks must be an int >= 0, got 1.0")),
    ("sinks-bool", dict(sinks=True), ValueError, esc("sinks must be an int >= 0, got True")),
    ("sinks-str", dict(sinks="4"), ValueError, esc("sinks must be an int >= 0, got '4'")),
    # softmax_scale
    (
        "scale-str",
        dict(softmax_scale="0.1"),
        TypeError,
        esc("softmax_scale must be a float or None, got str"),
    ),
    (
        "scale-bool",
        dict(softmax_scale=True),
        TypeError,
        esc("softmax_scale must be a float or None, got bool"),
    ),
    (
        "scale-tensor",
        dict(softmax_scale=torch.tensor(0.1)),
        TypeError,
        esc("softmax_scale must be a float or None, got Tensor"),
    ),
]


# ----------------------------------------------------------------------------- tests


def test_valid_call_runs():
    """The base call the bad inputs are made from is itself valid (so each error below is
    caused by its one change)."""
    out = call(
        gate=torch.full((H, 2), 0.5), order=(1, 0), sinks=2, softmax_scale=0.2, causal=True, mode="block"
    )
    assert out.shape == (B, N, H, D)


@pytest.mark.parametrize(("overrides", "exc", "pattern"), [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUTS])
def test_bad_input_raises(overrides, exc, pattern):
    """The bad input raises ``exc`` (exactly that class) with the expected message."""
    with pytest.raises(exc, match=pattern) as info:
        call(**overrides)
    assert type(info.value) is exc


def test_backend_not_available_on_device(monkeypatch):
    """A known backend that cannot run on q's device is refused, naming the device and
    the backends that can (on the CPU without Triton's interpreter: only the reference)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_backends("cpu") == ["reference"]
    with pytest.raises(
        ValueError, match=esc("backend 'triton' is not available on device cpu; available: ['reference']")
    ):
        call(backend="triton")


def test_gate_range_message_shows_given_values():
    """The gate-range error, like every other, should show what was given (here 1.5)."""
    with pytest.raises(ValueError, match=r"1\.5"):
        call(gate=torch.tensor([0.5, 1.5]))
