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
    assert sum(c.method == "triton" and not c.select for c in cases) == 2 * 2 * 2 * 2
    assert {c.seqlen for c in cases if c.method == "sdpa-flash"} == {4096}
    assert {c.seqlen for c in cases if c.method == "reference"} == {4096}
    selected = [c for c in cases if c.select]
    assert [(c.seqlen, c.backward, c.shape, c.sinks, c.select) for c in selected] == [
        (n, bwd, suite.choose_shape(n, 2), 4, 2) for n in (4096, 262144) for bwd in (False, True)]
    assert "complete+select2 fwd" in selected[0].name and "complete+select2 fwd+bwd" in selected[1].name
    assert not suite.registry([4096], methods=["triton"], select_topk=())[0].select
