"""Triton backend (GPU; the kernels also run on the CPU under TRITON_INTERPRET=1)."""

from .launch import tensorized_attn_triton, triton_bwd, triton_fwd

__all__ = ["tensorized_attn_triton", "triton_bwd", "triton_fwd"]
