"""Passkey retrieval: the test of LongLoRA and Landmark Attention, teacher-forced, behind
``tensorized-attention passkey``.

The prompt (LongLoRA's text and layout: its parts joined by newlines)::

    There is an important info hidden inside a lot of irrelevant text. Find it and
    memorize them. I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 68241. Remember it. 68241 is the pass key.
    The grass is green. The sky is blue. ... There and back
    What is the pass key? The pass key is 68241

One sequence of exactly ``length`` tokens: the instruction, a newline, the filler before
the needle, a newline, the needle, a newline, the filler after it, a newline, the question
and the answer `` 68241`` (the answer's tokens are the sequence's last ones and count in
``length``). The filler repeats the five sentences; the needle goes in at the sentence
boundary nearest to ``depth`` times the filler's tokens (depth 0: right after the
instruction; depth 1: right before the question), and the filler after it is cut to fill
the length exactly (it may end mid-sentence, as LongLoRA's does). At depth 0 the filler
before the needle is left out with its newline, at depth 1 the filler after it, so no two
newlines meet. Each part is tokenized on its own (no special tokens) and the ids are
concatenated, so the length is exact and the needle's token offset is known; with a
byte-level BPE tokenizer (SmolLM2's) the ids are those of the joined text. A BOS token
comes first only when the tokenizer adds one itself (``bos=None``, see
:class:`PromptBuilder`). The key is a random 5-digit integer, seeded per trial
(:func:`trial_key`).

Scoring is teacher-forced, one forward pass per trial, no generation: the trial succeeds
when every answer token is the argmax of the logits at the position before it. Also
recorded: the fraction of the key's digits predicted right and the answer's mean negative
log-likelihood. Only the logits of the answer positions are computed
(:func:`answer_logits`: ``logits_to_keep``), so a 128k-token prompt costs no
128k x vocabulary logits tensor.

:class:`PromptBuilder` builds the prompts, :func:`score_prompt` scores one,
:func:`evaluate` runs a grid of lengths x depths x trials, :func:`format_table` and
:func:`plot_heatmap` show the result (from ``passkey.json`` alone, no model needed).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ANSWER",
    "FILLER",
    "FILLERS",
    "INTRO",
    "MULTI_NEEDLE",
    "MULTI_QUESTION",
    "NAMES",
    "NEEDLE",
    "QUESTION",
    "SEPARATOR",
    "PasskeyPrompt",
    "PromptBuilder",
    "Trial",
    "add_arguments",
    "draw_key",
    "answer_logits",
    "contrast_key",
    "evaluate",
    "filler_offset",
    "format_table",
    "multi_needles",
    "parse_depths",
    "plan_trials",
    "plot_heatmap",
    "run",
    "score_prompt",
    "summarize",
    "trial_key",
]

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"
SEPARATOR = "\n"
KEY_RANGE = (10000, 99999)  # 5-digit keys, both ends included
# the multi-key task: several named keys hidden, one asked
MULTI_NEEDLE = "The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
MULTI_QUESTION = "What is the pass key of {name}? The pass key of {name} is"
NAMES = ("Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karla", "Lukas",
         "Maria", "Nikos", "Olga", "Peter")
FILLERS = ("repeat", "text")

DEFAULT_LENGTHS = "2k,8k,32k,128k"
DEFAULT_DEPTHS = "10"


# ---------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``ids`` (exactly ``length`` token ids, the answer's last), the ``key``, the
    requested ``depth``, where the needle sits (``needle_offset``: index of its first token,
    ``needle_length`` tokens), where the answer sits (``answer_offset`` = ``length -
    answer_length``), and the filler: ``filler_tokens`` in all, ``filler_before`` of them
    before the needle."""

    ids: list[int]
    key: int
    depth: float
    needle_offset: int
    needle_length: int
    answer_offset: int
    answer_length: int
    filler_tokens: int
    filler_before: int
    needles: int = 1  # needles in the prompt (more than 1: the multi-key task)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def depth_actual(self) -> float | None:
        """The share of the filler before the needle (None without filler)."""
        return self.filler_before / self.filler_tokens if self.filler_tokens else None

    @property
    def distance(self) -> int:
        """Tokens from the needle's first token to the first answer token."""
        return self.answer_offset - self.needle_offset


class PromptBuilder:
    """Builds passkey prompts of exact token lengths with ``tokenizer`` (a Hugging Face
    tokenizer, or anything called as ``tokenizer(text, add_special_tokens=False)`` that
    returns ``{"input_ids": [...]}``).

    ``bos``: put ``tokenizer.bos_token_id`` first. None (the default) decides as the
    tokenizer does: a BOS when ``tokenizer("x")`` (special tokens on) starts with it, as
    Llama 2 and 3 tokenizers do; SmolLM2's adds none, so its prompts start with the
    instruction.

    ``filler_text``: token ids of real text (e.g. a corpus's test split) to fill with instead
    of the repeated sentences: the filler is read from ``filler_offset`` on (wrapping
    around), continuing after the needle, and a needle may go in at any token boundary.
    """

    def __init__(self, tokenizer, *, bos: bool | None = None, filler_text: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        if filler_text is not None and len(filler_text) < 2:
            raise ValueError("filler_text must hold at least 2 tokens")
        self.filler_text = None if filler_text is None else [int(t) for t in filler_text]
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            try:
                bos = bos_id is not None and list(tokenizer("x")["input_ids"][:1]) == [bos_id]
            except (TypeError, KeyError):
                bos = False
        if bos and bos_id is None:
            raise ValueError("bos=True, but the tokenizer has no bos_token_id")
        self.prefix: list[int] = [int(bos_id)] if bos else []
        self._cache: dict[str, list[int]] = {}
        self.intro = self.encode(INTRO)
        self.separator = self.encode(SEPARATOR)
        self.question = self.encode(QUESTION)
        # a filler segment: its first sentence as is, later ones after a space
        self.filler_first = [self.encode(s) for s in FILLER]
        self.filler_next = [self.encode(" " + s) for s in FILLER]
        if not all(self.filler_first) or not all(self.filler_next) or not self.separator:
            raise ValueError("the tokenizer gives no tokens for a filler sentence or the separator")

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without special tokens (cached)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            self._cache[text] = ids
        return list(ids)

    def needle(self, key: int) -> list[int]:
        return self.encode(NEEDLE.format(key=key))

    def answer(self, key: int) -> list[int]:
        return self.encode(ANSWER.format(key=key))

    def min_length(self, key: int) -> int:
        """The shortest prompt with ``key``: BOS (if any), instruction, needle, question and
        answer, three separators and one filler token."""
        return (len(self.prefix) + len(self.intro) + len(self.needle(key)) + len(self.question)
                + len(self.answer(key)) + 3 * len(self.separator) + 1)

    def filler(self, count: int) -> tuple[list[int], list[int]]:
        """The first ``count`` tokens of a filler segment, and the offsets in it where a
        sentence ends (below ``count``)."""
        ids: list[int] = []
        ends: list[int] = []
        i = 0
        while len(ids) < count:
            ids += (self.filler_first if i == 0 else self.filler_next)[i % len(FILLER)]
            ends.append(len(ids))
            i += 1
        return ids[:count], [e for e in ends if e < count]

    def _stream(self, count: int, offset: int) -> tuple[list[int], list[int]]:
        """``count`` filler tokens read from ``offset`` on, and where a needle may go in."""
        if self.filler_text is None:
            return self.filler(count)
        text = self.filler_text
        start = offset % len(text)
        if start + count <= len(text):
            ids = text[start:start + count]
        else:  # wrap around
            ids = (text[start:] + text * (1 + count // len(text)))[:count]
        return ids, list(range(1, count))

    def build(self, length: int, depth: float, key: int, *, filler_offset: int = 0) -> PasskeyPrompt:
        """The prompt of exactly ``length`` tokens with ``key``'s needle at ``depth`` (a
        fraction of the filler, in [0, 1]); ValueError when ``length`` is below
        :meth:`min_length`.

        The filler's tokens before the needle are 0 (depth 0), all of them (depth 1, the
        filler then ends mid-sentence where the length says), or a sentence end between: the
        choice whose share of the filler is nearest to ``depth``. An empty filler segment
        goes with its separator, so no two separators meet.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        needle, answer = self.needle(key), self.answer(key)
        shortest = self.min_length(key)
        if length < shortest:
            raise ValueError(f"length {length} is shorter than the prompt's fixed parts ({shortest} tokens "
                             f"with one filler token)")
        sep = self.separator
        s = len(sep)
        # tokens of the filler segments and of their separators (at least s + 1)
        budget = length - (len(self.prefix) + len(self.intro) + len(needle) + len(self.question)
                           + len(answer) + 2 * s)
        stream, ends = self._stream(budget - s, filler_offset)
        options = [(0, budget - s), (budget - s, 0)]  # (filler before, filler after)
        options += [(b, budget - 2 * s - b) for b in ends if b <= budget - 2 * s - 1]
        before, after = min(options, key=lambda o: (abs(o[0] / (o[0] + o[1]) - depth), o[0]))
        head = self.prefix + self.intro + (sep + stream[:before] if before else []) + sep
        if self.filler_text is None:  # the repeated filler starts again after the needle
            tail = sep + self.filler(after)[0] if after else []
        else:  # real text reads on
            tail = sep + self._stream(after, filler_offset + before)[0] if after else []
        ids = head + needle + tail + sep + self.question + answer
        if len(ids) != length:  # pragma: no cover - a bug, not an input error
            raise RuntimeError(f"built {len(ids)} tokens, expected {length}")
        return PasskeyPrompt(ids=ids, key=key, depth=float(depth), needle_offset=len(head),
                             needle_length=len(needle), answer_offset=length - len(answer),
                             answer_length=len(answer), filler_tokens=before + after, filler_before=before)

    def build_multi(self, length: int, needles: Sequence[tuple[float, str, int]], asked: int, *,
                    filler_offset: int = 0) -> PasskeyPrompt:
        """A multi-key prompt of exactly ``length`` tokens: each ``(depth, name, key)`` of
        ``needles`` hidden at its depth (:data:`MULTI_NEEDLE`), the question asks for
        ``needles[asked]``'s key (:data:`MULTI_QUESTION`). Layout: the instruction, then
        filler and needles alternating, each filler segment at least one token and every
        part after a separator; needle i goes in at the boundary nearest ``depth_i`` times
        the filler (in the order of the depths, ties in the given order). The returned
        prompt describes the asked needle."""
        if len(needles) < 2 or not 0 <= asked < len(needles):
            raise ValueError(f"build_multi takes 2 or more needles and the index of one, got {len(needles)} "
                             f"needles and asked={asked}")
        if any(not 0.0 <= d <= 1.0 for d, _, _ in needles):
            raise ValueError(f"depths must lie in [0, 1], got {[d for d, _, _ in needles]}")
        sep = self.separator
        s = len(sep)
        n = len(needles)
        texts = [self.encode(MULTI_NEEDLE.format(name=name, key=key)) for _, name, key in needles]
        question = self.encode(MULTI_QUESTION.format(name=needles[asked][1]))
        answer = self.answer(needles[asked][2])
        fixed = len(self.prefix) + len(self.intro) + sum(map(len, texts)) + len(question) + len(answer)
        total = length - fixed - (2 * n + 2) * s  # filler tokens, n + 1 segments of at least one
        if total < n + 1:
            raise ValueError(f"length {length} is shorter than the prompt's fixed parts "
                             f"({fixed + (2 * n + 2) * s + n + 1} tokens with one filler token per segment)")
        stream, ends = self._stream(total, filler_offset)
        order = sorted(range(n), key=lambda i: (needles[i][0], i))
        cuts, low = [], 1
        for rank, i in enumerate(order):
            high = total - (n - rank)
            want = needles[i][0] * total
            cut = min((e for e in ends if low <= e <= high), key=lambda e: (abs(e - want), e), default=low)
            cuts.append(cut)
            low = cut + 1
        ids = self.prefix + self.intro
        starts, previous = {}, 0
        for rank, i in enumerate(order):
            ids = ids + sep + stream[previous:cuts[rank]] + sep
            starts[i] = len(ids)
            ids = ids + texts[i]
            previous = cuts[rank]
        ids = ids + sep + stream[previous:] + sep + question + answer
        if len(ids) != length:  # pragma: no cover - a bug, not an input error
            raise RuntimeError(f"built {len(ids)} tokens, expected {length}")
        before = cuts[order.index(asked)]
        return PasskeyPrompt(ids=ids, key=needles[asked][2], depth=float(needles[asked][0]),
                             needle_offset=starts[asked], needle_length=len(texts[asked]),
                             answer_offset=length - len(answer), answer_length=len(answer),
                             filler_tokens=total, filler_before=before, needles=n)

    def min_length_multi(self, needles: Sequence[tuple[float, str, int]], asked: int) -> int:
        """The shortest multi-key prompt of these needles (one filler token per segment)."""
        n = len(needles)
        fixed = (len(self.prefix) + len(self.intro) + len(self.encode(MULTI_QUESTION.format(name=needles[asked][1])))
                 + sum(len(self.encode(MULTI_NEEDLE.format(name=nm, key=k))) for _, nm, k in needles)
                 + len(self.answer(needles[asked][2])))
        return fixed + (2 * n + 2) * len(self.separator) + n + 1

    def token_text(self, token: int) -> str:
        """The text of one token (``tokenizer.decode([token])``)."""
        return self.tokenizer.decode([int(token)])

    def text(self, prompt: PasskeyPrompt) -> str:
        """The prompt decoded (``tokenizer.decode``)."""
        return self.tokenizer.decode(prompt.ids)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of the protocol."""
        return {"intro": INTRO, "filler": list(FILLER) if self.filler_text is None else "text",
                "filler_text_tokens": None if self.filler_text is None else len(self.filler_text),
                "needle": NEEDLE, "question": QUESTION,
                "multi_needle": MULTI_NEEDLE, "multi_question": MULTI_QUESTION,
                "answer": ANSWER, "separator": SEPARATOR, "key_range": list(KEY_RANGE),
                "bos": bool(self.prefix), "min_length": self.min_length(KEY_RANGE[1]),
                "filler_cycle_tokens": sum(len(s) for s in self.filler_next),
                "length_counts": "every token the model reads: BOS (if any), prompt and answer",
                "scoring": "teacher-forced: success when every answer token is the argmax at the position before it"}


# ---------------------------------------------------------------------------------------
# the grid of trials


@dataclass(frozen=True)
class Trial:
    """One trial of the grid: a ``length``, a ``depth``, the trial's index in its cell and
    its ``key``."""

    length: int
    depth: float
    index: int
    key: int


def trial_key(seed: int, length: int, depth: float, index: int) -> int:
    """The key of a trial: a 5-digit integer drawn from a generator seeded with the seed and
    the trial's place, so a cell keeps its keys when other lengths or depths are added.

    >>> trial_key(0, 2048, 0.5, 0) == trial_key(0, 2048, 0.5, 0)
    True
    >>> 10000 <= trial_key(1, 4096, 0.0, 3) <= 99999
    True
    """
    return draw_key(random.Random(f"passkey/{seed}/{length}/{depth!r}/{index}"))


def draw_key(rng: random.Random, *, training: bool = False) -> int:
    """A key of ``KEY_RANGE`` drawn from ``rng``: odd for the evaluation, even for the
    synthetic examples of training (``train --retrieval-share``), so that no evaluation key
    is ever seen in training."""
    return 2 * rng.randint(KEY_RANGE[0] // 2, (KEY_RANGE[1] - 1) // 2) + (0 if training else 1)


def plan_trials(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0) -> list[Trial]:
    """Every trial of the grid, length by length (in the given order), depth by depth."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    return [Trial(int(n), float(d), i, trial_key(seed, int(n), float(d), i))
            for n in lengths for d in depths for i in range(trials)]


def multi_needles(trial: Trial, keys: int, seed: int = 0) -> tuple[list[tuple[float, str, int]], int]:
    """The needles of a multi-key trial: ``(depth, name, key)`` for ``keys`` needles, the
    asked one first (the trial's depth and key), the others at depths and with keys drawn
    from a generator seeded with the trial (distinct names and keys). Returns the needles
    and the index of the asked one (0)."""
    if not 2 <= keys <= len(NAMES):
        raise ValueError(f"keys must lie in [2, {len(NAMES)}] for the multi-key task, got {keys}")
    rng = random.Random(f"multikey/{seed}/{trial.length}/{trial.depth!r}/{trial.index}")
    names = rng.sample(NAMES, keys)
    values = [trial.key]
    while len(values) < keys:
        value = draw_key(rng)
        if value not in values:
            values.append(value)
    depths = [trial.depth] + [rng.random() for _ in range(keys - 1)]
    return list(zip(depths, names, values, strict=True)), 0


def contrast_key(trial: Trial, seed: int = 0) -> int:
    """A random key other than the trial's: its answer's likelihood is the baseline the
    true answer's is compared with."""
    rng = random.Random(f"contrast/{seed}/{trial.length}/{trial.depth!r}/{trial.index}")
    while True:
        value = draw_key(rng)
        if value != trial.key:
            return value


def filler_offset(trial: Trial, size: int, seed: int = 0) -> int:
    """Where a trial starts reading a real-text filler of ``size`` tokens (seeded)."""
    return random.Random(f"filler/{seed}/{trial.length}/{trial.depth!r}/{trial.index}").randrange(size)


def parse_depths(text: str) -> list[float]:
    """``--depths``: a count n (n depths evenly spaced in [0, 1], both ends included; one
    depth is 0.5) or a comma list of fractions in [0, 1].

    >>> parse_depths("5")
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> parse_depths("0, 0.5,1.0")
    [0.0, 0.5, 1.0]
    """
    text = str(text).strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ValueError(f"--depths: a count must be >= 1, got {count}")
        return [0.5] if count == 1 else [i / (count - 1) for i in range(count)]
    depths = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--depths: not a fraction: {item!r} (use a count such as 10, or fractions "
                             f"such as 0,0.25,0.5)") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--depths: depths are fractions of the filler in [0, 1], got {value}")
        depths.append(value)
    if not depths:
        raise ValueError("--depths: no depths given (use a count such as 10, or fractions such as 0,0.5,1)")
    if len(set(depths)) != len(depths):
        raise ValueError(f"--depths: each depth once, got {text!r}")
    return depths


# ---------------------------------------------------------------------------------------
# scoring


def _parameters(model) -> set[str]:
    try:
        return set(inspect.signature(getattr(model, "forward", model)).parameters)
    except (TypeError, ValueError):
        return set()


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def answer_logits(model, input_ids: torch.Tensor, count: int) -> torch.Tensor:
    """The float32 logits ``[count, vocab]`` that predict the last ``count`` tokens of
    ``input_ids`` (``[L]`` or ``[1, L]``): those of positions ``L-count-1 … L-2``, from one
    forward pass (``use_cache=False``).

    Only those positions go through the output layer: ``logits_to_keep=count + 1`` (or
    ``num_logits_to_keep``) when the model's ``forward`` takes it (every causal LM of
    transformers >= 4.45); else, for a model with ``.model`` and ``.lm_head`` (the Hugging
    Face layout), the last hidden states through ``lm_head``; else the model's full logits
    (any object called as ``model(input_ids=..., use_cache=False)`` that returns
    ``.logits`` ``[1, L, vocab]``).
    """
    ids = input_ids.reshape(1, -1)
    length = ids.shape[1]
    if not 1 <= count < length:
        raise ValueError(f"count must lie in [1, {length - 1}], got {count}")
    keep = count + 1
    params = _parameters(model)
    if "logits_to_keep" in params:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0]
    elif "num_logits_to_keep" in params:
        logits = model(input_ids=ids, use_cache=False, num_logits_to_keep=keep).logits[0]
    elif isinstance(getattr(model, "model", None), torch.nn.Module) and callable(getattr(model, "lm_head", None)):
        hidden = model.model(input_ids=ids, use_cache=False)[0]
        logits = model.lm_head(hidden[0, -keep:])
    else:
        logits = model(input_ids=ids, use_cache=False).logits[0]
    return logits[-keep:-1].float()


def _digits_right(targets: list[int], predicted: list[int], token_text: Callable[[int], str] | None) -> float:
    """The share of the answer's digits predicted right: character by character within each
    answer token (the predicted token's text against the true one's); without
    ``token_text``, the share of answer tokens right."""
    if token_text is None:
        return sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
    right = total = 0
    for p, t in zip(predicted, targets, strict=True):
        true, guess = token_text(t), token_text(p) if p != t else None
        for j, char in enumerate(true):
            if char.isdigit():
                total += 1
                right += guess is None or (j < len(guess) and guess[j] == char)
    return right / total if total else float(all(p == t for p, t in zip(predicted, targets, strict=True)))


@torch.no_grad()
def score_prompt(model, prompt: PasskeyPrompt, token_text: Callable[[int], str] | None = None,
                 contrast: Sequence[int] | None = None) -> dict[str, Any]:
    """Score ``prompt`` with ``model``, teacher-forced, one forward pass
    (:func:`answer_logits`).

    Returns ``success`` (every answer token is the argmax), ``digits_right`` (the share of
    the key's digits right, see :func:`_digits_right`; ``token_text`` maps a token id to its
    text, e.g. :meth:`PromptBuilder.token_text`; without it, the share of answer tokens
    right), ``nll`` (the answer tokens' mean negative log-likelihood, nats), ``predicted``
    (the argmax ids) and ``seconds``. With ``contrast`` (the answer ids of another key) also
    ``nll_random``: that answer's mean negative log-likelihood after the same prompt (a
    second forward pass; ``seconds`` counts both); the true answer should be the likelier.
    """
    device = _device_of(model)
    ids = torch.tensor(prompt.ids, dtype=torch.long, device=device)
    count = prompt.answer_length
    if prompt.answer_offset != len(prompt.ids) - count:
        raise ValueError("the answer must be the prompt's last tokens")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    logits = answer_logits(model, ids, count)
    targets = ids[-count:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
    predicted = logits.argmax(-1).tolist()
    nll_random = None
    if contrast is not None:
        other = torch.tensor(list(prompt.ids[: prompt.answer_offset]) + list(contrast), dtype=torch.long,
                             device=device)
        other_logits = answer_logits(model, other, len(contrast))
        nll_random = float(torch.nn.functional.cross_entropy(
            other_logits, other[-len(contrast):].to(other_logits.device), reduction="mean"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    target_list = targets.tolist()
    return {
        "success": predicted == target_list,
        "digits_right": _digits_right(target_list, predicted, token_text),
        "nll": float(nll),
        "nll_random": nll_random,
        "predicted": predicted,
        "seconds": seconds,
    }


def evaluate(
    model,
    builder: PromptBuilder,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 1,
    seed: int = 0,
    progress: bool = True,
    keys: int = 1,
    contrast: bool = True,
) -> dict[str, Any]:
    """Run every trial of the grid (:func:`plan_trials`) with ``model`` and summarize it
    (:func:`summarize`). ``keys`` > 1: the multi-key task (:func:`multi_needles`,
    :meth:`PromptBuilder.build_multi`); ``contrast``: also score a random other key
    (:func:`contrast_key`; ``nll_random`` in each record). Returns ``lengths``, ``depths``, ``trials_per_cell``, ``seed``,
    ``trials`` (one record per trial: ``length``, ``depth``, ``depth_actual``, ``trial``,
    ``key``, ``needle_offset``, ``needle_tokens``, ``distance`` (needle to answer, tokens),
    ``answer_tokens``, ``success``, ``digits_right``, ``nll``, ``predicted`` (the argmax
    answer, as text), ``seconds``, ``peak_memory_mb`` (CUDA only, else None)), and the summary: ``cells``, ``per_length``, ``accuracy``,
    ``digits_right``, ``mean_nll``, ``seconds``, ``tokens_per_s``."""
    plan = plan_trials(lengths, depths, trials, seed)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(plan, desc="passkey", unit="trial", disable=not progress) if tqdm else plan
    device = _device_of(model)
    records = []
    successes = 0
    for trial in bar:
        offset = filler_offset(trial, len(builder.filler_text), seed) if builder.filler_text is not None else 0
        if keys > 1:
            needles, asked = multi_needles(trial, keys, seed)
            prompt = builder.build_multi(trial.length, needles, asked, filler_offset=offset)
        else:
            prompt = builder.build(trial.length, trial.depth, trial.key, filler_offset=offset)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        other = builder.answer(contrast_key(trial, seed)) if contrast else None
        score = score_prompt(model, prompt, builder.token_text, contrast=other)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        successes += score["success"]
        records.append({
            "length": trial.length, "depth": trial.depth, "depth_actual": prompt.depth_actual,
            "trial": trial.index, "key": trial.key, "needle_offset": prompt.needle_offset,
            "needle_tokens": prompt.needle_length, "distance": prompt.distance,
            "answer_tokens": prompt.answer_length, "success": score["success"],
            "digits_right": score["digits_right"], "nll": score["nll"], "nll_random": score["nll_random"],
            "predicted": "".join(builder.token_text(t) for t in score["predicted"]),
            "seconds": score["seconds"], "peak_memory_mb": peak,
        })
        if tqdm is not None and progress:
            bar.set_postfix_str(f"L={trial.length} ok {successes}/{len(records)}")
    return {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths],
            "trials_per_cell": trials, "seed": seed, "keys": keys, **summarize(records, lengths, depths),
            "trials": records}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    ok = sum(bool(r["success"]) for r in rows)
    contrasted = [r for r in rows if r.get("nll_random") is not None]
    return {"trials": n, "successes": ok, "accuracy": ok / n if n else None,
            "digits_right": _mean([r["digits_right"] for r in rows]), "mean_nll": _mean([r["nll"] for r in rows]),
            "mean_nll_random": _mean([r["nll_random"] for r in contrasted]),
            # the share of trials whose true answer is likelier than the random one
            "prefers_true": _mean([float(r["nll"] < r["nll_random"]) for r in contrasted])}


def summarize(records: list[dict[str, Any]], lengths: Sequence[int], depths: Sequence[float]) -> dict[str, Any]:
    """Accuracy (share of successes), mean digits right and mean answer NLL per (length,
    depth) cell (``cells``), per length (``per_length``) and over all trials; ``seconds``
    in the model and ``tokens_per_s``."""
    cells = []
    for n in lengths:
        for d in depths:
            rows = [r for r in records if r["length"] == n and r["depth"] == d]
            offsets = [r["needle_offset"] for r in rows]
            cells.append({"length": int(n), "depth": float(d), **_group(rows),
                          "needle_offset": _mean(offsets)})
    per_length = [{"length": int(n), **_group([r for r in records if r["length"] == n])} for n in lengths]
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["length"] for r in records)
    return {**{k: v for k, v in _group(records).items() if k != "trials"}, "cells": cells,
            "per_length": per_length, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None}


# ---------------------------------------------------------------------------------------
# showing a result


def _length_label(n: int) -> str:
    """A length as the table shows it.

    >>> _length_label(2048), _length_label(3000)
    ('2k', '3000')
    """
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _cell(result: dict[str, Any], length: int, depth: float) -> dict[str, Any] | None:
    for c in result["cells"]:
        if c["length"] == length and c["depth"] == depth:
            return c
    return None


def format_table(result: dict[str, Any]) -> str:
    """A text table of a result (``evaluate``'s, or ``passkey.json`` loaded): a row per
    length, a column per depth (successes / trials), then all depths together: successes,
    mean digits right, mean answer NLL and (when scored) the share of trials whose answer is
    likelier than a random key's."""
    depths = result["depths"]
    contrasted = any(p.get("prefers_true") is not None for p in result["per_length"])
    header = ["length", *[f"{d:.2f}" for d in depths], "all", "digits", "NLL"] + (["true>random"] if contrasted else [])
    rows = []
    for n in result["lengths"]:
        row = [_length_label(n)]
        for d in depths:
            c = _cell(result, n, d)
            row.append(f"{c['successes']}/{c['trials']}" if c and c["trials"] else "-")
        total = next(p for p in result["per_length"] if p["length"] == n)
        row += [f"{total['successes']}/{total['trials']}",
                f"{total['digits_right']:.0%}" if total["digits_right"] is not None else "-",
                f"{total['mean_nll']:.3f}" if total["mean_nll"] is not None else "-"]
        if contrasted:
            row.append(f"{total['prefers_true']:.0%}" if total.get("prefers_true") is not None else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def plot_heatmap(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """Draw a result (``evaluate``'s, or ``passkey.json`` loaded) as a heat map into
    ``path``: lengths down, depths across, colour = accuracy, successes / trials in each
    cell, each length's accuracy beside its label. Needs matplotlib (ImportError
    otherwise). Returns ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    lengths, depths = result["lengths"], result["depths"]
    grid = [[math.nan] * len(depths) for _ in lengths]
    labels = [[""] * len(depths) for _ in lengths]
    for i, n in enumerate(lengths):
        for j, d in enumerate(depths):
            c = _cell(result, n, d)
            if c and c["trials"]:
                grid[i][j] = c["accuracy"]
                labels[i][j] = f"{c['successes']}/{c['trials']}"
    per_length = {p["length"]: p for p in result["per_length"]}
    row_labels = []
    for n in lengths:
        acc = per_length.get(n, {}).get("accuracy")
        row_labels.append(_length_label(n) + (f"  ({acc:.0%})" if acc is not None else ""))

    width = max(4.5, 1.6 + 0.62 * len(depths))
    height = max(2.4, 1.3 + 0.5 * len(lengths))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    fontsize = 8 if len(depths) <= 12 else 6
    for i in range(len(lengths)):
        for j in range(len(depths)):
            if labels[i][j]:  # white on the dark ends of the colour map
                dark = not 0.2 <= grid[i][j] <= 0.85
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=fontsize,
                        color="white" if dark else "black")
    ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=fontsize)
    ax.set_yticks(range(len(lengths)), row_labels, fontsize=9)
    ax.set_xlabel("needle depth (share of the filler before it)")
    ax.set_ylabel("prompt length (tokens)")
    if title is None:
        setup = result.get("setup") or {}
        model = os.path.basename(str(result.get("model", "model")).rstrip("/\\"))
        title = f"passkey: {model}, {result.get('attention', setup.get('kind', ''))}"
        if result.get("accuracy") is not None:
            title += f"; accuracy {result['accuracy']:.0%}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy", fraction=0.05)
    fig.savefig(path, dpi=120)
    return str(path)


# ---------------------------------------------------------------------------------------
# the command


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tensorized-attention passkey``."""
    from .cli import DTYPES
    from .setups import add_model_arguments

    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help="comma-separated prompt lengths in tokens, answer included; k = 1024")
    parser.add_argument("--depths", default=DEFAULT_DEPTHS,
                        help="needle depths: a count n (evenly spaced in [0, 1]) or a comma list of fractions")
    parser.add_argument("--trials", type=int, default=1, help="trials (random keys) per length and depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys")
    parser.add_argument("--keys", type=int, default=1,
                        help=f"keys hidden per prompt: 1 = the passkey task, 2 .. {len(NAMES)} = multi-key "
                             "(named keys, one asked)")
    parser.add_argument("--filler", choices=FILLERS, default="repeat",
                        help="repeat: LongLoRA's five sentences; text: real text from --filler-data")
    parser.add_argument("--filler-data", default=None,
                        help="a corpus built by 'tensorized-attention corpus' (its test split fills with --filler text)")
    parser.add_argument("--no-contrast", action="store_true",
                        help="do not score a random other key (saves the second forward pass per trial)")
    parser.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                        help="a BOS token first: auto = when the tokenizer adds one itself")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--out", default=os.path.join("results", "passkey"),
                        help="directory for passkey.json and passkey.png")
    parser.add_argument("--no-plot", action="store_true", help="do not write passkey.png")
    add_model_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    """``tensorized-attention passkey``: load the model with the attention setup, run the
    grid, print the table, write ``passkey.json`` (and ``passkey.png``) into ``--out``.
    Returns the exit status (2 on a usage error, with a message on stderr)."""
    from . import bench
    from .cli import PROG, parse_lengths
    from .setups import LOAD_ERRORS, load_for_job, parse_attention

    def fail(message: str) -> int:
        print(f"{PROG} passkey: error: {message}", file=sys.stderr)
        return 2

    try:
        setup = parse_attention(args.attention)
    except ValueError as err:
        return fail(f"--attention: {err}")
    try:
        lengths = parse_lengths(args.lengths)
    except argparse.ArgumentTypeError as err:
        return fail(f"--lengths: {err}")
    if len(set(lengths)) != len(lengths):
        return fail(f"--lengths: each length once, got {args.lengths!r}")
    try:
        depths = parse_depths(args.depths)
    except ValueError as err:
        return fail(str(err))
    if args.trials < 1:
        return fail(f"--trials must be >= 1, got {args.trials}")
    if not 1 <= args.keys <= len(NAMES):
        return fail(f"--keys must lie in [1, {len(NAMES)}], got {args.keys}")
    if (args.filler == "text") != (args.filler_data is not None):
        return fail("--filler text reads its text from --filler-data CORPUS (and --filler-data needs --filler text)")
    filler_text = None
    if args.filler == "text":
        import numpy as np

        from .corpus import load_split

        try:
            split = load_split(args.filler_data, "test")
        except (OSError, ValueError) as err:
            return fail(f"--filler-data: {err}")
        filler_text = np.asarray(split.tokens, dtype=np.int64)
        if len(filler_text) < 2:
            return fail(f"--filler-data: the test split of {args.filler_data} holds no text")
    try:
        model, tokenizer, device, load_s = load_for_job(
            args.model, setup, device=args.device, dtype=args.dtype, threads=args.threads, cache_dir=args.cache_dir)
    except LOAD_ERRORS as err:
        return fail(str(err))
    if filler_text is not None:
        vocab = model.get_input_embeddings().num_embeddings
        if int(filler_text.max()) >= vocab:
            return fail(f"--filler-data: token ids up to {int(filler_text.max())}, beyond the model's vocabulary "
                        f"({vocab}): the corpus was built with another tokenizer")
    try:
        builder = PromptBuilder(tokenizer, bos={"auto": None, "yes": True, "no": False}[args.bos],
                                filler_text=filler_text)
    except ValueError as err:
        return fail(str(err))
    plan = plan_trials(lengths, depths, args.trials, args.seed)
    if args.keys > 1:
        needed = max(builder.min_length_multi(*multi_needles(t, args.keys, args.seed)) for t in plan)
    else:
        needed = max(builder.min_length(t.key) for t in plan)
    short = [n for n in lengths if n < needed]
    if short:
        return fail(f"--lengths: {', '.join(map(str, short))} {'is' if len(short) == 1 else 'are'} too short "
                    f"for the prompt's fixed parts: {needed} tokens with this tokenizer "
                    f"({'BOS, ' if builder.prefix else ''}instruction, needle, question, answer, separators "
                    f"and one filler token); use lengths >= {needed}")

    dtype = next(model.parameters()).dtype
    max_positions = getattr(model.config, "max_position_embeddings", None)
    options = None
    if setup.kind in ("tensorized", "window"):
        from . import hf

        options = hf.options_of(model.config)
    print(f"passkey: {args.model} ({model.config.model_type}), attention {args.attention}, "
          f"{str(dtype).replace('torch.', '')} on {device.type}; lengths {', '.join(map(_length_label, lengths))}, "
          f"{_plural(len(depths), 'depth')}, {_plural(args.trials, 'trial')} each "
          f"({_plural(len(plan), 'forward pass', 'forward passes')})", flush=True)
    if max_positions is not None and max(lengths) > max_positions:
        print(f"note: lengths beyond the model's max_position_embeddings ({max_positions}) run as they are")

    result = evaluate(model, builder, lengths, depths, trials=args.trials, seed=args.seed,
                      progress=not args.no_progress, keys=args.keys, contrast=not args.no_contrast)
    import transformers

    record = {
        "model": args.model,
        "model_type": model.config.model_type,
        "attention": args.attention,
        "setup": setup.describe(),
        "options_resolved": options,
        "max_position_embeddings": max_positions,
        "dtype": str(dtype).replace("torch.", ""),
        "protocol": builder.describe(),
        "task": "passkey" if args.keys == 1 else f"multi-key ({args.keys} keys)",
        "filler_data": args.filler_data,
        **{k: v for k, v in result.items() if k != "trials"},
        "load_s": round(load_s, 2),
        "device": bench.device_info(device),
        "transformers": transformers.__version__,
        "command": command,
        "trials": result["trials"],
    }
    print()
    print(format_table(record))
    print()
    contrast = (f", the answer likelier than a random key's in {record['prefers_true']:.0%} of trials"
                if record.get("prefers_true") is not None else "")
    print(f"accuracy {record['successes']}/{len(plan)} = {record['accuracy']:.1%}, digits right "
          f"{record['digits_right']:.1%}, answer NLL {record['mean_nll']:.3f} nats{contrast}; "
          f"{record['seconds']:.1f} s in the model")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "passkey.json")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {json_path}")
    if not args.no_plot:
        try:
            png_path = plot_heatmap(record, os.path.join(args.out, "passkey.png"))
            print(f"wrote {png_path}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'tensorized-attention[plot]')")
    return 0
