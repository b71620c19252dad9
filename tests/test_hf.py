"""attn_implementation="tensorized" in Hugging Face models (tiny random Llama, Mistral, Qwen2)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, DynamicCache  # noqa: E402

from tensorized_attention import SelectedPass, TensorPositions, hf, tensorized_attn  # noqa: E402
from tensorized_attention.passes import PooledPass  # noqa: E402

hf.register()


def _tiny(family="llama", dtype=torch.float64, **overrides):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    common.update(overrides)
    if family == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "mistral":
        config, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(config).to(dtype).eval()


OPTIONS = [
    {"shape": [None, 4], "mode": "complete"},
    {"shape": [None, 3, 2], "mode": "complete", "gate": [0.7, None, 0.4], "sinks": 2},
    {"shape": [None, 5], "mode": "block", "sinks": 3, "gate": [0.88, None]},
    {"shape": [None, 4], "mode": "complete", "positions": "sequence", "sinks": 1},
    hf.window_options(4, sinks=2),
    {"shape": [None, 4], "mode": "complete", "order": [], "sinks": 2, "select": {"block": 4, "topk": 2}},
    {"shape": [None, 4], "mode": "complete", "gate": [0.7, None, 0.5], "sinks": 1, "select": {"block": 4, "topk": 1}},
    {"shape": [None, 4], "mode": "complete", "sinks": 2, "pool": {"block": 4}, "gate": [0.5, None, 0.3]},
    {"shape": [None, 3, 2], "mode": "complete", "sinks": 1, "relay": True},
]

# cached decoding covers everything but key relay; a last pass alone, after the fold passes
DECODABLE = [o for o in OPTIONS if not o.get("relay")] + [
    {"shape": [None, 4], "mode": "complete", "order": [], "sinks": 2, "select": {"block": 4, "topk": 2}},
    {"shape": [None, 4], "mode": "complete", "order": [], "sinks": 1, "gate": [0.3], "pool": {"block": 4}},
    {"shape": [None, 4], "mode": "complete", "order": [], "positions": "sequence", "select": {"block": 4, "topk": 1}},
    {"shape": [None, 4], "mode": "complete", "order": [], "sinks": 1, "select": {"block": 4, "topk": 2, "score": "bound"}},
]


def _manual(options):
    """An attention function that calls tensorized_attn by hand with the same options."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        N = query.shape[2]
        tail = options["shape"][1:]
        capacity = module.config.max_position_embeddings  # a None first dimension holds the trained length
        first = -(-max(N, capacity) // int(torch.tensor(tail).prod()))
        rotary = module._manual_rotary
        positions = TensorPositions(rotary, rotated=True) if options.get("positions", "tensor") == "tensor" else None
        gate = None
        if options.get("gate"):
            gate = torch.tensor([g if g is not None else 0.0 for g in options["gate"]], dtype=torch.float64)
        out = tensorized_attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), (first, *tail),
                              mode=options["mode"], gate=gate, sinks=options.get("sinks", 0),
                              softmax_scale=scaling, positions=positions, order=options.get("order"),
                              select=SelectedPass(**options["select"]) if options.get("select") else
                              PooledPass(**options["pool"]) if options.get("pool") else None,
                              relay=options.get("relay", False))
        return out, None

    return attention


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: str(o["shape"]) + o["mode"] + "".join(f"+{x}" for x in ("select", "pool", "relay") if o.get(x)))
def test_same_logits_as_calling_the_operator_by_hand(family, options):
    model = _tiny(family)
    ids = torch.randint(0, 97, (2, 29))
    AttentionInterface.register("manual_tensorized", _manual(options))
    for layer in model.model.layers:
        layer.self_attn._manual_rotary = model.model.rotary_emb.inv_freq  # the model's own frequencies
    model.set_attn_implementation("manual_tensorized")
    with torch.no_grad():
        manual = model(ids).logits
    hf.enable(model, options)
    with torch.no_grad():
        ours = model(ids).logits
    # the model's gate is sigmoid of a float32 logit parameter: equal to ~1e-8
    torch.testing.assert_close(ours, manual, rtol=1e-6, atol=1e-6)


def test_window_options_are_a_sliding_window_with_sinks():
    """window_options(W, S): each query reads its last W positions and the first S, nothing else."""
    W, S = 5, 2

    def dense_window(module, query, key, value, attention_mask, scaling=None, **kwargs):
        N = query.shape[2]
        p = torch.arange(N)
        allowed = (p[None, :] <= p[:, None]) & ((p[:, None] - p[None, :] < W) | (p[None, :] < S))
        group = query.shape[1] // key.shape[1]
        k, v = (x.repeat_interleave(group, dim=1) for x in (key, value))
        scores = (query @ k.transpose(-1, -2)) * scaling
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (weights @ v).transpose(1, 2), None

    model = _tiny()
    ids = torch.randint(0, 97, (2, 23))
    AttentionInterface.register("dense_window", dense_window)
    model.set_attn_implementation("dense_window")
    with torch.no_grad():
        dense = model(ids).logits
    hf.enable(model, {**hf.window_options(W, sinks=S), "positions": "sequence"})
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, dense, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(hf.gate_of(layer.self_attn, hf.options_of(model.config))[:, 0], torch.ones(4))
               for layer in model.model.layers)


@pytest.mark.parametrize("options", OPTIONS[:3], ids=lambda o: str(o["shape"]))
def test_causal_and_complete_reaches_every_token(options):
    model = hf.enable(_tiny(), options)
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        base = model(ids).logits
        changed = ids.clone()
        changed[0, 17] = (changed[0, 17] + 1) % 97
        after = model(changed).logits
    torch.testing.assert_close(after[:, :17], base[:, :17], rtol=0, atol=0)
    assert (after[:, 17:] - base[:, 17:]).abs().max() > 0
    if options["mode"] == "complete":
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=emb).logits[0, -1].sum().backward()
        assert (emb.grad[0].abs().sum(-1) > 0).all()


def test_full_attention_layers_and_sequence_fold_match_sdpa():
    """A 1-dim fold is full causal attention: with tensor positions it equals the model's
    ordinary RoPE (SDPA); full_attention_layers use SDPA directly."""
    model = _tiny()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        hf.enable(model, {"shape": [None], "positions": "tensor"})
        one_pass = model(ids).logits
        hf.enable(model, {"shape": [None, 4], "full_attention_layers": [0, 1]})
        hybrid = model(ids).logits
    # rotating back and forth with float32 cos / sin (as the model computes them): equal to ~1e-8
    torch.testing.assert_close(one_pass, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hybrid, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("options", DECODABLE, ids=lambda o: str(o["shape"]) + o["mode"] + "".join(
    f"+{x}" for x in ("select", "pool") if o.get(x)) + ("+seqpos" if o.get("positions") == "sequence" else ""))
@pytest.mark.parametrize("prefill", [12, 13])
def test_cached_decoding_equals_one_forward(family, options, prefill):
    model = hf.enable(_tiny(family), options)
    ids = torch.randint(0, 97, (2, 25))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :prefill], past_key_values=cache).logits]
        for i in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, i:i + 1], past_key_values=cache).logits)
    # float64 model; the rotations use float32 cos / sin (as the model does): equal to ~1e-8
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["complete", "block"])
def test_cached_decoding_from_one_token_with_more_sinks_than_tokens(mode):
    """Decoding from a 1-token prefill: the sinks (3) are filled while decoding, and each
    pass's sink outputs are read from its own store."""
    model = hf.enable(_tiny(), {"shape": [None, 4], "mode": mode, "gate": [0.5, None], "sinks": 3})
    ids = torch.randint(0, 97, (1, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-6, atol=1e-6)


def test_cached_decoding_follows_a_reordered_cache():
    """Beam search reorders the cache: the decoding state (rings, sinks, the sinks' keys kept
    for decoding) follows, so decoding on equals decoding the reordered batch from the start."""
    model = hf.enable(_tiny(), {"shape": [None, 4], "mode": "complete", "gate": [0.5, None], "sinks": 2})
    ids = torch.randint(0, 97, (2, 16))
    swapped = ids.flip(0)

    def decode(batch, cache, start, stop):
        return [model(batch[:, i:i + 1], past_key_values=cache).logits for i in range(start, stop)]

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :9], past_key_values=cache)
        decode(ids, cache, 9, 12)
        cache.reorder_cache(torch.tensor([1, 0]))
        after = decode(swapped, cache, 12, 16)
        fresh = DynamicCache(config=model.config)
        model(swapped[:, :9], past_key_values=fresh)
        decode(swapped, fresh, 9, 12)
        expected = decode(swapped, fresh, 12, 16)
    torch.testing.assert_close(torch.cat(after, 1), torch.cat(expected, 1), rtol=1e-9, atol=1e-9)


def test_decode_step_reads_sum_of_fold_keys():
    """The attention work of a decode step is sum(n_j) keys per head (plus the sinks outside
    the pass masks): counted, not timed."""
    model = hf.enable(_tiny(), {"shape": [None, 8, 4], "sinks": 0})
    ids = torch.randint(0, 97, (1, 200))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :160], past_key_values=cache)
        for i in range(160, 200):
            model(ids[:, i:i + 1], past_key_values=cache)
    state = hf.decode_state(cache, 0)
    # DESIGN.md §4: with the coarse pass first, pass t's output lives in a ring of s_t positions
    assert [x.shape[2] for x in state.values] == [32, 4]
    reads = state.keys_read
    for step, p in zip(reads, range(160, 200), strict=True):
        assert step == (p // 32 + 1) + 8 + 4  # the coarse dimension grows with the length: n_1 = p // 32 + 1


def test_generate_greedy_equals_argmax_of_full_forward():
    model = hf.enable(_tiny(dtype=torch.float32), "pilot")
    model.config.tensorized_attention = {**hf.PRESETS["pilot"], "shape": [None, 8]}
    ids = torch.randint(1, 97, (1, 19))
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(8):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_left_padding_is_refused():
    model = hf.enable(_tiny(), {"shape": [None, 4]})
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="does not take padded batches"):
        model(ids, attention_mask=mask)


def test_gate_is_a_saved_parameter(tmp_path):
    model = hf.enable(_tiny(), "pilot")
    logits = [n for n, _ in model.named_parameters() if n.endswith("tensorized_gate_logit")]
    assert len(logits) == 2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.tensorized_gate_logit.fill_(0.3)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert loaded.config.tensorized_attention["sinks"] == 4
    for layer in loaded.model.layers:
        assert torch.all(layer.self_attn.tensorized_gate_logit == 0.3)


def test_bad_options_are_refused():
    model = _tiny()
    with pytest.raises(ValueError, match="unknown keys"):
        hf.enable(model, {"shap": [None, 4]})
    with pytest.raises(ValueError, match="unknown preset"):
        hf.enable(model, "best")
    with pytest.raises(ValueError, match=r"\['gate'\] must be None or 2 entries"):
        hf.enable(model, {"shape": [None, 4], "gate": [1.5, None]})
    with pytest.raises(ValueError, match=r"\['gate'\] must be None or 3 entries \(one per pass\)"):
        hf.enable(model, {"shape": [None, 4], "gate": [0.5, None], "select": {"block": 4, "topk": 1}})
    with pytest.raises(ValueError, match=r"\['select'\] must be None or \{'block': W, 'topk': k\}"):
        hf.enable(model, {"shape": [None, 4], "select": {"block": 4, "topk": 0}})
    with pytest.raises(ValueError, match=r"optionally 'score': one of \('mean', 'bound'\)"):
        hf.enable(model, {"shape": [None, 4], "select": {"block": 4, "topk": 1, "score": "max"}})
    with pytest.raises(ValueError, match="needs a 'select' or 'pool' pass"):
        hf.enable(model, {"shape": [None, 4], "order": []})
    with pytest.raises(ValueError, match="two kinds of last pass"):
        hf.enable(model, {"shape": [None, 4], "select": {"block": 4, "topk": 1}, "pool": {"block": 4}})
    with pytest.raises(ValueError, match=r"\['relay'\] must be true or false"):
        hf.enable(model, {"shape": [None, 4], "relay": True, "pool": {"block": 4}})


def test_from_pretrained_with_attn_implementation(tmp_path):
    """After register(), from_pretrained(attn_implementation="tensorized") reads the options
    saved in the config."""
    model = hf.enable(_tiny(), {"shape": [None, 4], "sinks": 2})
    ids = torch.randint(0, 97, (1, 15))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="tensorized", dtype=torch.float64)
    assert loaded.config._attn_implementation == "tensorized"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-9, atol=1e-9)


def test_cached_decoding_other_order_keeps_whole_sequences():
    """Fine pass first: the intermediate values are read far back, so the state keeps them all."""
    model = hf.enable(_tiny(), {"shape": [None, 4], "order": [1, 0], "sinks": 2, "gate": [0.5, 0.3]})
    ids = torch.randint(0, 97, (1, 22))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :9], past_key_values=cache).logits]
        for i in range(9, 22):
            steps.append(model(ids[:, i:i + 1], past_key_values=cache).logits)
    assert hf.decode_state(cache, 0).values[0].shape[2] == 22
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-6, atol=1e-6)


def test_cached_decoding_with_key_relay_is_refused():
    """A forward with a cache works (the prefill); decoding from it says what is missing."""
    model = hf.enable(_tiny(dtype=torch.float32), {"shape": [None, 4], "relay": True})
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        with pytest.raises(NotImplementedError, match="cached decoding with key relay"):
            model.generate(ids, max_new_tokens=2, do_sample=False)
