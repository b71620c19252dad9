"""Attention setups of a pretrained model, as the long-context jobs (``train``,
``perplexity``, ``passkey``) name them: one string, parsed into an :class:`AttentionSetup`.

=================================  ===========================================================
``full``                           the model's own attention (SDPA), its own RoPE
``full:linear=4``                  the same, RoPE position interpolation by 4 (``rope_type``
                                   ``linear``; the trained length times 4)
``full:yarn=16``                   the same, YaRN by 16 (``rope_type`` ``yarn``)
``eager``                          transformers' plain attention (a slow reference)
``tensorized``                     tensorized attention with :data:`hf.DEFAULTS <tensorized_attention.hf.DEFAULTS>`
``tensorized:pilot``               a preset of :data:`hf.PRESETS <tensorized_attention.hf.PRESETS>`
``tensorized:{"mode": "block"}``   options as a JSON object (keys of ``hf.DEFAULTS``)
``window:256+4``                   a causal sliding window of 256 keys and 4 sinks, tensor
                                   positions (:func:`hf.window_options <tensorized_attention.hf.window_options>`)
=================================  ===========================================================

>>> parse_attention("full:yarn=16")
AttentionSetup(kind='full', rope='yarn', rope_factor=16.0, options=None)
>>> parse_attention("window:256+4").options["gate"]
[1.0, None]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionSetup", "parse_attention", "load_with_attention", "load_for_job", "apply_attention",
           "add_model_arguments"]

KINDS = ("full", "eager", "tensorized", "window")
ROPE_TYPES = ("linear", "yarn")
_SYNTAX = ("full | full:linear=F | full:yarn=F | eager | tensorized | tensorized:PRESET | "
           "tensorized:{JSON options} | window:W+S")


@dataclass(frozen=True)
class AttentionSetup:
    """What attention a model runs: ``kind`` (full, eager, tensorized, window), the RoPE
    scaling of full attention (``rope`` linear / yarn by ``rope_factor``), and the options
    of tensorized attention (a dict of ``hf.DEFAULTS`` keys or a preset name; the window's
    options for kind window)."""

    kind: str = "full"
    rope: str | None = None
    rope_factor: float | None = None
    options: dict[str, Any] | str | None = None

    @property
    def attn_implementation(self) -> str:
        return {"full": "sdpa", "eager": "eager", "tensorized": "tensorized", "window": "tensorized"}[self.kind]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of the setup."""
        return {"kind": self.kind, "rope": self.rope, "rope_factor": self.rope_factor, "options": self.options,
                "attn_implementation": self.attn_implementation}


def parse_attention(spec: str) -> AttentionSetup:
    """Parse an attention string (see the module's table); ValueError says what is allowed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attention must be one of: {_SYNTAX}; got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r} in {spec!r}; allowed: {_SYNTAX}")
    if kind == "full":
        if not arg:
            return AttentionSetup("full")
        rope, _, factor = arg.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if rope not in ROPE_TYPES or not value >= 1.0:
            raise ValueError(f"full attention takes a RoPE scaling 'linear=F' or 'yarn=F' with F >= 1, got {arg!r}")
        return AttentionSetup("full", rope=rope, rope_factor=value)
    if kind == "eager":
        if arg:
            raise ValueError(f"'eager' takes no argument, got {spec!r}")
        return AttentionSetup("eager")
    if kind == "window":
        width, plus, sinks = arg.partition("+")
        if not width.isdigit() or int(width) < 1 or (plus and not sinks.isdigit()):
            raise ValueError(f"a window is 'window:W' or 'window:W+S' (W >= 1 keys, S >= 0 sinks), got {spec!r}")
        from .hf.options import window_options

        return AttentionSetup("window", options=window_options(int(width), int(sinks or 0)))
    if not arg:
        return AttentionSetup("tensorized", options={})
    try:
        options = json.loads(arg)
    except json.JSONDecodeError:
        if not arg.isidentifier():
            raise ValueError(f"tensorized options must be a preset name or a JSON object, got {arg!r}") from None
        options = arg
    if not isinstance(options, (dict, str)):
        raise ValueError(f"tensorized options must be a preset name or a JSON object, got {arg!r}")
    from .hf.options import PRESETS

    if isinstance(options, str) and options not in PRESETS:
        raise ValueError(f"unknown preset {options!r}; presets: {sorted(PRESETS)}")
    return AttentionSetup("tensorized", options=options)


def rope_overrides(config, setup: AttentionSetup) -> dict[str, Any]:
    """The config keys that give full attention its scaled RoPE (empty without scaling):
    ``rope_parameters`` with the type and factor, and ``max_position_embeddings`` times the
    factor; YaRN also records the original length. Nothing when the config has that scaling
    already (a checkpoint trained with it)."""
    if setup.rope is None:
        return {}
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type") == setup.rope and float(params.get("factor", 0)) == float(setup.rope_factor):
        return {}  # a checkpoint trained with this scaling has it in its config already
    trained = int(config.max_position_embeddings)
    if not params:
        params = {"rope_theta": float(getattr(config, "rope_theta", 10000.0))}
    params.update(rope_type=setup.rope, factor=float(setup.rope_factor))
    if setup.rope == "yarn":
        params["original_max_position_embeddings"] = trained
    return {"rope_parameters": params, "max_position_embeddings": int(round(trained * setup.rope_factor))}


def apply_attention(model, setup: AttentionSetup):
    """Switch a loaded model to ``setup``'s attention (tensorized / window: registers the
    implementation, stores the options, adds gate parameters); full and eager need nothing
    after loading (their RoPE scaling is a load-time setting, see :func:`load_with_attention`)."""
    if setup.kind in ("tensorized", "window"):
        from . import hf

        hf.enable(model, setup.options)
    else:
        model.set_attn_implementation(setup.attn_implementation)
    return model


def load_with_attention(name_or_path, setup: AttentionSetup, **kwargs):
    """:func:`tensorized_attention.models.load_model` with ``setup``'s attention; returns
    ``(model, tokenizer)``; the gate logits a trained checkpoint saved are restored.
    Keyword arguments go to ``load_model`` (dtype, device, cache_dir)."""
    from . import models

    overrides = {}
    if setup.rope is not None:
        from transformers import AutoConfig

        path = models.checkpoint_path(name_or_path, cache_dir=kwargs.get("cache_dir"))
        if path.is_file():
            raise ValueError(f"RoPE scaling ({setup.rope}) needs a named model or a checkpoint directory, "
                             f"not a .gguf file: {path}")
        overrides = rope_overrides(AutoConfig.from_pretrained(path, local_files_only=True), setup)
    if setup.kind in ("tensorized", "window"):
        from . import hf

        hf.register()
    model, tokenizer = models.load_model(name_or_path, attn_implementation=setup.attn_implementation,
                                         **overrides, **kwargs)
    apply_attention(model, setup)
    if setup.kind in ("tensorized", "window"):
        from . import hf

        path = models.checkpoint_path(name_or_path, cache_dir=kwargs.get("cache_dir"), progress=False)
        if path.is_dir():  # a trained checkpoint keeps its gates
            hf.restore_gates(model, path)
    return model, tokenizer


#: What :func:`load_for_job` raises for a device, model or setup it cannot provide.
LOAD_ERRORS = (RuntimeError, FileNotFoundError, TypeError, ValueError, ImportError)


def add_model_arguments(p, *, attention: str = "the model's attention") -> None:
    """The options every model job shares (``train``, ``perplexity``, ``passkey``): --model,
    --attention (``attention`` says what it sets), --device, --cache-dir, --threads and
    --no-progress."""
    from .cli import _positive

    p.add_argument("--model", default="smollm2-135m",
                   help="a named model (smollm2-135m), a Hugging Face checkpoint directory, or a .gguf file")
    p.add_argument("--attention", default="full", metavar="SPEC",
                   help=f"{attention}: full, full:linear=F, full:yarn=F, eager, tensorized, tensorized:PRESET, "
                        "tensorized:{JSON}, window:W+S (tensorized_attention.setups)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--cache-dir", default=None,
                   help="base directory of converted models (default: $TENSORIZED_ATTENTION_CACHE or "
                        "~/.cache/tensorized-attention)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (torch.set_num_threads); default: torch's own choice")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_for_job(name_or_path, setup: AttentionSetup, *, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None, cache_dir=None):
    """The common start of the evaluation jobs (``perplexity``, ``passkey``): resolve
    ``device`` (auto, cpu, cuda), set torch's CPU threads when given, and load the model
    with ``setup`` (:func:`load_with_attention`; ``dtype`` "auto" is the loader's default).
    Returns ``(model, tokenizer, device, load_seconds)``; raises one of :data:`LOAD_ERRORS`."""
    import time

    import torch

    from .bench import resolve_device

    device = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tokenizer = load_with_attention(name_or_path, setup, dtype=None if dtype == "auto" else dtype,
                                           device=device, cache_dir=cache_dir)
    return model, tokenizer, device, time.perf_counter() - start
