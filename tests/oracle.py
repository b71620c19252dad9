"""The dense float64 oracle of DESIGN.md §2, written from the spec alone.

O(N^2) masks built directly from coordinates, one softmax per pass over all N keys;
it shares no code with the library.
"""

from __future__ import annotations

import math

import torch


def _coords(positions: torch.Tensor, shape) -> torch.Tensor:
    out, stride = [], math.prod(shape)
    for n in shape:
        stride //= n
        out.append((positions // stride) % n)
    return torch.stack(out, -1)  # [N, m]


def dense_pass_mask(N: int, shape, dim: int, mode: str, causal: bool, sinks: int) -> torch.Tensor:
    """[N, N] bool: query p (row) reads key p2 (column) in the pass along `dim`."""
    pos = torch.arange(N)
    p, p2 = pos[:, None], pos[None, :]
    if mode == "block":
        c = _coords(pos, shape)
        mask = torch.ones(N, N, dtype=torch.bool)
        for j in range(len(shape)):
            if j != dim:
                mask &= c[:, None, j] == c[None, :, j]
        if causal:
            mask &= c[None, :, dim] <= c[:, None, dim]
    else:
        s = math.prod(shape[dim + 1:])
        d = p - p2
        mask = (d >= 0) & (d % s == 0) & (d // s < shape[dim])
    sink = (p2 < sinks) & ((p2 <= p) if causal else torch.ones(N, N, dtype=torch.bool))
    return mask | sink


def oracle(q, k, v, shape, *, causal=True, mode=None, order=None, gate=None, sinks=0, softmax_scale=None,
           select=None, relay=False):
    """q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D] in float64. select: a
    SelectedPass (its block and topk) run after the fold passes; relay: each pass mixes the
    keys as the values, and the next pass scores against them."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    mode = mode or ("complete" if causal else "block")
    order = list(range(len(shape))) if order is None else list(order)
    scale = 1 / math.sqrt(D) if softmax_scale is None else softmax_scale
    q64 = q.double().transpose(1, 2)  # [B, H, N, D]
    k64 = k.double().transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    vals = v.double().transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = scale * q64 @ k64.transpose(-1, -2)  # [B, H, N, N]
    if gate is not None:
        gate = gate.double().expand(H, len(order) + (select is not None))
    for t, dim in enumerate(order):
        if relay:
            scores = scale * q64 @ k64.transpose(-1, -2)
        mask = dense_pass_mask(N, shape, dim, mode, causal, sinks).to(scores.device)
        attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        new, new_keys = attn @ vals, attn @ k64
        if gate is not None:
            g = gate[:, t].view(1, H, 1, 1)
            new, new_keys = g * vals + (1 - g) * new, g * k64 + (1 - g) * new_keys
        vals = new
        if relay:
            k64 = new_keys
    if select is not None:
        g = None if gate is None else gate[:, len(order)]
        vals = content_pass_oracle(select, q64, k64, vals, sinks, scale, gate=g)
    return vals.transpose(1, 2)


def _rotate_complex(x, pos, freqs):
    """x [..., D] float64 rotated at integer positions pos (broadcast to x[..., 0])."""
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    z = z * torch.polar(torch.ones_like(freqs), pos.double()[..., None] * freqs)
    return torch.cat([z.real, z.imag], dim=-1)


def content_pass_oracle(step, q64, k64, vals, sinks, scale, *, freqs=None, gate=None):
    """The selected pass (``step.topk``) or the pooled pass (no ``topk``)."""
    if getattr(step, "topk", None) is None:
        return pooled_pass_oracle(q64, k64, vals, step.block, sinks, scale, freqs=freqs, gate=gate)
    return selected_pass_oracle(q64, k64, vals, step.block, step.topk, sinks, scale, freqs=freqs, gate=gate,
                                score=step.score)


def pooled_pass_oracle(q64, k64, vals, block, sinks, scale, *, freqs=None, gate=None):
    """The pooled pass (PooledPass's docstring), one query at a time: the window at true
    distances, one summary (mean key, mean value) per earlier whole block, unrotated, and
    the sinks outside the window at block + S - 1 - s."""
    B, H, N, D = q64.shape
    W = block
    rows = []
    for b in range(B):
        for h in range(H):
            for p in range(N):
                keys, values = [], []
                for p2 in range(max(0, p - W + 1), p + 1):
                    kk = k64[b, h, p2]
                    keys.append(kk if freqs is None else _rotate_complex(kk, torch.tensor(p2 - p), freqs))
                    values.append(vals[b, h, p2])
                for blk in range(p // W):
                    keys.append(k64[b, h, blk * W:(blk + 1) * W].mean(0))
                    values.append(vals[b, h, blk * W:(blk + 1) * W].mean(0))
                for s in range(min(sinks, p + 1)):
                    if p - s >= W:
                        kk = k64[b, h, s]
                        dist = torch.tensor(W + sinks - 1 - s)
                        keys.append(kk if freqs is None else _rotate_complex(kk, -dist, freqs))
                        values.append(vals[b, h, s])
                w = torch.softmax(scale * torch.stack(keys) @ q64[b, h, p], dim=0)
                row = w @ torch.stack(values)
                if gate is not None:
                    row = gate[h] * vals[b, h, p] + (1 - gate[h]) * row
                rows.append(row)
    return torch.stack(rows).reshape(B, H, N, D)


def _block_score(q, keys, score):
    """A block's score against query q (SelectedPass's docstring), before the softmax scale:
    q . mean(keys), or the sum over channels of max(q_d max_d, q_d min_d)."""
    if score == "mean":
        return (q @ keys.mean(0)).item()
    return torch.maximum(q * keys.amax(0), q * keys.amin(0)).sum().item()


def selected_pass_oracle(q64, k64, vals, block, topk, sinks, scale, *, freqs=None, gate=None, score="mean"):
    """The selected pass (SelectedPass's docstring), one query at a time, from the spec:
    q64, k64 [B, H, N, D] float64 content (k per query head); vals [B, H, N, D]; freqs:
    rotary frequencies (float64) or None; gate [H] or None; score: how blocks rank.
    Returns [B, H, N, D]."""
    B, H, N, D = q64.shape
    W = block
    rows = []
    for b in range(B):
        for h in range(H):
            for p in range(N):
                c = p // W
                scores = [scale * _block_score(q64[b, h, p], k64[b, h, i * W:(i + 1) * W], score) for i in range(c)]
                ranked = sorted(range(c), key=lambda i: (-scores[i], -i))
                chosen = sorted(ranked[:topk])
                r = len(chosen)
                dist = {}  # key position -> distance at which the query sees it
                for p2 in range(max(0, p - W + 1), p + 1):
                    dist[p2] = p - p2
                for i, blk in enumerate(chosen):
                    for j in range(W):
                        dist.setdefault(blk * W + j, (r - i + 1) * W - 1 - j)
                for s in range(min(sinks, p + 1)):
                    dist.setdefault(s, (r + 1) * W + sinks - 1 - s)
                keys = torch.tensor(sorted(dist), device=q64.device)
                d = torch.tensor([dist[x] for x in sorted(dist)], device=q64.device)
                kk = k64[b, h, keys]
                if freqs is not None:
                    kk = _rotate_complex(kk, -d, freqs)
                w = torch.softmax(scale * kk @ q64[b, h, p], dim=0)
                row = w @ vals[b, h, keys]
                if gate is not None:
                    row = gate[h] * vals[b, h, p] + (1 - gate[h]) * row
                rows.append(row)
    return torch.stack(rows).reshape(B, H, N, D)


def oracle_in_dtype(q, k, v, shape, **kw):
    """The same dense computation in q's own dtype (for low-precision error bounds)."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    causal = kw.get("causal", True)
    mode = kw.get("mode") or ("complete" if causal else "block")
    order = kw.get("order") or list(range(len(shape)))
    gate, sinks = kw.get("gate"), kw.get("sinks", 0)
    scale = kw.get("softmax_scale") or 1 / math.sqrt(D)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    vals = v.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if gate is not None:
        gate = gate.to(q.dtype).expand(H, len(shape))
    for t, dim in enumerate(order):
        mask = dense_pass_mask(N, shape, dim, mode, causal, sinks).to(scores.device)
        attn = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
        new = attn @ vals
        if gate is not None:
            g = gate[:, t].view(1, H, 1, 1)
            new = g * vals + (1 - g) * new
        vals = new
    return vals.transpose(1, 2)


def oracle_with_positions(q, k, v, shape, inv_freq, *, rotated=False, attention_scaling=1.0, causal=True,
                          mode=None, order=None, gate=None, sinks=0, softmax_scale=None, select=None,
                          relay=False):
    """The dense oracle with rotary tensor positions (DESIGN.md §3), rotations done with
    complex numbers: in pass j, position p is rotated at p // s_j; a sink i outside the pass
    mask is scored as an unrotated query against key i rotated at -(n_j + S - 1 - i)."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    mode = mode or ("complete" if causal else "block")
    order = list(range(len(shape))) if order is None else list(order)
    scale = 1 / math.sqrt(D) if softmax_scale is None else softmax_scale
    dev = q.device
    freqs = inv_freq.double().to(dev)

    def rot(x, pos):  # x [B, H, N, D] float64, pos [N] (any integers)
        z = torch.complex(x[..., : D // 2], x[..., D // 2:])
        z = z * torch.polar(torch.ones_like(freqs), pos.double()[:, None] * freqs[None, :])
        return torch.cat([z.real, z.imag], dim=-1)

    pos = torch.arange(N, device=dev)
    q64 = q.double().transpose(1, 2)
    k64 = k.double().transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    if rotated:
        q64, k64 = rot(q64, -pos), rot(k64, -pos)
    else:
        q64, k64 = q64 * attention_scaling, k64 * attention_scaling
    vals = v.double().transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    if gate is not None:
        gate = gate.double().expand(H, len(order) + (select is not None))
    for t, dim in enumerate(order):
        s_j = math.prod(shape[dim + 1:])
        tp = pos // s_j
        scores = scale * rot(q64, tp) @ rot(k64, tp).transpose(-1, -2)
        in_pass = dense_pass_mask(N, shape, dim, mode, causal, 0).to(dev)
        mask = dense_pass_mask(N, shape, dim, mode, causal, sinks).to(dev)
        if sinks:
            dist = shape[dim] + sinks - 1 - torch.arange(min(sinks, N), device=dev)
            sink_k = rot(k64[:, :, : len(dist)], -dist)
            sink_scores = scale * q64 @ sink_k.transpose(-1, -2)  # [B, H, N, S]
            as_sink = mask & ~in_pass
            scores[..., : len(dist)] = torch.where(as_sink[:, : len(dist)], sink_scores, scores[..., : len(dist)])
        attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        new, new_keys = attn @ vals, attn @ k64
        if gate is not None:
            g = gate[:, t].view(1, H, 1, 1)
            new, new_keys = g * vals + (1 - g) * new, g * k64 + (1 - g) * new_keys
        vals = new
        if relay:
            k64 = new_keys
    if select is not None:
        g = None if gate is None else gate[:, len(order)]
        vals = content_pass_oracle(select, q64, k64, vals, sinks, scale, freqs=freqs, gate=g)
    return vals.transpose(1, 2)
