"""Hugging Face transformers integration: ``attn_implementation="tensorized"``.

>>> from tensorized_attention import hf
>>> hf.register()                                   # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tensorized")  # doctest: +SKIP
>>> hf.enable(model, "pilot")                       # doctest: +SKIP
"""

from .attention import (
    decode_state,
    enable,
    from_pretrained,
    gate_of,
    register,
    restore_gates,
    sequence_parallel,
    tensorized_attention_forward,
    tensorized_mask,
)
from .options import DEFAULTS, PRESETS, options_of, resolve_fold, window_options

__all__ = [
    "DEFAULTS",
    "PRESETS",
    "decode_state",
    "enable",
    "from_pretrained",
    "gate_of",
    "options_of",
    "register",
    "resolve_fold",
    "restore_gates",
    "sequence_parallel",
    "tensorized_attention_forward",
    "tensorized_mask",
    "window_options",
]
