"""Attention setups (tensorized_attention.setups): parsing, RoPE scaling, loading."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tensorized_attention import hf  # noqa: E402
from tensorized_attention.setups import AttentionSetup, load_with_attention, parse_attention  # noqa: E402


@pytest.mark.parametrize("spec, expected", [
    ("full", AttentionSetup("full")),
    ("full:linear=4", AttentionSetup("full", rope="linear", rope_factor=4.0)),
    ("full:yarn=16", AttentionSetup("full", rope="yarn", rope_factor=16.0)),
    ("eager", AttentionSetup("eager")),
    ("tensorized", AttentionSetup("tensorized", options={})),
    ("tensorized:pilot", AttentionSetup("tensorized", options="pilot")),
    ('tensorized:{"mode": "block", "sinks": 2}', AttentionSetup("tensorized", options={"mode": "block", "sinks": 2})),
    ("window:256+4", AttentionSetup("window", options=hf.window_options(256, 4))),
    ("window:64", AttentionSetup("window", options=hf.window_options(64, 0))),
])
def test_parse(spec, expected):
    assert parse_attention(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("", "attention must be one of"),
    ("flash", "unknown attention kind 'flash'"),
    ("full:linear", "'linear=F' or 'yarn=F' with F >= 1"),
    ("full:ntk=2", "'linear=F' or 'yarn=F'"),
    ("full:yarn=0.5", "F >= 1"),
    ("eager:x", "takes no argument"),
    ("window:", "'window:W' or 'window:W\\+S'"),
    ("window:0+4", "W >= 1"),
    ("window:256+x", "S >= 0"),
    ("tensorized:nopreset", "unknown preset 'nopreset'"),
    ("tensorized:[1, 2]", "preset name or a JSON object"),
    ("tensorized:{bad json", "preset name or a JSON object"),
])
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_attention(spec)


@pytest.mark.parametrize("spec", ["full", "full:linear=4", "full:yarn=4", "eager", "tensorized:pilot", "window:8+2"])
def test_load_with_attention_runs_the_setup(checkpoint, spec):
    setup = parse_attention(spec)
    model, tokenizer = load_with_attention(checkpoint, setup)
    config = model.config
    assert config._attn_implementation == setup.attn_implementation
    if setup.rope is not None:
        assert config.max_position_embeddings == 256 * 4
        assert config.rope_parameters["rope_type"] == setup.rope and config.rope_parameters["factor"] == 4.0
        if setup.rope == "yarn":
            assert config.rope_parameters["original_max_position_embeddings"] == 256
    else:
        assert config.max_position_embeddings == 256
    if setup.kind in ("tensorized", "window"):
        assert hf.options_of(config)["sinks"] == (4 if setup.kind == "tensorized" else 2)
    ids = torch.tensor([tokenizer("Of Mans First Disobedience, and the Fruit" * 4)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_rope_scaling_changes_the_model(checkpoint):
    """Linear interpolation by 4 is RoPE at p / 4: logits differ from the unscaled model."""
    plain, tok = load_with_attention(checkpoint, parse_attention("full"))
    scaled, _ = load_with_attention(checkpoint, parse_attention("full:linear=4"))
    ids = torch.tensor([tok("With loss of EDEN, till one greater Man" * 3)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, scaled(ids).logits)


def test_load_with_attention_restores_trained_gates(checkpoint, tmp_path):
    model, tokenizer = load_with_attention(checkpoint, parse_attention("tensorized:pilot"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.tensorized_gate_logit.fill_(-1.25)
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    again, _ = load_with_attention(tmp_path / "trained", parse_attention("tensorized:pilot"))
    for layer in again.model.layers:
        assert torch.all(layer.self_attn.tensorized_gate_logit == -1.25)


@pytest.mark.parametrize("spec", ["full:linear=4", "full:yarn=4"])
def test_a_checkpoint_saved_with_scaled_rope_is_not_scaled_twice(checkpoint, tmp_path, spec):
    model, tokenizer = load_with_attention(checkpoint, parse_attention(spec))
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    again, _ = load_with_attention(tmp_path / "trained", parse_attention(spec))
    assert again.config.max_position_embeddings == 1024
    assert again.config.rope_parameters == model.config.rope_parameters
