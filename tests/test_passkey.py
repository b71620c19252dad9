"""Passkey retrieval (tensorized_attention.passkey): exact prompts, teacher-forced scoring
with stub models, the result's summary, table and heat map, and the ``passkey`` command on
the tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import random
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
    assert all(10000 <= t.key <= 99999 and t.key % 2 == 1 for t in plan)  # odd: training's keys are even
    rng = random.Random(0)
    assert all(10000 <= k <= 99998 and k % 2 == 0 for k in (passkey.draw_key(rng, training=True) for _ in range(200)))
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
    # only the answer's logits, for the true key and for the random one
    assert stub.kept == [len(builder.answer(12345)) + 1] * 2


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


class KnowsTheKey(Stub):
    """Predicts the next token of its input, except at the answer: there it predicts the
    true key's tokens whatever the input holds (a model that read the needle)."""

    def __init__(self, vocab: int, answer: list[int]):
        super().__init__(vocab)
        self.answer = answer

    def logits(self, input_ids):
        logits = super().logits(input_ids)
        n = len(self.answer)
        logits[:, -n - 1:-1] = -8.0
        logits[0, torch.arange(input_ids.shape[1] - n - 1, input_ids.shape[1] - 1), self.answer] = 8.0
        return logits


def test_contrast_scores_a_random_key_after_the_same_prompt(builder, tokenizer):
    prompt = builder.build(300, 0.5, 24680)
    other = builder.answer(13579)
    model = KnowsTheKey(len(tokenizer), builder.answer(24680))
    score = passkey.score_prompt(model, prompt, builder.token_text, contrast=other)
    assert score["success"] and score["nll"] < 1e-3 and score["nll_random"] > 10
    assert model.kept == [len(other) + 1, len(other) + 1]  # two forwards, answer logits only
    assert passkey.score_prompt(model, prompt, builder.token_text)["nll_random"] is None
    trial = passkey.Trial(300, 0.5, 0, 24680)
    assert passkey.contrast_key(trial) == passkey.contrast_key(trial) != 24680
    result = passkey.evaluate(Stub(len(tokenizer), shift=1, wrong=10**6), builder, [256], [0.5], progress=False)
    assert result["prefers_true"] is not None and result["mean_nll_random"] is not None
    result = passkey.evaluate(Stub(len(tokenizer)), builder, [256], [0.5], progress=False, contrast=False)
    assert result["prefers_true"] is None and result["trials"][0]["nll_random"] is None


# ---------------------------------------------------------------------------------------
# the multi-key task and real-text filler


@pytest.mark.parametrize("length", [None, 700, 1500])
def test_multi_key_prompt_hides_every_key_and_asks_one(builder, length):
    trial = passkey.Trial(1500, 0.3, 1, 24680)
    needles, asked = passkey.multi_needles(trial, 4, seed=2)
    assert asked == 0 and needles[0][0] == 0.3 and needles[0][2] == 24680
    assert len({n for _, n, _ in needles}) == 4 and len({k for _, _, k in needles}) == 4
    assert needles == passkey.multi_needles(trial, 4, seed=2)[0]
    length = length or builder.min_length_multi(needles, asked)
    p = builder.build_multi(length, needles, asked)
    assert len(p.ids) == length and p.needles == 4 and p.key == 24680
    text = builder.text(p)
    lines = text.split(passkey.SEPARATOR)
    assert lines[0] == passkey.INTRO and len(lines) == 2 * 4 + 3
    needle_lines = [line for line in lines if line.startswith("The pass key of")]
    order = sorted(range(4), key=lambda i: needles[i][0])
    assert needle_lines == [passkey.MULTI_NEEDLE.format(name=needles[i][1], key=needles[i][2]) for i in order]
    name = needles[0][1]
    assert lines[-1] == passkey.MULTI_QUESTION.format(name=name) + " 24680"
    assert p.ids[p.needle_offset:p.needle_offset + p.needle_length] == builder.encode(
        passkey.MULTI_NEEDLE.format(name=name, key=24680))
    assert all(line for line in lines)  # every filler segment holds text
    if length == 1500:
        sentence = max(len(x) for x in builder.filler_next)
        assert abs(p.filler_before - 0.3 * p.filler_tokens) <= sentence
    with pytest.raises(ValueError, match="shorter than the prompt's fixed parts"):
        builder.build_multi(builder.min_length_multi(needles, asked) - 1, needles, asked)


def test_multi_key_errors(builder):
    trial = passkey.Trial(500, 0.5, 0, 11111)
    with pytest.raises(ValueError, match="keys must lie in"):
        passkey.multi_needles(trial, 1)
    with pytest.raises(ValueError, match="2 or more needles"):
        builder.build_multi(500, [(0.5, "Anna", 11111)], 0)


def test_text_filler_reads_on_across_the_needle(tokenizer):
    text = list(range(100, 400))  # token ids as filler text
    builder = passkey.PromptBuilder(tokenizer, filler_text=text)
    p = builder.build(260, 0.4, 13579, filler_offset=50)
    assert len(p.ids) == 260 and abs(p.filler_before - 0.4 * p.filler_tokens) <= 1
    sep = len(builder.separator)
    before = p.ids[len(builder.intro) + sep: p.needle_offset - sep]
    after_start = p.needle_offset + p.needle_length + sep
    after = p.ids[after_start: after_start + p.filler_tokens - p.filler_before]
    assert before + after == text[50: 50 + p.filler_tokens]  # one stretch of text, cut by the needle
    wrapped = builder.build(260, 0.5, 13579, filler_offset=290)  # reads past the end: wraps around
    assert len(wrapped.ids) == 260
    assert builder.describe()["filler"] == "text"
    with pytest.raises(ValueError, match="filler_text must hold at least 2 tokens"):
        passkey.PromptBuilder(tokenizer, filler_text=[1])


# ---------------------------------------------------------------------------------------
# showing a result


def test_table_and_heatmap_from_a_result(builder, tokenizer, tmp_path):
    result = passkey.evaluate(Stub(len(tokenizer)), builder, [256, 2048], [0.0, 0.5, 1.0], progress=False)
    result["trials"][0]["success"] = False  # as if one trial failed
    result.update(passkey.summarize(result["trials"], result["lengths"], result["depths"]))
    table = passkey.format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["length", "0.00", "0.50", "1.00", "all", "digits", "NLL", "true>random"]
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


def test_cli_multi_key_with_text_filler(checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tensorized_attention import corpus
    from tensorized_attention.corpus import Document

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    words = "the river runs under the old stone bridge and into the quiet town " * 60
    docs = [Document(f"s/{i}", "s", str(i), f"Document {i}. " + words) for i in range(12)]
    data = tmp_path / "corpus"
    corpus.build_corpus(docs, tokenizer, data, val_fraction=0.0, test_fraction=0.5)
    out = tmp_path / "multi"
    argv = ["passkey", "--model", str(checkpoint), "--attention", "full", "--lengths", "400", "--depths", "2",
            "--keys", "3", "--filler", "text", "--filler-data", str(data), "--device", "cpu", "--out", str(out),
            "--no-progress", "--no-plot"]
    assert main(argv) == 0
    result = json.loads((out / "passkey.json").read_text())
    assert result["task"] == "multi-key (3 keys)" and result["keys"] == 3 and result["filler_data"] == str(data)
    assert result["protocol"]["filler"] == "text" and len(result["trials"]) == 2
    assert all(r["nll_random"] is not None for r in result["trials"])
    assert "true>random" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--keys", "0"], "--keys must lie in \\[1, 16\\], got 0"),
    (["--filler", "text"], "--filler text reads its text from --filler-data"),
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


def _probe_ranking_script():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probe_ranking.py")
    spec = importlib.util.spec_from_file_location("probe_ranking", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_probe_ranking_block_scores():
    """The max score is the block's best q . k; the bound is never below it; the mean is
    q . mean(k)."""
    script = _probe_ranking_script()
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 4, 8)  # [Hkv, G, D], [Hkv, blocks, block, D]
    exact = torch.einsum("hgd,hnwd->hgnw", q, k).amax(-1)
    torch.testing.assert_close(script.block_scores(q, k, "max"), exact)
    assert (script.block_scores(q, k, "bound") >= exact - 1e-5).all()
    torch.testing.assert_close(script.block_scores(q, k, "mean"), torch.einsum("hgd,hnd->hgn", q, k.mean(2)))
    with pytest.raises(ValueError, match="kind must be one of"):
        script.block_scores(q, k, "median")


def test_probe_ranking_on_the_tiny_checkpoint(checkpoint, tmp_path):
    """benchmarks/probe_ranking.py: a row per prompt (5 depths), each score's share of the
    (layer, head)s that rank the asked needle's block in their top k, and a summary."""
    out = tmp_path / "probe.json"
    result = _probe_ranking_script().main(["--model", str(checkpoint), "--lengths", "1024", "--trials", "1",
                                           "--keys", "2", "--block", "64", "--topk", "2", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    rows = result["rows"]
    assert [r["depth"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    scored = [r for r in rows if "mean" in r]
    assert scored and all(0.0 <= r[kind] <= 1.0 for r in scored for kind in ("mean", "max", "bound"))
    assert result["summary"]["1024"]["prompts"] == len(scored)
