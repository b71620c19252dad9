"""The content-addressed options of DESIGN.md §8 against their dense float64 oracles: the
selected pass (passes.SelectedPass), the pooled pass (passes.PooledPass) and key relay.

Forward and gradients in float64 (the ranking is discrete: the oracle ranks the blocks
itself, one query at a time, from the spec), float32 and bfloat16 within a tolerance of
the oracle on the same rounded inputs, alone (``order=()``) and after the fold passes,
with sinks, gate, grouped-query attention, odd lengths and rotary positions; bad
parameters raise.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from oracle import oracle, oracle_with_positions
from tensorized_attention import TensorPositions, tensorized_attn
from tensorized_attention.ops import reference
from tensorized_attention.passes import PooledPass, SelectedPass


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    seqlen: int
    block: int
    topk: int
    fold_passes: bool = True
    sinks: int = 0
    gate: bool = False
    heads: int = 4
    kv_heads: int = 2
    headdim: int = 8
    positions: str | None = None  # None, "raw" (scaled 1.25) or "rotated" (as a Hugging Face layer gives them)
    pooled: bool = False  # a PooledPass(block) instead of SelectedPass(block, topk)
    score: str = "mean"  # the SelectedPass's block score

    def __str__(self):
        kind = f"pool{self.block}" if self.pooled else f"W{self.block}k{self.topk}-{self.score}"
        return (f"{self.shape}-N{self.seqlen}-{kind}-{'fold' if self.fold_passes else 'alone'}"
                f"-S{self.sinks}{'-gate' if self.gate else ''}-H{self.heads}/{self.kv_heads}-{self.positions}")


CASES = [
    Case((10, 4), 37, 4, 2),
    Case((10, 4), 37, 4, 2, sinks=3, gate=True),
    Case((10, 4), 40, 8, 1, fold_passes=False, sinks=2),
    Case((7, 5), 33, 5, 3, fold_passes=False, heads=3, kv_heads=1, gate=True),
    Case((3, 4, 5), 53, 5, 2, sinks=4, heads=2, kv_heads=2),
    Case((10, 4), 37, 4, 2, sinks=3, gate=True, positions="raw"),
    Case((10, 4), 39, 4, 3, fold_passes=False, sinks=2, positions="rotated"),
    Case((6, 6), 36, 12, 1, heads=4, kv_heads=1, positions="rotated"),
    Case((4, 4), 3, 4, 2, fold_passes=False, sinks=1),  # shorter than one block: window and sinks only
    Case((10, 4), 37, 4, 0, pooled=True),
    Case((10, 4), 37, 4, 0, sinks=3, gate=True, heads=3, kv_heads=1, pooled=True),
    Case((7, 5), 33, 5, 0, fold_passes=False, sinks=6, positions="raw", pooled=True),
    Case((6, 6), 36, 6, 0, fold_passes=False, sinks=2, gate=True, positions="rotated", pooled=True),
    # ranked by the channel-wise bound of each block's keys
    Case((10, 4), 37, 4, 2, sinks=3, gate=True, score="bound"),
    Case((7, 5), 33, 5, 3, fold_passes=False, heads=3, kv_heads=1, gate=True, score="bound"),
    Case((10, 4), 39, 4, 3, fold_passes=False, sinks=2, positions="rotated", score="bound"),
]


def _inv_freq(headdim: int) -> torch.Tensor:
    return 1.0 / (100.0 ** (torch.arange(0, headdim, 2, dtype=torch.float32) / headdim))


def make_inputs(case: Case, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, H, Hkv, D = case.seqlen, case.heads, case.kv_heads, case.headdim
    q = torch.randn(1, N, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, N, Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    inv = _inv_freq(D)
    positions = None
    if case.positions == "raw":
        positions = TensorPositions(inv, attention_scaling=1.25)
    elif case.positions == "rotated":
        from tensorized_attention.rope import rotate

        pos = torch.arange(N)
        q, k = (rotate(x.transpose(1, 2), pos, inv).transpose(1, 2) for x in (q, k))
        positions = TensorPositions(inv, rotated=True)
    q, k, v = (x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v))
    passes = (len(case.shape) if case.fold_passes else 0) + 1
    gate = torch.rand(H, passes, generator=g, dtype=torch.float64).to(dtype) if case.gate else None
    if gate is not None:
        gate.requires_grad_(requires_grad)
    kwargs = dict(order=None if case.fold_passes else (), sinks=case.sinks, gate=gate,
                  select=PooledPass(case.block) if case.pooled else SelectedPass(case.block, case.topk, case.score))
    return q, k, v, kwargs, positions


def expected(case, q, k, v, kwargs, positions):
    if positions is None:
        return oracle(q, k, v, case.shape, **kwargs)
    return oracle_with_positions(q, k, v, case.shape, positions.inv_freq, rotated=positions.rotated,
                                 attention_scaling=positions.attention_scaling, **kwargs)


def _tolerance(case: Case) -> float:
    # rotary angles are computed in float32 (as models compute them): ~1e-7 from float64
    return 1e-10 if case.positions is None else 2e-6


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_oracle(case):
    q, k, v, kwargs, positions = make_inputs(case, requires_grad=True)
    leaves = [q, k, v] + ([kwargs["gate"]] if case.gate else [])
    out = tensorized_attn(q, k, v, case.shape, positions=positions, **kwargs)
    want = expected(case, q, k, v, kwargs, positions)
    tol = _tolerance(case)
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    grads_want = torch.autograd.grad(want, leaves, upstream)
    for name, got, ref in zip("qkvg", grads, grads_want, strict=False):
        torch.testing.assert_close(got, ref, rtol=0, atol=tol * 10, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6], CASES[10], CASES[12]], ids=str)
def test_training_dtypes_close_to_oracle(case, dtype):
    """float32 and bfloat16 (the dtypes models train in): forward and gradients within a
    few units of the dtype's rounding of the float64 oracle on the same rounded inputs."""
    q, k, v, kwargs, positions = make_inputs(case, dtype, requires_grad=True)
    leaves = [q, k, v] + ([kwargs["gate"]] if case.gate else [])
    out = tensorized_attn(q, k, v, case.shape, positions=positions, **kwargs)
    assert out.dtype == dtype
    want = expected(case, q, k, v, kwargs, positions)
    eps = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert (out.double() - want).abs().max().item() <= eps
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(out, leaves, upstream.to(dtype))
    grads_want = torch.autograd.grad(want, leaves, upstream)
    for name, got, ref in zip("qkvg", grads, grads_want, strict=False):
        scale = ref.abs().max().item() + 1.0
        assert (got.double() - ref).abs().max().item() <= eps * scale * 2, name


def test_chunks_of_queries_do_not_change_the_result(monkeypatch):
    """The pass runs over chunks of queries to bound its memory: any chunking, one result."""
    case = CASES[1]
    q, k, v, kwargs, positions = make_inputs(case)
    whole = tensorized_attn(q, k, v, case.shape, **kwargs)
    monkeypatch.setattr(reference, "SELECT_CHUNK_ELEMENTS", 1)  # one query per chunk
    torch.testing.assert_close(tensorized_attn(q, k, v, case.shape, **kwargs), whole, rtol=0, atol=1e-12)


def test_selecting_every_earlier_block_is_causal_attention():
    """With topk at least the number of blocks, no positions and no sinks, every query reads
    every earlier key: the selected pass alone is full causal attention."""
    q, k, v = torch.randn(3, 1, 45, 2, 16, dtype=torch.float64).unbind(0)
    out = tensorized_attn(q, k, v, (9, 5), order=(), select=SelectedPass(5, 9))
    full = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out, full.transpose(1, 2), rtol=0, atol=1e-12)


def test_far_block_that_matches_the_query_is_read():
    """A block whose keys align with the query is selected however far back it lies (60
    blocks here), and its value then dominates the output."""
    N, W, D = 4096, 64, 32
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(1, N, 1, D, dtype=torch.float64)
    k = torch.randn(1, N, 1, D, generator=g, dtype=torch.float64) * 0.1
    v = torch.zeros(1, N, 1, D, dtype=torch.float64)
    needle = slice(3 * W, 4 * W)  # block 3, ~60 blocks before the last query
    q[0, -1, 0, 0] = 4.0
    k[0, needle, 0, 0] = 4.0
    v[0, needle, 0, 1] = 1.0
    out = tensorized_attn(q, k, v, (64, 64), order=(), select=SelectedPass(W, 1), softmax_scale=1.0)
    assert out[0, -1, 0, 1] > 0.99


def test_bound_score_finds_a_needle_that_the_mean_dilutes():
    """One key aligned with the query in a block of filler (block 1) against a block whose
    every key leans slightly toward the query (block 4): the mean ranks block 4 first, the
    bound block 1; the output then reads the needle's value only with the bound."""
    N, W, D = 512, 64, 16
    g = torch.Generator().manual_seed(2)
    q = torch.zeros(1, N, 1, D, dtype=torch.float64)
    k = torch.randn(1, N, 1, D, generator=g, dtype=torch.float64) * 0.1
    k[0, :, 0, 0] = -0.5  # filler leans away from the query
    v = torch.zeros(1, N, 1, D, dtype=torch.float64)
    q[0, -1, 0, 0] = 1.0
    k[0, 4 * W:5 * W, 0, 0] = 0.5  # block 4: every key mildly aligned
    k[0, 1 * W + 10, 0, 0] = 8.0  # block 1: one key strongly aligned (the needle)
    v[0, 1 * W + 10, 0, 1] = 1.0
    outs = {score: tensorized_attn(q, k, v, (8, 64), order=(), select=SelectedPass(W, 1, score), softmax_scale=1.0)
            for score in ("mean", "bound")}
    assert outs["mean"][0, -1, 0, 1] < 0.01
    assert outs["bound"][0, -1, 0, 1] > 0.9


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SelectedPass(4, 2, "median"), "score must be one of"),
        (lambda: SelectedPass(0, 2), "block must be an int >= 1"),
        (lambda: SelectedPass(4, 0), "topk must be an int >= 1"),
        (lambda: SelectedPass(4.0, 2), "block must be an int >= 1"),
        (lambda: SelectedPass(4, True), "topk must be an int >= 1"),
        (lambda: PooledPass(0), "PooledPass.block must be an int >= 1"),
    ],
)
def test_bad_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_uses_raise():
    q, k, v = torch.randn(3, 1, 40, 2, 8).unbind(0)
    sel = SelectedPass(4, 2)
    with pytest.raises(TypeError, match="select must be None, a SelectedPass"):
        tensorized_attn(q, k, v, (10, 4), select=(4, 2))
    with pytest.raises(ValueError, match="causal only"):
        tensorized_attn(q, k, v, (10, 4), causal=False, select=sel)
    with pytest.raises(ValueError, match=r"select.block \(3\) must divide the fold's 40 positions"):
        tensorized_attn(q, k, v, (10, 4), select=SelectedPass(3, 2))
    with pytest.raises(ValueError, match=r"gate must have shape \[heads, m\] = \[2, 3\]"):
        tensorized_attn(q, k, v, (10, 4), select=sel, gate=torch.rand(2, 2))
    with pytest.raises(ValueError, match="permutation"):
        tensorized_attn(q, k, v, (10, 4), order=())  # no pass at all
    # alone, the block need not divide the fold
    assert tensorized_attn(q, k, v, (10, 4), order=(), select=SelectedPass(3, 2)).shape == q.shape


# ------------------------------------------------------------------------------ key relay

RELAY_CASES = [
    ((10, 4), 37, "complete", True, 0, False, 4, 2, None),
    ((10, 4), 37, "complete", True, 3, True, 4, 1, "raw"),
    ((3, 4, 4), 45, "block", False, 2, True, 2, 2, None),
    ((3, 4, 4), 47, "complete", True, 0, False, 3, 1, "rotated"),
]


@pytest.mark.parametrize("case", RELAY_CASES, ids=str)
def test_key_relay_matches_oracle(case):
    """Key relay: each pass mixes the keys with the weights it mixes the values with, and the
    next pass scores against them; forward and gradients against the oracle."""
    shape, N, mode, causal, sinks, gated, H, Hkv, positions_kind = case
    base = Case(shape, N, 4, 1, heads=H, kv_heads=Hkv, positions=positions_kind)
    q, k, v, _, positions = make_inputs(base, requires_grad=True)
    gate = torch.rand(H, len(shape), dtype=torch.float64, requires_grad=True) if gated else None
    kwargs = dict(mode=mode, causal=causal, sinks=sinks, gate=gate, relay=True)
    leaves = [q, k, v] + ([gate] if gated else [])
    out = tensorized_attn(q, k, v, shape, positions=positions, **kwargs)
    want = expected(base, q, k, v, kwargs, positions)
    tol = _tolerance(base)
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
    plain = tensorized_attn(q, k, v, shape, positions=positions, **{**kwargs, "relay": False})
    assert (out - plain).abs().max() > 0.1  # relay changes what the later passes see
    upstream = torch.randn_like(out)
    for name, got, ref in zip("qkvg", torch.autograd.grad(out, leaves, upstream),
                              torch.autograd.grad(want, leaves, upstream), strict=False):
        torch.testing.assert_close(got, ref, rtol=0, atol=tol * 10, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_key_relay_bad_uses_raise():
    q, k, v = torch.randn(3, 1, 40, 2, 8).unbind(0)
    with pytest.raises(TypeError, match="relay must be a bool"):
        tensorized_attn(q, k, v, (10, 4), relay=1)
    with pytest.raises(ValueError, match="relay and select together"):
        tensorized_attn(q, k, v, (10, 4), relay=True, select=SelectedPass(4, 1))
