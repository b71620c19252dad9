"""Test session setup shared by tests/ and the doctests of src/.

Without a GPU, the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must
be set before any kernel is defined, so it is set here, before anything is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The Triton backend is optional (the "triton" extra): without triton, its modules cannot
# be imported, so the doctest collection of src/ leaves them out (tests/test_triton.py
# skips itself).
try:
    import triton  # noqa: F401
except ImportError:
    collect_ignore_glob = ["src/tensorized_attention/ops/triton/*.py"]
