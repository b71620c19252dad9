"""The reference backend agrees with the dense float64 oracle of DESIGN.md §2.

Forward in float64 to ~1e-10; in float32 / float16 / bfloat16 within twice the error
of the same dense computation done in that dtype; backward by gradcheck and against
the oracle's own gradients.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from conftest import random_qkv
from oracle import oracle, oracle_in_dtype
from tensorized_attention import choose_shape, tensorized_attn

# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of the operator. ``shape=None`` and ``mode=None`` use the defaults;
    ``order`` is None (default), a tuple, "reversed" or "random" (a permutation drawn
    from the test's seed); ``gate`` is None, "heads" ([heads, m]) or "shared" ([m])."""

    shape: tuple[int, ...] | None
    seqlen: int
    causal: bool = True
    mode: str | None = "complete"
    order: object = None
    gate: str | None = None
    sinks: int = 0
    heads: int = 4
    kv_heads: int = 2
    headdim: int = 16
    batch: int = 2

    def __str__(self) -> str:
        fold = "default" if self.shape is None else "x".join(map(str, self.shape))
        order = self.order if isinstance(self.order, (str, type(None))) else "".join(map(str, self.order))
        kind = f"{self.mode}-{'causal' if self.causal else 'bidir'}"
        return (
            f"{fold}-N{self.seqlen}-{kind}-order{order}-gate{self.gate}-S{self.sinks}"
            f"-H{self.heads}kv{self.kv_heads}-D{self.headdim}"
        )


def make_inputs(case: Case, dtype=torch.float64, requires_grad=False):
    """(q, k, v, kwargs for tensorized_attn, the explicit fold) for ``case``; the gate is
    float32 for low-precision dtypes (as a model would keep it), else ``dtype``."""
    q, k, v = random_qkv(
        case.batch, case.seqlen, case.heads, case.kv_heads, case.headdim, dtype, requires_grad
    )
    shape = choose_shape(case.seqlen) if case.shape is None else case.shape
    m = len(shape)
    if case.order == "reversed":
        order = tuple(reversed(range(m)))
    elif case.order == "random":
        order = tuple(torch.randperm(m).tolist())
    else:
        order = case.order
    gate = None
    if case.gate is not None:
        gate_shape = (case.heads, m) if case.gate == "heads" else (m,)
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        gate = (0.1 + 0.8 * torch.rand(gate_shape)).to(gate_dtype).requires_grad_(requires_grad)
    kwargs = dict(causal=case.causal, mode=case.mode, order=order, gate=gate, sinks=case.sinks)
    return q, k, v, kwargs, shape


def run_backend(case, q, k, v, kwargs, **extra):
    """The operator under test, with the case's shape (None stays None: the default)."""
    return tensorized_attn(q, k, v, case.shape, backend="reference", **kwargs, **extra)


def check_output_form(out, q):
    """Output has q's shape and dtype and no NaN / inf."""
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all()


def assert_matches_oracle_f64(case: Case):
    q, k, v, kwargs, shape = make_inputs(case)
    out = run_backend(case, q, k, v, kwargs)
    check_output_form(out, q)
    torch.testing.assert_close(out, oracle(q, k, v, shape, **kwargs), rtol=0, atol=1e-10)


# The three kinds of passes (complete exists only causal).
KINDS = [("complete", True), ("block", True), ("block", False)]
KIND_IDS = ["complete", "block-causal", "block-bidir"]

# A covering set: every fold order m = 1..4 (odd folds, size-1 dims included), every kind,
# orders default / reversed / random / explicit, GQA ratios, padded and exact and
# length-1 sequences, head dims 16 / 60 / 64 / 128, gates, sinks up to more than seqlen,
# default shape and default mode.
CASES = [
    # m = 1
    Case((5,), 5),
    Case((5,), 3, causal=False, mode="block", sinks=1),
    Case((7,), 7, mode="block", gate="heads", heads=3, kv_heads=1),
    # m = 2
    Case((4, 4), 16),
    Case((4, 4), 16, mode="block", order="reversed", gate="shared", sinks=1),
    Case((4, 4), 13, causal=False, mode="block", kv_heads=4, headdim=64),
    Case((3, 7), 19, order="reversed", gate="heads", sinks=4, headdim=60),
    Case((3, 7), 21, causal=False, mode="block", order="reversed", kv_heads=1, headdim=128),
    Case((1, 5), 1, sinks=4),
    Case((1, 5), 1, causal=False, mode="block"),
    Case((6, 1), 5, order="reversed", sinks=100),
    Case((6, 1), 6, mode="block", gate="heads"),
    # m = 3
    Case((3, 4, 5), 60, order="random", gate="heads", sinks=1),
    Case((3, 4, 5), 47, mode="block", order="random", sinks=4, heads=3, kv_heads=1),
    Case((3, 4, 5), 60, causal=False, mode="block", order=(1, 2, 0), gate="shared", headdim=60),
    Case((3, 4, 5), 41, order="reversed", kv_heads=1, headdim=128),
    Case((2, 2, 2), 1, mode="block", sinks=100),
    # m = 4
    Case((2, 3, 2, 3), 36, order="random", sinks=4),
    Case((2, 3, 2, 3), 29, mode="block", order="reversed", gate="heads"),
    Case((2, 3, 2, 3), 36, causal=False, mode="block", order=(3, 1, 0, 2), sinks=1),
    Case((2, 3, 2, 3), 30, gate="shared", kv_heads=4, headdim=64),
    # defaults: shape=None (choose_shape(seqlen)) and mode=None
    Case(None, 37, mode=None),
    Case(None, 64, causal=False, mode=None, sinks=1),
    Case(None, 1, mode=None),
    Case((4, 4), 16, mode=None, gate="heads"),
    Case((4, 4), 11, causal=False, mode=None, order="reversed"),
]


# ------------------------------------------------------------------- forward, float64


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float64_matches_oracle(case):
    """Each covering case equals the dense oracle to 1e-10, with q's shape and dtype."""
    assert_matches_oracle_f64(case)


@pytest.mark.parametrize(("mode", "causal"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda o: "".join(map(str, o)))
def test_every_order_of_three_dims(order, mode, causal):
    """Every pass order of a padded 3-dim fold, in every kind, equals the oracle."""
    assert_matches_oracle_f64(Case((3, 4, 5), 53, causal=causal, mode=mode, order=order, sinks=1))


@pytest.mark.parametrize(("mode", "causal"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 1), (4, 2), (4, 4), (3, 1)])
def test_grouped_query_attention(heads, kv_heads, mode, causal):
    """Query head h reads kv head h // (heads / kv_heads), with and without a gate."""
    for gate in (None, "heads"):
        assert_matches_oracle_f64(
            Case((3, 5), 14, causal=causal, mode=mode, heads=heads, kv_heads=kv_heads, gate=gate)
        )


@pytest.mark.parametrize(("mode", "causal"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("seqlen", [1, 2, 31, 59, 60])
def test_seqlen_padding(seqlen, mode, causal):
    """seqlen from 1 to prod(shape): padded keys are never read by a real query."""
    assert_matches_oracle_f64(Case((3, 4, 5), seqlen, causal=causal, mode=mode, order="random"))


@pytest.mark.parametrize("headdim", [16, 60, 64, 128])
def test_head_dims(headdim):
    """Head dims, powers of two or not; the default scale is 1 / sqrt(headdim)."""
    assert_matches_oracle_f64(Case((4, 8), 30, headdim=headdim, sinks=1))


@pytest.mark.parametrize(("mode", "causal"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("sinks", [0, 1, 4, 40])
def test_sinks(sinks, mode, causal):
    """Sinks 0, 1, 4 and more than seqlen (sinks beyond seqlen do not exist)."""
    assert_matches_oracle_f64(Case((4, 2, 3), 22, causal=causal, mode=mode, order="random", sinks=sinks))


@pytest.mark.parametrize(("mode", "causal"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("gate", [None, "heads", "shared"])
def test_gate(gate, mode, causal):
    """No gate, a per-head [heads, m] gate, a shared [m] gate, indexed by place in order."""
    assert_matches_oracle_f64(Case((3, 3, 3), 25, causal=causal, mode=mode, order=(2, 0, 1), gate=gate))


@pytest.mark.parametrize("gate_value", [0.0, 1.0])
def test_gate_extremes(gate_value):
    """Gate 0 is the plain operator; gate 1 keeps every pass's input, so the output is v."""
    q, k, v = random_qkv(1, 20, 4, 2, 8)
    gate = torch.full((2,), gate_value, dtype=torch.float64)
    out = tensorized_attn(q, k, v, (4, 5), gate=gate, sinks=2)
    if gate_value == 0.0:
        torch.testing.assert_close(out, tensorized_attn(q, k, v, (4, 5), sinks=2), rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(out, v.repeat_interleave(2, dim=2), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_softmax_scale(scale):
    """An explicit softmax_scale replaces 1 / sqrt(headdim)."""
    case = Case((4, 4), 15, sinks=1, gate="heads")
    q, k, v, kwargs, shape = make_inputs(case)
    out = run_backend(case, q, k, v, kwargs, softmax_scale=scale)
    torch.testing.assert_close(out, oracle(q, k, v, shape, softmax_scale=scale, **kwargs), rtol=0, atol=1e-10)
    default = run_backend(case, q, k, v, kwargs)
    assert not torch.allclose(out, default)


def test_auto_backend_is_reference():
    """backend="auto" on CPU gives exactly the reference's output."""
    case = Case((3, 4, 5), 50, order="random", gate="heads", sinks=2)
    q, k, v, kwargs, _ = make_inputs(case)
    assert torch.equal(
        tensorized_attn(q, k, v, case.shape, **kwargs),
        tensorized_attn(q, k, v, case.shape, backend="reference", **kwargs),
    )


def test_non_contiguous_inputs():
    """Strided views (e.g. from a [batch, heads, seqlen, headdim] layout) give the same output."""
    case = Case((4, 5), 18, gate="heads", sinks=1)
    q, k, v, kwargs, _ = make_inputs(case)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not any(x.is_contiguous() for x in views)
    torch.testing.assert_close(
        run_backend(case, *views, kwargs), run_backend(case, q, k, v, kwargs), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gate_mix_in_float32_whatever_the_gate_dtype(dtype):
    """Documented: "The mix is computed in float32 (float64 for float64 inputs)". So a gate
    whose values are exact in every dtype (0.5, 0.25) gives the same output whether it is
    passed in float32 or in the inputs' low dtype."""
    q, k, v = random_qkv(1, 64, 2, 1, 16, dtype)
    gate = torch.tensor([0.5, 0.25])
    out32 = tensorized_attn(q, k, v, (8, 8), gate=gate)
    out_low = tensorized_attn(q, k, v, (8, 8), gate=gate.to(dtype))
    torch.testing.assert_close(out_low, out32, rtol=0, atol=0)


# ------------------------------------------------------------------- forward, low precision

LOWP_CASES = [
    Case((8, 8), 64, headdim=64, gate="heads", sinks=4),
    Case((4, 4, 4), 61, mode="block", order="random", headdim=128, kv_heads=1, sinks=1),
    Case((8, 8), 57, causal=False, mode="block", order="reversed", headdim=64, gate="shared"),
    Case((2, 3, 2, 3), 36, order="random", headdim=60, heads=3, kv_heads=1),
    Case(None, 100, mode=None, headdim=64),
]
# Absolute slack on top of twice the dense error in the same dtype.
LOWP_EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", list(LOWP_EPS), ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=str)
def test_low_precision_error_bound(case, dtype):
    """max |backend - oracle64| <= 2 max |dense-in-dtype - oracle64| + eps (flash-attn style),
    on the same rounded inputs; output in q's dtype, finite."""
    q, k, v, kwargs, shape = make_inputs(case, dtype)
    out = run_backend(case, q, k, v, kwargs)
    check_output_form(out, q)
    exact = oracle(q, k, v, shape, **kwargs)
    baseline = (oracle_in_dtype(q, k, v, shape, **kwargs).double() - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * baseline + LOWP_EPS[dtype], f"error {err:.3g}, dense {dtype} error {baseline:.3g}"


# ------------------------------------------------------------------- backward

GRADCHECK_CASES = [
    Case((2, 3), 5, gate="heads", sinks=1, heads=2, kv_heads=1, headdim=3, batch=1),
    Case(
        (2, 3), 5, mode="block", order=(1, 0), gate="shared", sinks=1, heads=2, kv_heads=1, headdim=3, batch=1
    ),
    Case(
        (2, 3), 6, causal=False, mode="block", gate="heads", sinks=2, heads=2, kv_heads=1, headdim=3, batch=1
    ),
    Case((2, 2, 2), 7, order=(2, 0, 1), gate="heads", sinks=2, heads=2, kv_heads=1, headdim=2, batch=1),
    Case(
        (2, 2, 2),
        8,
        mode="block",
        order="reversed",
        gate="heads",
        sinks=1,
        heads=2,
        kv_heads=2,
        headdim=2,
        batch=1,
    ),
]


# Every case in gradcheck's fast mode (random vector-Jacobian products); the full
# Jacobian (seconds per case) for the first one.
GRADCHECK_PARAMS = [pytest.param(c, True, id=f"fast-{c}") for c in GRADCHECK_CASES] + [
    pytest.param(GRADCHECK_CASES[0], False, id=f"full-{GRADCHECK_CASES[0]}")
]


@pytest.mark.parametrize(("case", "fast_mode"), GRADCHECK_PARAMS)
def test_gradcheck(case, fast_mode):
    """Analytic gradients w.r.t. q, k, v and the gate (a leaf inside (0, 1)) match finite
    differences in float64: both modes, sinks, GQA, per-head and shared gates."""
    q, k, v, kwargs, _ = make_inputs(case, requires_grad=True)
    gate = kwargs.pop("gate")

    def f(q, k, v, gate):
        return run_backend(case, q, k, v, kwargs, gate=gate)

    assert torch.autograd.gradcheck(f, (q, k, v, gate), eps=1e-6, atol=1e-7, fast_mode=fast_mode)


GRAD_CASES = [c for c in CASES if c.seqlen > 1][::2] + [
    Case((4, 4, 4), 57, mode="block", gate="heads", sinks=3)
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradients_match_oracle(case):
    """For a random upstream gradient, d/dq, d/dk, d/dv and d/dgate equal those obtained by
    autograd through the dense oracle, in float64."""
    q, k, v, kwargs, shape = make_inputs(case, requires_grad=True)
    leaves = [q, k, v] + ([kwargs["gate"]] if kwargs["gate"] is not None else [])
    out = run_backend(case, q, k, v, kwargs)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    expected = torch.autograd.grad(oracle(q, k, v, shape, **kwargs), leaves, upstream)
    for name, got, want in zip("qkvg"[: len(leaves)], grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m, name=name: f"d/d{name}: {m}")
