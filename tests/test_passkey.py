"""Passkey retrieval (tensorized_attention.passkey): exact prompts, teacher-forced scoring
with stub models, the result's summary, table and heat map, and the ``passkey`` command on
the tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tensorized_attention import passkey  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402
from tensorized_attention.setups import parse_attention  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return passkey.PromptBuilder(tokenizer)


# ---------------------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("extra", [0, 1, 2, 7, 96, 313])
@pytest.mark.parametrize("depth", [0.0, 0.37, 0.5, 1.0])
def test_prompt_has_the_exact_length_and_its_parts_where_recorded(builder, extra, depth):
    key = 48213
    length = builder.min_length(key) + extra
    p = builder.build(length, depth, key)
    assert len(p.ids) == p.length == length
    needle, answer, question = builder.needle(key), builder.answer(key), builder.question
    # the parts, a separator before the needle and the question, and one before each filler segment
    separators = 2 + (p.filler_before > 0) + (p.filler_tokens > p.filler_before)
    parts = len(builder.intro) + len(needle) + len(question) + len(answer)
    assert parts + separators * len(builder.separator) + p.filler_tokens == length
    assert p.filler_tokens >= 1 and 0 <= p.filler_before <= p.filler_tokens
    assert p.ids[p.needle_offset : p.needle_offset + p.needle_length] == needle
    assert p.answer_offset == length - len(answer) and p.ids[p.answer_offset :] == answer
    assert "".join(builder.token_text(t) for t in answer) == " 48213"
    assert p.ids[p.answer_offset - len(question) : p.answer_offset] == question
    assert p.ids[: len(builder.intro)] == builder.intro  # no BOS for this tokenizer
    assert p.distance == p.answer_offset - p.needle_offset


def test_prompt_text_is_longloras_layout(builder, tokenizer):
    p = builder.build(420, 0.5, 12345)
    text = builder.text(p)
    intro, before, needle, after, question = text.split("\n")
    assert intro == passkey.INTRO
    assert before.startswith("The grass is green. The sky is blue.") and before.endswith(".")
    assert needle == "The pass key is 12345. Remember it. 12345 is the pass key."
    assert after.startswith("The grass is green.")
    assert question == "What is the pass key? The pass key is 12345"
    # a byte-level BPE: the ids are those of the whole text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == p.ids
    # at the ends an empty filler segment goes with its newline
    first = builder.text(builder.build(420, 0.0, 12345)).split("\n")
    assert first[0] == passkey.INTRO and first[1] == needle and len(first) == 4
    last = builder.text(builder.build(420, 1.0, 12345)).split("\n")
    assert last[2] == needle and last[3] == question and len(last) == 4


def test_needle_sits_at_the_requested_depth(builder):
    key, length = 70001, 1200
    sentence = max(len(s) for s in builder.filler_next)
    offsets = []
    for depth in [i / 20 for i in range(21)]:
        p = builder.build(length, depth, key)
        assert abs(p.filler_before - depth * p.filler_tokens) <= sentence / 2 + 1
        assert p.depth_actual == p.filler_before / p.filler_tokens
        offsets.append(p.needle_offset)
    assert offsets == sorted(offsets) and offsets[0] < offsets[-1]
    sep = len(builder.separator)
    first = builder.build(length, 0.0, key)
    assert first.filler_before == 0 and first.needle_offset == len(builder.intro) + sep
    last = builder.build(length, 1.0, key)
    assert last.filler_before == last.filler_tokens
    assert last.needle_offset + last.needle_length + sep + len(builder.question) == last.answer_offset


def test_needle_goes_in_at_a_sentence_boundary(builder):
    p = builder.build(900, 0.4, 31337)
    before = builder.tokenizer.decode(p.ids[: p.needle_offset])
    assert before.endswith("." + passkey.SEPARATOR)


def test_too_short_lengths_and_bad_depths_are_refused(builder):
    shortest = builder.min_length(12345)
    assert builder.build(shortest, 0.5, 12345).filler_tokens == 1
    with pytest.raises(ValueError, match=f"shorter than the prompt's fixed parts \\({shortest} tokens"):
        builder.build(shortest - 1, 0.5, 12345)
    with pytest.raises(ValueError, match="depth must lie in \\[0, 1\\]"):
        builder.build(shortest + 10, 1.5, 12345)


def test_bos_when_the_tokenizer_adds_one(tokenizer):
    class WithBos:
        bos_token_id = tokenizer.bos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

        def decode(self, ids):
            return tokenizer.decode(ids)

    assert passkey.PromptBuilder(tokenizer).prefix == []  # the tiny tokenizer adds none
    auto = passkey.PromptBuilder(WithBos())
    assert auto.prefix == [tokenizer.bos_token_id]
    p = auto.build(300, 0.5, 12345)
    assert len(p.ids) == 300 and p.ids[0] == tokenizer.bos_token_id and p.ids[1:4] == auto.intro[:3]
    assert passkey.PromptBuilder(WithBos(), bos=False).prefix == []
    assert passkey.PromptBuilder(tokenizer, bos=True).prefix == [tokenizer.bos_token_id]


def test_keys_are_seeded_five_digit_and_stable_per_cell():
    plan = passkey.plan_trials([256, 512], [0.0, 0.5, 1.0], 3, seed=7)
    assert len(plan) == 18 and len({t.key for t in plan}) > 12
    assert all(10000 <= t.key <= 99999 for t in plan)
    assert plan == passkey.plan_trials([256, 512], [0.0, 0.5, 1.0], 3, seed=7)
    assert [t.key for t in plan] != [t.key for t in passkey.plan_trials([256, 512], [0.0, 0.5, 1.0], 3, seed=8)]
    more = passkey.plan_trials([128, 512], [0.5], 3, seed=7)  # other cells do not move a cell's keys
    assert [t.key for t in more if t.length == 512] == [t.key for t in plan if t.length == 512 and t.depth == 0.5]
    with pytest.raises(ValueError, match="trials must be >= 1"):
        passkey.plan_trials([256], [0.5], 0)


@pytest.mark.parametrize("text, expected", [
    ("1", [0.5]), ("3", [0.0, 0.5, 1.0]), ("0.25", [0.25]), ("0, 0.1,1", [0.0, 0.1, 1.0]), ("1.0", [1.0]),
])
def test_parse_depths(text, expected):
    assert passkey.parse_depths(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0", "a count must be >= 1"), ("0,1.5", "in \\[0, 1\\], got 1.5"), ("-0.1", "in \\[0, 1\\]"),
    ("a,b", "not a fraction: 'a'"), (",", "no depths given"), ("0.5,0.5", "each depth once"),
])
def test_parse_depths_errors(text, message):
    with pytest.raises(ValueError, match=message):
        passkey.parse_depths(text)


# ---------------------------------------------------------------------------------------
# scoring with stub models


class Stub(torch.nn.Module):
    """A model-like object that reads its input and predicts the token after each position
    (so it is always right), or that token's id plus ``shift`` at the last ``wrong``
    predicting positions (wrong there). Records the ``logits_to_keep`` it was given."""

    def __init__(self, vocab: int, shift: int = 0, wrong: int = 0):
        super().__init__()
        self.vocab, self.shift, self.wrong = vocab, shift, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stub a device
        self.kept: list[int] = []

    def logits(self, input_ids):
        following = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            following[:, -1 - self.wrong : -1] = (following[:, -1 - self.wrong : -1] + self.shift) % self.vocab
        logits = torch.full((*input_ids.shape, self.vocab), -8.0)
        return logits.scatter_(2, following[..., None], 8.0)

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        self.kept.append(logits_to_keep)
        logits = self.logits(input_ids)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class FullLogitsStub(Stub):
    """The same, with no ``logits_to_keep``: the scorer slices the full logits."""

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits(input_ids))


def test_always_right_model_scores_one(builder, tokenizer):
    vocab = len(tokenizer)
    for model in (Stub(vocab), FullLogitsStub(vocab)):
        result = passkey.evaluate(model, builder, [256, 300], [0.0, 0.5, 1.0], trials=2, seed=1, progress=False)
        assert result["accuracy"] == 1.0 and result["digits_right"] == 1.0 and result["successes"] == 12
        assert result["mean_nll"] < 1e-3
        assert all(c["accuracy"] == 1.0 and c["trials"] == 2 for c in result["cells"])
        assert [p["accuracy"] for p in result["per_length"]] == [1.0, 1.0]
        for r in result["trials"]:
            assert r["success"] and r["predicted"] == f" {r['key']}"
    stub = Stub(vocab)
    passkey.evaluate(stub, builder, [256], [0.5], progress=False)
    assert stub.kept == [len(builder.answer(12345)) + 1]  # only the answer's logits


def test_never_right_model_scores_zero(builder, tokenizer):
    model = Stub(len(tokenizer), shift=1, wrong=10**6)
    result = passkey.evaluate(model, builder, [256], [0.0, 1.0], trials=3, progress=False)
    assert result["accuracy"] == 0.0 and result["digits_right"] == 0.0 and result["successes"] == 0
    assert result["mean_nll"] > 10


def test_one_wrong_digit_fails_the_trial_but_keeps_four_fifths(builder, tokenizer):
    prompt = builder.build(280, 0.5, 24680)
    score = passkey.score_prompt(Stub(len(tokenizer), shift=1, wrong=1), prompt, builder.token_text)
    assert score["success"] is False
    assert score["digits_right"] == pytest.approx(4 / 5)
    assert score["predicted"][:-1] == prompt.ids[-prompt.answer_length : -1]


def test_digits_right_compares_characters_within_tokens():
    texts = {0: " 12", 1: "345", 2: " 13", 3: "346", 4: " 12"}.get
    assert passkey._digits_right([0, 1], [2, 3], texts) == pytest.approx(3 / 5)
    assert passkey._digits_right([0, 1], [4, 1], texts) == 1.0
    assert passkey._digits_right([0, 1], [2, 1], None) == 0.5  # no token texts: tokens right


def test_answer_logits_of_a_real_model_equal_its_full_logits(checkpoint, builder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    prompt = builder.build(300, 0.3, 13579)
    ids = torch.tensor(prompt.ids)
    n = prompt.answer_length
    with torch.no_grad():
        full = model(ids[None]).logits[0, -n - 1 : -1]
    assert torch.allclose(passkey.answer_logits(model, ids, n), full, atol=1e-5)

    class Layout(torch.nn.Module):  # the Hugging Face layout without logits_to_keep
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = model.model, model.lm_head

        def forward(self, input_ids, use_cache=False):
            raise AssertionError("the scorer should use .model and .lm_head")

    assert torch.allclose(passkey.answer_logits(Layout(), ids, n), full, atol=1e-5)
    with pytest.raises(ValueError, match="count must lie in"):
        passkey.answer_logits(model, ids[:5], 5)


# ---------------------------------------------------------------------------------------
# showing a result


def test_table_and_heatmap_from_a_result(builder, tokenizer, tmp_path):
    result = passkey.evaluate(Stub(len(tokenizer)), builder, [256, 2048], [0.0, 0.5, 1.0], progress=False)
    result["trials"][0]["success"] = False  # as if one trial failed
    result.update(passkey.summarize(result["trials"], result["lengths"], result["depths"]))
    table = passkey.format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["length", "0.00", "0.50", "1.00", "all", "digits", "NLL"]
    assert lines[1].split()[:5] == ["256", "0/1", "1/1", "1/1", "2/3"]
    assert lines[2].split()[:5] == ["2k", "1/1", "1/1", "1/1", "3/3"]
    pytest.importorskip("matplotlib")
    path = passkey.plot_heatmap(json.loads(json.dumps(result)), tmp_path / "passkey.png")
    png = (tmp_path / "passkey.png").read_bytes()
    assert path.endswith("passkey.png") and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ---------------------------------------------------------------------------------------
# the command


@pytest.mark.parametrize("spec", ["full", "window:8+2"])
def test_cli_on_the_tiny_checkpoint(checkpoint, tmp_path, capsys, spec):
    out = tmp_path / "passkey"
    argv = ["passkey", "--model", str(checkpoint), "--attention", spec, "--lengths", "256,300",
            "--depths", "3", "--trials", "2", "--seed", "3", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "length  0.00  0.50  1.00" in printed and str(out / "passkey.json") in printed

    data = json.loads((out / "passkey.json").read_text())
    assert data["command"].startswith("tensorized-attention passkey --model")
    assert data["attention"] == spec
    assert data["setup"] == json.loads(json.dumps(parse_attention(spec).describe()))
    assert data["model_type"] == "llama" and data["dtype"] == "float32"
    assert data["lengths"] == [256, 300] and data["depths"] == [0.0, 0.5, 1.0]
    assert data["trials_per_cell"] == 2 and data["seed"] == 3
    assert data["protocol"]["needle"] == passkey.NEEDLE and data["protocol"]["bos"] is False
    assert (data["options_resolved"] is None) == (spec == "full")
    assert len(data["trials"]) == 12
    for r in data["trials"]:
        assert {"length", "depth", "depth_actual", "needle_offset", "distance", "key", "success",
                "digits_right", "nll", "predicted", "seconds"} <= set(r)
        assert 10000 <= r["key"] <= 99999 and 0 <= r["digits_right"] <= 1 and r["nll"] > 0
    assert len(data["cells"]) == 6 and all(c["trials"] == 2 for c in data["cells"])
    assert [p["length"] for p in data["per_length"]] == [256, 300]
    assert data["successes"] == sum(r["success"] for r in data["trials"])
    assert 0 <= data["accuracy"] <= 1
    if spec == "full":  # the same keys and prompts give the same trials
        keys = [t.key for t in passkey.plan_trials([256, 300], [0.0, 0.5, 1.0], 2, seed=3)]
        assert [r["key"] for r in data["trials"]] == keys
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--lengths", "128"], "--lengths: 128 is too short for the prompt's fixed parts: .* use lengths >= "),
    (["--lengths", "1k,x"], "--lengths: not a length"),
    (["--lengths", "300,300"], "each length once"),
    (["--depths", "0,1.5"], "depths are fractions of the filler in \\[0, 1\\], got 1.5"),
    (["--depths", "0"], "a count must be >= 1"),
    (["--trials", "0"], "--trials must be >= 1, got 0"),
    (["--attention", "flash"], "--attention: unknown attention kind 'flash'"),
])
def test_cli_errors(checkpoint, tmp_path, capsys, args, message):
    argv = ["passkey", "--model", str(checkpoint), "--lengths", "300", "--depths", "2", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--no-progress", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tensorized-attention passkey: error: " in err
    assert re.search(message, err)
    assert not (tmp_path / "out").exists()
