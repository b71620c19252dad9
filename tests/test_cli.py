"""The command line and the measurement utilities behind ``tensorized-attention bench``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest
import torch

from tensorized_attention import bench
from tensorized_attention.cli import main, parse_lengths

TINY = ["--lengths", "64,256", "--heads", "4", "--kv-heads", "2", "--headdim", "16",
        "--repeats", "2", "--min-time", "0", "--warmup", "1", "--device", "cpu", "--no-progress"]


def test_bench_writes_json_png_and_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tensorized ms" in printed and "SDPA ms" in printed
    assert str(out / "bench.json") in printed and str(out / "bench.png") in printed

    data = json.loads((out / "bench.json").read_text())
    assert data["command"].startswith("tensorized-attention bench --lengths 64,256")
    assert data["device"]["torch"] == torch.__version__
    assert data["device"]["cpu_count"] >= 1
    assert data["config"]["heads"] == 4 and data["config"]["kv_heads"] == 2
    rows = data["rows"]
    assert [r["N"] for r in rows] == [64, 256]
    for r in rows:
        assert r["fold"] == "x".join(map(str, r["shape"]))
        assert len(r["shape"]) == 2 and r["shape"][0] * r["shape"][1] >= r["N"]
        assert r["backend"] == "reference"
        for method in ("tensorized", "sdpa"):
            assert 0 < r[f"{method}_min_ms"] <= r[f"{method}_ms"] <= r[f"{method}_max_ms"]
            # at least the output: N * heads * headdim float32
            assert r[f"{method}_peak_bytes"] >= r["N"] * 4 * 16 * 4
        assert r["speedup"] == pytest.approx(r["sdpa_ms"] / r["tensorized_ms"])

    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_options_backward_gate_sinks_no_plot(tmp_path):
    out = tmp_path / "b"
    argv = ["bench", *TINY, "--lengths", "100", "--backward", "--gate", "0.5", "--sinks", "2",
            "--ndim", "3", "--no-plot", "--no-memory", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    (row,) = data["rows"]
    assert len(row["shape"]) == 3 and row["tensorized_ms"] > 0 and row["sdpa_ms"] > 0
    assert row["tensorized_peak_bytes"] is None
    assert data["config"]["backward"] is True and data["config"]["gate"] == 0.5
    assert not (out / "bench.png").exists()


def test_sdpa_skipped_past_its_budget_says_why():
    rows, info = bench.sweep([64, 4096], heads=2, kv_heads=1, headdim=8, device="cpu", repeats=1,
                             min_time_s=0, warmup=0, memory=False, sdpa_max_seconds=1e-9, progress=False)
    assert rows[0]["sdpa_ms"] is not None
    assert rows[1]["sdpa_ms"] is None and rows[1]["speedup"] is None
    assert rows[1]["sdpa_note"].startswith("skipped: predicted")
    table = bench.format_table(rows)
    assert "N=4096: sdpa: skipped" in table
    assert info["device"] == "cpu"


def test_peak_memory_of_a_known_allocation():
    def fn():
        x = torch.empty(100 * 2**20, dtype=torch.uint8)
        x.fill_(1)
        y = x[:1024].clone()  # 1 KiB more while x is alive
        del x
        return y

    peak = bench.peak_memory(fn, device="cpu")
    assert 100 * 2**20 <= peak <= 100 * 2**20 + 64 * 1024
    assert bench.peak_memory(lambda: None, device="cpu") == 0


def test_peak_memory_sees_temporaries_freed_before_return():
    def fn():
        for _ in range(3):
            torch.ones(2**20) * 2  # 4 MiB, then a 4 MiB product; both freed at once
        return None

    peak = bench.peak_memory(fn, device="cpu")
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_time_fn_reports_the_median():
    t = bench.time_fn(lambda: torch.ones(1000).sum(), warmup=1, repeats=5, device="cpu")
    assert t["repeats"] == 5 and len(t["times_ms"]) == 5
    assert t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    assert t["median_ms"] == sorted(t["times_ms"])[2]
    # quick calls are repeated until they add up to min_time_s (capped by max_repeats)
    t = bench.time_fn(lambda: None, warmup=0, repeats=2, min_time_s=10.0, max_repeats=50, device="cpu")
    assert t["repeats"] == 50 == len(t["times_ms"])
    t = bench.time_fn(lambda: time.sleep(0.01), warmup=0, repeats=2, min_time_s=0.05, device="cpu")
    assert 5 <= t["repeats"] <= 6


def test_parse_lengths():
    assert parse_lengths("1k,2048, 4k") == [1024, 2048, 4096]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_lengths("12x")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--lengths", "--kv-heads", "--backward", "--device", "--out", "--no-plot"):
        assert option in text


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "tpu"])
    assert e.value.code == 2
    assert main(["bench", "--heads", "6", "--kv-heads", "4", "--no-progress"]) == 2


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "tensorized_attention", "bench", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--lengths" in result.stdout
