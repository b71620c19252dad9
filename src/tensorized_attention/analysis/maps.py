"""Attention maps of a real model, collected per layer and head with forward hooks, and the
attention a tensorized fold would compute from the same scores.

:func:`attention_maps` runs a Hugging Face causal LM (Llama, Mistral, Qwen and the models
that reuse their attention: each decoder layer's ``self_attn`` returns ``(output,
weights)``) once over a window of tokens with transformers' ``eager`` attention, whose
attention modules return the softmax weights they computed, ``[batch, heads, N, N]``
(float32, causal, the model's own RoPE). A forward hook on each requested layer's
``self_attn`` hands the requested heads to a callback (or keeps a copy) as soon as the layer
has run, so only one layer's weights exist at a time; the forward stops after the last
requested layer. The model's attention implementation is restored afterwards.

:func:`tensorized_operator` turns a full causal attention map ``A`` into the ``N x N``
matrix tensorized attention applies to the values with the same q and k: in pass j the
softmax over the keys of the pass mask is ``A`` restricted to the mask and renormalised per
row (``softmax(S + mask_j) = A ∘ mask_j / rowsum``, the scores ``S`` at sequence positions;
not the tensor positions of DESIGN.md §3); the passes multiply, last on the left.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ..fold import check_shape
from ..passes import MODES, pass_mask

__all__ = ["attention_maps", "attention_modules", "tensorized_operator"]


class _Done(Exception):
    """Raised by the hook of the last requested layer to end the forward early."""


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a Hugging Face decoder, in layer order
    (``model.model.layers[i].self_attn``)."""
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} has no decoder layers with a self_attn module (model.model.layers[i].self_attn); "
            "attention maps are collected from Llama-style Hugging Face models"
        )
    return [layer.self_attn for layer in layers]


def _check_indices(values, limit: int, what: str) -> list[int]:
    values = list(range(limit)) if values is None else list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit]
    if bad or not values:
        raise ValueError(f"{what} must be ints in [0, {limit - 1}] (the model has {limit}), got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat, got {values}")
    return values


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor, *, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None,
                   callback: Callable[[int, torch.Tensor], None] | None = None) -> dict[int, torch.Tensor]:
    """The attention weights of ``model`` on one window ``input_ids`` (``[N]`` or ``[1, N]``).

    For each layer of ``layers`` (default all), the weights of ``heads`` (default all query
    heads) as a ``[len(heads), N, N]`` float32 CPU tensor: ``[h, p, p']`` is the weight query p
    of head h puts on key p' (rows sum to 1, zero above the diagonal). With ``callback``,
    ``callback(layer, weights)`` is called as each layer runs and nothing is kept (the
    result is empty); without it, the maps are returned as ``{layer: weights}``.
    """
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    modules = attention_modules(model)
    layers = _check_indices(layers, len(modules), "layers")
    n_heads = int(model.config.num_attention_heads)
    heads = _check_indices(heads, n_heads, "heads")
    device = next(model.parameters()).device
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous != "eager"
    if switch:
        model.set_attn_implementation("eager")
    kept: dict[int, torch.Tensor] = {}
    last = max(layers)
    head_index = torch.tensor(heads)

    def hook_for(layer):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
                raise RuntimeError(
                    f"layer {layer}: the attention module returned no weights [batch, heads, N, N] with eager "
                    "attention; this model's attention cannot be read by a hook"
                )
            maps = weights[0, head_index.to(weights.device)].float().cpu()
            if callback is not None:
                callback(layer, maps)
            else:
                kept[layer] = maps.clone()
            if layer == last:
                raise _Done
        return hook

    handles = [modules[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        model(input_ids=ids.to(device), use_cache=False)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
        if switch:
            model.set_attn_implementation(previous)
    return kept


@functools.lru_cache(maxsize=128)
def _mask(N: int, shape: tuple[int, ...], dim: int, mode: str, sinks: int) -> torch.Tensor:
    """A causal pass mask (cached: the same folds are asked for map after map)."""
    return pass_mask(N, shape, dim, mode=mode, causal=True, sinks=sinks)


def tensorized_operator(attn: torch.Tensor, shape: Sequence[int], *, mode: str = "complete",
                        order: Sequence[int] | None = None, gate: Sequence[float] | None = None,
                        sinks: int = 0, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """The ``N x N`` matrix that causal tensorized attention applies to the values, computed
    from the full causal attention map ``attn`` (``N x N``, rows summing to 1) of the same q
    and k, for the fold ``shape`` (``prod(shape) == N``).

    Pass j's attention is ``attn`` restricted to the pass mask (sinks included) and
    renormalised per row; with a gate ``g_t`` the pass applies ``g_t I + (1 - g_t) P_j``; the
    output is ``P_last ... P_first``. ``order`` may also be a part of the dims: ``order=(m-1,)``
    with sinks is the sliding window of ``n_m`` keys (the control of docs/results.md).
    In ``attn``'s dtype (float32 or float64; others in float64). Rows whose pass mask holds no weight at all (weights that underflowed to 0)
    stay zero. ``rows``: only these query rows of the result (``[len(rows), N]``), computed
    from the last pass backwards at a fraction of the cost.

    >>> A = torch.softmax(torch.randn(8, 8, dtype=torch.float64).tril() - 1e9 * torch.ones(8, 8).triu(1), -1)
    >>> T = tensorized_operator(A, (2, 4))  # complete reaches every earlier token ...
    >>> bool(torch.equal(T > 0, torch.ones(8, 8).tril() > 0)), bool(torch.allclose(T.sum(-1), torch.ones(8).double()))
    (True, True)
    """
    shape = check_shape(shape)
    m = len(shape)
    N = math.prod(shape)
    if not isinstance(attn, torch.Tensor) or attn.dim() != 2 or tuple(attn.shape) != (N, N):
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be an [N, N] tensor with N = prod(shape) = {N}, got {got}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    order = tuple(range(m)) if order is None else tuple(order)
    if not order or len(set(order)) != len(order) or not all(isinstance(d, int) and 0 <= d < m for d in order):
        raise ValueError(f"order must be distinct dims in [0, {m - 1}], got {order}")
    if gate is None:
        gate = [0.0] * len(order)
    gate = [float(g) for g in gate]
    if len(gate) != len(order) or not all(0.0 <= g <= 1.0 for g in gate):
        raise ValueError(f"gate must hold one value in [0, 1] per pass ({len(order)}), got {gate}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    dtype = attn.dtype if attn.dtype in (torch.float32, torch.float64) else torch.float64
    A = attn.to(dtype).tril()
    eye = torch.eye(N, dtype=dtype)
    matrices = []
    for dim, g in zip(order, gate, strict=True):
        P = A * _mask(N, shape, dim, mode, sinks)
        P = P / P.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        matrices.append(g * eye + (1 - g) * P if g else P)
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.dim() != 1 or rows.numel() == 0 or rows.min() < 0 or rows.max() >= N:
            raise ValueError(f"rows must be a non-empty list of query positions in [0, {N - 1}]")
        out = matrices[-1][rows]
        for P in reversed(matrices[:-1]):  # out @ P with P sparse: (Pᵀ out ᵀ)ᵀ
            out = torch.sparse.mm(P.t().to_sparse(), out.t()).t()
        return out.contiguous()
    out = matrices[0]
    for P in matrices[1:]:  # a pass reads n_j (+ sinks) keys per query: a sparse product, O(N² n_j)
        out = torch.sparse.mm(P.to_sparse(), out)
    return out
