"""Sequence parallelism (tensorized_attention.distributed) on the CPU with gloo: 2 and 4
spawned processes, each running every case of its group (one spawn per group).

Each case compares this rank's slice of the output and of the gradients of q, k, v (and
the gate's gradient summed over the ranks) with the single-process tensorized_attn on the
whole sequence; the bytes each rank sends through the collectives with the plan's
prediction; and ranks that disagree must all raise the same clear error.
"""

from __future__ import annotations

import multiprocessing
import queue

import pytest
import torch

from distributed_worker import Case, compare, count_bytes, disagree, run_group
from tensorized_attention.distributed import plan_sequence_parallel

TIMEOUT_S = 120  # a group that hangs fails the tests instead of blocking them

F64 = torch.float64
CASES = {
    2: [
        # complete, the slice boundary cuts windows of both dims; unequal slices (halos)
        Case((8, 4), 30, (17, 13)),
        # gate per head, sinks, rotary positions given rotated, reversed order, GQA
        Case((4, 4, 4), 50, gate="heads", sinks=2, positions="rotated", order=(2, 1, 0)),
        # block causal: fibers of dim 1 stay inside the slices, those of dim 0 do not
        Case((6, 5), 30, mode="block"),
        # block bidirectional, slices cutting the fibers of both dims, sinks and a shared gate
        Case((5, 6), 28, (13, 15), mode="block", causal=False, sinks=3, gate="shared"),
        # block bidirectional, slices that cut no fiber of dim 1
        Case((4, 8), 32, mode="block", causal=False),
        # float32
        Case((4, 8), 29, mode="complete", gate="heads", sinks=1, dtype=torch.float32),
    ],
    4: [
        Case((8, 4), 30),
        Case((4, 4, 4), 61, gate="heads", sinks=1, positions="plain", heads=6, kv_heads=3),
        Case((3, 4, 5), 57, (20, 10, 17, 10), mode="block", gate="heads"),
        Case((5, 6), 28, mode="block", causal=False, sinks=2),
        Case((4, 4, 4), 50, gate="shared", order=(2, 0, 1), sinks=2, positions="rotated", dtype=torch.float32),
    ],
}
BYTES = {2: [CASES[2][0], CASES[2][2], CASES[2][3]], 4: [CASES[4][0], CASES[4][2], CASES[4][3],
                                                         Case((4, 4, 4), 50, order=(2, 1, 0))]}
DISAGREEMENTS = ("shape", "dtype", "fold", "input", "select")


def _spawn(world: int, jobs, tmp_path) -> dict:
    """Run ``jobs`` on ``world`` spawned ranks; {(rank, name): result}. Fails on a timeout."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / 'init'}"
    procs = [ctx.Process(target=run_group, args=(r, world, init, jobs, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world * len(jobs)):
            rank, name, result = results.get(timeout=TIMEOUT_S)
            out[(rank, name)] = result
    except queue.Empty:
        pytest.fail(f"{world} ranks: no result within {TIMEOUT_S} s (a hang); got {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def group_results(request, tmp_path_factory):
    world = request.param
    jobs = [(str(c), compare, (c,)) for c in CASES[world]]
    jobs += [("bytes " + str(c), count_bytes, (c,)) for c in BYTES[world]]
    if world == 2:
        jobs += [("disagree " + w, disagree, (w,)) for w in DISAGREEMENTS]
    return world, _spawn(world, jobs, tmp_path_factory.mktemp(f"dist{world}"))


def _result(results, rank, name):
    result = results[(rank, name)]
    if isinstance(result, str):
        pytest.fail(f"rank {rank}, {name}: {result}")
    return result


def test_matches_single_process(group_results):
    world, results = group_results
    kinds = set()
    for case in CASES[world]:
        tol = 1e-12 if case.dtype == F64 else 2e-5
        for rank in range(world):
            r = _result(results, rank, str(case))
            kinds.update(r["kinds"])
            for key in ("out", "dq", "dk", "dv", "dgate"):
                if key in r:
                    assert r[key] <= tol * max(1.0, r["scale"]), (world, rank, str(case), key, r)
    assert kinds == {"local", "halo", "all_to_all"} or world == 4 and kinds >= {"halo", "all_to_all"}


def test_gate_gradient_is_a_share(group_results):
    """Each rank's gate gradient is its own part, not the whole (the sum over ranks is the
    whole: test_matches_single_process)."""
    world, results = group_results
    gated = [c for c in CASES[world] if c.gate is not None]
    assert gated
    for case in gated:
        assert any(_result(results, r, str(case))["dgate_share"] > 1e-6 for r in range(world))


def test_bytes_sent_match_plan(group_results):
    world, results = group_results
    for case in BYTES[world]:
        total = 0
        for rank in range(world):
            r = _result(results, rank, "bytes " + str(case))
            assert r["forward"] == r["plan_send"], (world, rank, str(case), r)
            assert r["backward"] == r["plan_recv"], (world, rank, str(case), r)
            total += r["forward"]
        assert total > 0


def test_disagreeing_ranks_all_raise(group_results):
    world, results = group_results
    if world != 2:
        pytest.skip("run in the 2-rank group")
    expected = {"shape": ("ValueError", "disagree on shape"), "dtype": ("ValueError", "disagree on dtype"),
                "fold": ("ValueError", "disagree on shape"), "input": ("ValueError", "rank 1: q must be 4-D"),
                "select": ("NotImplementedError", "no select or relay")}
    for what, (kind, text) in expected.items():
        messages = {results[(r, "disagree " + what)] for r in range(world)}
        assert len(messages) == 1, messages  # the same error on every rank
        (message,) = messages
        assert message.startswith(kind) and text in message, message


# ----------------------------------------------------------------------------- the plan alone


def test_plan_worked_example():
    """docs/distributed.md: 4096 x 256 at 2^20 tokens on 2 ranks, bf16, 32 heads, 8 kv heads."""
    plan = plan_sequence_parallel((4096, 256), 1 << 20, 2, heads=32, kv_heads=8, headdim=128, dtype_bytes=2)
    assert [(e.dim, e.stride, e.kind) for e in plan] == [(0, 256, "halo"), (1, 1, "halo")]
    assert plan[0].halo == (0, 524288) and plan[0].send_bytes == (2 ** 31, 0)
    assert plan[1].halo == (0, 255) and plan[1].send_bytes == (255 * 40 * 128 * 2, 0)
    block = plan_sequence_parallel((4096, 256), 1 << 20, 2, mode="block", causal=False, heads=32, kv_heads=8,
                                   headdim=128, dtype_bytes=2)
    assert [e.kind for e in block] == ["all_to_all", "local"]
    per_rank = (1 << 20) // 4 * ((32 + 8 + 8) + 32) * 128 * 2  # half of each slice there, and its outputs back
    assert block[0].send_bytes == (per_rank, per_rank) and block[0].layout == "residues"


def test_plan_max_halo_regroups_a_pass_whose_halo_is_too_long():
    """The coarse pass's halo at 1M on 2 ranks is rank 0's whole slice: with max_halo=0.25 it
    regroups instead (rank 1 no longer computes rank 0's queries), the fine pass keeps its
    255-position halo."""
    kw = dict(heads=32, kv_heads=8, headdim=128, dtype_bytes=2)
    plan = plan_sequence_parallel((4096, 256), 1 << 20, 2, max_halo=0.25, **kw)
    assert [e.kind for e in plan] == ["all_to_all", "halo"] and plan[0].layout == "residues"
    # half of each slice (the other rank's residues) there with q, k, v, and its outputs back
    assert plan[0].send_bytes == ((1 << 20) // 4 * ((32 + 8 + 8) + 32) * 128 * 2,) * 2
    assert plan_sequence_parallel((4096, 256), 1 << 20, 2, max_halo=1.0, **kw)[0].kind == "halo"
    for bad in (-1, "0.5", True):
        with pytest.raises(ValueError, match="max_halo must be None or a number >= 0"):
            plan_sequence_parallel((4096, 256), 1 << 20, 2, max_halo=bad, **kw)


def test_plan_rejects_bad_input():
    kw = dict(heads=4, kv_heads=2, headdim=8, dtype_bytes=2)
    with pytest.raises(ValueError, match="lengths must be 2 ints"):
        plan_sequence_parallel((4, 4), 16, 2, lengths=[10, 5], **kw)
    with pytest.raises(ValueError, match="kv_heads"):
        plan_sequence_parallel((4, 4), 16, 2, heads=4, kv_heads=3, headdim=8, dtype_bytes=2)
    with pytest.raises(ValueError, match="causal only"):
        plan_sequence_parallel((4, 4), 16, 2, mode="complete", causal=False, **kw)
    with pytest.raises(ValueError, match="fewer than"):
        plan_sequence_parallel((2, 4), 16, 2, **kw)


@pytest.mark.parametrize("shape, N, world, mode, causal", [
    ((8, 4), 30, 2, "complete", True), ((4, 4, 4), 61, 3, "complete", True), ((6, 5), 30, 4, "block", True),
    ((5, 6), 28, 2, "block", False), ((16, 8), 128, 3, "complete", True)])
def test_balanced_lengths_share_the_work(shape, N, world, mode, causal):
    """Each rank's keys read (counted from the dense masks of the passes) is within one
    position's work of an equal share; slices cover the sequence, each at least 1 long."""
    from tensorized_attention.distributed import balanced_lengths
    from tensorized_attention.passes import pass_mask

    lengths = balanced_lengths(N, world, shape, mode=mode, causal=causal)
    assert sum(lengths) == N and min(lengths) >= 1 and len(lengths) == world
    work = sum(pass_mask(N, shape, dim, mode=mode, causal=causal).sum(1) for dim in range(len(shape))).double()
    bounds = torch.tensor([0] + lengths).cumsum(0)
    shares = [work[a:b].sum().item() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert max(abs(x - work.sum().item() / world) for x in shares) <= 2 * work.max().item()
    if causal and mode == "complete":  # later positions read more keys: earlier slices are longer
        assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def test_balanced_lengths_align_moves_each_cut_to_the_nearest_multiple():
    from tensorized_attention.distributed import balanced_lengths

    N, shape = 1 << 20, (4096, 256)
    assert balanced_lengths(N, 2, shape) == [723595, 324981]
    assert balanced_lengths(N, 2, shape, align=32768) == [720896, 327680]  # 723 595 / 32 768 = 22.08
    for world in (2, 3, 5):
        plain = balanced_lengths(N, world, shape)
        aligned = balanced_lengths(N, world, shape, align=4096)
        cuts, plain_cuts = torch.tensor(aligned[:-1]).cumsum(0), torch.tensor(plain[:-1]).cumsum(0)
        assert sum(aligned) == N and bool((cuts % 4096 == 0).all())
        assert bool(((cuts - plain_cuts).abs() <= 2048).all())
    assert balanced_lengths(6, 3, (3, 2), align=8) == balanced_lengths(6, 3, (3, 2))  # no multiple fits: cuts stay


def test_balanced_lengths_rejects_bad_input():
    from tensorized_attention.distributed import balanced_lengths

    with pytest.raises(ValueError, match="seqlen must be an int >= world_size"):
        balanced_lengths(3, 4)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        balanced_lengths(8, 0)
    with pytest.raises(ValueError, match="mode"):
        balanced_lengths(8, 2, (4, 2), mode="ring")
    with pytest.raises(ValueError, match="align must be an int >= 1"):
        balanced_lengths(8, 2, (4, 2), align=0)


def test_needs_a_process_group():
    from tensorized_attention.distributed import sequence_parallel_tensorized_attn

    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_tensorized_attn(q, q, q, (4, 2))


TRITON_CASES = [
    Case((5, 8), 40, mode="complete", gate="heads", positions="plain", dtype=torch.float32, backend="triton"),
    Case((4, 10), 40, (17, 23), mode="block", causal=False, gate="shared", dtype=torch.float32, backend="triton"),
    # block causal: both passes halos (rank 1 starts inside a fiber of each), odd slices
    Case((7, 5), 31, (14, 17), mode="block", gate="heads", positions="rotated", dtype=torch.float32,
         backend="triton"),
]


# 3 ranks, the last two passes halos (the middle rank receives and sends both), batch 1: the
# halos land straight in the key and value buffers (batch 2 receives through a copy)
TRITON_CASES_3 = [Case((3, 4, 4), 48, (17, 16, 15), mode="complete", gate="heads", positions="plain",
                       dtype=torch.float32, backend="triton", batch=1)]


@pytest.mark.parametrize("world, cases", [(2, TRITON_CASES), (3, TRITON_CASES_3)], ids=["2-ranks", "3-ranks"])
def test_triton_backend_under_interpreter(world, cases, tmp_path, monkeypatch):
    """The passes on the Triton backend (one pass per call, on each rank's slots; a halo
    pass computes with the rank's own keys first and folds the halo's in after it arrives),
    run by Triton's interpreter on the CPU, against the single-process reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    results = _spawn(world, [(str(c), compare, (c,)) for c in cases], tmp_path)
    kinds = set()
    for case in cases:
        for rank in range(world):
            r = _result(results, rank, str(case))
            kinds.update(r["kinds"])
            for key in ("out", "dq", "dk", "dv", "dgate"):
                assert r[key] <= 2e-5 * max(1.0, r["scale"]), (rank, str(case), key, r)
    assert "halo" in kinds and (world != 2 or "all_to_all" in kinds)


def _torchrun(script: str, args: list[str]) -> None:
    """benchmarks/``script`` under torchrun on 2 CPU ranks (gloo); fails with its stderr."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not found")
    path = Path(__file__).parents[1] / "benchmarks" / script
    cmd = [str(torchrun if torchrun.exists() else shutil.which("torchrun")), "--standalone", "--nproc-per-node", "2",
           str(path), "--device", "cpu", *args]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a rank that aborts prints where
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/distributed.py under torchrun, 2 CPU ranks (gloo), tiny sizes: its JSON
    holds the plan's bytes and a time for every measurement, one row per length and shift
    of the slices."""
    import json

    out = tmp_path / "bench.json"
    _torchrun("distributed.py", ["--min-tokens", "256", "--max-tokens", "512", "--heads", "4", "--kv-heads", "2",
                                 "--headdim", "16", "--inner", "16", "--iters", "2", "--cp-max-tokens", "256",
                                 "--dtype", "float32", "--shifts", "0,16", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["tokens"], r["shift"]) for r in rows] == [(256, 0), (256, 16), (512, 0), (512, 16)]
    for row in rows:
        plan = plan_sequence_parallel(tuple(row["shape"]), row["tokens"], 2, heads=4, kv_heads=2, headdim=16,
                                      dtype_bytes=4, lengths=row["lengths"])
        assert row["forward_send_bytes"] == [sum(e.send_bytes[r] for e in plan) for r in range(2)]
        assert row["lengths"] == [row["tokens"] // 2 + row["shift"], row["tokens"] // 2 - row["shift"]]
        for part in ("parallel", "single"):
            assert row[part]["forward_ms"] > 0 and row[part]["forward_backward_ms"] > 0
    assert rows[0]["single"] == rows[1]["single"]  # one GPU: measured once per length
    assert ["context_parallel_sdpa" in r for r in rows] == [True, False, False, False]


def test_transfer_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/transfer.py under torchrun, 2 CPU ranks (gloo): a time for each way of
    sending a halo."""
    import json

    out = tmp_path / "transfer.json"
    _torchrun("transfer.py", ["--mib", "0.25", "--iters", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"batch_isend_irecv", "broadcast in a pair group", "all_to_all_single"}
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows.values())


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_profile_benchmark_runs_on_cpu(tmp_path, backward):
    """benchmarks/profile_distributed.py under torchrun, 2 CPU ranks (gloo): each rank's
    time and costliest operators, and the plain operator's on rank 0, forward or forward +
    backward."""
    import json

    out = tmp_path / "profile.json"
    _torchrun("profile_distributed.py", ["--tokens", "512", "--inner", "16", "--heads", "4", "--kv-heads", "2",
                                         "--headdim", "16", "--dtype", "float32", "--calls", "1", "--top", "40",
                                         "--out", str(out)]
              + ["--backward"] * backward)
    result = json.loads(out.read_text())
    assert result["backward"] is backward
    names = " ".join(row["name"] for r in result["ranks"] for row in r["rows"])
    assert ("Backward" in names) is backward
    assert [r["rank"] for r in result["ranks"]] == [0, 1] and sum(result["lengths"]) == 512
    assert all(r["wall_ms"] > 0 and r["rows"] for r in result["ranks"]) and result["single"]["rows"]


def test_check_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/check_distributed.py under torchrun, 2 CPU ranks (gloo): the gathered
    output and gradients match one process's on the same inputs (float32), on aligned
    slices shifted off balance."""
    import json

    out = tmp_path / "check.json"
    _torchrun("check_distributed.py", ["--tokens", "512", "--inner", "16", "--heads", "4", "--kv-heads", "2",
                                       "--headdim", "16", "--dtype", "float32", "--align", "64", "--shift", "-64",
                                       "--out", str(out)])
    result = json.loads(out.read_text())
    assert sum(result["lengths"]) == 512 and result["lengths"][0] % 64 == 0
    assert set(result["tensors"]) == {"out", "dq", "dk", "dv"}
    for row in result["tensors"].values():
        assert row["max_abs_reference"] > 0.1 and row["max_abs_diff"] <= 1e-5 * row["max_abs_reference"]


def test_trace_timeline_lists_the_kernels_in_order():
    """benchmarks/trace_timeline.py: the GPU kernels of a Chrome trace by start, with their
    duration and stream, CPU events and short kernels left out."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "trace_timeline.py"
    spec = importlib.util.spec_from_file_location("trace_timeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 3000.0, "dur": 500.0, "args": {"stream": 7}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::cat", "ts": 500.0, "dur": 9000.0},
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 1000.0, "dur": 1500.0, "args": {"stream": 17}},
        {"ph": "X", "cat": "kernel", "name": "tiny", "ts": 4000.0, "dur": 10.0, "args": {"stream": 7}},
    ]}
    assert module.timeline(trace) == [(0.0, 1.5, 17, "a"), (2.0, 0.5, 7, "b")]
    assert module.timeline({"traceEvents": []}) == []
