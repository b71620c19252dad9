"""The GPU benchmark suite's registry (tensorized_attention.suite): which cases it holds
and what they are called; the cases themselves run on a GPU (benchmarks/run.py)."""

from __future__ import annotations

from tensorized_attention import suite


def test_registry_holds_every_method_and_the_selected_pass():
    cases = suite.registry([4096, 262144], kv_heads=[32], ndims=[2, 3], methods=["triton", "sdpa-flash", "reference"],
                           max_sdpa_len=131072, max_reference_len=32768)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    # per length and direction: 2 dims x 2 modes on Triton; the reference and SDPA only where they fit
    assert sum(c.method == "triton" and not c.sinks for c in cases) == 2 * 2 * 2 * 2
    assert {c.seqlen for c in cases if c.method == "sdpa-flash"} == {4096}
    assert {c.seqlen for c in cases if c.method == "reference"} == {4096}
    # a trained model's configuration (sinks, gate, tensor positions), without and with the selected pass
    trained = [c for c in cases if c.sinks]
    assert [(c.seqlen, c.backward, c.shape, c.gate, c.positions, c.select) for c in trained] == [
        (n, bwd, suite.choose_shape(n, 2), True, True, k) for n in (4096, 262144) for bwd in (False, True)
        for k in (0, 2)]
    assert "complete+sinks4+gate+rope fwd" in trained[0].name
    assert "complete+select2+sinks4+gate+rope fwd+bwd" in trained[3].name
    assert not any(c.sinks for c in suite.registry([4096], methods=["triton"], select_topk=()))
