"""Rotary tensor positions for the Triton backend: every pass's rotated copy of q (or k) in
one kernel, ``tensorized_attention::rotate_passes``.

Pass ``t`` of stride ``s_t`` rotates position ``p`` at its tensor position ``p // s_t``
(DESIGN.md §3); the selected pass's keys are rotated at their offset in their block,
``p mod W``. The kernel reads x once per tile and writes each pass's rotated copy into
one ``[m, B, N, H, D]`` tensor, the cosines and sines read from a table of the positions
``0 .. N-1`` computed in PyTorch exactly as :func:`tensorized_attention.rope.rotate`
computes them (float32 angles); a pass of divisor 0 takes a second input ``y`` as it is
(the contiguous pass of q and k that arrive rotated at their positions). Inputs that
arrive rotated at their positions (a Hugging Face layer's q and k) are rotated once, by the
difference of the two angles (``from_rotated``), never back to a copy first. Its gradient
is one kernel too: the sum over the passes of each pass's gradient rotated back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...rope import rotary_angles


@triton.jit
def _cos_sin_at(COS, SIN, n, div, mod, offs_h, m, HALF: tl.constexpr, FROM_ROTATED: tl.constexpr):
    """cos and sin [BN, BH] of the angle each token n is rotated by in a pass: that of
    n // div, modulo mod when mod > 0; minus that of n itself with FROM_ROTATED (the input
    arrives rotated at its position: one rotation takes it to the pass's)."""
    pos = n // div
    if mod > 0:
        pos = pos % mod
    at = pos.to(tl.int64)[:, None] * HALF + offs_h[None, :]
    c = tl.load(COS + at, mask=m, other=1.0)
    s = tl.load(SIN + at, mask=m, other=0.0)
    if FROM_ROTATED:
        own = n.to(tl.int64)[:, None] * HALF + offs_h[None, :]
        c0 = tl.load(COS + own, mask=m, other=1.0)
        s0 = tl.load(SIN + own, mask=m, other=0.0)
        c, s = c * c0 + s * s0, s * c0 - c * s0
    return c, s


@triton.jit
def _rotate_kernel(
    X, Y, OUT, COS, SIN, DIV, MOD,
    stride_xb, stride_xn, stride_xh, stride_yb, stride_yn, stride_yh,
    stride_ot, stride_ob, stride_on, stride_oh,
    N, Hx, M, scale,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr,
    FROM_ROTATED: tl.constexpr,
):
    """OUT[t] = scale R(+-(p // DIV[t] mod MOD[t]) theta) X for each pass t < M (MOD[t] = 0:
    no modulus; FROM_ROTATED: R((p // DIV[t] mod MOD[t] - p) theta)); DIV[t] = 0: OUT[t] = Y."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1)
    b = bh // Hx
    h = bh % Hx
    offs_h = tl.arange(0, BLOCK_H)
    m = (n < N)[:, None] & (offs_h < HALF)[None, :]
    rows = n.to(tl.int64)[:, None]
    x = X + b.to(tl.int64) * stride_xb + h * stride_xh + rows * stride_xn + offs_h[None, :]
    x1 = tl.load(x, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=m, other=0.0).to(tl.float32)
    for t in range(0, M):
        div = tl.load(DIV + t)
        out = OUT + t * stride_ot + b.to(tl.int64) * stride_ob + h * stride_oh + rows * stride_on + offs_h[None, :]
        if div == 0:
            y = Y + b.to(tl.int64) * stride_yb + h * stride_yh + rows * stride_yn + offs_h[None, :]
            tl.store(out, tl.load(y, mask=m, other=0.0), mask=m)
            tl.store(out + HALF, tl.load(y + HALF, mask=m, other=0.0), mask=m)
        else:
            c, s = _cos_sin_at(COS, SIN, n, div, tl.load(MOD + t), offs_h, m, HALF, FROM_ROTATED)
            if INVERSE:
                s = -s
            tl.store(out, ((x1 * c - x2 * s) * scale).to(OUT.dtype.element_ty), mask=m)
            tl.store(out + HALF, ((x2 * c + x1 * s) * scale).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _rotate_back_kernel(
    G, OUT, COS, SIN, DIV, MOD,
    stride_gt, stride_gb, stride_gn, stride_gh, stride_ob, stride_on, stride_oh,
    N, Hx, M, scale,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr,
    FROM_ROTATED: tl.constexpr,
):
    """OUT = sum over the passes t with DIV[t] > 0 of scale R(-+(p // DIV[t] mod MOD[t]) theta) G[t]
    (the gradient of x in :func:`_rotate_kernel`), summed in float32 in the order of t."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1)
    b = bh // Hx
    h = bh % Hx
    offs_h = tl.arange(0, BLOCK_H)
    m = (n < N)[:, None] & (offs_h < HALF)[None, :]
    rows = n.to(tl.int64)[:, None]
    acc1 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for t in range(0, M):
        div = tl.load(DIV + t)
        if div > 0:
            g = G + t * stride_gt + b.to(tl.int64) * stride_gb + h * stride_gh + rows * stride_gn + offs_h[None, :]
            g1 = tl.load(g, mask=m, other=0.0).to(tl.float32)
            g2 = tl.load(g + HALF, mask=m, other=0.0).to(tl.float32)
            c, s = _cos_sin_at(COS, SIN, n, div, tl.load(MOD + t), offs_h, m, HALF, FROM_ROTATED)
            if not INVERSE:  # the transpose of the forward's rotation
                s = -s
            acc1 += ((g1 * c - g2 * s) * scale).to(tl.float32)  # a compiled graph's scale arrives as float64
            acc2 += ((g2 * c + g1 * s) * scale).to(tl.float32)
    out = OUT + b.to(tl.int64) * stride_ob + h * stride_oh + rows * stride_on + offs_h[None, :]
    tl.store(out, acc1.to(OUT.dtype.element_ty), mask=m)
    tl.store(out + HALF, acc2.to(OUT.dtype.element_ty), mask=m)


def rotary_tables(seqlen: int, inv_freq: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seqlen, D/2]`` (float32) of the positions ``0 .. seqlen-1``, the
    angles :func:`tensorized_attention.rope.rotate` uses."""
    angles = rotary_angles(torch.arange(seqlen, device=device), inv_freq)
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


def _grid(x_shape):
    B, N, Hx, D = x_shape
    return (triton.cdiv(N, 64), B * Hx)


def _meta(D):
    return dict(HALF=D // 2, BLOCK_N=64, BLOCK_H=max(16, triton.next_power_of_2(D // 2)), num_warps=4)


@triton_op("tensorized_attention::rotate_passes", mutates_args=())
def rotate_passes(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, divisors: list[int],
                  moduli: list[int], scale: float, inverse: bool, from_rotated: bool) -> torch.Tensor:
    """x, y ``[B, N, Hx, D]``; cos, sin from :func:`rotary_tables`. Returns
    ``[m, B, N, Hx, D]`` (m = len(divisors)): pass t is x rotated at ``p // divisors[t]``
    (modulo ``moduli[t]`` where that is not 0; by minus the angle with ``inverse``) times
    ``scale``, or y as it is where ``divisors[t]`` is 0. ``from_rotated``: x arrives
    rotated at its positions p, and is rotated by the difference (a divisor past the last
    position gives x unrotated)."""
    B, N, Hx, D = x.shape
    out = x.new_empty((len(divisors), B, N, Hx, D))
    div, mod = (torch.tensor(v, dtype=torch.int32, device=x.device) for v in (divisors, moduli))
    wrap_triton(_rotate_kernel)[_grid(x.shape)](
        x, y, out, cos, sin, div, mod, *x.stride()[:3], *y.stride()[:3], *out.stride()[:4],
        N, Hx, len(divisors), scale, INVERSE=inverse, FROM_ROTATED=from_rotated, **_meta(D))
    return out


@triton_op("tensorized_attention::rotate_passes_back", mutates_args=())
def rotate_passes_back(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, divisors: list[int],
                       moduli: list[int], scale: float, inverse: bool, from_rotated: bool) -> torch.Tensor:
    """The gradient of x in :func:`rotate_passes` from ``grad [m, B, N, Hx, D]``."""
    _, B, N, Hx, D = grad.shape
    out = grad.new_empty((B, N, Hx, D))
    div, mod = (torch.tensor(v, dtype=torch.int32, device=grad.device) for v in (divisors, moduli))
    wrap_triton(_rotate_back_kernel)[_grid(out.shape)](
        grad, out, cos, sin, div, mod, *grad.stride()[:4], *out.stride()[:3],
        N, Hx, len(divisors), scale, INVERSE=inverse, FROM_ROTATED=from_rotated, **_meta(D))
    return out


@rotate_passes.register_fake
def _(x, y, cos, sin, divisors, moduli, scale, inverse, from_rotated):
    return x.new_empty((len(divisors), *x.shape))


@rotate_passes_back.register_fake
def _(grad, cos, sin, divisors, moduli, scale, inverse, from_rotated):
    return grad.new_empty(grad.shape[1:])


def _setup_context(ctx, inputs, output):
    x, y, cos, sin, divisors, moduli, scale, inverse, from_rotated = inputs
    ctx.save_for_backward(cos, sin)
    ctx.options = (list(divisors), list(moduli), scale, inverse, from_rotated)


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    divisors, moduli, scale, inverse, from_rotated = ctx.options
    grad = grad.contiguous()
    dx = rotate_passes_back(grad, cos, sin, divisors, moduli, scale, inverse, from_rotated) if any(divisors) else None
    as_is = [t for t, d in enumerate(divisors) if d == 0]  # y's gradient: the passes that took it as it is
    dy = None if not as_is else grad[as_is[0]] if len(as_is) == 1 else grad[as_is].sum(0)
    return dx, dy, None, None, None, None, None, None, None


rotate_passes.register_autograd(_backward, setup_context=_setup_context)
