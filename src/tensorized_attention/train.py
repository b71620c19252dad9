"""Continued pretraining of a Hugging Face causal language model with a chosen attention:
the work behind ``tensorized-attention train``.

The model (a named model or a checkpoint directory, :mod:`tensorized_attention.models`)
is loaded with an attention setup (:mod:`tensorized_attention.setups`: ``full``,
``full:linear=4``, ``tensorized:pilot``, ``window:256+4``, ...) and trained on random
windows of a token stream:

- **Data** (:class:`TokenStream`). The train split of a corpus built by
  ``tensorized-attention corpus`` (its documents concatenated in the stored order, one
  separator token between consecutive documents, :func:`corpus_stream`), or a flat token
  file (:func:`file_stream`). Step ``k`` reads ``batch`` windows of ``context + 1`` tokens
  (inputs and the labels shifted by one) starting at :func:`window_starts` ``(seed, k)``:
  uniform over the stream, drawn with replacement, a pure function of the seed and the
  step, so a resumed run reads exactly the windows an uninterrupted one would.
- **Optimisation.** AdamW (betas 0.9 / 0.95, eps 1e-8; weight decay on matrices, none
  on norms, biases and the gate logits of tensorized attention), gradient accumulation of
  ``micro_batch`` sequences up to ``batch``, gradient clipping, the learning rate of
  :func:`lr_at` (linear warmup, cosine decay to ``min_lr_ratio`` times the peak). The loss
  is the mean cross-entropy per predicted token (float32 logits).
- **Precision** (:func:`resolve_precision`). ``bf16-autocast``: float32 weights, gradients
  and AdamW moments, the forward and backward under ``torch.autocast`` in bfloat16 (the
  default on CUDA); ``float32`` (the default on CPU); ``bfloat16``: weights, gradients and
  moments in bfloat16 (half the memory of the states, and updates smaller than the
  weights' rounding step are lost).
- **Checkpoints** (:func:`save_checkpoint`): ``OUT/checkpoint-STEP/`` holds the model
  (``save_pretrained``, gate logits included), the tokenizer and ``trainer_state.pt``
  (optimizer, RNG states, step, the run's settings); ``OUT/final/`` the model and the
  tokenizer only. A resumed run loads the latest checkpoint and continues bitwise as the
  uninterrupted run would (on CPU).
- **Logging**: ``OUT/train_log.jsonl`` (one line per ``log_every`` steps, plus evaluation
  lines), ``OUT/train_summary.json``; the model FLOPs per token of :func:`flops_per_token`
  give the MFU.

See docs/train.md.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import sha256_file

__all__ = [
    "TrainConfig",
    "TrainError",
    "TokenStream",
    "attention_keys",
    "checkpoints",
    "corpus_stream",
    "default_peak_tflops",
    "evaluate_loss",
    "file_stream",
    "flops_per_token",
    "latest_checkpoint",
    "load_checkpoint_weights",
    "lr_at",
    "matmul_params",
    "parse_count",
    "resolve_precision",
    "resolve_separator",
    "save_checkpoint",
    "train",
    "window_starts",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
FINAL_DIR = "final"
SETUP_FILE = "tensorized_attention_train.json"
BETAS = (0.9, 0.95)
EPS = 1e-8
PRECISIONS = ("auto", "float32", "bf16-autocast", "bfloat16")
#: dense bfloat16 tensor-core peaks, TFLOP/s, by a substring of the CUDA device name (first match)
PEAK_TFLOPS_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))
#: the settings a checkpoint must share with the run that resumes it (they fix the windows
#: read at each step and the learning rate of each step)
RUN_KEYS = ("model", "attention", "data", "context", "batch", "train_tokens", "lr", "new_lr", "retrieval_share",
            "answer_weight", "min_lr_ratio", "warmup", "weight_decay", "clip", "seed")
#: settings added later, with the value that leaves a run as before: they join a run's
#: identity only when set otherwise, so older checkpoints still resume
_LATER_KEYS = {"new_lr": None, "retrieval_share": 0.0, "answer_weight": 1.0}
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


class TrainError(ValueError):
    """A run that cannot start as asked; the message says what was wrong and what is allowed."""


# ---------------------------------------------------------------------------------------
# numbers on the command line


def parse_count(text: str | int) -> int:
    """A token count: an integer, or a decimal number with ``k`` (10**3), ``M`` (10**6) or
    ``B`` / ``G`` (10**9).

    >>> parse_count("20M"), parse_count("1.5B"), parse_count("32k"), parse_count("20000000")
    (20000000, 1500000000, 32000, 20000000)
    """
    if isinstance(text, int):
        return text
    item = str(text).strip().replace("_", "")
    factor = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(item[-1:].lower(), 1)
    if factor != 1:
        item = item[:-1]
    try:
        value = float(item) * factor
    except ValueError:
        raise ValueError(f"not a token count: {text!r} (use e.g. 20000000, 20M, 1.5B)") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"a token count must be a whole number >= 1, got {text!r}")
    return int(value)


# ---------------------------------------------------------------------------------------
# the data


@dataclass
class TokenStream:
    """A flat sequence of token ids (``tokens``, 1-D, any integer dtype, possibly a memory
    map) that training windows are cut from, and what it is (``info``)."""

    tokens: np.ndarray
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts: np.ndarray, length: int) -> torch.Tensor:
        """The windows ``tokens[s : s + length]`` for each start s: ``[len(starts), length]`` int64."""
        index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))


def window_starts(seed: int, step: int, count: int, n_tokens: int, length: int, *,
                  stream: int = _TRAIN_STREAM) -> np.ndarray:
    """The starts of the ``count`` windows of ``length`` tokens read at step ``step``: uniform
    over ``[0, n_tokens - length]``, with replacement, from numpy's PCG64 seeded with
    ``(seed, stream, step)``: a pure function of its arguments (``stream`` 0 is training,
    1 the fixed evaluation windows).

    >>> a = window_starts(0, 7, 4, 1000, 65)
    >>> bool((a == window_starts(0, 7, 4, 1000, 65)).all()), bool((a <= 1000 - 65).all())
    (True, True)
    """
    if n_tokens < length:
        raise ValueError(f"a window of {length} tokens does not fit in {n_tokens} tokens")
    rng = np.random.default_rng([int(seed), int(stream), int(step)])
    return rng.integers(0, n_tokens - length + 1, size=count, dtype=np.int64)


def resolve_separator(spec: str | int | None, tokenizer) -> tuple[int | None, str | None]:
    """The token put between the documents of a corpus: ``(id, token)``.

    ``"auto"`` (or None): ``<|endoftext|>`` when the vocabulary has it (the document
    separator of GPT-2-style vocabularies, SmolLM2's among them, whose tokenizer's EOS is
    the chat turn end ``<|im_end|>``), else the tokenizer's EOS token; ``"eos"``: the EOS
    token; ``"none"``: nothing (documents run into each other); an integer: that id; any
    other string: that token."""
    vocab = tokenizer.get_vocab()
    if spec is None or spec == "auto":
        if "<|endoftext|>" in vocab:
            return vocab["<|endoftext|>"], "<|endoftext|>"
        spec = "eos"
    if spec == "none":
        return None, None
    if spec == "eos":
        if tokenizer.eos_token_id is None:
            raise TrainError("--separator eos: the tokenizer has no EOS token; give a token or an id, or 'none'")
        return int(tokenizer.eos_token_id), tokenizer.eos_token
    if isinstance(spec, int) or str(spec).isdigit():
        token_id = int(spec)
        if not 0 <= token_id < len(tokenizer):
            raise TrainError(f"--separator {spec}: not a token id of the tokenizer (0 .. {len(tokenizer) - 1})")
        return token_id, tokenizer.convert_ids_to_tokens(token_id)
    if spec not in vocab:
        raise TrainError(f"--separator {spec!r} is not a token of the tokenizer; allowed: auto, eos, none, "
                         "a token of the vocabulary, or a token id")
    return vocab[spec], spec


def corpus_stream(data_dir: str | os.PathLike, split: str, separator: int | None) -> TokenStream:
    """The documents of ``split`` of a corpus directory (``tensorized-attention corpus``),
    concatenated in their stored order with ``separator`` (a token id, or None for
    nothing) between consecutive documents."""
    from .corpus import MANIFEST, load_split

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainError(f"--data {data_dir}: no such directory; give a corpus directory written by "
                         "'tensorized-attention corpus'")
    if not (data_dir / MANIFEST).is_file():
        raise TrainError(f"--data {data_dir} is not a corpus (no {MANIFEST}); give a directory written by "
                         "'tensorized-attention corpus'")
    try:
        part = load_split(data_dir, split)
        manifest = json.loads((data_dir / MANIFEST).read_text())
    except (OSError, ValueError, KeyError) as err:
        raise TrainError(f"--data {data_dir}: cannot read its {split} split ({err})") from None
    tokens = part.tokens
    if separator is not None and len(part) > 1:
        if separator > np.iinfo(tokens.dtype).max:
            tokens = np.asarray(tokens, dtype=np.int64)
        tokens = np.insert(np.asarray(tokens), part.offsets[1:-1], separator)
    info = {
        "kind": "corpus",
        "path": str(data_dir),
        "split": split,
        "documents": len(part),
        "tokens": int(part.offsets[-1]),
        "stream_tokens": len(tokens),
        "sha256": manifest.get("splits", {}).get(split, {}).get("tokens_file_sha256"),
        "layout": "documents concatenated in stored order, the separator between consecutive documents",
    }
    return TokenStream(tokens, info)


def file_stream(path: str | os.PathLike, dtype: str = "uint16") -> TokenStream:
    """A flat token file: a 1-D ``.npy`` array, or raw integers of ``dtype``; memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"--tokens {path}: no such file; give a 1-D .npy array or a raw file of token ids")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            tokens = (np.memmap(path, dtype=np.dtype(dtype), mode="r") if path.stat().st_size
                      else np.zeros(0, dtype=np.dtype(dtype)))
    except (OSError, ValueError, TypeError) as err:
        raise TrainError(f"--tokens {path}: cannot read it ({err})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TrainError(f"--tokens {path}: expected a 1-D array of integer token ids, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    info = {"kind": "tokens", "path": str(path), "dtype": tokens.dtype.name, "tokens": len(tokens),
            "stream_tokens": len(tokens), "sha256": sha256_file(path)}
    return TokenStream(tokens, info)


def _check_stream(stream: TokenStream, *, context: int, vocab: int, what: str) -> None:
    if len(stream) < context + 1:
        raise TrainError(f"{what} holds {len(stream)} tokens, fewer than one window of --context + 1 = "
                         f"{context + 1} (inputs and the shifted labels); give a smaller --context or more data")
    low, high = int(np.min(stream.tokens)), int(np.max(stream.tokens))
    if low < 0 or high >= vocab:
        raise TrainError(f"{what}: token ids must lie in [0, {vocab}) (the model's vocabulary), found {low} .. {high}")


# ---------------------------------------------------------------------------------------
# the schedule


def warmup_steps(value: float, steps: int) -> int:
    """``--warmup``: a fraction of the steps when below 1, else a number of steps.

    >>> warmup_steps(0.1, 250), warmup_steps(20, 250), warmup_steps(0, 250)
    (25, 20, 0)
    """
    if value < 0:
        raise TrainError(f"--warmup must be >= 0 (steps, or a fraction of the steps below 1), got {value}")
    if value < 1:
        return int(round(value * steps))
    if value != int(value):
        raise TrainError(f"--warmup of 1 or more is a number of steps and must be whole, got {value}")
    return int(value)


def lr_at(step: int, *, steps: int, warmup: int, peak: float, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps``: linear warmup
    ``peak * (step + 1) / warmup`` over the first ``warmup`` steps, then a cosine from
    ``peak`` (the first step after the warmup) to ``min_ratio * peak`` (the last step).

    >>> [round(lr_at(s, steps=6, warmup=2, peak=1.0, min_ratio=0.1), 4) for s in range(6)]
    [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = steps - warmup - 1
    progress = min(1.0, (step - warmup) / span) if span > 0 else 0.0
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------
# FLOPs


def matmul_params(model) -> int:
    """The parameters that take part in matrix products per token: all of them but the
    input embedding table (a lookup), with the output projection counted once even when
    tied to the input embedding."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    total -= embed.numel()
    if out is not None and out.weight is embed:  # tied: the head is a product all the same
        total += embed.numel()
    return int(total)


def _pass_keys(n: int, s: int, mode: str, sinks: int, context: int) -> float:
    """Mean keys per query, over positions 0 .. context-1, of a causal pass along a fold
    dimension of size n and stride s (its own keys plus the sinks not among them)."""
    p = np.arange(context, dtype=np.int64)
    a = p // s
    count = np.minimum(n, a + 1) if mode == "complete" else (a % n) + 1
    keys = count.astype(np.float64)
    for j in range(min(sinks, context)):
        d = p - j
        in_pass = (d >= 0) & (d % s == 0) & (d // s < count)
        keys += (d >= 0) & ~in_pass
    return float(keys.mean())


def attention_keys(model, context: int) -> list[float]:
    """Per layer, the mean number of keys a query attends at ``context`` tokens: (T + 1) / 2
    for full causal attention; for tensorized attention the keys of its passes (each pass's
    fiber or window plus the sinks not in it, :func:`_pass_keys`), less the passes turned
    off by a gate of exactly 1 (computed by the kernels, then discarded: not model FLOPs)."""
    config = model.config
    layers = int(config.num_hidden_layers)
    full = (context + 1) / 2
    if getattr(config, "_attn_implementation", None) != "tensorized":
        return [full] * layers
    from .fold import strides
    from .hf import options_of, resolve_fold

    opts = options_of(config)
    shape = resolve_fold(opts, context, int(getattr(config, "max_position_embeddings", 0) or 0))
    order = opts["order"] if opts["order"] is not None else list(range(len(shape)))
    st = strides(shape)
    gate = opts["gate"]
    tensorized = 0.0
    for t, dim in enumerate(order):
        if gate is not None and gate[t] is not None and float(gate[t]) == 1.0:
            continue
        tensorized += _pass_keys(shape[dim], st[dim], opts["mode"], int(opts["sinks"]), context)
    return [full if i in opts["full_attention_layers"] else tensorized for i in range(layers)]


def flops_per_token(model, context: int) -> dict[str, Any]:
    """Training FLOPs per token: ``6 * N + 12 * H * D * sum_l k_l``, N the
    :func:`matmul_params`, H the query heads, D the head dimension, k_l the mean keys per
    query of layer l (:func:`attention_keys`): a forward pass costs 2 N for the weights and
    4 H D per attended key (scores and weighted values), the backward pass twice the
    forward. Full causal attention: ``6 N + 6 L H D (T + 1)``."""
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    n = matmul_params(model)
    keys = attention_keys(model, context)
    attention = 12.0 * heads * head_dim * sum(keys)
    return {
        "matmul_params": n,
        "mean_keys_per_query": sum(keys) / len(keys),
        "weights_flops_per_token": 6.0 * n,
        "attention_flops_per_token": attention,
        "flops_per_token": 6.0 * n + attention,
        "formula": "6 * N + 12 * H * D * sum over layers of the mean keys per query (N: parameters but the "
                   "input embedding, the output head counted once; H query heads, D head dim)",
    }


def default_peak_tflops(device: torch.device, compute_dtype: torch.dtype) -> float | None:
    """The dense bfloat16 peak of a known CUDA device (H100 SXM 989 TFLOP/s, ...) when the
    products run in bfloat16; None (MFU not reported) otherwise."""
    if device.type != "cuda" or compute_dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS_BF16:
        if key in name:
            return value
    return None


# ---------------------------------------------------------------------------------------
# precision, the optimizer, the loss


def resolve_precision(name: str, device: torch.device) -> dict[str, Any]:
    """``--dtype``: ``{"name", "weights", "autocast"}`` (torch dtypes; autocast None: none).

    >>> p = resolve_precision("auto", torch.device("cpu")); p["name"], p["weights"], p["autocast"]
    ('float32', torch.float32, None)
    """
    if name not in PRECISIONS:
        raise TrainError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        name = "bf16-autocast" if device.type == "cuda" else "float32"
    if name == "bf16-autocast":
        return {"name": name, "weights": torch.float32, "autocast": torch.bfloat16}
    return {"name": name, "weights": getattr(torch, name), "autocast": None}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model, *, lr: float, weight_decay: float, new_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices (2 dims or more: the
    projections, the embeddings), none on vectors (norms, biases) nor on the gate logits.
    ``new_lr``: the peak learning rate of the parameters tensorized attention adds (the gate
    logits; the pretrained weights keep ``lr``). Each group's ``lr_scale`` is its share of
    the schedule's learning rate."""
    from .hf.attention import GATE_PARAM

    decay, no_decay, new = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(GATE_PARAM):
            (new if new_lr is not None else no_decay).append(param)
        else:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if new:
        groups.append({"params": new, "weight_decay": 0.0, "lr_scale": new_lr / lr})
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)


def retrieval_rows(ids: torch.Tensor, share: float, tokenizer, seed: int,
                   step: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Synthetic retrieval examples in a training batch (``train --retrieval-share``): a
    ``share`` of the rows, over the run, become passkey or multi-key prompts of the same T
    tokens (:mod:`tensorized_attention.passkey`) whose filler is the row's own text. Row
    ``i`` of the run (``step * batch + row``) is one when ``floor((i + 1) share) >
    floor(i share)``: every 4th row for 0.25, whatever the batch. The number of keys (1 to
    4), their depths, names and values come from a generator seeded with
    ``train-retrieval/{seed}/{step}/{row}``, apart from the evaluation's (``passkey/...``,
    ``multikey/...``); the keys are even, the evaluation's odd
    (:func:`tensorized_attention.passkey.draw_key`). Returns the batch and, for each
    synthetic row, ``(row, answer_offset, answer_length)``: where its answer's tokens are
    (for :func:`answer_weights`)."""
    import math
    import random

    from . import passkey

    batch = ids.shape[0]
    chosen = [row for row in range(batch)
              if math.floor((step * batch + row + 1) * share) > math.floor((step * batch + row) * share)]
    out = ids.clone()
    answers = []
    for row in chosen:
        rng = random.Random(f"train-retrieval/{seed}/{step}/{row}")
        builder = passkey.PromptBuilder(tokenizer, filler_text=ids[row].tolist())
        keys = rng.randint(1, 4)
        values = []
        while len(values) < keys:  # even keys: the evaluation's are odd
            value = passkey.draw_key(rng, training=True)
            if value not in values:
                values.append(value)
        if keys == 1:
            prompt = builder.build(ids.shape[1], rng.random(), values[0])
        else:
            needles = list(zip([rng.random() for _ in range(keys)], rng.sample(passkey.NAMES, keys), values,
                               strict=True))
            prompt = builder.build_multi(ids.shape[1], needles, 0)
        out[row] = torch.tensor(prompt.ids, dtype=ids.dtype)
        answers.append((row, prompt.answer_offset, prompt.answer_length))
    return out, answers


def answer_weights(answers: list[tuple[int, int, int]], ids: torch.Tensor, weight: float) -> torch.Tensor | None:
    """The weight of each predicted token of ``ids [B, T + 1]`` (``[B, T]``, for
    :func:`sequence_loss`): ``weight`` for the answer tokens of ``answers`` (from
    :func:`retrieval_rows`), 1 elsewhere; None when all would be 1."""
    if weight == 1.0 or not answers:
        return None
    weights = torch.ones(ids.shape[0], ids.shape[1] - 1)
    for row, offset, length in answers:  # token t is predicted at position t - 1
        weights[row, offset - 1: offset - 1 + length] = weight
    return weights


def sequence_loss(model, ids: torch.Tensor, autocast: torch.dtype | None = None,
                  parallel: SequenceParallel | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats per predicted token) of windows ``ids`` ``[B, T + 1]``: the
    model reads ``ids[:, :-1]`` (no cache) and predicts ``ids[:, 1:]``; logits in float32.
    With ``weights [B, T]`` (:func:`answer_weights`) the mean is weighted: a token of weight
    w counts w times.

    With ``parallel`` (every rank given the same ``ids``) the model reads this rank's slice
    of the T positions (:meth:`SequenceParallel.bounds`, at its global ``position_ids``)
    and the result is this rank's share of the mean times the number of ranks: FSDP averages
    the ranks' gradients, so what each rank backpropagates sums to the mean's gradient, and
    :meth:`SequenceParallel.mean` of the values is the mean loss."""
    inputs, labels = ids[:, :-1], ids[:, 1:]
    total = labels.numel() if weights is None else float(weights.sum())
    if parallel is None:
        with _autocast(ids.device, autocast):
            logits = model(input_ids=inputs, use_cache=False).logits
        return _weighted_mean(logits, labels, weights, total)
    from .hf.attention import sequence_parallel

    a, b = parallel.bounds(inputs.shape[1])
    positions = torch.arange(a, b, device=ids.device).expand(inputs.shape[0], -1)
    with _autocast(ids.device, autocast), sequence_parallel(parallel.group, inputs.shape[1]):
        logits = model(input_ids=inputs[:, a:b], position_ids=positions, use_cache=False).logits
    return _weighted_mean(logits, labels[:, a:b], None if weights is None else weights[:, a:b], total) * parallel.world


def _weighted_mean(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                   total: float) -> torch.Tensor:
    """The cross-entropy of ``logits`` (float32) against ``labels``, each token times its
    weight (1 without ``weights``), summed and divided by ``total``."""
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    if weights is not None:
        losses = losses * weights.to(losses.device, losses.dtype).reshape(-1)
    return losses.sum() / total


@torch.no_grad()
def evaluate_loss(model, stream: TokenStream, *, context: int, windows: int, micro_batch: int, seed: int,
                  autocast: torch.dtype | None = None, parallel: SequenceParallel | None = None) -> dict[str, Any]:
    """Mean loss per predicted token over ``windows`` fixed windows of ``stream`` (the same
    ones at every call: :func:`window_starts` of stream 1), in eval mode, under no_grad."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    starts = window_starts(seed, 0, windows, len(stream), context + 1, stream=_EVAL_STREAM)
    total = 0.0
    for i in range(0, windows, micro_batch):
        ids = stream.windows(starts[i: i + micro_batch], context + 1).to(device)
        loss = sequence_loss(model, ids, autocast, parallel)
        total += float(parallel.mean(loss) if parallel is not None else loss) * len(ids)
    model.train(was_training)
    return {"eval_loss": total / windows, "eval_windows": windows, "eval_tokens": windows * context,
            "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------
# checkpoints


def checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``checkpoint-STEP`` directories of ``out_dir`` that hold a trainer state, by step."""
    found = []
    for path in Path(out_dir).glob(CHECKPOINT_PREFIX + "*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step in ``out_dir`` (None if there is none)."""
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def _save_pretrained(model, tokenizer, path: Path, extra: dict[str, Any] | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Model and tokenizer into ``path``, written beside it first and renamed when complete
    (``state_dict``: the weights to write, when the model's own are sharded)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name, value in (extra or {}).items():
        if name.endswith(".pt"):
            torch.save(value, tmp / name)
        else:
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | os.PathLike, step: int, model, tokenizer, optimizer, state: dict[str, Any],
                    *, keep: int = 2) -> Path:
    """Write ``out_dir/checkpoint-STEP``: the model (``save_pretrained``, gate logits
    included), the tokenizer, ``trainer_state.pt`` (``state`` plus the optimizer's state
    and the RNG states) and ``trainer_state.json`` (``state``, readable); then delete all but
    the ``keep`` latest checkpoints. Returns the checkpoint's path."""
    path = Path(out_dir) / f"{CHECKPOINT_PREFIX}{step}"
    trainer = {**state, "step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state()}
    _save_pretrained(model, tokenizer, path, {TRAINER_STATE: trainer, "trainer_state.json": {**state, "step": step}})
    for _, old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint_weights(model, path: str | os.PathLike) -> None:
    """Load the weights a checkpoint saved (its ``*.safetensors``, gate logits included) into
    ``model`` in place. Weights tied to a loaded one (the output head tied to the
    embedding, which ``save_pretrained`` writes once) may be absent; any other missing or
    unexpected weight is an error."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        state.update(load_file(file))
    if not state:
        raise TrainError(f"{path}: no *.safetensors weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_of: dict[int, set[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(tensor), set()).add(name)
    aliases = {name: names for names in names_of.values() for name in names}
    missing = [k for k in missing if not (aliases.get(k, set()) & state.keys())]
    if missing or unexpected:
        raise TrainError(f"{path}: the checkpoint's weights do not fit the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); resume with the --model and --attention of the run")


# ---------------------------------------------------------------------------------------
# sequence parallelism (train --sequence-parallel, under torchrun)


NO_PARALLEL_RESUME = "--resume: a --sequence-parallel run writes no intermediate checkpoint; start it again"


@dataclass(frozen=True)
class SequenceParallel:
    """A training run whose sequences are sharded over the ``world`` ranks of ``group``
    (None: the default group): every rank reads the same windows and runs its contiguous
    slice of their positions (the first ``T % world`` ranks one more); the attention layers
    run :func:`tensorized_attention.distributed.sequence_parallel_tensorized_attn`, the
    parameters are sharded with FSDP2 (:func:`shard_model`)."""

    rank: int
    world: int
    group: Any = None

    @property
    def main(self) -> bool:
        """Whether this rank writes the logs, the summary and the model."""
        return self.rank == 0

    def bounds(self, length: int) -> tuple[int, int]:
        """This rank's slice ``[start, stop)`` of ``length`` positions."""
        base, extra = divmod(length, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a scalar (a collective: every rank calls it)."""
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any rank's ``flag`` is set (a collective): ranks stop together."""
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())


def start_sequence_parallel(device_arg: str) -> tuple[SequenceParallel, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``): NCCL on CUDA (one GPU per local rank), gloo on the CPU."""
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainError(f"--sequence-parallel runs under torchrun (the environment lacks {', '.join(missing)}): "
                         "torchrun --nproc-per-node P -m tensorized_attention train --sequence-parallel ...")
    from .bench import resolve_device

    device = resolve_device(device_arg)
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise TrainError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most "
                             "one process per GPU")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return SequenceParallel(dist.get_rank(), dist.get_world_size()), device


def shard_model(model) -> None:
    """FSDP2 (``fully_shard``) on each decoder layer, then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers if layers is not None else ():
        fully_shard(layer)
    fully_shard(model)


def _full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 (empty elsewhere; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------------
# the run


@dataclass
class TrainConfig:
    """The settings of a run (the options of ``tensorized-attention train``)."""

    context: int
    batch: int
    train_tokens: int
    micro_batch: int = 1
    lr: float = 2e-5
    new_lr: float | None = None
    retrieval_share: float = 0.0
    answer_weight: float = 1.0
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int | None = None
    eval_windows: int = 8
    peak_tflops: float | None = None
    stop_after: int | None = None
    time_limit: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.context

    @property
    def steps(self) -> int:
        """ceil(train_tokens / (batch * context))."""
        return -(-self.train_tokens // self.tokens_per_step)

    @property
    def accumulation(self) -> int:
        return self.batch // self.micro_batch

    @property
    def warmup_steps(self) -> int:
        return warmup_steps(self.warmup, self.steps)

    def check(self) -> None:
        """Raise :class:`TrainError` for settings that cannot run, saying what is allowed."""
        for key in ("context", "batch", "micro_batch", "train_tokens", "save_every", "keep_checkpoints",
                    "log_every", "eval_windows"):
            if getattr(self, key) < 1:
                raise TrainError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.batch % self.micro_batch:
            raise TrainError(f"--micro-batch ({self.micro_batch}) must divide --batch ({self.batch}): the batch is "
                             f"--batch / --micro-batch accumulated micro-batches; e.g. --micro-batch 1")
        if self.train_tokens < self.tokens_per_step:
            raise TrainError(f"--train-tokens ({self.train_tokens}) is smaller than one step, --batch x --context = "
                             f"{self.batch} x {self.context} = {self.tokens_per_step} tokens; give at least that")
        if not 0.0 <= self.retrieval_share < 1.0:
            raise TrainError(f"--retrieval-share must lie in [0, 1), got {self.retrieval_share}")
        if not self.answer_weight >= 1.0 or (self.answer_weight != 1.0 and not self.retrieval_share):
            raise TrainError(f"--answer-weight must be >= 1, and other than 1 only with --retrieval-share (it weights "
                             f"the answers of the synthetic rows), got {self.answer_weight} with --retrieval-share "
                             f"{self.retrieval_share}")
        if self.new_lr is not None and not self.new_lr > 0:
            raise TrainError(f"--new-lr must be > 0 (or left out: the same as --lr), got {self.new_lr}")
        if not self.lr > 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainError(f"--lr must be > 0 and --min-lr-ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip < 0:
            raise TrainError(f"--weight-decay and --clip must be >= 0 (--clip 0: no clipping), got "
                             f"{self.weight_decay} and {self.clip}")
        for key in ("eval_every", "stop_after"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise TrainError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise TrainError(f"--time-limit must be > 0 seconds, got {self.time_limit}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise TrainError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if self.dtype not in PRECISIONS:
            raise TrainError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        self.warmup_steps  # noqa: B018 - raises for a bad --warmup


def _run_identity(run: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    data = run.get("data") or {}
    settings = asdict(config)
    return {
        "model": run.get("model"),
        "attention": run.get("attention"),
        "data": {k: data.get(k) for k in ("kind", "split", "sha256", "stream_tokens", "separator")},
        **{k: settings[k] for k in RUN_KEYS if k in settings and settings[k] != _LATER_KEYS.get(k, object())},
    }


def _describe_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
            for key in now if saved.get(key) != now.get(key)]


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types (what a weights-only ``torch.load`` reads back)."""
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of steps up to ``step`` (a resumed run logs the later ones again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def train(model, tokenizer, stream: TokenStream, config: TrainConfig, out_dir: str | os.PathLike, *,
          run: dict[str, Any] | None = None, eval_stream: TokenStream | None = None, resume: bool = False,
          progress: bool = True, echo=print, parallel: SequenceParallel | None = None) -> dict[str, Any]:
    """Train ``model`` (loaded with its attention, on its device, weights in the dtype of
    ``config.dtype``) on windows of ``stream``; checkpoints, log and summary in ``out_dir``.

    ``run`` describes the run for the checkpoints and the summary (``model``,
    ``attention``, ``setup``, ``data``, ``command``, ...); ``resume``: continue from the
    latest checkpoint of ``out_dir`` (its run must share :data:`RUN_KEYS`). Returns the
    summary (also written to ``out_dir/train_summary.json``). Raises :class:`TrainError`
    for a run that cannot start, :class:`FloatingPointError` for a loss that is not finite.

    ``parallel``: the sequences sharded over ranks (:class:`SequenceParallel`; the model
    sharded by :func:`shard_model`). Rank 0 writes the log, the summary and the final
    model; no intermediate checkpoint is written (the optimizer's state is sharded), so
    such a run cannot be resumed.
    """
    from .hf.attention import mean_gates

    config.check()
    main = parallel is None or parallel.main
    if parallel is not None and resume:
        raise TrainError(NO_PARALLEL_RESUME)
    if config.retrieval_share:
        from . import passkey

        needles = [(0.5, name, passkey.KEY_RANGE[1]) for name in sorted(passkey.NAMES, key=len)[-4:]]
        shortest = passkey.PromptBuilder(tokenizer, filler_text=[0, 0]).min_length_multi(needles, 0)
        if config.context + 1 < shortest:
            raise TrainError(f"--retrieval-share needs --context >= {shortest - 1}: a prompt with four keys does not "
                             f"fit {config.context + 1} tokens")
    run = dict(run or {})
    invocation_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    precision = resolve_precision(config.dtype, device)
    autocast = precision["autocast"]
    steps, warmup = config.steps, config.warmup_steps
    log_path, summary_path = out_dir / LOG_FILE, out_dir / SUMMARY_FILE
    identity = _plain(_run_identity(run, config))

    model.config.use_cache = False
    if config.gradient_checkpointing:  # non-reentrant torch.utils.checkpoint around each decoder layer
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, new_lr=config.new_lr)
    params = [p for p in model.parameters() if p.requires_grad]

    start_step, history = 0, {"train_time_s": 0.0, "wall_time_s": 0.0, "commands": [], "resumed_from": []}
    if resume:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise TrainError(f"--resume: {out_dir} holds no checkpoint ({CHECKPOINT_PREFIX}STEP/ with "
                             f"{TRAINER_STATE}); start without --resume")
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        differences = _describe_differences(state.get("identity", {}), identity)
        if differences:
            raise TrainError(f"--resume: {path} belongs to a run with other settings ({'; '.join(differences)}); "
                             f"resume with the run's settings, or train into another --out")
        load_checkpoint_weights(model, path)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_step = int(state["step"])
        history = {k: state.get("history", {}).get(k, history[k]) for k in history}
        history["resumed_from"] = [*history["resumed_from"], {"checkpoint": path.name, "step": start_step}]
        _truncate_log(log_path, start_step)
        echo(f"resumed from {path} (step {start_step} of {steps})")
    else:
        if checkpoints(out_dir):
            raise TrainError(f"{out_dir} already holds checkpoints ({latest_checkpoint(out_dir).name}, ...): "
                             "continue that run with --resume, or train into another --out")
        if main:
            log_path.write_text("")
    history["commands"] = [*history["commands"], run.get("command")]

    flops = flops_per_token(model, config.context)
    peak_tflops = config.peak_tflops or default_peak_tflops(device, autocast or precision["weights"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def log(record: dict[str, Any]) -> None:
        if not main:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def peak_memory_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None

    def checkpoint_state() -> dict[str, Any]:
        wall_total = wall_before + time.perf_counter() - invocation_start
        return _plain({
            "identity": identity,
            "run": {k: v for k, v in run.items() if k != "command"},
            "config": asdict(config),
            "precision": precision["name"],
            "tokens": step * config.tokens_per_step,
            "last_loss": last_loss,
            "history": {**history, "train_time_s": train_time, "wall_time_s": wall_total},
        })

    eval_results: list[dict[str, Any]] = []

    def run_eval(at_step: int) -> None:
        result = evaluate_loss(model, eval_stream, context=config.context, windows=config.eval_windows,
                               micro_batch=config.micro_batch, seed=config.seed, autocast=autocast, parallel=parallel)
        record = {"kind": "eval", "step": at_step, "tokens": at_step * config.tokens_per_step, **result}
        eval_results.append(record)
        log(record)
        if main:
            bar.write(f"step {at_step}: eval loss {result['eval_loss']:.4f} ({config.eval_windows} windows)")

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", disable=not progress or not main,
               dynamic_ncols=True)
    train_time, wall_before = float(history["train_time_s"]), float(history["wall_time_s"])
    step, last_loss, saved_at = start_step, None, start_step if resume else None
    interval = {"losses": [], "seconds": 0.0}
    losses_recent: list[float] = []
    step_times: list[float] = []
    stopped = None
    if eval_stream is not None and start_step == 0:
        run_eval(0)
    while step < steps:
        t0 = time.perf_counter()
        starts = window_starts(config.seed, step, config.batch, len(stream), config.context + 1)
        ids = stream.windows(starts, config.context + 1)
        weights = None
        if config.retrieval_share:
            ids, answers = retrieval_rows(ids, config.retrieval_share, tokenizer, config.seed, step)
            weights = answer_weights(answers, ids, config.answer_weight)
        ids = ids.to(device)
        lr = lr_at(step, steps=steps, warmup=warmup, peak=config.lr, min_ratio=config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, config.batch, config.micro_batch):
            loss = sequence_loss(model, ids[i: i + config.micro_batch], autocast, parallel,
                                 None if weights is None else weights[i: i + config.micro_batch])
            (loss / config.accumulation).backward()
            loss_sum += loss.detach()
        if parallel is not None:
            loss_sum = parallel.mean(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        last_loss = float(loss_sum) / config.accumulation
        if not math.isfinite(last_loss):
            bar.close()
            raise FloatingPointError(f"the loss is {last_loss} at step {step + 1}; lower --lr, or check the data")
        dt = time.perf_counter() - t0
        step += 1
        train_time += dt
        step_times.append(dt)
        interval["losses"].append(last_loss)
        interval["seconds"] += dt
        losses_recent = (losses_recent + [last_loss])[-config.log_every:]
        tokens_per_s = config.tokens_per_step / dt
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

        done_here = step - start_step
        if config.stop_after is not None and done_here >= config.stop_after and step < steps:
            stopped = f"--stop-after {config.stop_after}"
        elif config.time_limit is not None and step < steps:
            mean = sum(step_times) / len(step_times)
            late = time.perf_counter() - invocation_start + mean > config.time_limit
            if parallel.any(late, device) if parallel is not None else late:  # ranks stop together
                stopped = f"--time-limit {config.time_limit:g} s"
        if step % config.log_every == 0 or step == steps or stopped:
            n = len(interval["losses"])
            tps = n * config.tokens_per_step / interval["seconds"]
            log({"kind": "train", "step": step, "tokens": step * config.tokens_per_step,
                 "loss": sum(interval["losses"]) / n, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": round(tps, 2),
                 "mfu": flops["flops_per_token"] * tps / (peak_tflops * 1e12) if peak_tflops else None,
                 "peak_memory_gib": peak_memory_gib(), "step_s": round(interval["seconds"] / n, 4),
                 "elapsed_s": round(time.perf_counter() - invocation_start, 2), "gate": mean_gates(model)})
            interval = {"losses": [], "seconds": 0.0}
        if eval_stream is not None and config.eval_every and (step % config.eval_every == 0 or step == steps):
            run_eval(step)
        if parallel is None and (step % config.save_every == 0 or step == steps or stopped):
            save_checkpoint(out_dir, step, model, tokenizer, optimizer, checkpoint_state(),
                            keep=config.keep_checkpoints)
            saved_at = step
        if stopped:
            break
    bar.close()
    finished = step >= steps
    if parallel is None and finished and saved_at != step:  # resumed at the end: nothing left but the final model
        save_checkpoint(out_dir, step, model, tokenizer, optimizer, checkpoint_state(), keep=config.keep_checkpoints)
    if finished:
        note = {"base_model": run.get("model"), "attention": run.get("attention"), "setup": run.get("setup"),
                "steps": steps, "tokens": steps * config.tokens_per_step,
                "loading": "the config holds the attention (RoPE scaling, config.tensorized_attention) and the "
                           "weights the gate logits: tensorized_attention.hf.from_pretrained(path), or "
                           "setups.load_with_attention(path, setup) with the run's tensorized setup, or 'full' "
                           "for a RoPE-scaled full-attention model (its config is scaled already)"}
        model.config.use_cache = True
        weights = _full_state_dict(model) if parallel is not None else None
        if main:
            _save_pretrained(model, tokenizer, out_dir / FINAL_DIR, {SETUP_FILE: note}, state_dict=weights)
        model.config.use_cache = False
    wall = time.perf_counter() - invocation_start
    # throughput of this call: the median step (the first steps of a CUDA run compile and tune kernels)
    tokens_per_s = config.tokens_per_step / float(np.median(step_times)) if step_times else None
    summary = {
        "finished": finished,
        "stopped_by": stopped,
        "model": run.get("model"),
        "model_type": getattr(model.config, "model_type", None),
        "attention": run.get("attention"),
        "setup": run.get("setup"),
        "options_resolved": getattr(model.config, "tensorized_attention", None)
        if getattr(model.config, "_attn_implementation", None) == "tensorized" else None,
        "fold": run.get("fold"),
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "data": run.get("data"),
        "eval_data": run.get("eval_data"),
        "hyperparameters": {**asdict(config), "steps": steps, "warmup_steps": warmup, "accumulation": config.accumulation,
                            "tokens_per_step": config.tokens_per_step, "betas": list(BETAS), "eps": EPS,
                            "precision": precision["name"], "weights_dtype": str(precision["weights"])[6:],
                            "autocast_dtype": str(autocast)[6:] if autocast is not None else None,
                            "optimizer": "AdamW (weight decay on matrices; none on vectors and gate logits)",
                            "schedule": "linear warmup, cosine to min_lr_ratio x lr"},
        "train_tokens": config.train_tokens,
        "steps": steps,
        "steps_done": step,
        "tokens_trained": step * config.tokens_per_step,
        "tokens_per_epoch": len(stream),
        "epochs": step * config.tokens_per_step / len(stream),
        "params": {"total": sum(p.numel() for p in params), "matmul": flops["matmul_params"]},
        "flops": flops,
        "peak_tflops": peak_tflops,
        "final_loss": last_loss,
        "final_loss_mean": sum(losses_recent) / len(losses_recent) if losses_recent else None,
        "final_losses": losses_recent,
        "final_eval_loss": eval_results[-1]["eval_loss"] if eval_results else None,
        "eval": eval_results,
        "tokens_per_s": tokens_per_s,
        "mfu": flops["flops_per_token"] * tokens_per_s / (peak_tflops * 1e12) if peak_tflops and tokens_per_s else None,
        "peak_memory_gib": peak_memory_gib(),
        "load_s": run.get("load_s"),
        "wall_time_s": round(wall, 2),
        "wall_time_total_s": round(wall_before + wall, 2),
        "train_time_s": round(train_time, 2),
        "resumed_from": history["resumed_from"],
        "checkpoints": [p.name for _, p in checkpoints(out_dir)],
        "final_dir": str(out_dir / FINAL_DIR) if finished else None,
        "device": run.get("device"),
        "versions": run.get("versions"),
        "command": run.get("command"),
        "commands": history["commands"],
    }
    if main:
        _write_json(summary_path, summary)
    return summary


# ---------------------------------------------------------------------------------------
# the command line


def _length(text: str) -> int:
    from .cli import parse_lengths

    values = parse_lengths(text)
    if len(values) != 1:
        import argparse

        raise argparse.ArgumentTypeError(f"one length, got {text!r}")
    return values[0]


def _count(text: str) -> int:
    import argparse

    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(p) -> None:
    """The options of ``tensorized-attention train``."""
    from .cli import _nonnegative, _positive
    from .setups import add_model_arguments

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR",
                        help="a corpus built by 'tensorized-attention corpus': its train split, documents "
                             "concatenated with --separator between them (its validation split for --eval-every)")
    source.add_argument("--tokens", metavar="FILE",
                        help="a flat token file: a 1-D .npy array, or raw integers (see --tokens-dtype)")
    p.add_argument("--tokens-dtype", default="uint16", help="integer type of the ids in a raw --tokens file")
    p.add_argument("--eval-tokens", metavar="FILE", default=None,
                   help="with --tokens: a token file for --eval-every (with --data: its validation split)")
    p.add_argument("--separator", default="auto",
                   help="the token between documents of --data: auto (<|endoftext|> when the vocabulary has it, "
                        "else EOS), eos, none, a token, or a token id")
    p.add_argument("--context", type=_length, default=32768, help="tokens per training sequence (k = 1024)")
    p.add_argument("--batch", type=_positive, default=4, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=_positive, default=1,
                   help="sequences per forward/backward; --batch / --micro-batch are accumulated")
    p.add_argument("--train-tokens", type=_count, required=True,
                   help="the token budget: ceil(budget / (batch x context)) steps; e.g. 20M, 1.5B")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    p.add_argument("--new-lr", type=float, default=None,
                   help="peak learning rate of the parameters tensorized attention adds (the gate logits); "
                        "default: --lr")
    p.add_argument("--retrieval-share", type=float, default=0.0,
                   help="share of each batch replaced by synthetic passkey / multi-key prompts over the batch's own "
                        "text (keys apart from the evaluation's); 0: none")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="with --retrieval-share: each answer token of a synthetic row counts this many times in its "
                        "micro-batch's mean loss (1: like any other token)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this times --lr")
    p.add_argument("--warmup", type=float, default=0.05,
                   help="linear warmup: steps (>= 1), or a fraction of the steps (< 1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: none)")
    p.add_argument("--dtype", choices=PRECISIONS, default="auto",
                   help="bf16-autocast: float32 weights and optimizer, torch.autocast bfloat16 compute; "
                        "bfloat16: everything bfloat16; auto: bf16-autocast on CUDA, float32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of the windows read")
    p.add_argument("--out", default=os.path.join("results", "train"),
                   help="directory of checkpoint-STEP/, final/, train_log.jsonl, train_summary.json")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="under torchrun: shard each sequence over the processes (one per GPU) and the parameters "
                        "with FSDP2; tensorized attention only; rank 0 writes; no intermediate checkpoints")
    p.add_argument("--save-every", type=_positive, default=100, help="a checkpoint every this many steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=_positive, default=2, help="keep the latest this many checkpoints")
    p.add_argument("--log-every", type=_positive, default=10, help="a line of train_log.jsonl every this many steps")
    p.add_argument("--eval-every", type=_positive, default=None,
                   help="validation loss every this many steps (and before the first and after the last)")
    p.add_argument("--eval-windows", type=_positive, default=8, help="validation windows (fixed by --seed)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak FLOP/s for MFU, in TFLOP/s; default: 989 on H100 / H200 with "
                        "bfloat16 compute, else MFU is not reported")
    p.add_argument("--stop-after", type=_positive, default=None,
                   help="stop after this many steps of this call (with a checkpoint); continue with --resume")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop (with a checkpoint) before a step would end past this many seconds of this call")
    add_model_arguments(p, attention="the attention trained")


def run(args, command: str) -> int:
    """``tensorized-attention train``: check the settings, load the model with its attention
    and the data, train, write checkpoints, log and summary. A process group this call
    starts (``--sequence-parallel``) is destroyed when it returns."""
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    try:
        return _run(args, command)
    finally:
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, command: str) -> int:
    import sys

    from . import bench, setups
    from .cli import PROG

    def fail(message: str) -> int:
        print(f"{PROG} train: error: {message}", file=sys.stderr)
        return 2

    try:
        setup = setups.parse_attention(args.attention)
    except ValueError as err:
        return fail(f"--attention: {err}")
    config = TrainConfig(
        context=args.context, batch=args.batch, train_tokens=args.train_tokens, micro_batch=args.micro_batch,
        lr=args.lr, new_lr=args.new_lr, retrieval_share=args.retrieval_share,
        answer_weight=args.answer_weight, min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip, seed=args.seed, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        eval_every=args.eval_every, eval_windows=args.eval_windows, peak_tflops=args.peak_tflops,
        stop_after=args.stop_after, time_limit=args.time_limit)
    parallel = None
    try:
        config.check()
        if args.sequence_parallel:
            if setup.kind not in ("tensorized", "window"):
                raise TrainError(f"--sequence-parallel needs tensorized attention (--attention tensorized:... or "
                                 f"window:...), got {args.attention!r}")
            if args.resume:
                raise TrainError(NO_PARALLEL_RESUME)
            parallel, device = start_sequence_parallel(args.device)
        else:
            device = bench.resolve_device(args.device)
    except (TrainError, RuntimeError) as err:
        return fail(str(err))
    say = print if parallel is None or parallel.main else (lambda *_args, **_kwargs: None)  # rank 0 speaks
    precision = resolve_precision(config.dtype, device)
    config.dtype = precision["name"]
    if args.resume and latest_checkpoint(args.out) is None:
        return fail(f"--resume: {args.out} holds no checkpoint ({CHECKPOINT_PREFIX}STEP/ with {TRAINER_STATE}); "
                    "start without --resume")
    if not args.resume and checkpoints(args.out):
        return fail(f"{args.out} already holds checkpoints ({latest_checkpoint(args.out).name}, ...): continue "
                    "that run with --resume, or train into another --out")
    if args.eval_tokens is not None and args.tokens is None:
        return fail("--eval-tokens goes with --tokens (with --data, --eval-every reads its validation split)")
    if args.eval_every is not None and args.tokens is not None and args.eval_tokens is None:
        return fail("--eval-every needs validation data: --data (its validation split) or --eval-tokens FILE")
    if args.data is not None:
        from .corpus import MANIFEST

        if not os.path.isdir(args.data):
            return fail(f"--data {args.data}: no such directory; give a corpus directory written by "
                        "'tensorized-attention corpus'")
        if not os.path.isfile(os.path.join(args.data, MANIFEST)):
            return fail(f"--data {args.data} is not a corpus (no {MANIFEST}); give a directory written by "
                        "'tensorized-attention corpus'")
    for flag, path in (("--tokens", args.tokens), ("--eval-tokens", args.eval_tokens)):
        if path is not None and not os.path.isfile(path):
            return fail(f"{flag} {path}: no such file; give a 1-D .npy array or a raw file of token ids")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    try:
        model, tokenizer = setups.load_with_attention(args.model, setup, dtype=precision["weights"], device=device,
                                                      cache_dir=args.cache_dir)
    except (FileNotFoundError, TypeError, ValueError) as err:
        return fail(str(err))
    load_s = time.perf_counter() - start
    if parallel is not None:
        shard_model(model)
    vocab = model.get_input_embeddings().num_embeddings
    try:
        if args.data is not None:
            separator, separator_token = resolve_separator(args.separator, tokenizer)
            stream = corpus_stream(args.data, "train", separator)
            _check_stream(stream, context=config.context, vocab=vocab, what=f"the train split of {args.data}")
            eval_stream = None
            if config.eval_every is not None:
                eval_stream = corpus_stream(args.data, "validation", separator)
                _check_stream(eval_stream, context=config.context, vocab=vocab,
                              what=f"the validation split of {args.data} (for --eval-every)")
            for s in (stream, eval_stream):
                if s is not None:
                    s.info["separator"] = {"id": separator, "token": separator_token}
        else:
            stream = file_stream(args.tokens, args.tokens_dtype)
            _check_stream(stream, context=config.context, vocab=vocab, what=f"--tokens {args.tokens}")
            eval_stream = None
            if config.eval_every is not None:
                eval_stream = file_stream(args.eval_tokens, args.tokens_dtype)
                _check_stream(eval_stream, context=config.context, vocab=vocab, what=f"--eval-tokens {args.eval_tokens}")
    except TrainError as err:
        return fail(str(err))

    import transformers

    fold = None
    if setup.kind in ("tensorized", "window"):
        from .hf import options_of, resolve_fold

        fold = list(resolve_fold(options_of(model.config), config.context, int(model.config.max_position_embeddings)))
    model_id = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    info = {
        "model": model_id,
        "attention": args.attention,
        "setup": setup.describe(),
        "fold": fold,
        "data": stream.info,
        "eval_data": eval_stream.info if eval_stream is not None else None,
        "load_s": round(load_s, 2),
        "device": bench.device_info(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": command,
    }
    max_positions = getattr(model.config, "max_position_embeddings", None)
    say(f"train: {args.model} ({model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters), attention {args.attention} (attn_implementation={setup.attn_implementation!r}"
          + (f", fold {'x'.join(map(str, fold))}" if fold else "") + f"), {precision['name']} on {device.type}",
          flush=True)
    what = (f"{stream.info['documents']} documents of {args.data} (train split)" if args.data is not None
            else f"{args.tokens}")
    say(f"data: {what}, {len(stream)} tokens in the stream; context {config.context}, batch {config.batch} "
          f"({config.accumulation} x {config.micro_batch}), {config.tokens_per_step} tokens per step", flush=True)
    say(f"budget: {config.train_tokens} tokens -> {config.steps} steps ({config.steps * config.tokens_per_step} "
          f"tokens, {config.steps * config.tokens_per_step / len(stream):.2f} passes over the stream); lr "
          f"{config.lr:g}, warmup {config.warmup_steps} steps, cosine to {config.min_lr_ratio:g} x lr", flush=True)
    if max_positions is not None and config.context > max_positions:
        say(f"note: the context {config.context} exceeds the model's max_position_embeddings ({max_positions})")
    try:
        summary = train(model, tokenizer, stream, config, args.out, run=info, eval_stream=eval_stream,
                        resume=args.resume, progress=not args.no_progress, echo=say, parallel=parallel)
    except TrainError as err:
        return fail(str(err))
    except FloatingPointError as err:
        print(f"{PROG} train: error: {err}", file=sys.stderr)
        return 1
    mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
    tps = summary["tokens_per_s"]
    line = f"step {summary['steps_done']} of {summary['steps']}"
    if summary["final_loss"] is not None:
        line += (f": loss {summary['final_loss']:.4f} (mean of the last {len(summary['final_losses'])} steps "
                 f"{summary['final_loss_mean']:.4f})")
    if summary["final_eval_loss"] is not None:
        line += f", eval loss {summary['final_eval_loss']:.4f}"
    if tps:
        line += f", {tps:,.0f} tokens/s (median step){mfu}"
    say(line + f", {summary['wall_time_s']:.1f} s")
    if summary["finished"]:
        say(f"wrote {summary['final_dir']}, {os.path.join(args.out, LOG_FILE)} and "
              f"{os.path.join(args.out, SUMMARY_FILE)}")
    else:
        say(f"stopped by {summary['stopped_by']} at step {summary['steps_done']} of {summary['steps']}; "
              f"continue with --resume (checkpoint {summary['checkpoints'][-1]})")
    return 0
