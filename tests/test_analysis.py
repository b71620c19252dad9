"""tensorized_attention.analysis: Kronecker and CP structure, reachability pictures, attention
maps by hooks, and the ``analyze`` command on the tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from oracle import dense_pass_mask
from tensorized_attention import tensorized_attn
from tensorized_attention.analysis import (
    attention_cp,
    attention_maps,
    draw_reachability,
    energy_curves,
    kronecker_approximation,
    kronecker_cp,
    kronecker_spectrum,
    matrix_spectrum,
    nearest_kronecker,
    numerical_rank,
    paired_tensor,
    reachable,
    tensorized_operator,
    truncation_errors,
)
from tensorized_attention.analysis.reachability import unreached_pairs
from tensorized_attention.cli import main
from tensorized_attention.passes import pass_mask

F64 = dict(dtype=torch.float64)


def rel_err(X, Y) -> float:
    return float(torch.linalg.vector_norm(X - Y) / torch.linalg.vector_norm(Y))


# ----------------------------------------------------------------------------- Kronecker


@pytest.mark.parametrize("shape", [(5, 7), (3, 11), (8, 4)], ids=str)
def test_exact_kronecker_product_is_recovered(shape):
    """A = B ⊗ C of random factors (float64): Kronecker rank 1, the nearest Kronecker
    product reproduces A to 1e-10, and its factors are B and C up to one scale."""
    g = torch.Generator().manual_seed(sum(shape))
    B, C = torch.randn(shape[0], shape[0], generator=g, **F64), torch.randn(shape[1], shape[1], generator=g, **F64)
    A = torch.kron(B, C)
    s = kronecker_spectrum(A, shape)
    assert numerical_rank(s) == 1
    assert len(s) == min(shape[0] ** 2, shape[1] ** 2)
    [(B1, C1)], _ = nearest_kronecker(A, shape)
    assert rel_err(torch.kron(B1, C1), A) < 1e-10
    scale = (B1 / B).flatten()
    assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-8)  # B1 = c B, C1 = C / c
    assert float(truncation_errors(s)[1]) < 1e-10
    # the matrix itself is full rank: the Kronecker form needs one component where SVD needs all
    assert numerical_rank(matrix_spectrum(A)) == A.shape[0]


@pytest.mark.parametrize(("shape", "r"), [((5, 7), 2), ((6, 4), 3), ((3, 9), 5)], ids=str)
def test_sum_of_r_kronecker_products_has_kronecker_rank_r(shape, r):
    g = torch.Generator().manual_seed(r)
    A = sum(torch.kron(torch.randn(shape[0], shape[0], generator=g, **F64),
                       torch.randn(shape[1], shape[1], generator=g, **F64)) for _ in range(r))
    s = kronecker_spectrum(A, shape)
    assert numerical_rank(s) == r
    assert rel_err(kronecker_approximation(A, shape, r), A) < 1e-10
    assert rel_err(kronecker_approximation(A, shape, r - 1), A) > 1e-3
    # the rank-(r-1) error is the one the spectrum predicts (Van Loan–Pitsianis is optimal)
    assert rel_err(kronecker_approximation(A, shape, r - 1), A) == pytest.approx(float(truncation_errors(s)[r - 1]))


def test_three_factor_kronecker_product_is_recovered_by_cp():
    """m = 3: A_1 ⊗ A_2 ⊗ A_3 is one CP component of the paired tensor (TensorLy ALS), and
    Kronecker rank 1 at both splits."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 4, 5)
    factors = [torch.rand(n, n, generator=g, **F64) for n in shape]
    A = torch.kron(torch.kron(factors[0], factors[1]), factors[2])
    fit = kronecker_cp(A, shape, 1)
    assert fit.error < 1e-10
    assert rel_err(fit.matrix(), A) < 1e-10
    for j, F in enumerate(fit.kronecker_factors(0)):
        cos = torch.dot(F.flatten(), factors[j].flatten()) / (F.norm() * factors[j].norm())
        assert abs(float(cos)) == pytest.approx(1.0, abs=1e-10)
    for split in (1, 2):
        assert numerical_rank(kronecker_spectrum(A, shape, split)) == 1


def test_kron_order_matches_the_fold():
    """The coarse factor acts on dim 0 (the pass along dim 0, stride n_2): the bidirectional
    block mask of the pass along dim 0 is J ⊗ I, along dim 1 I ⊗ J."""
    shape = (3, 5)
    J = [torch.ones(n, n, **F64) for n in shape]
    I_ = [torch.eye(n, **F64) for n in shape]
    m0 = pass_mask(15, shape, 0, mode="block", causal=False).double()
    m1 = pass_mask(15, shape, 1, mode="block", causal=False).double()
    assert torch.equal(m0, torch.kron(J[0], I_[1]))
    assert torch.equal(m1, torch.kron(I_[0], J[1]))
    assert torch.allclose(paired_tensor(m0, shape), torch.outer(J[0].flatten(), I_[1].flatten()))


@pytest.mark.parametrize("shape", [(6, 10), (12, 5), (7, 3)], ids=str)
def test_paper_patterns_need_one_tensor_component(shape):
    """The paper's Figure 4(b): structured patterns on a fold need one Kronecker component
    where their matrix rank is large. Block diagonal I ⊗ J (rank n_1), the causal coarse pass
    L ⊗ I (full rank) and the bidirectional coarse pass J ⊗ I (rank n_2): Kronecker rank 1;
    the causal window of n_2 keys (complete's local pass, a band crossing the blocks):
    Kronecker rank 2, matrix full rank."""
    n1, n2 = shape
    N = n1 * n2
    patterns = {
        "block diagonal": (torch.kron(torch.eye(n1, **F64), torch.ones(n2, n2, **F64)), 1, n1),
        "causal coarse pass": (pass_mask(N, shape, 0, mode="block", causal=True).double(), 1, N),
        "bidirectional coarse pass": (pass_mask(N, shape, 0, mode="block", causal=False).double(), 1, n2),
        "causal window (complete, dim 1)": (pass_mask(N, shape, 1, mode="complete", causal=True).double(), 2, N),
    }
    band = torch.ones(N, N, **F64).tril() - torch.ones(N, N, **F64).tril(-n2)
    assert torch.equal(patterns["causal window (complete, dim 1)"][0], band)
    assert torch.equal(patterns["causal coarse pass"][0],
                       torch.kron(torch.ones(n1, n1, **F64).tril(), torch.eye(n2, **F64)))
    for name, (M, kron_rank, mat_rank) in patterns.items():
        assert numerical_rank(kronecker_spectrum(M, shape)) == kron_rank, name
        assert numerical_rank(matrix_spectrum(M)) == mat_rank, name
        assert mat_rank >= 3 * kron_rank, name
        assert rel_err(kronecker_approximation(M, shape, kron_rank), M) < 1e-10, name


def test_order_2m_cp_and_energy_curves():
    """The order-2m CP recovers a rank-1 tensor; its energy at rank r never exceeds the
    matrix SVD's (each CP component is a rank-1 matrix); the 2-dim Kronecker curve is the
    Van Loan–Pitsianis one; parameters follow the stated counts."""
    shape = (4, 6)
    g = torch.Generator().manual_seed(0)
    u = [torch.rand(n, generator=g, **F64) for n in (*shape, *shape)]
    A1 = torch.kron(u[0], u[1])[:, None] * torch.kron(u[2], u[3])[None, :]
    assert attention_cp(A1, shape, 1).error < 1e-10

    A = torch.softmax(torch.randn(24, 24, generator=g, **F64) + torch.full((24, 24), -1e9, **F64).triu(1), -1)
    curves = energy_curves(A, shape, [1, 2, 4, 8])
    matrix = {row["rank"]: row["energy"] for row in curves["matrix"]}
    for row in curves["cp"]:
        assert row["energy"] <= matrix[row["rank"]] + 1e-9
        assert row["parameters"] == 2 * row["rank"] * sum(shape)
    s = kronecker_spectrum(A, shape)
    for row in curves["kronecker"]:
        assert row["energy"] == pytest.approx(1 - float(truncation_errors(s)[row["rank"]]) ** 2)
        assert row["energy"] == pytest.approx(kronecker_cp(A, shape, row["rank"]).energy)
        assert row["parameters"] == row["rank"] * (16 + 36)
    assert [row["parameters"] for row in curves["matrix"]] == [48 * r for r in (1, 2, 4, 8)]


def test_spectrum_methods_agree_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(1)
    A = torch.rand(30, 30, generator=g, **F64)
    e_svd = 1 - truncation_errors(kronecker_spectrum(A, (5, 6))) ** 2
    e_gram = 1 - truncation_errors(kronecker_spectrum(A, (5, 6), method="gram")) ** 2
    assert torch.allclose(e_svd, e_gram, atol=1e-12)
    with pytest.raises(ValueError, match=r"prod\(shape\) == N exactly"):
        kronecker_spectrum(A, (4, 8))
    with pytest.raises(ValueError, match="give split"):
        kronecker_spectrum(torch.eye(24, **F64), (2, 3, 4))
    with pytest.raises(ValueError, match="square"):
        matrix_spectrum(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        matrix_spectrum(A, method="qr")
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 25\]"):
        nearest_kronecker(A, (5, 6), rank=26)


# ----------------------------------------------------------------------------- reachability

REACH_CASES = [((4, 4), (0, 1), 16), ((4, 4), (1, 0), 16), ((3, 5), (1, 0), 13), ((2, 3, 4), (0, 1, 2), 24),
               ((2, 3, 4), (2, 0, 1), 21), ((4, 4, 4), (0, 1, 2), 64)]


def oracle_reach(seqlen, shape, order, mode, causal):
    reach = torch.eye(seqlen, dtype=torch.bool)
    for dim in order:
        reach = (dense_pass_mask(seqlen, shape, dim, mode, causal, 0).double() @ reach.double()) > 0
    return reach


def red_pixels(path) -> int:
    import matplotlib.image

    img = matplotlib.image.imread(path)[..., :3]
    red = torch.tensor([0xD6, 0x27, 0x28]) / 255
    return int(((torch.from_numpy(img.copy()) - red).abs().max(-1).values < 0.02).sum())


@pytest.mark.parametrize(("shape", "order", "seqlen"), REACH_CASES, ids=str)
def test_reachability_picture_causal_block_shows_gaps_complete_none(shape, order, seqlen, tmp_path):
    """The picture and the ASCII art of causal block show exactly the pairs the oracle's masks
    leave unreached (the same facts test_properties asserts from gradients); complete's
    show none."""
    expected = oracle_reach(seqlen, shape, order, "block", True)
    masks, reach = reachable(shape, mode="block", order=order, seqlen=seqlen)
    assert torch.equal(reach, expected)
    for t, dim in enumerate(order):
        assert torch.equal(masks[t], dense_pass_mask(seqlen, shape, dim, "block", True, 0))
    missing, pairs = unreached_pairs(reach)
    assert missing > 0 and missing == int((torch.ones(seqlen, seqlen).tril(-1).bool() & ~expected).sum())

    text = draw_reachability(shape, mode="block", order=order, seqlen=seqlen, path=tmp_path / "block.png")
    assert f"unreached pairs (p' < p that no path connects): {missing} of {pairs}" in text
    matrix = text.split("x reached, - never reached, . after p):\n")[1].splitlines()
    assert len(matrix) == seqlen
    drawn = torch.tensor([[c == "-" for c in line.split()[1]] for line in matrix])
    assert torch.equal(drawn, torch.ones(seqlen, seqlen).tril(-1).bool() & ~expected)
    assert red_pixels(tmp_path / "block.png") > 0

    text = draw_reachability(shape, mode="complete", order=order, seqlen=seqlen, path=tmp_path / "complete.png")
    assert f"that no path connects): 0 of {pairs}" in text
    assert "-" not in "".join(line.split()[1] for line in text.split("after p):\n")[1].splitlines())
    assert torch.equal(reachable(shape, mode="complete", order=order, seqlen=seqlen)[1],
                       torch.ones(seqlen, seqlen).tril().bool())
    assert red_pixels(tmp_path / "complete.png") == 0


def test_reachability_pictures_other_cases():
    """Bidirectional block reaches everything; the design's 4 x 4 gap is drawn; sinks show
    as 's'; bad input is refused with what is allowed."""
    text = draw_reachability((3, 4), mode="block", causal=False)
    assert "that no path connects): 0 of 132" in text
    text = draw_reachability((4, 4), mode="block", query=8)  # (2, 0) never reads (1, 3) = 7
    panel = [line.split("    ")[-1] for line in text.splitlines()[2:6]]
    assert panel[1].split()[3] == "-" and panel[2].split()[0] == "q"
    text = draw_reachability((4, 4), mode="complete", sinks=2, query=13, matrix_limit=0)
    assert "s" in text.splitlines()[2]
    with pytest.raises(ValueError, match="causal only"):
        draw_reachability((4, 4), mode="complete", causal=False)
    with pytest.raises(ValueError, match="permutation"):
        reachable((4, 4), order=(0, 0))
    with pytest.raises(ValueError, match=r"query must be a position in \[0, 15\]"):
        draw_reachability((4, 4), query=16)


# ----------------------------------------------------------------------------- operator and maps


@pytest.mark.parametrize(("shape", "seqlen_ok", "kw"), [
    ((3, 5), True, dict(mode="complete")),
    ((3, 5), True, dict(mode="block", order=(1, 0))),
    ((2, 3, 4), True, dict(mode="complete", order=(2, 0, 1), sinks=2)),
    ((4, 6), True, dict(mode="complete", gate=(0.7, 0.2), sinks=1)),
], ids=str)
def test_tensorized_operator_is_the_operator(shape, seqlen_ok, kw):
    """The matrix built from the full attention map, applied to v, is tensorized_attn's output
    (reference backend, float64): the passes are the full softmax restricted to each mask."""
    N = math.prod(shape)
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(1, N, 1, 8, generator=g, **F64) for _ in range(3))
    scores = (q[0, :, 0] @ k[0, :, 0].T) / math.sqrt(8)
    A = torch.softmax(scores.masked_fill(torch.ones(N, N).triu(1).bool(), float("-inf")), -1)
    gate = kw.pop("gate", None)
    T = tensorized_operator(A, shape, gate=gate, **kw)
    expected = tensorized_attn(q, k, v, shape, causal=True, backend="reference",
                               gate=None if gate is None else torch.tensor(gate, **F64), **kw)
    assert torch.allclose(T @ v[0, :, 0], expected[0, :, 0], atol=1e-12)
    rows = [0, N // 2, N - 1]
    assert torch.allclose(tensorized_operator(A, shape, gate=gate, rows=rows, **kw), T[rows], atol=1e-14)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_model import TEXT, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_analysis")
    save_tiny_checkpoint(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def test_attention_maps_by_hook_equal_output_attentions(tiny):
    from tensorized_attention.models import load_model

    model, tok = load_model(tiny / "model", attn_implementation="sdpa")
    ids = tok((tiny / "text.txt").read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0, :50]
    maps = attention_maps(model, ids, layers=[1, 0], heads=[3, 1])
    assert sorted(maps) == [0, 1] and maps[0].shape == (2, 50, 50)
    assert model.config._attn_implementation == "sdpa"  # restored
    model.set_attn_implementation("eager")
    ref = model(input_ids=ids[None], output_attentions=True, use_cache=False).attentions
    for layer in (0, 1):
        assert torch.allclose(maps[layer], ref[layer][0, [3, 1]], atol=1e-6)
        assert torch.allclose(maps[layer].sum(-1), torch.ones(2, 50), atol=1e-5)
        assert not maps[layer].triu(1).any()
    seen = []
    assert attention_maps(model, ids, layers=[0], callback=lambda layer, w: seen.append((layer, w.shape))) == {}
    assert seen == [(0, torch.Size([4, 50, 50]))]
    with pytest.raises(ValueError, match=r"layers must be ints in \[0, 1\]"):
        attention_maps(model, ids, layers=[2])


def test_analyze_command_on_the_tiny_model(tiny, tmp_path, capsys):
    out = tmp_path / "an"
    argv = ["analyze", "--model", str(tiny / "model"), "--text", str(tiny / "text.txt"), "--length", "64",
            "--samples", "2", "--folds", "8x8,4x16,4x4x4", "--layer", "1", "--head", "3", "--cp-ranks", "1,2",
            "--operator-rows", "16", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kron r=1" in printed and "matrix SVD: rank 1" in printed
    for name in ("spectra.png", "energy.png", "cp_factors.png", "folds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    data = json.loads((out / "analysis.json").read_text())
    assert data["command"].startswith("tensorized-attention analyze --model")
    assert data["folds"] == [[8, 8], [4, 16], [4, 4, 4]]
    assert data["source"]["tokens_used"] == [0, 128]
    for panel in ("average", "one sample"):
        chosen = data["chosen"][panel]
        assert set(chosen["folds"]) == {"8x8", "4x16", "4x4x4"}
        assert chosen["folds"]["8x8"]["kronecker_spectrum"][0] > 0
        assert [c["rank"] for c in chosen["folds"]["4x4x4"]["cp_curve"]] == [1, 2]
        assert 0 <= chosen["folds"]["8x8"]["tv"]["complete"] <= 1
    assert "maps" not in data and data["summary_heads"] == [0, 1, 2, 3]
    assert set(data["summary"]["per_layer"]) == {"0", "1"}

    bad = [("--folds", "8x9", "holds 72 positions"), ("--layer", "5", "the model has 2 layers"),
           ("--length", "4096", "needs 8192")]
    for flag, value, message in bad:
        args = list(argv)
        args[args.index(flag) + 1] = value
        if flag == "--length":
            args[args.index("--folds") + 1] = "64x64"
        assert main(args) == 2
        assert message in capsys.readouterr().err
