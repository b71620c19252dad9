"""The public operator: input checks, defaults, and the choice of backend."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ..fold import check_shape, choose_shape, fold_size
from ..passes import MODES, PooledPass, SelectedPass
from ..rope import TensorPositions
from .reference import tensorized_attn_reference

__all__ = ["tensorized_attn", "available_backends"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("reference", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEADDIM = 256


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device``, in the order ``backend="auto"`` prefers them.

    ``"triton"`` runs on CUDA devices (and on the CPU under Triton's interpreter,
    ``TRITON_INTERPRET=1``, slowly: there ``"auto"`` keeps the reference first).
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and _triton_importable():
        return ["triton", "reference"]
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable():
        return ["reference", "triton"]
    return ["reference"]


def tensorized_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: Sequence[int] | None = None,
    *,
    causal: bool = True,
    mode: str | None = None,
    order: Sequence[int] | None = None,
    gate: torch.Tensor | None = None,
    sinks: int = 0,
    softmax_scale: float | None = None,
    positions: TensorPositions | None = None,
    select: SelectedPass | PooledPass | None = None,
    relay: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Tensorized attention: attention along each dimension of a fold of the sequence.

    The sequence of ``seqlen`` positions is folded row-major into a tensor of shape
    ``(n_1, ..., n_m)`` (padded at the end when ``prod(shape) > seqlen``). The passes
    run in ``order``; pass ``t`` along dimension ``j`` computes
    ``V_t = softmax(softmax_scale * q @ k^T + mask_j) @ V_{t-1}`` with ``V_0 = v``: q and k
    never change, only the values do. The output is the last ``V``. Cost per query:
    ``sum(shape)`` keys instead of ``seqlen``.

    Which keys a query reads in each pass, drawn for the 4 x 4 fold (position
    ``p = 4 * row + column``) and the query at ``p = 9`` (``q``; ``x``: a key it reads).

    ``mode="block"``, causal (the paper's fold): the fiber of the pass's dimension,
    earlier keys only. Causal block does not reach every earlier token: (2, 1) never
    reads (1, 3), at any depth::

        pass along dim 0    pass along dim 1
        . x . .             . . . .
        . x . .             . . . .
        . q . .             x q . .
        . . . .             . . . .

    ``mode="complete"`` (causal only): ``p`` reads ``p - t * s_j`` for ``0 <= t < n_j``, a
    causal window of ``n_j`` keys dilated by the stride ``s_j`` of the dimension; every
    earlier token is reached along exactly one path::

        pass along dim 0    pass along dim 1
        . x . .             . . . .
        . x . .             . . x x
        . q . .             x q . .
        . . . .             . . . .

    ``mode="block"``, ``causal=False``: the whole fiber::

        pass along dim 0    pass along dim 1
        . x . .             . . . .
        . x . .             . . . .
        . q . .             x q x x
        . x . .             . . . .

    With ``sinks=2`` (``s``: a sink read beyond the pass mask), complete::

        pass along dim 0    pass along dim 1
        s x . .             s s . .
        . x . .             . . x x
        . q . .             x q . .
        . . . .             . . . .

    Arguments:
        q: ``[batch, seqlen, heads, headdim]``.
        k, v: ``[batch, seqlen, kv_heads, headdim]``; ``heads`` a multiple of ``kv_heads``
            (grouped-query attention: query head ``h`` reads kv head
            ``h // (heads // kv_heads)``; k and v are never repeated in memory).
            q, k, v share one floating dtype (float16, bfloat16, float32, float64) and device.
        shape: the fold ``(n_1, ..., n_m)``, positive ints with ``prod(shape) >= seqlen``.
            None: :func:`tensorized_attention.choose_shape` ``(seqlen)`` (two dims).
        causal: queries read only earlier or equal positions.
        mode: ``"block"`` or ``"complete"``; None means ``"complete"`` when causal, else
            ``"block"``. ``"complete"`` needs ``causal=True``.
        order: the dimensions the passes visit, a permutation of ``range(m)``; default
            ``range(m)``: coarsest first, the contiguous dimension last. ``()`` (with
            ``select`` only): no fold pass, the selected pass alone.
        gate: None (no gate), or a floating tensor of shape ``[heads, passes]`` or
            ``[passes]`` (shared by all heads; ``passes = len(order)``, plus one with
            ``select``), values in ``[0, 1]``, on q's device: pass ``t`` (its place in
            ``order``, the selected pass last) computes
            ``V_t = g[h, t] V_{t-1} + (1 - g[h, t]) A_t V_{t-1}``.
            Gradients flow to it. The mix is computed in float32 (float64 for float64 inputs).
        sinks: ``S >= 0``; in every pass each query also reads positions ``0 .. S-1``
            (those ``<= p`` when causal) that its pass mask does not already hold, with the
            values of that pass's input. Sinks beyond ``seqlen`` do not exist.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        positions: None (q and k are used as given), or a
            :class:`tensorized_attention.rope.TensorPositions`: rotary embeddings at tensor
            positions, pass j rotating position p at ``p // s_j`` and seeing sink i at the
            fixed distance ``n_j + S - 1 - i`` (DESIGN.md §3). The Triton backend takes each
            pass's rotated q and k (a rotated copy per pass: m copies of q and k).
        select: None, or a content-addressed pass run after the fold passes (causal only):
            :class:`tensorized_attention.passes.SelectedPass` ``(block, topk)``: each query
            reads its window of ``block`` keys, the tokens of the ``topk`` earlier blocks whose
            mean key scores highest against it, and the sinks; with ``positions`` the selected
            blocks are seen at virtual places just before the window. Or
            :class:`~tensorized_attention.passes.PooledPass` ``(block)``: the window, one
            summary (mean key, mean value) of every earlier block, and the sinks. ``block``
            must divide ``prod(shape)`` when fold passes run. The Triton backend (``"auto"`` on
            CUDA) runs the selected pass, forward and backward, for a block that is a multiple
            of 16, an even headdim and the ``"mean"`` score (else "auto" picks the reference);
            the pooled pass is reference only.
        relay: key relay (DESIGN.md §8): each fold pass mixes the keys with the weights it
            mixes the values with, ``K_t = g K_{t-1} + (1 - g) A_t K_{t-1}`` (``K_0 = k``), and
            pass t scores q against ``K_{t-1}`` (rotated at its tensor positions), so a relay
            token's key shows what it carries. Keys then differ per query head. Not with
            ``select``; reference backend only (``"auto"`` picks it).
        backend: ``"auto"`` (the best available for q's device and dtype: ``"triton"`` on
            CUDA, else ``"reference"``), ``"reference"`` (PyTorch, any device, autograd)
            or ``"triton"`` (fused kernels; float16 / bfloat16 / float32, headdim <= 256).

    Returns:
        ``[batch, seqlen, heads, headdim]`` in q's dtype.

    Example::

        >>> import torch
        >>> from tensorized_attention import tensorized_attn
        >>> q = torch.randn(1, 1000, 8, 64)
        >>> k, v = torch.randn(2, 1, 1000, 2, 64).unbind(0)
        >>> out = tensorized_attn(q, k, v, (32, 32), causal=True, gate=torch.full((2,), 0.5), sinks=4)
        >>> out.shape
        torch.Size([1, 1000, 8, 64])
    """
    _check_tensors(q, k, v)
    B, N, H, D = q.shape
    if shape is None:
        shape = choose_shape(N)
    shape = check_shape(shape, N)
    m = len(shape)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if mode is None:
        mode = "complete" if causal else "block"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if mode == "complete" and not causal:
        raise ValueError("mode='complete' is causal only: pass causal=True, or mode='block' for bidirectional")
    order = _check_order(order, m, allow_empty=select is not None)
    _check_select(select, causal, order, shape)
    if not isinstance(relay, bool):
        raise TypeError(f"relay must be a bool, got {relay!r}")
    if relay and select is not None:
        raise ValueError("relay and select together are not defined: the selected pass ranks the original keys")
    gate = _check_gate(gate, H, len(order) + (select is not None), q.device)
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    _check_positions(positions, D, q.device)
    backend = _choose_backend(backend, q, reference_only=_reference_only(select, relay, q))
    options = dict(causal=causal, mode=mode, order=order, gate=gate, sinks=sinks, softmax_scale=float(softmax_scale))
    if backend == "triton":
        from .triton import tensorized_attn_triton

        if select is None:
            return tensorized_attn_triton(q, k, v, shape, positions=positions, **options)
        return _selected_on_triton(q, k, v, shape, select, positions, options)
    return tensorized_attn_reference(q, k, v, shape, positions=positions, select=select, relay=relay, **options)


def _reference_only(select, relay, q) -> str | None:
    """What in this call only the reference backend computes, if anything: key relay, a
    pooled pass, or a selected pass with a block the kernels' tiles do not divide."""
    if relay:
        return "relay"
    if isinstance(select, PooledPass):
        return "PooledPass"
    if isinstance(select, SelectedPass):
        if select.block % 16 or q.shape[-1] % 2:
            return "SelectedPass with a block that is not a multiple of 16 or an odd headdim"
    return None


def _selected_on_triton(q, k, v, shape, select, positions, options):
    """The fold passes on the Triton backend, then the selected pass's Triton kernels, its
    gate mixed here (all with autograd)."""
    from .triton import tensorized_attn_triton
    from .triton.select import selected_pass

    order, gate = options["order"], options["gate"]
    values = v
    if order:
        fold_gate = None if gate is None else gate[:, : len(order)]
        values = tensorized_attn_triton(q, k, v, shape, positions=positions, **{**options, "gate": fold_gate})
    block = max(b for b in (64, 32, 16) if select.block % b == 0)
    out = selected_pass(select, q, k, values, sinks=options["sinks"], scale=options["softmax_scale"],
                                positions=positions, block_m=block, block_n=block)
    if gate is None:
        return out
    H = q.shape[2]
    inputs = values.repeat_interleave(H // values.shape[2], dim=2) if values.shape[2] != H else values
    g = gate[:, -1].to(torch.promote_types(q.dtype, torch.float32))[None, None, :, None]
    return (g * inputs.to(g.dtype) + (1 - g) * out.to(g.dtype)).to(q.dtype)


def _check_tensors(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [batch, seqlen, heads, headdim], got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, N, H, D = q.shape
    Bk, Nk, Hkv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch of k/v ({Bk}) must equal batch of q ({B})")
    if Nk != N:
        raise ValueError(f"seqlen of k/v ({Nk}) must equal seqlen of q ({N})")
    if Dk != D:
        raise ValueError(f"headdim of k/v ({Dk}) must equal headdim of q ({D})")
    if N < 1 or B < 1 or D < 1:
        raise ValueError(f"batch, seqlen and headdim must be >= 1, got q shape {tuple(q.shape)}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"number of heads in k/v ({Hkv}) must divide number of heads in q ({H})")


def _check_order(order, m: int, allow_empty: bool = False) -> tuple[int, ...]:
    if order is None:
        return tuple(range(m))
    if allow_empty and isinstance(order, Sequence) and len(order) == 0:
        return ()
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
        raise TypeError(f"order must be a sequence of ints, a permutation of range({m}), got {order!r}")
    if any(isinstance(j, bool) or not isinstance(j, int) for j in order) or sorted(order) != list(range(m)):
        raise ValueError(f"order must be a permutation of range({m}) (one entry per fold dimension), got {tuple(order)}")
    return tuple(int(j) for j in order)


def _check_select(select, causal: bool, order: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if select is None:
        return
    if not isinstance(select, (SelectedPass, PooledPass)):
        raise TypeError(f"select must be None, a SelectedPass(block, topk) or a PooledPass(block), "
                        f"got {type(select).__name__}")
    if not causal:
        raise ValueError("select (a selected or pooled pass) is causal only: pass causal=True")
    if order and fold_size(shape) % select.block:
        raise ValueError(f"select.block ({select.block}) must divide the fold's {fold_size(shape)} positions "
                         f"(shape {shape}), so that its blocks tile the fold; e.g. block = shape[-1] = {shape[-1]}")


def _check_gate(gate, heads: int, m: int, device: torch.device) -> torch.Tensor | None:
    if gate is None:
        return None
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be None or a torch.Tensor of shape [{heads}, {m}] or [{m}], got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must have a floating dtype, got {gate.dtype}")
    if gate.device != device:
        raise ValueError(f"gate must be on q's device {device}, got {gate.device}")
    if tuple(gate.shape) == (m,):
        gate = gate.expand(heads, m)
    elif tuple(gate.shape) != (heads, m):
        raise ValueError(f"gate must have shape [heads, m] = [{heads}, {m}] or [m] = [{m}], got {tuple(gate.shape)}")
    if not torch.compiler.is_compiling() and not bool(((gate >= 0) & (gate <= 1)).all()):
        raise ValueError(
            f"gate values must lie in [0, 1] (the share of a pass's input to keep), got values from "
            f"{gate.min().item():g} to {gate.max().item():g}"
        )
    return gate


def _check_positions(positions, headdim: int, device: torch.device) -> None:
    if positions is None:
        return
    if not isinstance(positions, TensorPositions):
        raise TypeError(f"positions must be None or a TensorPositions, got {type(positions).__name__}")
    inv_freq = positions.inv_freq
    if not isinstance(inv_freq, torch.Tensor) or tuple(inv_freq.shape) != (headdim // 2,) or headdim % 2:
        got = tuple(inv_freq.shape) if isinstance(inv_freq, torch.Tensor) else type(inv_freq).__name__
        raise ValueError(f"positions.inv_freq must be a tensor of shape [headdim // 2] = [{headdim // 2}] "
                         f"(headdim even), got {got} with headdim {headdim}")
    if inv_freq.device != device:
        raise ValueError(f"positions.inv_freq must be on q's device {device}, got {inv_freq.device}")


def _choose_backend(backend: str, q: torch.Tensor, reference_only: str | None = None) -> str:
    """The backend to run: ``reference_only`` names an option only the reference has."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    names = available_backends(q.device)
    if backend == "auto":
        if names[0] == "triton" and (q.dtype not in TRITON_DTYPES or q.shape[-1] > TRITON_MAX_HEADDIM
                                     or reference_only is not None):
            return "reference"
        return names[0]
    if backend not in names:
        raise ValueError(f"backend {backend!r} is not available on device {q.device}; available: {names}")
    if backend == "triton":
        if reference_only is not None:
            raise ValueError(f"backend 'triton' has no {reference_only!r} yet; use backend='reference' (or 'auto')")
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend 'triton' takes dtypes {TRITON_DTYPES}, got {q.dtype}; use backend='reference'")
        if q.shape[-1] > TRITON_MAX_HEADDIM:
            raise ValueError(f"backend 'triton' takes headdim <= {TRITON_MAX_HEADDIM}, got {q.shape[-1]}")
    return backend
