"""The long-context study end to end on the CPU: a tiny corpus, the tiny model, one
configuration trained and evaluated by `tensorized-attention study` (train, perplexity on
the test split at two lengths, passkey), and the commands of every configuration."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tensorized_attention import corpus, hf, models, setups, study  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402
from tiny_model import TEXT, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    checkpoint = save_tiny_checkpoint(root / "model")
    _, tokenizer = models.load_model(checkpoint)
    docs = [corpus.Document(id=f"doc{i}", source="local", path=f"doc{i}.txt", text=TEXT[i * 7:] + TEXT[: i * 7])
            for i in range(6)]
    corpus.build_corpus(docs, tokenizer, root / "corpus", test_fraction=0.34, val_fraction=0.0,
                        long_tokens=10**9, progress=False)
    return root, checkpoint


def _args(root, checkpoint, **extra):
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    argv = ["--config", "pilot", "--data", str(root / "corpus"), "--model", str(checkpoint), "--context", "32",
            "--train-tokens", "256", "--batch", "2", "--eval-lengths", "16,32", "--eval-windows", "4",
            "--passkey-lengths", "256", "--depths", "2", "--trials", "1", "--device", "cpu",
            "--train-args", "--log-every 1 --save-every 2 --no-progress", "--out", str(root / "out"),
            "--work", str(root / "work")]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def test_every_configuration_has_its_commands(setup, tmp_path):
    root, checkpoint = setup
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    for name, config in study.ALL_CONFIGS.items():
        args = parser.parse_args(_args(root, checkpoint)[2:] + ["--config", name, "--work", str(tmp_path)])
        commands = study.study_commands(name, args)
        assert [c[0] for c in commands] == (["train"] if config.train else []) + ["perplexity", "passkey"]
        setup = setups.parse_attention(config.attention)  # every setup string parses, its options validate
        if setup.kind == "tensorized":
            hf.options_of(SimpleNamespace(tensorized_attention=setup.options))
        assert all(c[c.index("--attention") + 1] == config.attention for c in commands)
        evaluated = commands[-1][commands[-1].index("--model") + 1]
        assert evaluated == (str(tmp_path / name / "train" / "final") if config.train else str(checkpoint))
        assert "--score-last" not in commands[-2]
        if config.train:  # the configuration's own training options come before --train-args
            train, extra = commands[0], len(args.train_args)
            assert train[len(train) - extra - len(config.train_args):len(train) - extra] == list(config.train_args)
    assert study.ALL_CONFIGS["pilot-select"].train_args == study.RETRIEVAL_RECIPE
    args = parser.parse_args(_args(root, checkpoint)[2:] + ["--config", "pilot", "--eval-score-last", "1024"])
    perplexity = study.study_commands("pilot", args)[-2]
    assert perplexity[0] == "perplexity" and perplexity[perplexity.index("--score-last") + 1] == "1024"
    # --multikey K: the multi-key task, a passkey command of its own stage
    args = parser.parse_args(_args(root, checkpoint)[2:] + ["--config", "select", "--multikey", "4"])
    commands = study.study_commands("select", args)
    assert [study.stage_of(c) for c in commands] == ["perplexity", "passkey", "multikey"]
    assert commands[-1][0] == "passkey" and commands[-1][commands[-1].index("--keys") + 1] == "4"
    assert commands[-1][-1].endswith("multikey")


def test_study_trains_then_evaluates_the_trained_model(setup, capsys):
    root, checkpoint = setup
    assert main(["study", *_args(root, checkpoint)]) == 0
    out, final = root / "out" / "pilot", root / "work" / "pilot" / "train" / "final"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and (out / "train_log.jsonl").exists()
    assert not (out / "train").exists() and final.is_dir()  # checkpoints stay out of the results
    ppl = json.loads((out / "perplexity.json").read_text())
    assert ppl["model"] == str(final) and ppl["setup"]["kind"] == "tensorized"
    assert [r["context"] for r in ppl["results"]] == [16, 32]
    assert all(torch.isfinite(torch.tensor(r["mean_nll"])) for r in ppl["results"])
    passkey = json.loads((out / "passkey" / "passkey.json").read_text())
    assert passkey["model"] == str(final)
    # a second call finds the trained model and only evaluates it again
    printed = capsys.readouterr().out
    assert main(["study", *_args(root, checkpoint), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "$ tensorized-attention train" not in printed and "$ tensorized-attention perplexity" in printed


def test_study_stopped_before_its_budget_resumes_then_evaluates(setup, tmp_path, capsys):
    """A training cut by --stop-after (or --time-limit) evaluates nothing; the same command
    run again resumes it from its checkpoint and then evaluates the trained model."""
    root, checkpoint = setup
    argv = _args(root, checkpoint, out=tmp_path / "out", work=tmp_path / "work")
    first = argv + ["--train-args", "--log-every 1 --save-every 2 --no-progress --stop-after 2"]
    assert main(["study", *first]) == 0
    assert "run the same command again to resume" in capsys.readouterr().out
    out = tmp_path / "out" / "pilot"
    assert json.loads((out / "train_summary.json").read_text())["steps_done"] == 2
    assert not (out / "perplexity.json").exists() and not (tmp_path / "work" / "pilot" / "train" / "final").exists()
    assert main(["study", *argv, "--stages", "train"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert json.loads((out / "train_summary.json").read_text())["steps_done"] == 4
    assert not (out / "perplexity.json").exists()
    assert main(["study", *argv]) == 0
    assert "$ tensorized-attention train" not in capsys.readouterr().out
    assert (out / "perplexity.json").exists() and (out / "passkey" / "passkey.json").exists()
    with pytest.raises(SystemExit):
        main(["study", *argv, "--stages", "train,eval"])


def test_report_rebuilds_results_from_the_json(setup, tmp_path):
    """benchmarks/study_report.py renders what the study wrote (and 'not run' for the rest)."""
    import sys
    from pathlib import Path

    root, checkpoint = setup
    if not (root / "out" / "pilot" / "perplexity.json").exists():
        assert main(["study", *_args(root, checkpoint)]) == 0
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import study_report

    results = study_report.collect(str(root / "out"))
    text = study_report.render(results, str(tmp_path), plots=True)
    ppl = {r["context"]: r["perplexity"] for r in results["pilot"]["perplexity"]["results"]}
    assert any(line.startswith("| pilot |") and f"{ppl[16]:.2f}" in line and f"{ppl[32]:.2f}" in line
               for line in text.splitlines())  # the perplexity table's row
    assert "| base | not run" in text
    passkey = results["pilot"]["passkey"]["per_length"][0]
    assert f"{passkey['successes']}/{passkey['trials']}" in text
    if "(no plots" not in text:
        assert (tmp_path / "results_ppl.png").exists() and (tmp_path / "results_passkey_pilot.png").exists()


def test_retrieval_report_is_rebuilt_from_the_committed_json():
    """docs/retrieval_study.md is what benchmarks/retrieval_report.py renders from the
    committed results (no number typed by hand), and its targets follow from them."""
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    sys.path.insert(0, str(repo / "benchmarks"))
    import retrieval_report

    results = retrieval_report.collect(str(repo / "benchmarks/results/retrieval/study"),
                                       str(repo / "benchmarks/results/study"))
    text = retrieval_report.render(results)
    assert text == (repo / "docs/retrieval_study.md").read_text()
    rate = retrieval_report._rate(results["select-trained"], "passkey", 131072)
    met = "yes" if rate >= 0.9 and retrieval_report._rate(results["select-trained"], "passkey", 32768) >= 0.9 else "no"
    assert any(line.startswith("| select-trained: passkey >= 90% at 32k and 128k |") and line.endswith(f"| {met} |")
               for line in text.splitlines())


def test_multikey_failures_count_first_digits_of_other_needles():
    """retrieval_report.first_digit_failures: a failed trial counts as 'only the first digit
    wrong' when the other four digits match, and as another needle's when that first digit
    starts one of the other keys the trial hid."""
    import sys
    from pathlib import Path

    from tensorized_attention import passkey

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import retrieval_report

    trial = passkey.Trial(2048, 0.5, 0, 12345)
    needles, asked = passkey.multi_needles(trial, 4, 0)
    other = next(str(k).zfill(5)[0] for i, (_, _, k) in enumerate(needles) if i != asked and str(k).zfill(5)[0] != "1")
    absent = next(d for d in "0123456789" if d not in {str(k).zfill(5)[0] for _, _, k in needles})

    def row(predicted, success=False):
        return {"length": 2048, "depth": 0.5, "trial": 0, "key": 12345, "predicted": " " + predicted,
                "success": success}

    result = {"keys": 4, "seed": 0, "trials": [row("12345", True), row(other + "2345"), row(absent + "2345"),
                                               row("13345")]}
    assert retrieval_report.first_digit_failures(result) == (3, 2, 1)
