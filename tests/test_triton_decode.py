"""Cached decoding on Triton (the prefill on the pass kernels, then one kernel per pass and
token: ops/triton/decode.py) against one forward over the whole sequence and against the
PyTorch decoding path; under Triton's interpreter without a GPU."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from tensorized_attention import hf  # noqa: E402
from tensorized_attention.hf import attention as hf_attention  # noqa: E402
from tensorized_attention.ops import triton as triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

OPTIONS = [
    {"shape": [None, 4], "mode": "complete"},
    {"shape": [None, 3, 2], "mode": "complete", "gate": [0.7, None, 0.4], "sinks": 2},
    {"shape": [None, 5], "mode": "block", "sinks": 3, "gate": [0.88, None]},
    {"shape": [None, 4], "mode": "complete", "positions": "sequence", "sinks": 1},
    {"shape": [None, 3, 2], "mode": "complete", "order": [2, 0, 1], "sinks": 2, "gate": [0.3, 0.5, None]},
    {"shape": [None, 8], "mode": "complete", "sinks": 4, "gate": [0.5, None]},
    {"shape": [None, 4], "mode": "complete", "positions": "tensor", "sinks": 2, "gate": [0.6, None]},
]


def _tiny(dtype):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()


def _decoded(model, ids, prefill):
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :prefill], past_key_values=cache).logits]
    for i in range(prefill, ids.shape[1]):
        steps.append(model(ids[:, i:i + 1], past_key_values=cache).logits)
    return torch.cat(steps, 1), cache


# a 1-token prefill: the sinks fill while decoding
CASES = [(options, 12) for options in OPTIONS] + [(OPTIONS[2], 1), (OPTIONS[5], 1)]


@pytest.mark.parametrize("options, prefill", CASES,
                         ids=lambda c: f"{c['shape']}{c['mode']}{c.get('order', '')}" if isinstance(c, dict) else str(c))
def test_decoding_kernel_equals_one_forward_and_the_pytorch_path(monkeypatch, options, prefill):
    model = hf.enable(_tiny(torch.float32), options)
    ids = torch.randint(0, 97, (2, 18), device=DEVICE)
    with torch.no_grad():
        full = model(ids).logits
        monkeypatch.setattr(hf_attention, "DECODE_KERNEL", False)
        by_torch, _ = _decoded(model, ids, prefill)
        monkeypatch.setattr(hf_attention, "DECODE_KERNEL", True)
        calls, prefills = [], []
        real = hf_attention._decode_pass_triton
        monkeypatch.setattr(hf_attention, "_decode_pass_triton", lambda *a: calls.append(1) or real(*a))
        real_passes = triton_ops.tensorized_attn_triton
        monkeypatch.setattr(triton_ops, "tensorized_attn_triton",
                            lambda *a, **kw: prefills.append(kw.get("return_values")) or real_passes(*a, **kw))
        by_kernel, cache = _decoded(model, ids, prefill)
    assert calls, "the kernel path did not run"
    assert prefills and all(prefills), "the prefill did not fill the decoding state on the Triton passes"
    torch.testing.assert_close(by_kernel, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_kernel, by_torch, rtol=1e-4, atol=1e-4)
    assert hf.decode_state(cache, 0).length == ids.shape[1]


def test_decode_pass_rejects_too_many_sinks():
    from tensorized_attention.ops.triton.decode import MAX_SINKS, decode_pass

    B, H, D = 1, 2, 8
    q = torch.randn(B, H, D, device=DEVICE)
    key = torch.randn(B, H, 40, D, device=DEVICE)
    with pytest.raises(ValueError, match=f"at most {MAX_SINKS} sinks"):
        decode_pass(q, key, key, q, torch.empty_like(q), lo=39, count=1, stride=1, ring=None, scale=1.0,
                    sink_keys=key, sink_values=key, sink_rows=[0, 1])
