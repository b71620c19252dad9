"""Test session setup shared by tests/ and the doctests of src/.

Without a GPU, the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must
be set before any kernel is defined, so it is set here, before anything is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
