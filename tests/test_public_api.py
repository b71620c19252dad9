"""The public names: each ``__all__`` is exactly the agreed list, and every name exists.

A change here is an API change: update the expected list on purpose."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "tensorized_attention": [
        "SelectedPass",
        "TensorPositions",
        "__version__",
        "available_backends",
        "choose_shape",
        "coordinates",
        "draw_passes",
        "fold",
        "fold_size",
        "ops",
        "pass_mask",
        "passes",
        "rope",
        "strides",
        "tensorized_attn",
    ],
    "tensorized_attention.fold": ["check_shape", "choose_shape", "coordinates", "fold_size", "strides"],
    "tensorized_attention.passes": ["FoldPass", "PooledPass", "SelectedPass", "draw_passes", "pass_mask", "plan_passes"],
    "tensorized_attention.ops": ["available_backends", "tensorized_attn", "tensorized_attn_reference"],
    "tensorized_attention.rope": ["TensorPositions", "pass_positions", "rotate", "sink_distances"],
    "tensorized_attention.analysis": [
        "CPFit", "attention_cp", "attention_maps", "cp", "draw_reachability", "energy_captured", "energy_curves",
        "fold_matrix", "kronecker", "kronecker_approximation", "kronecker_cp", "kronecker_rearrange",
        "kronecker_spectrum", "maps", "matrix_spectrum", "nearest_kronecker", "numerical_rank", "paired_tensor",
        "reachability", "reachable", "tensorized_operator", "truncation_errors",
    ],
}


@pytest.mark.parametrize("module_name", list(EXPECTED))
def test_all_is_the_expected_list(module_name):
    """``__all__`` holds exactly the expected names, once each, and each one exists."""
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    assert len(names) == len(set(names)), "duplicate names in __all__"
    assert sorted(names) == sorted(EXPECTED[module_name])
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing


def test_star_import_gives_the_public_names():
    """``from tensorized_attention import *`` binds exactly ``__all__``."""
    namespace: dict = {}
    exec("from tensorized_attention import *", namespace)  # noqa: S102
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED["tensorized_attention"])


def test_top_level_names_are_the_submodules_objects():
    """The top-level re-exports are the same objects as in their submodules."""
    import tensorized_attention as ta

    assert ta.tensorized_attn is ta.ops.tensorized_attn
    assert ta.available_backends is ta.ops.available_backends
    for name in ("choose_shape", "coordinates", "fold_size", "strides"):
        assert getattr(ta, name) is getattr(ta.fold, name)
    for name in ("draw_passes", "pass_mask"):
        assert getattr(ta, name) is getattr(ta.passes, name)
    assert isinstance(ta.__version__, str) and ta.__version__.count(".") >= 1
