"""The Triton backend against the dense float64 oracle (DESIGN.md §2).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by the
root conftest.py) at small sizes; on a GPU the same tests run, plus real-size cases.
The interpreter computes bfloat16 dot products wrongly, so bfloat16 runs on the GPU only.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from oracle import oracle, oracle_in_dtype, oracle_with_positions  # noqa: E402
from tensorized_attention import TensorPositions, tensorized_attn  # noqa: E402
from tensorized_attention.ops.triton import triton_fwd  # noqa: E402
from tensorized_attention.rope import rotate  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (shape, seqlen, causal, mode, order, heads, kv_heads, headdim, gate, sinks)
CASES = [
    ((4, 4), 16, True, "complete", None, 2, 1, 16, False, 0),
    ((4, 4), 13, True, "block", None, 2, 1, 16, False, 0),
    ((4, 4), 13, False, "block", (1, 0), 4, 2, 16, True, 2),
    ((3, 4, 5), 50, True, "complete", (2, 0, 1), 4, 2, 16, True, 4),
    ((3, 4, 5), 60, True, "block", (1, 2, 0), 4, 4, 60, True, 100),
    ((2, 3, 2, 3), 31, False, "block", (3, 1, 0, 2), 3, 1, 16, "m", 1),
    ((7,), 5, True, "complete", None, 3, 1, 16, True, 1),
    ((5, 3), 1, True, "complete", None, 2, 2, 16, True, 4),
    ((9, 20), 171, True, "complete", None, 2, 1, 100, True, 3),
    ((20, 9), 171, True, "block", (1, 0), 2, 1, 32, False, 0),
    ((17, 33), 561, True, "complete", (1, 0), 4, 1, 64, True, 4),
    ((2, 100), 190, True, "complete", None, 2, 1, 16, False, 0),
    ((3, 64), 180, True, "block", (1, 0), 2, 2, 16, False, 2),
    ((2, 80), 150, False, "block", None, 2, 1, 16, False, 0),
]
if CUDA:
    CASES += [
        ((64, 64), 4096, True, "complete", None, 8, 2, 128, True, 4),
        ((64, 64), 4000, True, "block", None, 8, 8, 128, False, 0),
        ((16, 16, 16), 4096, True, "complete", (2, 0, 1), 8, 2, 128, True, 4),
        ((32, 128), 4096, False, "block", None, 4, 1, 256, True, 1),
        ((16, 16, 16), 3001, True, "complete", None, 4, 4, 64, False, 4),
    ]


def _inputs(case, dtype, requires_grad=True):
    shape, N, causal, mode, order, H, Hkv, D, gate, sinks = case
    q = torch.randn(1, N, H, D, device=DEVICE)
    k = torch.randn(1, N, Hkv, D, device=DEVICE)
    v = torch.randn(1, N, Hkv, D, device=DEVICE)
    q, k, v = (x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v))
    m = len(shape)
    g = None
    if gate:
        g = torch.rand((m,) if gate == "m" else (H, m), device=DEVICE).requires_grad_(requires_grad)
    opts = dict(causal=causal, mode=mode, order=order, gate=g, sinks=sinks)
    return q, k, v, shape, opts


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[1]}-{c[3]}-{'c' if c[2] else 'b'}-D{c[7]}")
def test_forward_backward_match_oracle(case, dtype):
    """Outputs and gradients of q, k, v and the gate: within 3x (+eps) of the error of
    the same dense computation in the input dtype, against float64."""
    q, k, v, shape, opts = _inputs(case, dtype)
    out = tensorized_attn(q, k, v, shape, backend="triton", **opts)
    ref = oracle(q, k, v, shape, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any()
    leaves = [q, k, v] + ([opts["gate"]] if opts["gate"] is not None else [])
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    grads_ref = torch.autograd.grad(ref, leaves, dout)
    if dtype == torch.float32:
        low, grads_low, factor, eps = ref, grads_ref, 1.0, 2e-4
    else:
        low = oracle_in_dtype(q, k, v, shape, **opts)
        grads_low = torch.autograd.grad(low, leaves, dout.to(dtype))
        factor, eps = 3.0, 2e-3
    assert _max_err(out, ref) <= factor * _max_err(low, ref) + eps
    for name, g, g_ref, g_low in zip("qkvg", grads, grads_ref, grads_low, strict=False):
        assert not g.isnan().any(), name
        scale = g_ref.abs().max().item() + 1.0
        assert _max_err(g, g_ref) <= factor * _max_err(g_low, g_ref) + eps * scale, name


def test_auto_picks_triton_on_cuda_only():
    from tensorized_attention import available_backends

    assert available_backends(DEVICE)[0] == ("triton" if CUDA else "reference")


def _inv_freq(D, base=10000.0):
    return (1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))).float().to(DEVICE)


# (shape, seqlen, mode, order, heads, kv_heads, headdim, gate, sinks, rotated, attention_scaling)
POSITION_CASES = [
    ((4, 5), 20, "complete", None, 2, 1, 16, False, 0, False, 1.0),
    ((4, 5), 17, "complete", (1, 0), 4, 2, 16, True, 3, True, 1.0),
    ((3, 4, 5), 55, "block", (2, 0, 1), 4, 2, 32, True, 2, True, 1.3),
    ((3, 4, 5), 60, "complete", None, 2, 2, 16, False, 4, False, 0.8),
    ((9, 5), 17, "complete", None, 2, 1, 16, True, 3, True, 1.0),  # rows 4..8 hold no position
]
if CUDA:
    POSITION_CASES += [
        ((64, 64), 4096, "complete", None, 8, 2, 128, True, 4, True, 1.0),
        ((16, 16, 16), 3001, "block", (2, 0, 1), 4, 4, 64, True, 4, True, 1.2),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", POSITION_CASES, ids=lambda c: f"{c[0]}-N{c[1]}-{c[2]}-{'rot' if c[9] else 'raw'}")
def test_tensor_positions_match_oracle(case, dtype):
    """Rotary tensor positions (DESIGN.md §3) on the Triton backend: outputs and gradients
    against the float64 dense oracle, within 3x (+eps) of the reference backend's error in
    the same dtype (float32: within 1e-4). Rotated inputs arrive as a Hugging Face layer
    hands them over (rotated and scaled at 0 .. N-1)."""
    shape, N, mode, order, H, Hkv, D, gate, sinks, rotated, scaling = case
    inv = _inv_freq(D)
    q, k, v = torch.randn(1, N, H, D, device=DEVICE), *torch.randn(2, 1, N, Hkv, D, device=DEVICE)
    if rotated:
        q, k = (rotate(x.transpose(1, 2), torch.arange(N, device=DEVICE), inv, scale=scaling).transpose(1, 2)
                for x in (q, k))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    g = torch.rand(H, len(shape), device=DEVICE).requires_grad_() if gate else None
    opts = dict(mode=mode, order=order, sinks=sinks, gate=g,
                positions=TensorPositions(inv, attention_scaling=scaling, rotated=rotated))
    leaves = [q, k, v] + ([g] if gate else [])
    out = tensorized_attn(q, k, v, shape, backend="triton", **opts)
    low = tensorized_attn(q, k, v, shape, backend="reference", **opts)
    ref = oracle_with_positions(q, k, v, shape, inv, rotated=rotated, attention_scaling=scaling,
                                **{key: x for key, x in opts.items() if key != "positions"})
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    grads_low = torch.autograd.grad(low, leaves, dout.to(dtype))
    grads_ref = torch.autograd.grad(ref, leaves, dout)
    factor, eps = (1.0, 1e-4) if dtype == torch.float32 else (3.0, 2e-3)
    assert _max_err(out, ref) <= factor * _max_err(low, ref) + eps
    for name, gr, g_ref, g_low in zip("qkvg", grads, grads_ref, grads_low, strict=False):
        scale = g_ref.abs().max().item() + 1.0
        assert _max_err(gr, g_ref) <= factor * _max_err(g_low, g_ref) + eps * scale, name


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_gated_softmax_gradient_rows_sum_to_zero(dtype):
    """A query that reads one key has a softmax of exactly 1 whatever its score, so q and k
    get no gradient. With a gate, dO = (1 - g) dOut is rounded to the input dtype for the
    dots: the row statistic delta = rowsum(dO * O) must use that same rounded dO, or
    dS = P (dP - delta) is off by the rounding and dq, dk are not zero."""
    q, k, v, shape, opts = _inputs(((5, 3), 1, True, "complete", None, 2, 1, 16, True, 4), dtype)
    out = tensorized_attn(q, k, v, shape, backend="triton", **opts)
    dq, dk = torch.autograd.grad(out, [q, k], torch.randn_like(out))
    assert dq.abs().max().item() < 1e-5 and dk.abs().max().item() < 1e-5


@pytest.mark.parametrize("residue_major", [False, True], ids=["tile-major", "residue-major"])
def test_both_launch_orders_match_oracle(monkeypatch, residue_major):
    """Both orders in which a pass's programs can be launched cover every (tile, residue)
    once: strided passes (several residues, several tiles each) in the forward and in both
    backward kernels."""
    from tensorized_attention.ops.triton import launch

    monkeypatch.setattr(launch, "RESIDUE_MAJOR", residue_major)
    case = ((40, 3, 2), 230, True, "complete", (1, 0, 2), 2, 1, 16, True, 2)
    q, k, v, shape, opts = _inputs(case, torch.float32)
    out = tensorized_attn(q, k, v, shape, backend="triton", **opts)
    ref = oracle(q, k, v, shape, **opts)
    leaves = [q, k, v, opts["gate"]]
    dout = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad(out, leaves, dout.float()), torch.autograd.grad(ref, leaves, dout),
                        strict=True):
        assert _max_err(g, g_ref) < 1e-4 * (g_ref.abs().max().item() + 1)
    assert _max_err(out, ref) < 1e-4


def test_repeated_backward_is_identical():
    """No atomics: the same inputs give bit-identical gradients."""
    case = ((64, 64), 4096, True, "complete", None, 8, 2, 128, True, 4) if CUDA else (
        (9, 20), 171, True, "complete", None, 2, 1, 32, True, 3)
    q, k, v, shape, opts = _inputs(case, torch.float16)
    leaves = [q, k, v, opts["gate"]]
    out = tensorized_attn(q, k, v, shape, backend="triton", **opts)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, leaves, dout, retain_graph=True)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("positions", [False, True], ids=["plain", "tensor-positions"])
def test_outputs_fully_written_over_nan(monkeypatch, positions):
    """Every buffer the backend allocates starts as NaN; outputs and gradients must not
    keep any of it (with tensor positions: the per-pass and sink gradients too)."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(real_empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: nan(real_new_empty(self, *a, **kw)))
    case = ((6, 7), 40, True, "complete", None, 4, 2, 32, True, 2)
    q, k, v, shape, opts = _inputs(case, torch.float32)
    if positions:
        opts["positions"] = TensorPositions(_inv_freq(32), rotated=True)
    out = tensorized_attn(q, k, v, shape, backend="triton", **opts)
    grads = torch.autograd.grad(out, [q, k, v, opts["gate"]], torch.ones_like(out))
    assert not out.isnan().any()
    assert not any(g.isnan().any() for g in grads)


# (fold, seqlen, first query, causal, mode, pass dim, heads, kv heads, gate): one pass whose
# queries are the last positions (a rank's slice after its halo of keys, distributed.py)
SUFFIX_CASES = [
    ((3, 6, 4), 70, 29, True, "complete", 1, 4, 2, True),
    ((5, 7), 35, 13, True, "complete", 0, 2, 1, False),
    ((5, 7), 33, 7, True, "block", 0, 2, 2, True),
    ((4, 8), 32, 17, False, "block", 0, 3, 1, True),
    ((4, 8), 32, 31, True, "complete", 1, 2, 1, False),
]
if CUDA:
    SUFFIX_CASES += [((8, 64, 8), 4096, 2300, True, "complete", 1, 8, 2, True)]  # the oracle is dense: N^2


@pytest.mark.parametrize("case", SUFFIX_CASES, ids=lambda c: f"{c[0]}-N{c[1]}-from{c[2]}-{c[4]}")
def test_queries_of_the_last_positions_match_oracle(case):
    """q for the last positions only (one pass, no sinks): the output and the gradients are
    the whole sequence's at those rows (dq there; dk, dv and the gate's from those queries
    alone), and the earlier queries are never read."""
    shape, N, first, causal, mode, dim, H, Hkv, gated = case
    dtype = torch.float32
    q = torch.randn(1, N, H, 16, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(1, N, Hkv, 16, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    gate = torch.rand(H, 1, device=DEVICE, requires_grad=True) if gated else None
    q_last = q[:, first:].clone().requires_grad_()
    q_all = torch.cat([torch.full_like(q[:, :first], float("nan")), q_last], dim=1)  # NaN: must not be read
    out, *_ = triton_fwd(q_last[None], k[None], v, gate, None, None, list(shape), [dim], causal, mode == "complete",
                         0, 0.25, True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q_last, k, v] + ([gate] if gated else []), dout)
    q_ref = q_all.detach().nan_to_num(0.0).requires_grad_()
    ref = oracle(q_ref, k, v, shape, causal=causal, mode=mode, order=[dim], gate=gate, softmax_scale=0.25)[:, first:]
    refs = torch.autograd.grad(ref, [q_ref, k, v] + ([gate] if gated else []), dout.double())
    refs = (refs[0][:, first:], *refs[1:])
    assert out.shape == q_last.shape and _max_err(out, ref) < 1e-4
    for g, g_ref in zip(grads, refs, strict=True):
        assert _max_err(g, g_ref) < 1e-4 * (g_ref.abs().max().item() + 1)


@pytest.mark.parametrize("case", SUFFIX_CASES, ids=lambda c: f"{c[0]}-N{c[1]}-from{c[2]}-{c[4]}")
def test_split_pass_matches_oracle(case):
    """A pass whose keys come in two parts (split_pass_triton: the queries' own keys, then,
    after wait(), the earlier positions' keys folded in by log-sum-exp) equals the whole
    pass at the queries' rows, gradients of both parts of k and v included. The earlier
    keys hold NaN until wait() fills them: the first launch must not read them."""
    from tensorized_attention.fold import strides
    from tensorized_attention.ops.triton.launch import split_pass_triton

    shape, N, first, causal, mode, dim, H, Hkv, gated = case
    n, s = shape[dim], strides(shape)[dim]
    local_shape = (-(-N // (n * s)), n, s)  # the pass along dim, as the middle dim of a 3-d fold
    q = torch.randn(1, N - first, H, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, N, Hkv, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    gate = torch.rand(H, device=DEVICE, requires_grad=True) if gated else None
    own_k, own_v = (x[:, first:].detach().clone().requires_grad_() for x in (k, v))
    before_k, before_v = (torch.full_like(x[:, :first], float("nan")).requires_grad_() for x in (k, v))

    def wait():
        with torch.no_grad():
            before_k.copy_(k[:, :first])
            before_v.copy_(v[:, :first])

    out = split_pass_triton(q, own_k, own_v, before_k, before_v, wait, local_shape, causal=causal, mode=mode,
                            gate=gate, softmax_scale=0.25)
    dout = torch.randn_like(out)
    inputs = [q, own_k, own_v, before_k, before_v] + ([gate] if gated else [])
    grads = torch.autograd.grad(out, inputs, dout)
    grads = [grads[0], torch.cat([grads[3], grads[1]], 1), torch.cat([grads[4], grads[2]], 1), *grads[5:]]
    q_ref = torch.cat([torch.zeros_like(q[:, :1]).expand(-1, first, -1, -1), q], 1).detach().requires_grad_()
    ref = oracle(q_ref, k, v, shape, causal=causal, mode=mode, order=[dim], gate=None if gate is None else gate[:, None],
                 softmax_scale=0.25)[:, first:]
    refs = torch.autograd.grad(ref, [q_ref, k, v] + ([gate] if gated else []), dout.double())
    refs = (refs[0][:, first:], *refs[1:])
    assert _max_err(out, ref) < 1e-4
    for name, g, g_ref in zip(("dq", "dk", "dv", "dgate"), grads, refs, strict=False):
        assert _max_err(g, g_ref) < 1e-4 * (g_ref.abs().max().item() + 1), name


def test_queries_of_the_last_positions_need_one_pass_without_sinks():
    q = torch.randn(1, 10, 2, 16, device=DEVICE)
    k = torch.randn(1, 12, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="last 10 of 12 positions only in one pass without sinks"):
        triton_fwd(q[None], k[None], k, None, None, None, [3, 4], [0, 1], True, True, 0, 0.25, False)
    with pytest.raises(ValueError, match="sinks=2"):
        triton_fwd(q[None], k[None], k, None, None, None, [3, 4], [0], True, True, 2, 0.25, False)


def test_no_grad_needs_no_saved_state():
    """Inference (no grad) keeps at most two intermediate buffers and no statistics."""
    case = ((3, 4, 5), 60, True, "complete", None, 2, 1, 16, True, 2)
    q, k, v, shape, opts = _inputs(case, torch.float32, requires_grad=False)
    g = opts["gate"].detach()
    out, values, attn, lse = triton_fwd(q[None], k[None], v, g, None, None, list(shape), [0, 1, 2], True, True, 2,
                                        0.25, False)
    assert values.numel() == attn.numel() == lse.numel() == 0
    ref = oracle(q, k, v, shape, gate=g, sinks=2, softmax_scale=0.25)
    assert _max_err(out, ref) < 1e-4


@pytest.mark.parametrize("per_pass", [False, True], ids=["shared", "per-pass"])
def test_opcheck(per_pass):
    """The op with one q and k for all passes, and with per-pass q and k and sink queries
    and keys (what rotary tensor positions hand it)."""
    case = ((3, 5), 14, True, "complete", None, 2, 1, 16, True, 2)
    q, k, v, shape, opts = _inputs(case, torch.float32)
    gate = opts["gate"].detach().clone().requires_grad_()
    sink_q = sink_k = None
    if per_pass:
        q = torch.randn(2, *q.shape, device=DEVICE, requires_grad=True)
        k = torch.randn(2, *k.shape, device=DEVICE, requires_grad=True)
        sink_q = torch.randn(q.shape[1:], device=DEVICE, requires_grad=True)
        sink_k = torch.randn(2, 1, 2, k.shape[3], k.shape[4], device=DEVICE, requires_grad=True)
    else:
        q, k = q[None].detach().requires_grad_(), k[None].detach().requires_grad_()
    args = (q, k, v, gate, sink_q, sink_k, list(shape), [0, 1], True, True, 2, 0.25, True)
    # AOT tracing through wrap_triton needs real kernels: under the interpreter only the
    # schema, autograd registration and fake-tensor checks run; on a GPU all of them.
    utils = None if CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(triton_fwd, args, **({} if utils is None else {"test_utils": utils}))


@pytest.mark.parametrize("positions", [False, True], ids=["plain", "tensor-positions"])
def test_torch_compile_fullgraph(positions):
    """torch.compile(fullgraph=True) traces the operator into one graph (inductor on a GPU;
    on the CPU dynamo's eager backend, since AOT tracing needs real kernels)."""
    case = ((3, 5), 14, True, "complete", None, 2, 1, 16, True, 2)
    q, k, v, shape, opts = _inputs(case, torch.float32)
    pos = TensorPositions(_inv_freq(16), rotated=True) if positions else None

    def f(q, k, v, gate):
        return tensorized_attn(q, k, v, shape, gate=gate, sinks=2, backend="triton", positions=pos)

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if CUDA else "eager")
    out = compiled(q, k, v, opts["gate"])
    torch.testing.assert_close(out, f(q, k, v, opts["gate"]))
    out.sum().backward()
    assert q.grad is not None and opts["gate"].grad is not None


def test_hf_training_step_with_tensor_positions_matches_reference(monkeypatch):
    """A tiny Llama with the pilot preset (tensor positions, a gate, 4 sinks) as the study
    trains it (no cache: a cached prefill keeps the passes' values and runs on the reference
    backend): the loss and every parameter's gradient on the Triton backend equal the
    reference backend's (on the CPU the kernels run under the interpreter)."""
    transformers = pytest.importorskip("transformers")
    from tensorized_attention import hf
    from tensorized_attention.ops import dispatch

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    hf.enable(model, "pilot")
    model.config.tensorized_attention = {**hf.PRESETS["pilot"], "shape": [None, 8]}
    ids = torch.randint(0, 97, (1, 45), device=DEVICE)

    def step(backend):
        names = ["triton", "reference"] if backend == "triton" else ["reference"]
        monkeypatch.setattr(dispatch, "available_backends", lambda device=None: names)
        model.zero_grad()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step("triton")
    loss_ref, grads_ref = step("reference")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and any("tensorized_gate" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
