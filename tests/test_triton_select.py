"""The Triton forward of the selected pass (ops/triton/select.py) against the reference
backend and the dense float64 oracle. Without a GPU it runs under Triton's interpreter
(small sizes, float32 / float16); on a GPU, real sizes and bfloat16 too."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from oracle import oracle, oracle_with_positions  # noqa: E402
from tensorized_attention import SelectedPass, TensorPositions, tensorized_attn  # noqa: E402
from tensorized_attention.ops.triton.select import BIG, _pairs, _selections, selected_pass  # noqa: E402
from tensorized_attention.rope import rotate  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (seqlen, block, topk, heads, kv_heads, headdim, sinks, positions, values per query head, score)
CASES = [
    (100, 16, 2, 2, 1, 32, 0, None, False, "mean"),
    (77, 16, 1, 4, 2, 32, 3, None, True, "mean"),
    (90, 32, 3, 2, 2, 32, 4, "raw", False, "mean"),
    (70, 16, 2, 3, 1, 32, 2, "rotated", True, "mean"),
    (10, 16, 2, 2, 1, 32, 2, "raw", False, "mean"),  # shorter than one block
    (83, 16, 2, 4, 2, 32, 3, "raw", False, "bound"),
    (70, 16, 3, 3, 1, 32, 2, "rotated", True, "bound"),
]
if CUDA:
    CASES += [(4096, 256, 2, 9, 3, 64, 4, "rotated", False, "mean"), (3001, 128, 4, 8, 2, 128, 4, "raw", True, "mean"),
              (2048, 256, 4, 6, 2, 64, 4, "rotated", False, "bound")]


def _inputs(case, dtype):
    N, W, topk, H, Hkv, D, sinks, kind, per_head, score = case
    g = torch.Generator().manual_seed(N + W)
    q = torch.randn(1, N, H, D, generator=g)
    k = torch.randn(1, N, Hkv, D, generator=g)
    # keys with a shared direction per block make the ranking decisive (no near ties)
    k = k + 2 * torch.randn(1, N // W + 1, Hkv, D, generator=g).repeat_interleave(W, 1)[:, :N]
    values = torch.randn(1, N, H if per_head else Hkv, D, generator=g)
    inv = 1.0 / (1000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    positions = None
    if kind == "raw":
        positions = TensorPositions(inv, attention_scaling=1.1)
    elif kind == "rotated":
        pos = torch.arange(N)
        q, k = (rotate(x.transpose(1, 2), pos, inv).transpose(1, 2) for x in (q, k))
        positions = TensorPositions(inv, rotated=True)
    if positions is not None:
        positions = TensorPositions(positions.inv_freq.to(DEVICE), positions.attention_scaling, positions.rotated)
    return (*(x.to(DEVICE, dtype) for x in (q, k, values)), positions, SelectedPass(W, topk, score), sinks)


def _reference_pass(step, q, k, values, positions, sinks, scale):
    """The reference's own selected pass on the same operands ([B, N, *, D] in and out),
    values per kv head or per query head."""
    from tensorized_attention.ops.reference import _content_pass

    B, N, H, D = q.shape
    Hkv = k.shape[2]

    def internal(x, groups):
        return x.reshape(B, N, x.shape[2] // groups, groups, D).permute(0, 2, 3, 1, 4)

    q_c, k_c, inv_freq, rope_scale = q, k, None, None
    if positions is not None:
        pos = torch.arange(N, device=q.device)
        if positions.rotated:
            q_c, k_c = (rotate(x.transpose(1, 2), pos, positions.inv_freq, inverse=True).transpose(1, 2)
                        for x in (q, k))
            rope_scale = 1.0
        else:
            rope_scale = positions.attention_scaling
        q_c = (q_c.to(torch.promote_types(q.dtype, torch.float32)) * rope_scale).to(q.dtype)
        inv_freq = positions.inv_freq
    value_groups = 1 if values.shape[2] == Hkv else H // Hkv
    out = _content_pass(step, internal(q_c, H // Hkv), internal(k_c, 1), internal(values, value_groups), None,
                        min(sinks, N), sinks, scale, inv_freq, rope_scale)
    return out.permute(0, 3, 1, 2, 4).reshape(B, N, H, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference_and_oracle(case, dtype):
    q, k, values, positions, step, sinks = _inputs(case, dtype)
    scale = q.shape[-1] ** -0.5
    out = selected_pass(step, q, k, values, sinks=sinks, scale=scale, positions=positions)
    assert out.dtype == dtype and out.shape == q.shape
    # the reference of the same pass (alone): values per kv head are v, per query head a
    # value tensor the fold passes would have left; the oracle takes them as v when per kv head
    ref = tensorized_attn(q, k, values if values.shape[2] == k.shape[2] else k, order=(), select=step, sinks=sinks,
                          positions=positions, backend="reference") if values.shape[2] == k.shape[2] else None
    if ref is not None:
        exact = (oracle(q, k, values, (q.shape[1],), order=(), select=step, sinks=sinks) if positions is None else
                 oracle_with_positions(q, k, values, (q.shape[1],), positions.inv_freq, rotated=positions.rotated,
                                       attention_scaling=positions.attention_scaling, order=(), select=step,
                                       sinks=sinks))
        err_ref = (ref.double() - exact).abs().max().item()
        err = (out.double() - exact).abs().max().item()
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
        assert err <= 2 * err_ref + tol, f"error {err:.3g} against the oracle, reference {err_ref:.3g}"
    else:  # values per query head: against the reference's own pass on those values, and in float64
        want = _reference_pass(step, q, k, values, positions, sinks, scale)
        exact = _reference_pass(step, *_float64(q, k, values, positions), sinks, scale)
        err, err_ref = ((x.double() - exact).abs().max().item() for x in (out, want))
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype] + _window_angles(positions, q)
        assert err <= 2 * err_ref + tol, f"error {err:.3g} against float64, the reference's {err_ref:.3g}"


def _window_angles(positions, q):
    """What rounding the window's angles adds: with raw positions the kernel's window rotates
    q and k at their positions 0 .. N-1 in float32 (as a model's own rotary embedding does),
    the reference at their distances; an angle near N is rounded by about N 2^-24."""
    return 1e-7 * q.shape[1] if positions is not None and not positions.rotated else 0.0


def _float64(q, k, values, positions):
    """The operands in float64 (the reference in float64 is the exact pass: it equals the
    oracle, tests/test_retrieval_passes.py)."""
    if positions is not None:
        positions = TensorPositions(positions.inv_freq.double(), positions.attention_scaling, positions.rotated)
    return q.double(), k.double(), values.double(), positions


@pytest.mark.parametrize("score", ["mean", "bound"])
@pytest.mark.parametrize("N, W, topk", [(300, 16, 3), (77, 16, 5), (129, 32, 1), (40, 16, 2)])
def test_ranking_kernel_selects_what_the_reference_selects(N, W, topk, score):
    """The ranking kernel against reference.select_blocks, by either score: the same blocks
    for every query (GQA, a last block cut short, fewer earlier blocks than topk), and of
    equal scores the later block."""
    from tensorized_attention.ops.reference import block_summaries, select_blocks

    g = torch.Generator().manual_seed(N)
    B, H, Hkv, D = 2, 4, 2, 32
    q = torch.randn(B, N, H, D, generator=g)
    k = torch.randn(B, N, Hkv, D, generator=g)
    if N >= 3 * W:  # blocks 0 and 2 of the first batch and kv head: the same (large) keys, so equal scores
        k[0, :W, 0] += 3
        k[0, 2 * W:3 * W, 0] = k[0, :W, 0]
        q[0, 3 * W:, 0] = 10 * k[0, :W, 0].mean(0)  # queries of block 3 on: blocks 0 and 2 tie at the top
    step = SelectedPass(W, topk, score)
    sel, R = _selections(step, q.to(DEVICE), k.to(DEVICE), 0.3)
    summaries = block_summaries(k.permute(0, 2, 1, 3)[:, :, None], step)
    qc = q.reshape(B, N, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)
    want = select_blocks(qc, summaries, torch.arange(N), W, topk, 0.3)[0].reshape(B, H, N, R)
    want = torch.where(want < N // W, want, BIG)
    assert R == min(topk, N // W) and torch.equal(sel[..., :R].cpu(), want.to(torch.int32))
    if N >= 3 * W and topk == 1:
        assert (sel[0, 0, 3 * W:, 0] == 2).all()  # the tie goes to the later block


def test_pairs_group_the_selections_by_head_and_block():
    """Each (query, slot) pair lands in its (head, block) group, in order of the query, and
    the tiles cover each group in pieces of at most block_m pairs."""
    sel = torch.tensor([[[[0, 2], [2, BIG], [1, 2], [0, 1], [2, BIG]],
                         [[1, BIG], [0, 1], [BIG, BIG], [1, 2], [0, 2]]]], dtype=torch.int32)  # B 1, H 2, N 5, R 2
    pair, offsets, tile_group, tile_start = _pairs(sel, 2, 3, 2)
    groups = [pair[offsets[g]:offsets[g + 1]].tolist() for g in range(6)]
    # pair = p * R + slot; head 0: block 0 <- (0,0), (3,0); block 1 <- (2,0), (3,1); block 2 <- (0,1), (1,0), (2,1), (4,0)
    assert groups[:3] == [[0, 6], [4, 7], [1, 2, 5, 8]]
    assert groups[3:] == [[2, 8], [0, 3, 6], [7, 9]]
    tiles = [(int(g), int(s)) for g, s in zip(tile_group, tile_start, strict=True)]
    assert tiles == [(0, 0), (1, 2), (2, 4), (2, 6), (3, 8), (4, 10), (4, 12), (5, 13)]


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "after-fold"])
def test_operator_runs_the_kernel_without_gradients(alone):
    """tensorized_attn(..., select=SelectedPass, backend="triton"): the fold passes and the
    selected pass on Triton, the gate mixed after, equal to the reference, gradients too."""
    q, k, values, positions, step, sinks = _inputs((96, 16, 2, 4, 2, 32, 2, "raw", False, "mean"), torch.float32)
    order = () if alone else None
    gate = torch.rand(4, 1 if alone else 3, device=DEVICE)
    opts = dict(order=order, select=step, sinks=sinks, positions=positions, gate=gate)
    with torch.no_grad():
        fast = tensorized_attn(q, k, values, (6, 16), backend="triton", **opts)
        ref = tensorized_attn(q, k, values, (6, 16), backend="reference", **opts)
    assert (fast - ref).abs().max().item() < 1e-4
    leaves = [x.requires_grad_() for x in (q, k, values, gate)]
    upstream = torch.randn_like(q)
    grads = [torch.autograd.grad(tensorized_attn(q, k, values, (6, 16), backend=backend, **opts), leaves, upstream)
             for backend in ("triton", "reference")]
    for name, a, b in zip("qkvg", *grads, strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * (b.abs().max().item() + 1), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_the_reference(case):
    """dq, dk, dv through the Triton forward and backward equal the reference's autograd
    (float32), for values per kv head and per query head, with and without positions."""
    q, k, values, positions, step, sinks = _inputs(case, torch.float32)
    q, k, values = (x.detach().requires_grad_() for x in (q, k, values))
    scale = q.shape[-1] ** -0.5
    out = selected_pass(step, q, k, values, sinks=sinks, scale=scale, positions=positions)
    want = _reference_pass(step, q, k, values, positions, sinks, scale)
    q64, k64, v64, pos64 = (x.detach().requires_grad_() if torch.is_tensor(x) else x
                            for x in _float64(q, k, values, positions))
    exact = _reference_pass(step, q64, k64, v64, pos64, sinks, scale)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, values), upstream)
    ref = torch.autograd.grad(want, (q, k, values), upstream)
    ref64 = torch.autograd.grad(exact, (q64, k64, v64), upstream.double())
    for name, a, b, c in zip("oqkv", (out, *got), (want, *ref), (exact, *ref64), strict=True):
        err, err_ref = ((x.double() - c).abs().max().item() for x in (a, b))
        tol = (1e-6 + _window_angles(positions, q)) * (c.abs().max().item() + 1)
        assert err <= 2 * err_ref + tol, f"{name}: {err:.3g}, reference {err_ref:.3g}"
    again = torch.autograd.grad(selected_pass(step, q, k, values, sinks=sinks, scale=scale,
                                                      positions=positions), (q, k, values), upstream)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))  # a fixed order of sums


def test_only_blocks_the_kernels_tile_run_on_them():
    """The selected pass runs on its kernels for a block that is a multiple of 16 and an even
    headdim; anything else is the reference's alone (and says why)."""
    from tensorized_attention.ops import dispatch

    q = torch.zeros(1, 8, 2, 32)
    assert dispatch._reference_only(SelectedPass(16, 2), False, q) is None
    assert dispatch._reference_only(SelectedPass(16, 2, "bound"), False, q) is None
    assert "multiple of 16" in dispatch._reference_only(SelectedPass(12, 2), False, q)
    assert "odd headdim" in dispatch._reference_only(SelectedPass(16, 2), False, torch.zeros(1, 8, 2, 31))
