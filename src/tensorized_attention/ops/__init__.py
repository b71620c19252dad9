"""Backends of the operator and the public entry point."""

from .dispatch import available_backends, tensorized_attn
from .reference import tensorized_attn_reference

__all__ = ["available_backends", "tensorized_attn", "tensorized_attn_reference"]
