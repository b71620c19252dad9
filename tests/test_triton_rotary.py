"""The rotary kernel of the Triton backend (ops/triton/rotary.py): every pass's rotated
copy in one kernel, against rope.rotate, with its gradient; under Triton's interpreter
without a GPU."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from tensorized_attention.ops.triton.rotary import rotary_tables, rotate_passes  # noqa: E402
from tensorized_attention.rope import rotate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expected(x, y, inv_freq, divisors, moduli, scale, inverse):
    """rope.rotate pass by pass ([B, N, H, D] in, positions at -2 as rotate wants them)."""
    N = x.shape[1]
    out = []
    for d, mod in zip(divisors, moduli, strict=True):
        if d == 0:
            out.append(y)
        else:
            pos = torch.div(torch.arange(N, device=x.device), d, rounding_mode="floor")
            pos = pos % mod if mod else pos
            out.append(rotate(x.transpose(1, 2), pos, inv_freq, scale=scale, inverse=inverse).transpose(1, 2))
    return torch.stack(out)


@pytest.mark.parametrize("divisors, moduli, scale, inverse", [
    ([7, 1], [0, 0], 1.0, False), ([1], [0], 1.0, True), ([13, 0, 1], [0, 0, 16], 1.2, False),
    ([1, 1], [0, 32], 1.0, True)])
@pytest.mark.parametrize("D", [32, 24])
def test_rotate_passes_equals_rope_rotate_with_gradients(divisors, moduli, scale, inverse, D):
    g = torch.Generator().manual_seed(D + len(divisors))
    B, N, H = 2, 91, 3
    x = torch.randn(B, N, H, D, generator=g).to(DEVICE)
    y = torch.randn(B, N, H, D, generator=g).to(DEVICE)
    inv_freq = (1.0 / 500.0 ** (torch.arange(0, D, 2) / D)).to(DEVICE)
    cos, sin = rotary_tables(N, inv_freq, DEVICE)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = rotate_passes(xs, ys, cos, sin, divisors, moduli, scale, inverse, False)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = _expected(xr, yr, inv_freq, divisors, moduli, scale, inverse)
    assert out.shape == (len(divisors), B, N, H, D)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(out.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(out, (xs, ys), upstream, allow_unused=True)
    ref = torch.autograd.grad(want, (xr, yr), upstream, allow_unused=True)
    for a, b in zip(got, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divisors", [[5, 0, 1000], [1, 3]])
def test_rotate_passes_from_rotated_inputs_equals_rotating_back_then_forth(divisors):
    """from_rotated: x arrives rotated at its positions; one rotation by the difference of
    the angles equals rotating back then at p // divisor (a divisor past the sequence: x
    unrotated), with the gradient likewise."""
    g = torch.Generator().manual_seed(len(divisors))
    B, N, H, D = 1, 77, 2, 32
    x = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).to(DEVICE)
    inv_freq = (1.0 / 500.0 ** (torch.arange(0, D, 2) / D)).to(DEVICE)
    cos, sin = rotary_tables(N, inv_freq, DEVICE)
    xs = x.clone().requires_grad_()
    out = rotate_passes(xs, xs, cos, sin, divisors, [0] * len(divisors), 1.0, False, True)
    xr = x.clone().requires_grad_()
    back = rotate(xr.transpose(1, 2), torch.arange(N, device=DEVICE), inv_freq, inverse=True).transpose(1, 2)
    want = _expected(back, xr, inv_freq, divisors, [0] * len(divisors), 1.0, False)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    torch.testing.assert_close(torch.autograd.grad(out, xs, upstream)[0], torch.autograd.grad(want, xr, upstream)[0],
                               atol=1e-5, rtol=1e-5)


def test_rotate_passes_reads_strided_inputs_and_keeps_bfloat16():
    """q as a Hugging Face layer hands it (a transposed view) in bfloat16: the same values
    as rope.rotate's, in bfloat16."""
    B, N, H, D = 1, 40, 2, 16
    x = torch.randn(B, H, N, D, dtype=torch.bfloat16).to(DEVICE).transpose(1, 2)  # strided [B, N, H, D]
    inv_freq = (1.0 / 100.0 ** (torch.arange(0, D, 2) / D)).to(DEVICE)
    cos, sin = rotary_tables(N, inv_freq, DEVICE)
    out = rotate_passes(x, x, cos, sin, [4], [0], 1.0, False, False)
    assert out.dtype == torch.bfloat16
    want = _expected(x, x, inv_freq, [4], [0], 1.0, False)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_rotate_passes_opcheck():
    x = torch.randn(1, 20, 2, 16, device=DEVICE, requires_grad=True)
    cos, sin = rotary_tables(20, (1.0 / 100.0 ** (torch.arange(0, 16, 2) / 16)).to(DEVICE), DEVICE)
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(rotate_passes, (x, x, cos, sin, [3, 0], [5, 0], 1.0, False, True),
                          **({} if utils is None else {"test_utils": utils}))
