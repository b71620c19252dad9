"""``attn_implementation="tensorized"`` for Hugging Face transformers models.

:func:`register` adds the attention function and its mask function to transformers'
registries. Every Llama-family attention layer (Llama, Mistral, Qwen2, Qwen3 and models
that reuse them, such as SmolLM2) calls the registered function with q and k already
rotated at their sequence positions, and the cached k and v when generating.

Cached generation (DESIGN.md §4): a prefill runs the whole operator and keeps, per layer,
the outputs of passes 1 .. m-1; each new token then runs its m passes against its own
fibers or windows (sum(n_j) keys per head, not N), reading k and v from the model's cache
and the intermediate values from this state, which lives on the cache object and follows
its reorder / crop / reset. With the coarse pass first, the intermediate values live in
ring buffers of s_1, ..., s_{m-1} positions plus the first S (DESIGN.md §4): the cache is
the size of full attention's plus a little.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..fold import strides
from ..ops.dispatch import TRITON_MAX_HEADDIM, tensorized_attn
from ..ops.reference import tensorized_attn_reference
from ..passes import PooledPass, SelectedPass
from ..rope import TensorPositions, cos_sin, rotate, rotate_by, sink_distances
from .options import options_of, resolve_fold

__all__ = ["register", "enable", "from_pretrained", "restore_gates", "gate_of", "mean_gates",
           "tensorized_attention_forward", "tensorized_mask", "decode_state"]

NAME = "tensorized"
GATE_PARAM = "tensorized_gate_logit"
_ACTIVE_CACHE: contextvars.ContextVar = contextvars.ContextVar("tensorized_active_cache", default=None)
# set by sequence_parallel(): (process group, length of the whole sequence)
_SEQUENCE_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("tensorized_sequence_parallel", default=None)


@contextlib.contextmanager
def sequence_parallel(group, seqlen: int):
    """Within this context, every tensorized layer takes its q, k, v as this rank's
    contiguous slice of a sequence of ``seqlen`` tokens sharded over the ranks of ``group``
    (None: the default group; slices in rank order) and runs
    :func:`tensorized_attention.distributed.sequence_parallel_tensorized_attn` on them, the
    fold resolved for the whole ``seqlen``. The model must be given the slice's
    ``position_ids`` (its global positions). Training and plain forwards only: a cached
    forward raises."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"sequence_parallel: seqlen must be an int >= 1, got {seqlen!r}")
    token = _SEQUENCE_PARALLEL.set((group, seqlen))
    try:
        yield
    finally:
        _SEQUENCE_PARALLEL.reset(token)
_REGISTERED = False


@dataclass
class DecodeState:
    """What one layer keeps for cached decoding: the outputs of passes 1 .. m-1, each
    ``[B, H, slots, D]``. With the coarse pass first (order 0 .. m-1), the output of pass t
    is only read back over the last s_t positions (DESIGN.md §4): it lives in a ring buffer
    of ``ring[t] = s_t`` slots (position p in slot p mod s_t), beside ``sinks[t]``, its first
    S positions. Other orders keep whole sequences (``ring[t] = None``)."""

    shape: tuple[int, ...]  # the fold of the prefill
    values: list[torch.Tensor]
    ring: list[int | None]
    sinks: list[torch.Tensor]  # [B, H, min(S, length), D] each (empty without sinks)
    length: int
    keys_read: list[int] = field(default_factory=list)  # per decoded token: keys read per head, all passes
    # with a selected or pooled pass after the fold passes: the last fold pass's output at every
    # position so far ([B, H, length, D]), which that pass reads anywhere; else None
    last: torch.Tensor | None = None
    n_sinks: int = 0  # the sinks (S): sinks[t] grows while the length is below it
    tables: dict = field(default_factory=dict)  # decoding's rotation tables and sink keys, made once

    def fiber(self, t: int, lo: int, hi: int, s: int) -> torch.Tensor:
        """Output of pass t at positions lo, lo + s, ..., hi, read by pass t + 1 (stride s)
        while position ``length`` = hi is decoded: [B, H, count, D], slices of the ring (two
        where the positions wrap around it). They always lie in the ring: pass t + 1 spans
        at most n_{t+1} s = s_t = ring[t] positions, and s divides ring[t]."""
        x, ring = self.values[t], self.ring[t]
        count = (hi - lo) // s + 1
        if ring is None:
            return x[:, :, lo:hi + 1:s]
        first = lo % ring
        before_wrap = min(count, (ring - 1 - first) // s + 1)
        head = x[:, :, first:first + (before_wrap - 1) * s + 1:s]
        if before_wrap == count:
            return head
        start = first + before_wrap * s - ring
        return torch.cat([head, x[:, :, start:start + (count - before_wrap - 1) * s + 1:s]], dim=2)

    def fiber_rotation(self, n: int, s: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines [n, D] of the angles j (s - 1), j = n - 1 .. 0 (row i: j = n - 1 - i),
        at which a pass of size n and stride s sees the key at distance j s from the query."""
        entry = ("fiber", n, s)
        if entry not in self.tables:
            j = torch.arange(n - 1, -1, -1, device=inv_freq.device)
            self.tables[entry] = cos_sin(j * (s - 1), inv_freq)
        return self.tables[entry]

    def sink_keys(self, t: int, n: int, sinks: int, key: torch.Tensor, positions, dtype) -> torch.Tensor:
        """The keys of the sinks (the first min(sinks, length) positions) as pass t, of size n,
        scores them ([B, Hkv, S, D] in dtype): with tensor positions unrotated, then rotated by
        minus their fixed distance. Kept once every sink exists."""
        count = min(sinks, key.shape[2])
        entry = ("sinks", t, n)
        cached = self.tables.get(entry)
        if cached is not None and cached.shape[2] == count:
            return cached
        k = key[:, :, :count]
        if positions is not None:
            dist = sink_distances(n, sinks)[:count].to(key.device)
            k = rotate(rotate(k, torch.arange(count, device=key.device), positions.inv_freq, inverse=True), -dist,
                       positions.inv_freq)
        k = k.to(dtype)
        if count == sinks:
            self.tables[entry] = k
        return k

    def write(self, t: int, p: int, x: torch.Tensor) -> None:
        """Store the output x [B, H, D] of pass t at position p (= the current length)."""
        if self.ring[t] is None:
            self.values[t] = torch.cat([self.values[t], x[:, :, None]], dim=2)
        else:
            self.values[t][:, :, p % self.ring[t]] = x
        if p < self.n_sinks:
            self.sinks[t] = torch.cat([self.sinks[t], x[:, :, None]], dim=2)


def decode_state(cache, layer_idx: int) -> DecodeState | None:
    """The decoding state of one layer kept on a transformers cache (None if none)."""
    return getattr(cache, "_tensorized_states", {}).get(layer_idx)


def _states(cache) -> dict[int, DecodeState]:
    if not hasattr(cache, "_tensorized_states"):
        cache._tensorized_states = {}
    return cache._tensorized_states


# ---------------------------------------------------------------------------- registration


def register() -> None:
    """Make ``attn_implementation="tensorized"`` available (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, tensorized_attention_forward)
    AttentionMaskInterface.register(NAME, tensorized_mask)

    original_update = Cache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        _ACTIVE_CACHE.set((self, layer_idx))
        return original_update(self, key_states, value_states, layer_idx, *args, **kwargs)

    Cache.update = update

    def follow(method_name, transform):
        original = getattr(Cache, method_name, None)
        if original is None:
            return

        def method(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            for state in getattr(self, "_tensorized_states", {}).values():
                transform(state, *args, **kwargs)
            if method_name == "reset":
                self._tensorized_states = {}
            return out

        setattr(Cache, method_name, method)

    def each(state, fn):
        state.values = [fn(x) for x in state.values]
        state.sinks = [fn(x) for x in state.sinks]
        if state.last is not None:
            state.last = fn(state.last)
        state.tables = {key: x for key, x in state.tables.items() if key[0] != "sinks"}  # per batch row: made again

    def reorder(state, beam_idx, *a, **k):
        each(state, lambda x: x.index_select(0, beam_idx.to(x.device)))

    def select(state, indices, *a, **k):
        each(state, lambda x: x[indices.to(x.device) if torch.is_tensor(indices) else indices])

    def repeat(state, repeats, *a, **k):
        each(state, lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(state, max_length, *a, **k):
        keep = max_length if max_length >= 0 else state.length + max_length
        if keep < state.length and any(r is not None for r in state.ring):
            raise NotImplementedError("tensorized decoding keeps ring buffers: a cache cannot be cropped back")
        state.values = [x[:, :, :keep] for x in state.values]
        if state.last is not None:
            state.last = state.last[:, :, :keep]
        state.length = min(state.length, keep)

    follow("reorder_cache", reorder)
    follow("batch_select_indices", select)
    follow("batch_repeat_interleave", repeat)
    follow("crop", crop)
    follow("reset", lambda state, *a, **k: None)
    _REGISTERED = True


def enable(model, options: dict | str | None = None):
    """Switch a loaded model to tensorized attention: store ``options`` (a dict, or a preset
    name such as ``"pilot"``) in ``model.config.tensorized_attention``, give each tensorized
    layer its gate logits (a learnable ``[heads, m]`` parameter, when the options have a
    gate), and set ``attn_implementation="tensorized"``. Returns the model."""
    register()
    config = model.config
    if options is not None:
        config.tensorized_attention = options
    opts = options_of(config)
    config.tensorized_attention = {k: v for k, v in opts.items()}  # presets resolved: the saved config says all
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj") and hasattr(module, "config"):
            _add_gate(module, opts)
    model.set_attn_implementation(NAME)
    return model


def from_pretrained(path, options: dict | str | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` switched to tensorized attention
    (:func:`enable`), with the gate logits saved in the checkpoint restored."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    enable(model, options)
    restore_gates(model, path)
    return model


def restore_gates(model, path) -> int:
    """Copy the gate logits saved in the checkpoint directory ``path`` (its ``*.safetensors``)
    into ``model``'s gate parameters (which :func:`enable` created: ``from_pretrained`` drops
    weights the model does not have yet); returns how many were restored."""
    import glob
    import os

    from safetensors.torch import load_file

    saved = {}
    for file in glob.glob(os.path.join(str(path), "*.safetensors")):
        saved.update({k: v for k, v in load_file(file).items() if k.endswith(GATE_PARAM)})
    params = dict(model.named_parameters())
    restored = 0
    with torch.no_grad():
        for name, value in saved.items():
            if name in params:
                params[name].copy_(value)
                restored += 1
    return restored


def _add_gate(module, opts) -> None:
    if opts["gate"] is None or module.layer_idx in opts["full_attention_layers"]:
        return
    heads = module.config.num_attention_heads
    init = torch.tensor([math.log(g / (1 - g)) if g is not None and g < 1 else 0.0 for g in opts["gate"]])
    if getattr(module, GATE_PARAM, None) is None:
        device = module.o_proj.weight.device
        module.register_parameter(GATE_PARAM, torch.nn.Parameter(init.expand(heads, -1).clone().to(device)))


def gate_of(module, opts) -> torch.Tensor | None:
    """The layer's gate, [heads, m] in [0, 1] (0 for passes configured without a gate, 1 for
    passes configured off)."""
    if opts["gate"] is None:
        return None
    logit = getattr(module, GATE_PARAM, None)
    if logit is None:
        raise RuntimeError(
            f"layer {module.layer_idx}: config.tensorized_attention has a gate but the layer has no "
            f"'{GATE_PARAM}' parameter; call tensorized_attention.hf.enable(model) after loading")
    return _gate_of_logit(logit, opts)


def _gate_of_logit(logit: torch.Tensor, opts) -> torch.Tensor:
    # the passes' kinds as two masks made once per configuration and device: a tensor built
    # from a list on each call would copy to the GPU and wait for it, layer after layer
    kinds = tuple(None if g is None else float(g) == 1.0 for g in opts["gate"])
    masks = _GATE_MASKS.get((kinds, logit.device))
    if masks is None:
        active = torch.tensor([k is not None for k in kinds], device=logit.device)
        fixed = torch.tensor([k is True for k in kinds], device=logit.device)
        masks = _GATE_MASKS[(kinds, logit.device)] = (active, fixed)
    active, fixed = masks
    gate = torch.where(active, torch.sigmoid(logit.float()), 0.0)
    return torch.where(fixed, 1.0, gate)


_GATE_MASKS: dict = {}


def mean_gates(model) -> list[float | None] | None:
    """The gate of each pass averaged over the layers and heads that have one (None for a
    pass configured without a gate); None when the model has no gate. For logs."""
    gates = []
    for module in model.modules():
        logit = getattr(module, GATE_PARAM, None)
        if logit is not None:
            if hasattr(logit, "full_tensor"):  # sharded (FSDP2): a collective, every rank calls it
                logit = logit.full_tensor()
            opts = options_of(module.config)
            gates.append(_gate_of_logit(logit.detach(), opts).float().mean(0))
            configured = opts["gate"]
    if not gates:
        return None
    mean = torch.stack(gates).mean(0).tolist()
    return [round(g, 4) if c is not None else None for g, c in zip(mean, configured, strict=True)]


# ------------------------------------------------------------------------------- the mask


def tensorized_mask(*args, attention_mask=None, **kwargs):
    """The mask function of ``attn_implementation="tensorized"``: the operator is causal by
    construction, so no mask is built; a padded batch (a 2-D mask with zeros) is refused."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "attn_implementation='tensorized' does not take padded batches (the attention mask has "
            "padding zeros): run the sequences one at a time, or in batches of equal length without padding")
    return None


# -------------------------------------------------------------------------- the attention


def _rotary(module, device):
    """(inv_freq [D/2], attention_scaling) of the model's RoPE, as its rotary embedding computes them."""
    cached = getattr(module, "_tensorized_rotary", None)
    if cached is not None and cached[0].device == device:
        return cached
    config = module.config
    shared = _SHARED_ROTARY.get(id(config))  # one tensor for the layers of a model: decoding keys on it
    if shared is not None and shared[0]() is config and shared[1] == module.head_dim and shared[2][0].device == device:
        module._tensorized_rotary = shared[2]
        return shared[2]
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        head_dim = module.head_dim
        dim = int(head_dim * float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))))
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        out = (inv_freq, 1.0)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        out = (inv_freq.to(device), float(attention_scaling))
    if out[0].numel() * 2 != module.head_dim:
        raise ValueError("tensor positions need rotary embeddings over the whole head dimension "
                         f"(got {out[0].numel() * 2} rotated of {module.head_dim})")
    module._tensorized_rotary = out
    _SHARED_ROTARY[id(config)] = (weakref.ref(config), module.head_dim, out)
    return out


_SHARED_ROTARY: dict = {}


def tensorized_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, **kwargs):
    """query [B, H, q_len, D]; key, value [B, H_kv, kv_len, D] (the cache included).
    Returns ([B, q_len, H, D], None)."""
    if dropout:
        raise ValueError("attn_implementation='tensorized' has no attention dropout; set attention_dropout=0")
    if torch.is_autocast_enabled(query.device.type):
        # under autocast q and k come out of the rotation in float32 (float32 cos / sin) and v in the
        # autocast dtype: like SDPA under autocast, run the operator in the autocast dtype
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (x.to(dtype) for x in (query, key, value))
    opts = options_of(module.config)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if module.layer_idx in opts["full_attention_layers"]:
        if _SEQUENCE_PARALLEL.get() is not None:
            raise NotImplementedError("tensorized attention: a layer that keeps full attention "
                                      "(full_attention_layers) does not run sequence-parallel")
        return _full_attention(query, key, value, scale), None
    active = _ACTIVE_CACHE.get()
    cache = active[0] if active is not None and active[1] == module.layer_idx else None
    _ACTIVE_CACHE.set(None)
    past = kv_len - q_len
    if past == 0:
        return _prefill(module, opts, query, key, value, scale, cache), None
    if last_pass(opts) is not None and opts["order"] is not None and len(opts["order"]) == 0:
        return _decode_last_pass_alone(module, opts, query, key, value, scale, past), None
    if opts["relay"]:
        raise NotImplementedError("tensorized attention: cached decoding with key relay is not built yet; run each "
                                  "step over the whole sequence (use_cache=False)")
    if cache is None or decode_state(cache, module.layer_idx) is None:
        raise RuntimeError(
            "tensorized attention: the keys hold past tokens but this layer has no decoding state; decode with "
            "a transformers cache that went through the prefill with attn_implementation='tensorized'")
    return _decode(module, opts, query, key, value, scale, decode_state(cache, module.layer_idx), past), None


def _decode_last_pass_alone(module, opts, query, key, value, scale, past):
    """Tokens past .. past + q_len - 1 of a selected or pooled pass alone (``order: []``),
    against the cache (it keeps no state of its own). Returns [B, q_len, H, D]."""
    q_pos = torch.arange(past, past + query.shape[2], device=query.device)
    return _last_pass_for(module, opts, query, q_pos, key, value, scale, gate_of(module, opts)).transpose(1, 2)


def last_pass(opts) -> SelectedPass | PooledPass | None:
    """The content-addressed pass the options ask for after the fold passes, if any."""
    if opts["select"] is not None:
        return SelectedPass(**opts["select"])
    if opts["pool"] is not None:
        return PooledPass(**opts["pool"])
    return None


def _full_attention(query, key, value, scale):
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if q_len > 1:
        i = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = torch.arange(kv_len, device=query.device)[None, :] <= i
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _positions(module, opts, device):
    if opts["positions"] != "tensor":
        return None
    inv_freq, attention_scaling = _rotary(module, device)
    return TensorPositions(inv_freq, attention_scaling=attention_scaling, rotated=True)


def _capacity(module) -> int:
    return int(getattr(module.config, "max_position_embeddings", 0) or 0)


def _prefill(module, opts, query, key, value, scale, cache):
    parallel = _SEQUENCE_PARALLEL.get()
    N = query.shape[2] if parallel is None else parallel[1]
    shape = resolve_fold(opts, N, _capacity(module))
    m = len(shape)
    order = opts["order"] if opts["order"] is not None else list(range(m))
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    gate = gate_of(module, opts)
    kwargs = dict(causal=True, mode=opts["mode"], order=order, gate=gate, sinks=opts["sinks"], softmax_scale=scale)
    positions = _positions(module, opts, query.device)
    select = last_pass(opts)
    if parallel is not None:
        if cache is not None or select is not None or opts["relay"]:
            raise NotImplementedError(
                "tensorized attention: sequence parallelism runs the fold passes of a training step or a plain "
                "forward; not cached decoding, a selected or pooled pass, or key relay")
        from ..distributed import sequence_parallel_tensorized_attn

        return sequence_parallel_tensorized_attn(q, k, v, shape, group=parallel[0], positions=positions, **kwargs)
    # training, a plain forward, or a pass that keeps no state (a last pass alone reads the
    # model's cache; key relay does not decode): the fastest backend
    if cache is None or opts["relay"] or (select is not None and not order):
        return tensorized_attn(q, k, v, shape, positions=positions, select=select, relay=opts["relay"], **kwargs)
    if select is None and _decode_kernel_applies(query, opts["sinks"]) and query.shape[-1] <= TRITON_MAX_HEADDIM:
        from ..ops.triton import tensorized_attn_triton

        out, values = tensorized_attn_triton(q, k, v, shape, positions=positions, return_values=True,
                                             **{**kwargs, "order": tuple(order)})
    else:
        out, values = tensorized_attn_reference(q, k, v, shape, positions=positions, return_values=True,
                                                select=select, **{**kwargs, "order": tuple(order)})
    values = [x.transpose(1, 2) for x in values]  # [B, H, N, D]
    last_fold = values.pop().contiguous() if select is not None else None  # the last pass's input
    st = strides(shape)
    ring = [st[t] if list(order) == list(range(m)) else None for t in range(m - 1)]
    n_sinks = opts["sinks"]  # sinks[t] holds the first min(n_sinks, length) outputs: it grows while decoding
    rings = []
    for x, r in zip(values, ring, strict=True):
        if r is None:
            rings.append(x.contiguous())
            continue
        buf = x.new_zeros(x.shape[0], x.shape[1], r, x.shape[3])
        last = torch.arange(max(0, N - r), N, device=x.device)
        buf[:, :, last % r] = x[:, :, last]
        rings.append(buf)
    _states(cache)[module.layer_idx] = DecodeState(
        shape=tuple(shape), values=rings, ring=ring, sinks=[x[:, :, :n_sinks].contiguous() for x in values],
        length=N, n_sinks=n_sinks, last=last_fold)
    return out


def _decode(module, opts, query, key, value, scale, state: DecodeState, past: int):
    """Tokens past .. past + q_len - 1, one at a time, against their fibers / windows.

    Every read is a strided slice of the cache or of a ring (no index tensors, nothing that
    waits for the GPU). With tensor positions the cache holds q and k rotated at their
    positions p; a pass of stride s sees them at p // s, so the score of key p' = p - j s
    is <R(p // s - p) q, R(p' // s - p') k> = <q, R(j (s - 1)) k>: each key of the fiber is
    rotated by a fixed angle of its distance j (tables kept on the state), the query not
    at all. On a GPU each pass is one kernel (:func:`..ops.triton.decode.decode_pass`)."""
    if state.length != past:
        raise RuntimeError(f"tensorized decoding state holds {state.length} tokens but the cache holds {past}")
    q_len = query.shape[2]
    positions = _positions(module, opts, query.device)
    gate = gate_of(module, opts)
    sinks = opts["sinks"]
    use_kernel = _decode_kernel_applies(query, sinks)
    outs = []
    for i in range(q_len):
        p = past + i
        shape = resolve_fold(opts, p + 1, _capacity(module))
        grew_first = shape[1:] == state.shape[1:] and not (sinks and positions is not None)
        if shape != state.shape and not grew_first:
            raise RuntimeError(
                f"tensorized decoding: the fold changed from {state.shape} (prefill) to {shape} at position {p}, "
                "which changes earlier outputs; give config.tensorized_attention['shape'] a fixed tail, e.g. "
                "[None, 256], and (with sinks and tensor positions) a first dimension that holds the whole sequence")
        m = len(shape)
        order = opts["order"] if opts["order"] is not None else list(range(m))
        st = strides(shape)
        q_p = query[:, :, i]  # [B, H, D], rotated at p
        prev = value[:, :, p]  # V^0 at p, [B, Hkv, D]: shared by each kv head's query heads
        keys_read = 0
        for t, dim in enumerate(order):
            n, s = shape[dim], st[dim]
            a = p // s
            count = min(n, a + 1) if opts["mode"] == "complete" else (a % n) + 1
            lo = p - (count - 1) * s  # the pass's keys: lo, lo + s, ..., p
            out_sinks = [j for j in range(min(sinks, p + 1)) if (p - j) % s or (p - j) // s >= count]
            step = _DecodePass(t, n, s, lo, count, out_sinks, p)
            if use_kernel:
                new = _decode_pass_triton(step, state, q_p, key, value, prev, positions, gate, sinks, scale)
            else:
                new = _decode_pass_torch(step, state, q_p, key, value, prev, positions, gate, sinks, scale)
            keys_read += count + len(out_sinks)
            if t < m - 1:
                state.write(t, p, new)
            prev = new
        out = prev
        if state.last is not None:  # the selected or pooled pass, over the last fold pass's outputs
            state.last = torch.cat([state.last, out[:, :, None]], dim=2)
            q_pos = torch.tensor([p], device=query.device)
            out = _last_pass_for(module, opts, query[:, :, i:i + 1], q_pos, key, state.last, scale, gate)[:, :, 0]
        state.length = p + 1
        state.keys_read.append(keys_read)
        outs.append(out)
    return outs[0][:, None] if q_len == 1 else torch.stack(outs, dim=1)  # [B, q_len, H, D]


@dataclass(frozen=True)
class _DecodePass:
    """Pass t (size n, stride s) of the token at p: keys lo, lo + s, ..., p (count of them),
    and the sinks it reads outside its mask."""

    t: int
    n: int
    s: int
    lo: int
    count: int
    out_sinks: list[int]
    p: int


# Whether cached decoding runs on Triton (the prefill that fills the decoding state on the
# pass kernels, each decoded token's pass as one kernel): "auto" on CUDA devices; True also
# on the CPU under Triton's interpreter (for tests); False never.
DECODE_KERNEL: bool | str = "auto"


def _decode_kernel_applies(query, sinks: int) -> bool:
    from ..ops.dispatch import available_backends

    if DECODE_KERNEL is False or query.shape[-1] % 2 or "triton" not in available_backends(query.device):
        return False
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):  # the kernel computes in float32
        return False
    from ..ops.triton.decode import MAX_SINKS

    return sinks <= MAX_SINKS and (DECODE_KERNEL is True or query.is_cuda)


def _decode_pass_triton(step: _DecodePass, state: DecodeState, q_p, key, value, prev, positions, gate, sinks, scale):
    """One pass of a decoded token in one Triton kernel: [B, H, D] in value's dtype."""
    from ..ops.triton.decode import decode_pass

    B, H, D = q_p.shape
    t = step.t
    rotation = sink_rotation = sink_keys = sink_values = None
    if positions is not None and step.s > 1:
        cos, sin = state.fiber_rotation(step.n, step.s, positions.inv_freq)
        rotation = (cos[step.n - step.count:], sin[step.n - step.count:])
    if step.out_sinks:
        sink_keys = state.sink_keys(t, step.n, sinks, key, positions, torch.float32)
        sink_values = value[:, :, :sink_keys.shape[2]] if t == 0 else state.sinks[t - 1]
        if positions is not None:
            sink_rotation = _rotation_at(step.p, positions.inv_freq)
    values = value if t == 0 else state.values[t - 1]
    ring = None if t == 0 else state.ring[t - 1]
    out = torch.empty((B, H, D), dtype=value.dtype, device=value.device)
    return decode_pass(q_p, key, values, prev, out, lo=step.lo, count=step.count, stride=step.s, ring=ring,
                       scale=scale, rotation=rotation, sink_keys=sink_keys, sink_values=sink_values,
                       sink_rows=step.out_sinks, sink_rotation=sink_rotation,
                       gate=None if gate is None else gate.float(), gate_col=t)


_ROTATION_AT: list = [None]  # (position, frequencies, (cos, sin)) of the last token decoded


def _rotation_at(p: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [D] of position p's angles, made once per decoded token for all layers."""
    last = _ROTATION_AT[0]
    if last is None or last[0] != p or last[1] is not inv_freq:
        cos, sin = cos_sin(torch.full((1,), p, device=inv_freq.device), inv_freq)
        last = _ROTATION_AT[0] = (p, inv_freq, (cos[0], sin[0]))
    return last[2]


def _decode_pass_torch(step: _DecodePass, state: DecodeState, q_p, key, value, prev, positions, gate, sinks, scale):
    """One pass of a decoded token in PyTorch (float32 or wider): [B, H, D] in value's dtype."""
    B, H, D = q_p.shape
    Hkv = key.shape[1]
    G = H // Hkv
    t, n, s, lo, p = step.t, step.n, step.s, step.lo, step.p
    acc = torch.promote_types(value.dtype, torch.float32)
    q = q_p.reshape(B, Hkv, G, D)
    q_acc = q.to(acc)
    keys = key[:, :, lo:p + 1:s]  # [B, Hkv, count, D]
    if positions is not None and s > 1:
        cos, sin = state.fiber_rotation(n, s, positions.inv_freq)
        keys = rotate_by(keys, cos[n - step.count:], sin[n - step.count:])
    vals = value[:, :, lo:p + 1:s, None] if t == 0 else state.fiber(t - 1, lo, p, s)
    scores = torch.einsum("bkgd,bkcd->bkgc", q_acc, keys.to(acc))
    if step.out_sinks:
        sink_q = q_acc
        if positions is not None:
            sink_q = rotate(q, torch.full((1,), p, device=q.device), positions.inv_freq, inverse=True).to(acc)
        sink_k = _take(state.sink_keys(t, n, sinks, key, positions, acc), step.out_sinks)
        sink_v = _take(value[:, :, :, None] if t == 0 else state.sinks[t - 1], step.out_sinks)
        scores = torch.cat([scores, torch.einsum("bkgd,bkcd->bkgc", sink_q, sink_k)], dim=-1)
        vals = torch.cat([vals, sink_v.to(vals.dtype)], dim=2)
    weights = torch.softmax(scores * scale, dim=-1)  # [B, Hkv, G, keys]
    # values [B, Hkv, keys, 1, D] (v, shared by the group) or [B, H, keys, D] (a pass's outputs)
    vals = vals.to(acc)
    if t == 0:
        new = torch.einsum("bkgc,bkcd->bkgd", weights, vals[:, :, :, 0])
    else:
        new = torch.einsum("bkgc,bkgcd->bkgd", weights, vals.reshape(B, Hkv, G, -1, D))
    if gate is not None:
        g = gate[:, t].to(acc).reshape(1, Hkv, G, 1)
        before = prev.to(acc).reshape(B, Hkv, -1, D)  # [B, Hkv, 1, D] (v) or [B, Hkv, G, D]
        new = g * before + (1 - g) * new
    return new.to(value.dtype).reshape(B, H, D)


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` (increasing) of x along dim 2: slices of its runs of consecutive rows."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append(x[:, :, rows[start]:rows[i - 1] + 1])
            start = i
    return runs[0] if len(runs) == 1 else torch.cat(runs, dim=2)


def _last_pass_for(module, opts, query, q_pos, key, values, scale, gate):
    """The selected or pooled pass for the queries at q_pos ([B, H, Q, D], rotated at their
    positions, as the model gives them), reading the cache's keys and ``values`` [B, Hv, N,
    D] (v, or the last fold pass's outputs); its gate is the last column of ``gate``: the
    reference's computation for these queries only. Returns [B, H, Q, D]."""
    from ..ops.reference import _content_pass

    B, H, Q, D = query.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    positions = _positions(module, opts, query.device)
    inv_freq = rope_scale = None
    if positions is not None:  # content q and k: the cache holds them rotated at their positions
        query = rotate(query, q_pos, positions.inv_freq, inverse=True)
        key = rotate(key, torch.arange(kv_len, device=key.device), positions.inv_freq, inverse=True)
        inv_freq, rope_scale = positions.inv_freq, 1.0
    g = None if gate is None else gate[:, -1].reshape(Hkv, H // Hkv, 1, 1)
    sinks = opts["sinks"]
    out = _content_pass(last_pass(opts), query.reshape(B, Hkv, H // Hkv, Q, D), key[:, :, None],
                        values.reshape(B, Hkv, values.shape[1] // Hkv, kv_len, D), g, min(sinks, kv_len), sinks,
                        scale, inv_freq, rope_scale, query_positions=q_pos)
    return out.reshape(B, H, Q, D)
