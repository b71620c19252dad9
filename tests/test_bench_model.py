"""The end-to-end benchmark (``bench model``) on the CPU: a tiny Llama, tiny lengths, the
reference backend; the measurement loop, the JSON record, the tables, and failures kept per row."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from tensorized_attention import bench_model as bm  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402

TINY = bm.ModelSpec("tiny", dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=300, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise_value_error(module, query, key, value, attention_mask, **kwargs):
    raise ValueError("this kernel refuses the shapes")


def _raise_oom(module, query, key, value, attention_mask, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")


def _missing_peer():
    import tensorized_attention_no_such_peer  # noqa: F401


SYSTEMS = {
    **bm.SYSTEMS,
    "fails": bm.System("fails", "test_fails", "raises at every call",
                       prepare=lambda: bm._register("test_fails", _raise_value_error)),
    "ooms": bm.System("ooms", "test_ooms", "runs out of memory",
                      prepare=lambda: bm._register("test_ooms", _raise_oom)),
    "absent": bm.System("absent", "absent", "a peer that is not installed", prepare=_missing_peer),
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_model") / "model.json"
    tasks = [
        bm.Task(TINY, "prefill", (32, 64), ("tensorized", "sdpa", "fails", "ooms", "absent")),
        bm.Task(TINY, "train", (64,), ("tensorized", "sdpa")),
        bm.Task(TINY, "decode", (256,), ("tensorized", "sdpa"), decode_tokens=3),  # N = the capacity
        bm.Task(TINY, "prefill", (32,), ("sdpa",), layers=1),
    ]
    out = bm.run_plan(tasks, device="cpu", repeats=2, budget_s=5.0, out_path=str(path), command="test",
                      systems=SYSTEMS, progress=False)
    return out, path


def _row(result, measurement, N, system, layers=2):
    rows = [r for r in result["rows"] if r["measurement"] == measurement and r["N"] == N and r["system"] == system
            and r["layers_measured"] == layers]
    assert len(rows) == 1, rows
    return rows[0]


def test_json_record(result):
    out, path = result
    data = json.loads(path.read_text())
    assert data["schema"] == bm.SCHEMA and data["command"] == "test"
    assert data["device"]["device"] == "cpu" and data["device"]["torch"] == torch.__version__
    assert "transformers" in data["device"] and data["device"]["name"]
    assert data["config"]["optimizer_in_train_step"] is False and data["config"]["dtype"] == "float32"
    # noop first in every task, one row per task x length x system
    assert [t["systems"][0] for t in data["tasks"]] == ["noop"] * 4
    assert len(data["rows"]) == 2 * 6 + 3 + 3 + 2
    for row in data["rows"]:
        assert {"model", "measurement", "N", "batch", "system", "status", "error", "ms", "ms_model", "peak_gib",
                "layers_measured", "layers_model"} <= set(row)
        assert row["status"] in ("ok", "oom", "error", "skipped", "unavailable")
        assert (row["status"] == "ok") == (row["ms"] is not None)


def test_measurements_and_attention_share(result):
    out, _ = result
    for measurement, N in (("prefill", 32), ("prefill", 64), ("train", 64), ("decode", 256)):
        noop = _row(out, measurement, N, "noop")
        assert noop["status"] == "ok" and noop["ms"] > 0 and "attention_share" not in noop
        for system in ("tensorized", "sdpa"):
            r = _row(out, measurement, N, system)
            assert r["status"] == "ok", r
            assert r["repeats"] >= 1 and r["ms"] == pytest.approx(sorted(r["times_ms"])[len(r["times_ms"]) // 2],
                                                                   rel=0.5)
            assert r["attention_ms"] == pytest.approx(r["ms"] - noop["ms"])
            assert 0.0 <= r["attention_share"] <= 1.0
            assert r["ms_model"] == r["ms"]  # the whole model measured


def test_layers_scaled(result):
    out, _ = result
    r = _row(out, "prefill", 32, "sdpa", layers=1)
    assert r["layers_model"] == 2 and r["ms_model"] == pytest.approx(2 * r["ms"])


def test_decode_cache_bytes(result):
    out, _ = result
    full = 2 * 2 * 2 * 16 * 4  # layers x kv heads x head dim x float32, keys and values
    sdpa = _row(out, "decode", 256, "sdpa")
    assert sdpa["full_cache_bytes_per_token"] == full
    assert sdpa["cache_bytes_per_token"] == pytest.approx(full) and sdpa["cache_ratio_to_full"] == pytest.approx(1.0)
    ten = _row(out, "decode", 256, "tensorized")
    # keys and values plus the ring buffers of the coarse pass (256 positions x 4 heads x 16 per layer)
    assert ten["cache_bytes"] == 256 * full + 2 * 256 * 4 * 16 * 4 + 2 * 4 * 4 * 16 * 4
    assert ten["tokens_per_s"] > 0 and ten["prefill_ms"] > 0


def test_failures_are_recorded_and_the_run_goes_on(result):
    out, _ = result
    fails = _row(out, "prefill", 32, "fails")
    assert fails["status"] == "error" and "refuses the shapes" in fails["error"]
    assert _row(out, "prefill", 64, "fails")["status"] == "error"  # tried again at the next length
    assert _row(out, "prefill", 32, "ooms")["status"] == "oom"
    later = _row(out, "prefill", 64, "ooms")
    assert later["status"] == "skipped" and "out of memory at a shorter length" in later["error"]
    absent = _row(out, "prefill", 32, "absent")
    assert absent["status"] == "unavailable" and "No module named" in absent["error"]
    assert out["systems"]["absent"]["error"].startswith("not available")
    assert out["systems"]["tensorized"]["error"] is None


def test_markdown_table_and_summary(result):
    out, _ = result
    text = bm.format_markdown(out)
    assert "### tiny, prefill, batch 1" in text and "### tiny, prefill, batch 1 (1 of 2 layers measured, times x 2)" in text
    assert "| N | noop | tensorized | sdpa | fails | ooms | absent | fastest |" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| 32 | ") and "fails" not in ln and "OOM" in ln)
    assert "error" in line and "n/a" in line and line.rstrip(" |").split("**")[1] in ("tensorized", "sdpa")
    assert "cache B/token" in text and "Not measured:" in text and "refuses the shapes" in text
    lines = bm.summary(out)
    assert any(ln.startswith("tiny decode b1 N=256: tensorized") and "B/token" in ln for ln in lines)


def test_plot_and_report_script(result, tmp_path):
    pytest.importorskip("matplotlib")
    out, path = result
    png = bm.plot(out, tmp_path / "model.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    spec = importlib.util.spec_from_file_location("model_report", os.path.join(ROOT, "benchmarks", "model_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    doc = tmp_path / "doc.md"
    doc.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    assert report.main([str(path), str(path), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "### tiny, train, batch 1" in text and text.endswith("after\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    assert report.main([str(bad)]) == 2


def test_noop_attention_keeps_the_graph():
    q = torch.randn(1, 4, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, requires_grad=True)
    v = torch.randn(1, 2, 8, 16, requires_grad=True)
    out, _ = bm.noop_attention(None, q, k, v, None)
    assert out.shape == (1, 8, 4, 16) and not out.any()
    out.sum().backward()
    assert all(x.grad is not None for x in (q, k, v))


def test_chunked_loss_matches_the_plain_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 10))
    loss = bm.chunked_lm_loss(hidden, head, labels, chunk=3)
    plain = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    loss.backward()
    g = hidden.grad.clone()
    hidden.grad = None
    plain.backward()
    assert torch.allclose(g, hidden.grad, atol=1e-6)


def test_plans():
    quick = bm.quick_plan()
    first = quick[0]
    assert (first.model.name, first.measurement, first.layers, first.lengths) == (
        "llama3-8b", "prefill", 1, (32768, 131072, 524288))
    assert {"tensorized", "sdpa-flash"} <= set(first.systems)
    assert any(t.measurement == "train" and t.model.name == "llama3.2-1b" and t.lengths == (131072,) for t in quick)
    assert any(t.measurement == "decode" and t.lengths == (131072,) and t.batch == 1 for t in quick)
    full = bm.full_plan()
    assert len(full) == 9 and {t.model.name for t in full} == set(bm.MODELS)
    assert all("flex-window" not in t.systems for t in full if t.measurement == "decode")
    spec = bm.MODELS["llama3-8b"]
    assert spec.full_cache_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    assert bm.MODELS["smollm2-135m"].head_dim() == 64


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown measurement"):
        bm.Task(TINY, "generate", (32,), ("sdpa",))
    with pytest.raises(ValueError, match="layers must lie in 1..2"):
        bm.Task(TINY, "prefill", (32,), ("sdpa",), layers=3)
    with pytest.raises(ValueError, match="lengths must be >= 2"):
        bm.Task(TINY, "prefill", (), ("sdpa",))
    with pytest.raises(ValueError, match="unknown systems"):
        bm.run_plan([bm.Task(TINY, "prefill", (32,), ("nope",))], device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        bm.full_plan(models=["gpt5"])


def test_cli_bench_model(tmp_path, capsys):
    assert main(["bench", "model", "--models", "gpt5", "--out", str(tmp_path)]) == 2
    assert "unknown ['gpt5']" in capsys.readouterr().err
    assert main(["bench", "model", "--layers", "two", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "model", "--help"])
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("measurement", ["prefill", "decode"])
def test_profile_model_script(tmp_path, measurement):
    """benchmarks/profile_model.py on the CPU: the rows of a profiled step, the Python
    functions among them with --python."""
    spec = importlib.util.spec_from_file_location("profile_model", os.path.join(ROOT, "benchmarks", "profile_model.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "prof.json"
    script.main(["--model", "smollm2-135m", "--layers", "1", "--seqlen", "64", "--measurement", measurement,
                 "--device", "cpu", "--steps", "1", "--python", "--out", str(out)])
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert data["wall_ms"] > 0 and "aten::mm" in names
    assert any("tensorized_attention" in n for n in names)  # a Python function of the package, by --python


def test_profile_model_script_cprofile(tmp_path):
    """benchmarks/profile_model.py --cprofile on the CPU: the wall time of a decoding step
    without a profiler, and the Python functions of the package by host time."""
    spec = importlib.util.spec_from_file_location("profile_model", os.path.join(ROOT, "benchmarks", "profile_model.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cprofile.json"
    result = script.main(["--model", "smollm2-135m", "--layers", "1", "--seqlen", "64", "--measurement", "decode",
                          "--device", "cpu", "--steps", "2", "--cprofile", "--out", str(out)])
    assert result["wall_ms"] > 0 and "tensorized_attention" in result["cprofile"]
    assert json.loads(out.read_text())["wall_ms"] == result["wall_ms"]
