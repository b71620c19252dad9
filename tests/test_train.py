"""Continued pretraining (tensorized_attention.train) and ``tensorized-attention train``.

Everything runs on the tiny random Llama of tiny_model.py (2 layers, hidden 64, a 300-token
byte-level BPE), on CPU, with windows of 32 tokens: a step takes milliseconds. Torch runs
on one thread here: with two threads and another process busy on a two-core machine, a
64-wide matrix product waits for the second thread and is 500 times slower.
"""

from __future__ import annotations

import inspect
import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from tensorized_attention import hf, models  # noqa: E402
from tensorized_attention import train as T  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402
from tensorized_attention.corpus import Document, build_corpus  # noqa: E402
from tensorized_attention.setups import load_with_attention, parse_attention  # noqa: E402
from tiny_model import LINES, TEXT  # noqa: E402

TENSORIZED = 'tensorized:{"shape": [null, 8], "gate": [0.88, null], "sinks": 2}'
GATE = "model.layers.0.self_attn.tensorized_gate_logit"
LOG_FIELDS = {"kind", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib",
              "step_s", "elapsed_s", "gate"}
EVAL_FIELDS = {"kind", "step", "tokens", "eval_loss", "eval_windows", "eval_tokens", "seconds"}
SUMMARY_FIELDS = {"finished", "stopped_by", "model", "model_type", "attention", "setup", "options_resolved", "fold",
                  "max_position_embeddings", "data", "eval_data", "hyperparameters", "train_tokens", "steps",
                  "steps_done", "tokens_trained", "tokens_per_epoch", "epochs", "params", "flops", "peak_tflops",
                  "final_loss", "final_loss_mean", "final_losses", "final_eval_loss", "eval", "tokens_per_s", "mfu",
                  "peak_memory_gib", "load_s", "wall_time_s", "wall_time_total_s", "train_time_s", "resumed_from",
                  "checkpoints", "final_dir", "device", "versions", "command", "commands"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tokenizer):
    """The repetitive text (five lines, 32 times over) as a .npy token file."""
    ids = tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.asarray(ids, dtype=np.uint16))
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tokenizer):
    """A corpus of 12 documents (the lines in turn, each a few times) written by build_corpus."""
    docs = [Document(f"milton/{i}.txt", "milton", f"{i}.txt",
                     f"Book {i}\n" + "\n".join(LINES[i % 5:] + LINES[: i % 5]) * (2 + i % 3) + "\n")
            for i in range(12)]
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(docs, tokenizer, out, seed=0, val_fraction=0.3, test_fraction=0.0, long_tokens=10**6,
                 long_test_fraction=0.0, min_long_test=0)
    return out


def _argv(checkpoint, out, *extra, data=("--tokens",), steps=6):
    """``train`` on 32-token windows, batch 4 in micro-batches of 2, ``steps`` steps."""
    return ["train", "--model", str(checkpoint), *map(str, data), "--context", "32", "--batch", "4",
            "--micro-batch", "2", "--train-tokens", str(steps * 128), "--warmup", "2", "--lr", "3e-3",
            "--log-every", "2", "--save-every", "3", "--out", str(out), "--no-progress", *map(str, extra)]


def _log(out):
    return [json.loads(line) for line in (out / T.LOG_FILE).read_text().splitlines()]


def _summary(out):
    return json.loads((out / T.SUMMARY_FILE).read_text())


# ------------------------------------------------------------------------------ training


def test_loss_goes_down_log_summary_checkpoints(checkpoint, tokens, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(checkpoint, out, "--log-every", "5", "--save-every", "10", "--peak-tflops", "1e-6",
                      data=("--tokens", tokens), steps=30)) == 0
    printed = capsys.readouterr().out
    assert "-> 30 steps" in printed and "wrote" in printed

    log = _log(out)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    summary = _summary(out)
    for r in log:
        assert set(r) == LOG_FIELDS and r["kind"] == "train"
        assert r["tokens"] == r["step"] * 128 and r["peak_memory_gib"] is None  # no CUDA
        flops = summary["flops"]["flops_per_token"]
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e6, rel=1e-6)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]  # 5.4 -> 3.0 nats on the repeated lines
    assert log[-1]["lr"] == pytest.approx(0.1 * 3e-3)  # the cosine ends at --min-lr-ratio x --lr

    assert SUMMARY_FIELDS <= set(summary)
    assert summary["finished"] and summary["steps"] == summary["steps_done"] == 30
    assert summary["train_tokens"] == summary["tokens_trained"] == 3840
    assert summary["setup"] == parse_attention("full").describe()
    assert summary["data"]["kind"] == "tokens" and summary["data"]["tokens"] == len(np.load(tokens))
    hp = summary["hyperparameters"]
    assert (hp["context"], hp["batch"], hp["micro_batch"], hp["accumulation"]) == (32, 4, 2, 2)
    assert (hp["warmup_steps"], hp["precision"], hp["autocast_dtype"], hp["betas"]) == (2, "float32", None, [0.9, 0.95])
    assert summary["final_loss_mean"] == pytest.approx(log[-1]["loss"])
    assert summary["command"].startswith("tensorized-attention train --model")
    assert summary["checkpoints"] == ["checkpoint-20", "checkpoint-30"]  # --keep-checkpoints 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-20", "checkpoint-30", "final", T.LOG_FILE,
                                                     T.SUMMARY_FILE]
    state = torch.load(out / "checkpoint-30" / T.TRAINER_STATE, weights_only=True)
    assert state["step"] == 30 and state["optimizer"]["state"]

    # final/ loads with models.load_model: the last checkpoint's weights, a lower loss than before
    trained, _ = models.load_model(out / "final")
    before, _ = models.load_model(checkpoint)
    saved = load_file(out / "checkpoint-30" / "model.safetensors")
    assert all(torch.equal(p, saved[name]) for name, p in trained.named_parameters())
    ids = torch.from_numpy(np.load(tokens)[:65].astype(np.int64))[None]
    with torch.no_grad():
        assert T.sequence_loss(trained, ids) < T.sequence_loss(before, ids) - 1.0


@pytest.mark.parametrize("attention", ["full", TENSORIZED])
def test_resume_equals_uninterrupted(checkpoint, tokens, tmp_path, attention):
    """Stopped after 4 of 8 steps and resumed, a run ends with bitwise the weights of the
    run that went through: step k reads the windows of (seed, k) whichever call runs it,
    the checkpoint restores float32 weights and AdamW moments exactly (safetensors,
    torch.save), the learning rate is a function of the step, and CPU kernels with the
    same thread count give the same bits for the same inputs."""
    argv = ["--attention", attention]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(_argv(checkpoint, whole, *argv, data=("--tokens", tokens), steps=8)) == 0
    assert main(_argv(checkpoint, parts, *argv, "--stop-after", "4", data=("--tokens", tokens), steps=8)) == 0
    stopped = _summary(parts)
    assert not stopped["finished"] and stopped["stopped_by"] == "--stop-after 4"
    assert stopped["checkpoints"] == ["checkpoint-3", "checkpoint-4"] and not (parts / "final").exists()
    assert main(_argv(checkpoint, parts, *argv, "--resume", data=("--tokens", tokens), steps=8)) == 0

    a = load_file(whole / "final" / "model.safetensors")
    b = load_file(parts / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["loss"]) for r in _log(whole)] == [(r["step"], r["loss"]) for r in _log(parts)]
    summary = _summary(parts)
    assert summary["resumed_from"] == [{"checkpoint": "checkpoint-4", "step": 4}]
    assert len(summary["commands"]) == 2 and summary["commands"][1].endswith("--resume")
    assert summary["checkpoints"] == _summary(whole)["checkpoints"] == ["checkpoint-6", "checkpoint-8"]


def test_tensorized_gates_train_and_are_saved(checkpoint, tokens, tmp_path):
    out = tmp_path / "tensorized"
    assert main(_argv(checkpoint, out, "--attention", TENSORIZED, "--lr", "1e-2", "--gradient-checkpointing",
                      data=("--tokens", tokens))) == 0
    summary = _summary(out)
    assert summary["fold"] == [32, 8] and summary["options_resolved"]["sinks"] == 2
    assert summary["setup"]["attn_implementation"] == "tensorized"
    assert summary["hyperparameters"]["gradient_checkpointing"] is True

    init = math.log(0.88 / 0.12)
    saved = load_file(out / "final" / "model.safetensors")[GATE]
    assert saved.shape == (4, 2)
    assert (saved[:, 0] - init).abs().min() > 1e-3  # the coarse pass's gate learned, per head
    assert torch.equal(saved[:, 1], torch.zeros(4))  # the contiguous pass has none: no gradient, no decay
    assert torch.equal(load_file(out / "checkpoint-6" / "model.safetensors")[GATE], saved)
    logged = [r["gate"] for r in _log(out) if r["kind"] == "train"]  # the mean over layers and heads
    every_layer = torch.stack([x for name, x in load_file(out / "final" / "model.safetensors").items()
                               if name.endswith("tensorized_gate_logit")])
    assert logged[-1][1] is None
    assert logged[-1][0] == pytest.approx(torch.sigmoid(every_layer[..., 0]).mean().item(), abs=1e-4)
    # both loaders give the trained gates back
    model = hf.from_pretrained(out / "final")
    assert torch.equal(dict(model.named_parameters())[GATE].detach(), saved)
    model, _ = load_with_attention(out / "final", parse_attention(TENSORIZED))
    assert torch.equal(dict(model.named_parameters())[GATE].detach(), saved)


def test_new_lr_is_the_learning_rate_of_the_gate_logits(checkpoint):
    """--new-lr: the parameters tensorized attention adds (the gate logits) get their own
    peak learning rate, as a share of the schedule's; the pretrained weights keep --lr."""
    model, _ = load_with_attention(checkpoint, parse_attention("tensorized:pilot"))
    gates = {id(p) for name, p in model.named_parameters() if name.endswith(hf.attention.GATE_PARAM)}
    assert gates
    same = T.make_optimizer(model, lr=1e-4, weight_decay=0.1)
    assert all(g["lr_scale"] == 1.0 for g in same.param_groups)
    split = T.make_optimizer(model, lr=1e-4, weight_decay=0.1, new_lr=1e-2)
    new = [g for g in split.param_groups if any(id(p) in gates for p in g["params"])]
    assert len(new) == 1 and {id(p) for p in new[0]["params"]} == gates
    assert new[0]["lr_scale"] == pytest.approx(100.0) and new[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in split.param_groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(T.TrainError, match="--new-lr must be > 0"):
        T.TrainConfig(context=32, batch=4, train_tokens=1000, new_lr=0.0).check()


def test_retrieval_rows_are_seeded_prompts_over_the_rows_own_text(tokenizer):
    """--retrieval-share: a share of the rows over the run (every 2nd for 0.5, every 4th for
    0.25, whatever the batch) become passkey / multi-key prompts of the same length, filled
    with the row's own text, seeded by (seed, step, row)."""
    from tensorized_attention import passkey

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (4, 900), generator=g)
    out, answers = T.retrieval_rows(ids, 0.5, tokenizer, seed=1, step=7)
    assert out.shape == ids.shape and torch.equal(out[0::2], ids[0::2]) and not torch.equal(out[1::2], ids[1::2])
    for row in (1, 3):
        text = tokenizer.decode(out[row].tolist())
        assert passkey.INTRO in text and "pass key" in text
        kept = set(ids[row].tolist())  # the filler is the row's own text
        assert sum(t in kept for t in out[row].tolist()) > 0.5 * out.shape[1]
        # its keys are even: the evaluation's are odd, so no evaluation key is trained on
        keys = [int(x) for x in re.findall(r"pass key (?:of \w+ )?is (\d{5})", text)]
        assert keys and all(key % 2 == 0 for key in keys)
        # the answer it reports: the key asked for, at the prompt's end
        (offset, length), = [(o, n) for r, o, n in answers if r == row]
        assert offset + length == out.shape[1] and tokenizer.decode(out[row, offset:].tolist()).strip() in map(str, keys)
    assert [r for r, _, _ in answers] == [1, 3]
    assert torch.equal(out, T.retrieval_rows(ids, 0.5, tokenizer, seed=1, step=7)[0])
    assert not torch.equal(out, T.retrieval_rows(ids, 0.5, tokenizer, seed=1, step=9)[0])
    assert torch.equal(T.retrieval_rows(ids, 0.0, tokenizer, seed=1, step=7)[0], ids)
    # a quarter of the rows over the run with a batch of 2: one row every other step
    pair = ids[:2, :300]
    changed = [int(not torch.equal(T.retrieval_rows(pair, 0.25, tokenizer, seed=1, step=s)[0][r], pair[r]))
               for s in range(4) for r in range(2)]
    assert changed == [0, 0, 0, 1, 0, 0, 0, 1]


def test_answer_weight_weights_the_answer_tokens_of_synthetic_rows(checkpoint):
    """--answer-weight: the loss is the weighted mean over predicted tokens, the answer
    tokens of the synthetic rows counting w times; 1 is the plain mean."""
    model, _ = models.load_model(checkpoint)
    ids = torch.randint(3, 250, (2, 41), generator=torch.Generator().manual_seed(3))
    answers = [(1, 30, 6)]  # row 1's tokens 30..35, predicted at positions 29..34
    weights = T.answer_weights(answers, ids, 50.0)
    assert weights.shape == (2, 40) and weights.sum() == 80 + 6 * 49
    assert (weights[1, 29:35] == 50).all() and weights[1, 28] == weights[1, 35] == weights[0].max() == 1
    assert T.answer_weights(answers, ids, 1.0) is None and T.answer_weights([], ids, 50.0) is None
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.float()
        each = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="none").reshape(2, 40)
        torch.testing.assert_close(T.sequence_loss(model, ids, weights=weights), (each * weights).sum() / weights.sum())
        torch.testing.assert_close(T.sequence_loss(model, ids), each.mean())
    with pytest.raises(T.TrainError, match="--answer-weight must be >= 1, and other than 1 only with --retrieval"):
        T.TrainConfig(context=32, batch=4, train_tokens=1000, answer_weight=10.0).check()
    with pytest.raises(T.TrainError, match="--answer-weight must be >= 1"):
        T.TrainConfig(context=32, batch=4, train_tokens=1000, retrieval_share=0.25, answer_weight=0.5).check()


def test_retrieval_share_needs_room_for_the_prompt(checkpoint, tokens, tmp_path, capsys):
    assert main(_argv(checkpoint, tmp_path / "out", "--retrieval-share", "0.5", data=("--tokens", tokens))) == 2
    assert "--retrieval-share needs --context >= " in capsys.readouterr().err
    assert main(_argv(checkpoint, tmp_path / "out", "--retrieval-share", "1.5", data=("--tokens", tokens))) == 2
    assert "--retrieval-share must lie in [0, 1)" in capsys.readouterr().err


def test_window_trains_with_its_gate_fixed(checkpoint, tokens, tmp_path):
    """Also under torch.autocast (bfloat16 compute, float32 weights), where the rotation gives
    float32 q and k beside a bfloat16 v: the attention runs in the autocast dtype, as SDPA."""
    out = tmp_path / "window"
    assert main(_argv(checkpoint, out, "--attention", "window:8+2", "--dtype", "bf16-autocast",
                      data=("--tokens", tokens))) == 0
    summary = _summary(out)
    hp = summary["hyperparameters"]
    assert (hp["precision"], hp["weights_dtype"], hp["autocast_dtype"]) == ("bf16-autocast", "float32", "bfloat16")
    assert summary["options_resolved"]["gate"] == [1.0, None] and summary["fold"] == [32, 8]
    assert math.isfinite(summary["final_loss"])
    final = load_file(out / "final" / "model.safetensors")
    first = load_file(checkpoint / "model.safetensors")
    assert torch.equal(final[GATE], torch.zeros(4, 2))  # the coarse pass is off: gate exactly 1, untouched
    assert not torch.equal(final["model.layers.0.self_attn.q_proj.weight"], first["model.layers.0.self_attn.q_proj.weight"])
    # the window reads min(8, p + 1) keys and the sinks outside it; the coarse pass is not counted
    keys = np.minimum(8, np.arange(32) + 1) + np.array([sum(p - j >= 8 for j in range(2)) for p in range(32)])
    assert summary["flops"]["mean_keys_per_query"] == pytest.approx(keys.mean())


def test_corpus_data_separator_and_eval(checkpoint, corpus_dir, tmp_path, tokenizer):
    from tensorized_attention.corpus import load_split

    out = tmp_path / "corpus-run"
    assert main(_argv(checkpoint, out, "--eval-every", "3", "--eval-windows", "3", data=("--data", corpus_dir))) == 0
    summary = _summary(out)
    split = load_split(corpus_dir, "train")
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert summary["data"]["kind"] == "corpus" and summary["data"]["documents"] == len(split) > 1
    assert summary["data"]["separator"] == {"id": sep, "token": "<|endoftext|>"}
    assert summary["data"]["stream_tokens"] == len(split.tokens) + len(split) - 1
    assert summary["eval_data"]["split"] == "validation"
    evals = [r for r in _log(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6] and all(set(r) == EVAL_FIELDS for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and summary["final_eval_loss"] == evals[-1]["eval_loss"]

    stream = T.corpus_stream(corpus_dir, "train", sep)
    expected = np.concatenate([x for i in range(len(split)) for x in ([split[i]] if i == 0 else [[sep], split[i]])])
    assert np.array_equal(stream.tokens, expected)


def test_time_limit_stops_with_a_checkpoint_bfloat16(checkpoint, tokens, tmp_path):
    out = tmp_path / "limited"
    assert main(_argv(checkpoint, out, "--time-limit", "1e-6", "--dtype", "bfloat16", data=("--tokens", tokens))) == 0
    summary = _summary(out)
    assert summary["stopped_by"] == "--time-limit 1e-06 s" and summary["steps_done"] == 1
    assert [p.name for _, p in T.checkpoints(out)] == ["checkpoint-1"]
    assert summary["hyperparameters"]["weights_dtype"] == "bfloat16"
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16


# --------------------------------------------------------------------------------- FLOPs


def test_attention_keys_match_cached_decoding(checkpoint):
    """The keys per query of attention_keys are those cached decoding reads, token by token."""
    options = '{"shape": [null, 8], "gate": [0.5, null], "sinks": 3, "mode": "%s"}'
    for mode in ("complete", "block"):
        model, _ = load_with_attention(checkpoint, parse_attention("tensorized:" + options % mode))
        T_ = 40
        ids = torch.randint(0, 300, (1, T_))
        cache = DynamicCache(config=model.config)
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            for p in range(T_):
                model(input_ids=ids[:, p: p + 1], use_cache=True, **{key: cache})
        read = hf.decode_state(cache, 0).keys_read  # positions 1 .. T-1; position 0 reads 1 key per pass
        assert T.attention_keys(model, T_) == [pytest.approx((2 + sum(read)) / T_)] * 2

    full, _ = load_with_attention(checkpoint, parse_attention("full"))
    assert T.attention_keys(full, 32) == [16.5, 16.5]
    flops = T.flops_per_token(full, 32)
    embed = full.get_input_embeddings().weight.numel()
    assert flops["matmul_params"] == sum(p.numel() for p in full.parameters()) - embed  # the head is untied here
    assert flops["flops_per_token"] == 6 * flops["matmul_params"] + 6 * 2 * 4 * 16 * 33


# -------------------------------------------------------------------------------- errors


def test_errors_exit_2_and_say_what_is_allowed(checkpoint, tokens, corpus_dir, tmp_path, capsys):
    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "tensorized-attention train: error:" in err and message in err, err

    out = tmp_path / "out"
    plain = tmp_path / "plain"
    plain.mkdir()
    fails(_argv(checkpoint, out, data=("--data", tmp_path / "nowhere")), "no such directory")
    fails(_argv(checkpoint, out, data=("--data", plain)), "is not a corpus (no manifest.json)")
    fails(_argv(checkpoint, out, data=("--tokens", tmp_path / "none.npy")), "no such file")
    fails(_argv(checkpoint, out, "--context", "8k", "--train-tokens", "1M", data=("--tokens", tokens)), "fewer than one window of --context + 1")
    fails(_argv(checkpoint, out, "--train-tokens", "100", data=("--tokens", tokens)),
          "smaller than one step, --batch x --context = 4 x 32 = 128 tokens")
    fails(_argv(checkpoint, out, "--micro-batch", "3", data=("--tokens", tokens)), "must divide --batch (4)")
    fails(_argv(checkpoint, out, "--resume", data=("--tokens", tokens)), "--resume: ")
    fails(_argv(checkpoint, out, "--attention", "flash", data=("--tokens", tokens)), "unknown attention kind 'flash'")
    fails(_argv(checkpoint, out, "--attention", "window:0", data=("--tokens", tokens)), "W >= 1")
    fails(_argv(checkpoint, out, "--eval-every", "2", data=("--tokens", tokens)), "--eval-every needs validation data")
    fails(_argv(checkpoint, out, "--warmup", "2.5", data=("--tokens", tokens)), "must be whole")
    fails(_argv(checkpoint, out, "--separator", "<nope>", data=("--data", corpus_dir)), "is not a token")
    big = tmp_path / "big.npy"
    np.save(big, np.arange(1000, dtype=np.uint16))
    fails(_argv(checkpoint, out, data=("--tokens", big)), "token ids must lie in [0, 300)")
    with pytest.raises(SystemExit) as e:  # neither --data nor --tokens: argparse says which are allowed
        main(["train", "--model", str(checkpoint), "--train-tokens", "1k", "--out", str(out)])
    assert e.value.code == 2 and "one of the arguments --data --tokens is required" in capsys.readouterr().err

    # a finished run: its --out is not trained into again, and resumed only with its own settings
    assert main(_argv(checkpoint, out, data=("--tokens", tokens), steps=1)) == 0
    capsys.readouterr()
    fails(_argv(checkpoint, out, data=("--tokens", tokens), steps=1), "already holds checkpoints")
    fails(_argv(checkpoint, out, "--resume", "--lr", "1e-3", data=("--tokens", tokens), steps=1),
          "lr: 0.003 in the checkpoint, 0.001 now")
