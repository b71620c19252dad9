"""Shared test helpers: a per-test seed, random q, k, v, and the tiny model checkpoint.

No "poison" helper is needed: the reference backend allocates every output itself
(it never writes into a caller's buffer), so there is no uninitialised memory to catch.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib, which does not put tests/ on sys.path:
# add it so test modules can `from oracle import ...`.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch per test from the test's id: reproducible, and different per case."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_qkv(batch, seqlen, heads, kv_heads, headdim, dtype=torch.float64, requires_grad=False):
    """q [batch, seqlen, heads, headdim] and k, v [batch, seqlen, kv_heads, headdim],
    standard normal, drawn in float32 and then cast to ``dtype`` (so every dtype sees
    the same values up to rounding)."""
    q = torch.randn(batch, seqlen, heads, headdim)
    k = torch.randn(batch, seqlen, kv_heads, headdim)
    v = torch.randn(batch, seqlen, kv_heads, headdim)
    return tuple(x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The tiny model and its tokenizer (tests/tiny_model.py), saved once per run; the directory.
    Tests read it and write elsewhere."""
    from tiny_model import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make_qkv():
    """The :func:`random_qkv` helper, as a fixture (seeded by ``_seed``)."""
    return random_qkv
