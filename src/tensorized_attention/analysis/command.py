"""``tensorized-attention analyze``: the Kronecker and CP structure of a real model's attention
for a list of folds, as plots and a JSON summary (docs/analysis.md).

What it does, for a model, a text and folds of ``--length`` positions each:

1. Cut ``--samples`` consecutive windows of ``--length`` tokens from the text (from
   ``--offset``) and run the model on each with eager attention, collecting the attention
   maps by hooks (:func:`~tensorized_attention.analysis.maps.attention_maps`).
2. The chosen map (``--layer``, ``--head``; the paper's Figure 4 uses layer 3, head 2),
   averaged over the windows ("average") and from the first window alone ("one sample"):
   its singular values and its Kronecker spectrum for every 2-dim fold (``spectra.png``);
   energy captured against parameters by the matrix SVD, the Kronecker sum of each fold and
   the order-2m CP of ``--cp-folds`` (``energy.png``); the CP (Kronecker-sum) factors of
   ``--cp-fold`` at rank ``--cp-rank`` (``cp_factors.png``).
3. Every map of ``--layers`` x ``--heads`` of the first ``--summary-samples`` windows:
   the energy the matrix SVD and each fold's Kronecker products capture at a few ranks, and
   how far the attention of tensorized passes over each fold (``complete``, ``block``, with
   the gate and sinks of ``tensorized:pilot``, and the sliding-window control) computed from
   the same scores is from the model's own, as the mean total-variation distance of a row
   (:func:`~tensorized_attention.analysis.maps.tensorized_operator`) over
   ``--operator-rows`` evenly spaced queries (``folds.png``).
4. ``analysis.json``: the numbers (the chosen map's spectra, first 64 values, and curves;
   the summary's means over the heads of each layer and over every map), the exact
   command, the text, timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch

__all__ = ["add_arguments", "default_folds", "parse_folds", "run"]

SUMMARY_RANKS = (1, 4, 16, 64)
KRON_RANKS = (1, 4, 16)
PILOT_GATE = 0.88  # sigmoid(2), the gate of tensorized:pilot on the coarse pass
PILOT_SINKS = 4


def parse_folds(text: str, length: int | None = None) -> list[tuple[int, ...]]:
    """``"8x256,16x8x16"`` -> ``[(8, 256), (16, 8, 16)]``; with ``length``, each fold must
    hold exactly ``length`` positions and have at least 2 dims.

    >>> parse_folds("8x256, 16x8x16", 2048)
    [(8, 256), (16, 8, 16)]
    """
    folds = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            fold = tuple(int(n) for n in item.split("x"))
        except ValueError:
            raise ValueError(f"not a fold: {item!r} (use e.g. 8x256 or 16x8x16)") from None
        if len(fold) < 2 or min(fold) < 2:
            raise ValueError(f"a fold needs at least 2 dims, each >= 2, got {item!r}")
        if length is not None and math.prod(fold) != length:
            raise ValueError(f"the fold {item} holds {math.prod(fold)} positions; every fold must hold exactly "
                             f"--length = {length} (the analysis folds the whole map, no padding)")
        if fold in folds:
            raise ValueError(f"the fold {item} is given twice")
        folds.append(fold)
    if not folds:
        raise ValueError("no folds given")
    return folds


def default_folds(length: int) -> list[tuple[int, ...]]:
    """The folds analysed unless told: for a power of two, every 2-dim fold ``(N / n, n)``
    with both sides >= 8, then the 3-dim folds with sides >= 8 whose sides differ by at most
    a factor 2; else ``[]`` (give ``--folds``).

    >>> default_folds(2048)
    [(256, 8), (128, 16), (64, 32), (32, 64), (16, 128), (8, 256), (16, 16, 8), (16, 8, 16), (8, 16, 16)]
    """
    if length < 64 or length & (length - 1):
        return []
    e = length.bit_length() - 1
    folds: list[tuple[int, ...]] = [(2 ** (e - b), 2**b) for b in range(3, e - 2)]
    for a in range(e - 3, 2, -1):
        for b in range(e - a - 3, 2, -1):
            c = e - a - b
            if c >= 3 and max(a, b, c) - min(a, b, c) <= 1:
                folds.append((2**a, 2**b, 2**c))
    return folds


def _name(fold) -> str:
    return "x".join(map(str, fold))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tensorized-attention analyze``."""
    from ..cli import _positive

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text file, tokenized whole without special tokens")
    source.add_argument("--tokens", metavar="FILE",
                        help="token ids: a 1-D .npy array, or raw integers (.bin, see --tokens-dtype)")
    source.add_argument("--data", metavar="DIR",
                        help="a corpus built by 'tensorized-attention corpus': the first document of --split long "
                             "enough for the windows")
    p.add_argument("--split", default="test", help="the split of --data")
    p.add_argument("--tokens-dtype", default="uint16", help="integer type of the ids in a raw --tokens file")
    p.add_argument("--offset", type=int, default=0, help="the first token of the first window")
    p.add_argument("--length", type=_positive, default=2048,
                   help="tokens per window: the maps are --length x --length and every fold holds exactly this many")
    p.add_argument("--samples", type=_positive, default=4,
                   help="consecutive windows; the chosen map is averaged over them ('average') and shown for the "
                        "first ('one sample')")
    p.add_argument("--folds", default=None,
                   help="comma list of folds, e.g. 8x256,32x64,16x8x16 (default: every 2-dim fold with sides >= 8 "
                        "and the balanced 3-dim ones, for a power-of-two --length)")
    p.add_argument("--layer", type=int, default=3, help="layer of the chosen map (0-based)")
    p.add_argument("--head", type=int, default=2, help="query head of the chosen map (0-based)")
    p.add_argument("--layers", default="all", help="layers of the summary: all, or a comma list")
    p.add_argument("--heads", default="all", help="query heads of the summary: all, or a comma list")
    p.add_argument("--summary-samples", type=_positive, default=1,
                   help="windows whose every map enters the summary (the first K)")
    p.add_argument("--cp-ranks", default="1,2,4,8,16,32",
                   help="ranks of the CP fits (order-2m CP, and the Kronecker sum of folds with more than 2 dims)")
    p.add_argument("--cp-folds", default=None,
                   help="folds whose order-2m CP is fitted on the chosen map (default: the first 2-dim and the first "
                        "3-dim fold of --folds)")
    p.add_argument("--cp-fold", default=None, help="the fold of cp_factors.png (default: the first of --folds)")
    p.add_argument("--cp-rank", type=_positive, default=4, help="components drawn in cp_factors.png")
    p.add_argument("--operator-rows", type=_positive, default=256,
                   help="query rows (evenly spaced) on which each fold's tensorized attention is compared with the "
                        "model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the CP fits' initialisation")
    p.add_argument("--out", default=os.path.join("results", "analysis"),
                   help="directory for analysis.json, spectra.png, energy.png, cp_factors.png and folds.png")
    p.add_argument("--model", default="smollm2-135m",
                   help="a named model (smollm2-135m), a Hugging Face checkpoint directory, or a .gguf file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the model runs (the analysis itself runs on the CPU)")
    p.add_argument("--cache-dir", default=None,
                   help="base directory of converted models (default: $TENSORIZED_ATTENTION_CACHE or "
                        "~/.cache/tensorized-attention)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (torch.set_num_threads); default: torch's own choice")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _index_list(text: str, limit: int, what: str) -> list[int]:
    if text.strip().lower() == "all":
        return list(range(limit))
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be 'all' or a comma list of ints, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < limit]
    if bad or not values or len(set(values)) != len(values):
        raise ValueError(f"--{what} must be 'all' or distinct ints in [0, {limit - 1}] (the model has {limit}), "
                         f"got {text!r}")
    return values


def _ranks(text: str) -> list[int]:
    try:
        ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--cp-ranks must be a comma list of ints >= 1, got {text!r}") from None
    if not ranks or ranks[0] < 1:
        raise ValueError(f"--cp-ranks must be a comma list of ints >= 1, got {text!r}")
    return ranks


def _read_source(args, tokenizer) -> tuple[Any, dict]:
    import numpy as np

    from ..corpus import sha256_file
    from ..perplexity import read_tokens

    needed = args.offset + args.samples * args.length
    if args.text is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
        source = {"text": args.text, "characters": len(text), "sha256": sha256_file(args.text)}
    elif args.tokens is not None:
        ids = read_tokens(args.tokens, args.tokens_dtype)
        source = {"tokens": args.tokens, "sha256": sha256_file(args.tokens)}
    else:
        from ..corpus import load_split

        split = load_split(args.data, args.split)
        for i, doc_id in enumerate(split.ids):
            if len(split[i]) >= needed:
                ids = np.asarray(split[i], dtype=np.int64)
                source = {"data": args.data, "split": args.split, "document": doc_id}
                break
        else:
            raise ValueError(f"no document of the {args.split} split of {args.data} holds --offset + --samples x "
                             f"--length = {needed} tokens")
    if len(ids) < needed:
        raise ValueError(f"the text holds {len(ids)} tokens; --offset {args.offset} + --samples {args.samples} x "
                         f"--length {args.length} needs {needed}")
    source.update(tokens_total=int(len(ids)), offset=args.offset, length=args.length, samples=args.samples,
                  tokens_used=[args.offset, needed])
    return ids, source


def _round(x, digits=4):
    if isinstance(x, float):
        return round(x, digits) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def _variants(fold) -> dict[str, dict]:
    m = len(fold)
    return {
        "complete": dict(mode="complete"),
        "block": dict(mode="block"),
        "pilot": dict(mode="complete", gate=[PILOT_GATE] + [0.0] * (m - 1), sinks=PILOT_SINKS),
    }


def _tv(T: torch.Tensor, A_rows: torch.Tensor) -> float:
    """Mean total-variation distance of the rows: half the L1 distance, in [0, 1]."""
    return float(0.5 * (T - A_rows).abs().sum(-1).mean())


def _top_energies(M: torch.Tensor, ranks) -> list[float]:
    """Share of ``||M||_F²`` in the best rank-r approximations, r in ``ranks`` (those below
    min(M.shape)), from the leading singular values of a randomized SVD
    (``torch.svd_lowrank``, 6 power iterations, seeded): a lower bound, within about 1e-3 of
    the exact energies on attention maps, at a fraction of a full SVD's cost."""
    ranks = [r for r in ranks if r < min(M.shape)]
    total = float((M.double() ** 2).sum())
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        _, s, _ = torch.svd_lowrank(M.double(), q=min(max(ranks) + 8, min(M.shape)), niter=6)
    finally:
        torch.random.set_rng_state(state)
    cum = (s.double() ** 2).cumsum(0)
    return [float(cum[r - 1]) / total for r in ranks]


def map_summary(A: torch.Tensor, folds, rows: torch.Tensor) -> dict:
    """The numbers of one map for the summary: matrix energies at SUMMARY_RANKS; per fold,
    Kronecker energies at KRON_RANKS (2-dim folds: randomized SVD, :func:`_top_energies`;
    more dims: rank 1 of the m-factor sum, ALS to a tolerance of 1e-6), and the mean row TV
    distance (float32) of each variant's attention to
    ``A`` over ``rows``; the sliding-window control per distinct last dim."""
    from .cp import kronecker_cp
    from .kronecker import kronecker_rearrange
    from .maps import tensorized_operator

    out: dict[str, Any] = {"matrix": _top_energies(A, SUMMARY_RANKS), "folds": {}, "window": {}}
    A32 = A.float()
    A_rows = A32[rows]
    for fold in folds:
        entry: dict[str, Any] = {}
        if len(fold) == 2:
            entry["kron"] = _top_energies(kronecker_rearrange(A, *fold), KRON_RANKS)
        else:
            entry["kron"] = [kronecker_cp(A, fold, 1, tol=1e-6, n_iter_max=30).energy]
        entry["tv"] = {name: _tv(tensorized_operator(A32, fold, rows=rows, **kw), A_rows)
                       for name, kw in _variants(fold).items()}
        out["folds"][_name(fold)] = entry
        w = fold[-1]
        if str(w) not in out["window"]:
            out["window"][str(w)] = _tv(tensorized_operator(A32, fold, order=(len(fold) - 1,), sinks=PILOT_SINKS,
                                                            rows=rows), A_rows)
    return out



def _cp_curve(fit_cp, A, fold, ranks, seed, bar) -> list[dict]:
    """Energy against parameters of a CP fit (``kronecker_cp`` or ``attention_cp``) at each rank."""
    curve = []
    for r in ranks:
        fit = fit_cp(A, fold, r, seed=seed)
        curve.append({"rank": r, "parameters": fit.parameters, "energy": fit.energy, "iterations": fit.iterations})
        if bar is not None:
            bar.update(1)
    return curve


def chosen_analysis(A: torch.Tensor, folds, cp_folds, cp_ranks, rows, *, seed: int, bar=None) -> dict:
    """Spectra, energy curves and operator distances of one map (float64)."""
    from .cp import attention_cp, kronecker_cp, parameters
    from .kronecker import energy_captured, kronecker_spectrum, matrix_spectrum, numerical_rank, split_sizes
    from .maps import tensorized_operator

    N = A.shape[0]
    s = matrix_spectrum(A)
    e = energy_captured(s)
    plot_ranks = sorted({min(N, round(1.2**k)) for k in range(0, int(math.log(N, 1.2)) + 2)})
    result: dict[str, Any] = {
        "matrix": {
            "spectrum": s.tolist(),
            "rank_1e-6": numerical_rank(s, 1e-6),
            "energy": {str(r): float(e[r]) for r in SUMMARY_RANKS if r < len(e)},
            "curve": [{"rank": r, "parameters": 2 * N * r, "energy": float(e[r])} for r in plot_ranks],
        },
        "folds": {},
    }
    A_rows = A[rows]
    for fold in folds:
        entry: dict[str, Any] = {}
        if len(fold) == 2:
            sk = kronecker_spectrum(A, fold)
            ek = energy_captured(sk)
            entry["kronecker_spectrum"] = sk.tolist()
            entry["kronecker_rank_1e-6"] = numerical_rank(sk, 1e-6)
            entry["kronecker_energy"] = {str(r): float(ek[r]) for r in KRON_RANKS if r < len(ek)}
            entry["kronecker_curve"] = [{"rank": r, "parameters": parameters("kronecker", fold, r), "energy": float(ek[r])}
                                        for r in range(1, len(sk) + 1)]
        else:
            entry["splits"] = {}
            for k in range(1, len(fold)):
                P, Q = split_sizes(fold, k)
                ek = energy_captured(kronecker_spectrum(A, fold, k, method="gram"))
                entry["splits"][f"{P}|{Q}"] = {str(r): float(ek[r]) for r in KRON_RANKS if r < len(ek)}
            curve = _cp_curve(kronecker_cp, A, fold, cp_ranks, seed, bar)
            entry["kronecker_curve"] = curve
            entry["kronecker_energy"] = {str(c["rank"]): c["energy"] for c in curve if c["rank"] in KRON_RANKS}
        if fold in cp_folds:
            entry["cp_curve"] = _cp_curve(attention_cp, A, fold, cp_ranks, seed, bar)
        entry["tv"] = {name: _tv(tensorized_operator(A, fold, rows=rows, **kw), A_rows)
                       for name, kw in _variants(fold).items()}
        entry["tv"]["window"] = _tv(tensorized_operator(A, fold, order=(len(fold) - 1,), sinks=PILOT_SINKS,
                                                        rows=rows), A_rows)
        result["folds"][_name(fold)] = entry
    return result


def _aggregate(records: list[dict], layers: list[int], folds) -> dict:
    """Means over heads per layer, and over every map, of the summary numbers."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    out: dict[str, Any] = {"per_layer": {}, "overall": {}}
    names = [_name(f) for f in folds]
    windows = sorted({str(f[-1]) for f in folds}, key=int)

    def summarise(rs):
        entry = {"matrix": [mean([r["matrix"][i] for r in rs]) for i in range(len(rs[0]["matrix"]))], "folds": {},
                 "window": {w: mean([r["window"][w] for r in rs]) for w in windows}}
        for n in names:
            k = len(rs[0]["folds"][n]["kron"])
            entry["folds"][n] = {
                "kron": [mean([r["folds"][n]["kron"][i] for r in rs]) for i in range(k)],
                "tv": {v: mean([r["folds"][n]["tv"][v] for r in rs]) for v in rs[0]["folds"][n]["tv"]},
            }
        return entry

    for layer in layers:
        rs = [r for r in records if r["layer"] == layer]
        out["per_layer"][str(layer)] = summarise(rs)
    out["overall"] = summarise(records)
    return out


def run(args: argparse.Namespace, command: str) -> int:
    """``tensorized-attention analyze``: collect the maps, analyse, plot, write the JSON."""
    import numpy as np

    from .. import bench, setups
    from ..cli import PROG
    from . import plots
    from .maps import attention_maps

    def fail(message: str) -> int:
        print(f"{PROG} analyze: error: {message}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    if args.offset < 0:
        return fail(f"--offset must be >= 0, got {args.offset}")
    try:
        folds = parse_folds(args.folds, args.length) if args.folds else default_folds(args.length)
        if not folds:
            return fail(f"no default folds for --length {args.length} (not a power of two >= 64); give --folds")
        cp_ranks = _ranks(args.cp_ranks)
        if args.cp_folds is not None:
            cp_folds = parse_folds(args.cp_folds, args.length) if args.cp_folds.strip() else []
        else:
            cp_folds = [f for m in (2, 3) for f in folds if len(f) == m][:1] + \
                [f for f in folds if len(f) == 3][:1]
            cp_folds = list(dict.fromkeys(cp_folds))
        cp_fold = parse_folds(args.cp_fold, args.length)[0] if args.cp_fold else folds[0]
    except ValueError as err:
        return fail(str(err))
    limit = min(n * n for n in cp_fold)
    if len(cp_fold) == 2 and args.cp_rank > limit:
        return fail(f"--cp-rank {args.cp_rank} exceeds min(n_1², n_2²) = {limit} of --cp-fold {_name(cp_fold)}")
    if args.operator_rows > args.length:
        return fail(f"--operator-rows ({args.operator_rows}) must not exceed --length ({args.length})")
    try:
        model, tokenizer, device, load_s = setups.load_for_job(
            args.model, setups.AttentionSetup("eager"), device=args.device, threads=args.threads,
            cache_dir=args.cache_dir)
    except setups.LOAD_ERRORS as err:
        return fail(str(err))
    n_layers = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else 0
    n_heads = int(model.config.num_attention_heads)
    try:
        layers = _index_list(args.layers, n_layers, "layers")
        heads = _index_list(args.heads, n_heads, "heads")
    except ValueError as err:
        return fail(str(err))
    if not 0 <= args.layer < n_layers:
        return fail(f"--layer {args.layer}: the model has {n_layers} layers (0 .. {n_layers - 1})")
    if not 0 <= args.head < n_heads:
        return fail(f"--head {args.head}: the model has {n_heads} query heads (0 .. {n_heads - 1})")
    if args.summary_samples > args.samples:
        return fail(f"--summary-samples ({args.summary_samples}) must not exceed --samples ({args.samples})")
    try:
        ids, source = _read_source(args, tokenizer)
    except (OSError, ValueError) as err:
        return fail(str(err))
    vocab = model.get_input_embeddings().num_embeddings
    used = ids[args.offset: args.offset + args.samples * args.length]
    if int(used.min()) < 0 or int(used.max()) >= vocab:
        return fail(f"token ids must lie in [0, {vocab}), found {int(used.min())} .. {int(used.max())}")

    N = args.length
    rows = torch.linspace(0, N - 1, args.operator_rows).round().long().unique()
    print(f"analyze: {args.model} ({model.config.model_type}, {n_layers} layers x {n_heads} heads) on {device.type}; "
          f"{args.samples} window(s) of {N} tokens from {source.get('text') or source.get('tokens') or source.get('data')}"
          f" at offset {args.offset}; folds {', '.join(map(_name, folds))}; chosen map layer {args.layer} head "
          f"{args.head}", flush=True)

    from tqdm import tqdm

    records: list[dict] = []
    chosen_sum = torch.zeros(N, N, dtype=torch.float64)
    chosen_first = None
    collect = sorted(set(layers) | {args.layer})
    summary_maps = args.summary_samples * len(layers) * len(heads)
    t_maps = time.perf_counter()
    with tqdm(total=args.samples * len(collect), desc="maps", unit="layer", disable=args.no_progress) as bar, \
            tqdm(total=summary_maps, desc="summary", unit="map", disable=args.no_progress) as sbar:
        for sample in range(args.samples):
            window = torch.as_tensor(ids[args.offset + sample * N: args.offset + (sample + 1) * N], dtype=torch.long)
            summarise = sample < args.summary_samples

            def callback(layer, maps, sample=sample, summarise=summarise):
                nonlocal chosen_first
                if layer == args.layer:
                    chosen = maps[args.head].double()
                    chosen_sum.add_(chosen)
                    if sample == 0:
                        chosen_first = chosen.clone()
                if summarise and layer in layers:
                    for h in heads:
                        rec = map_summary(maps[h].double(), folds, rows)
                        records.append({"sample": sample, "layer": layer, "head": h, **rec})
                        sbar.update(1)
                bar.update(1)

            attention_maps(model, window, layers=collect, callback=callback)
    maps_s = time.perf_counter() - t_maps
    chosen_avg = chosen_sum / args.samples

    t_chosen = time.perf_counter()
    fits = 2 * (len(cp_ranks) * sum(1 for f in folds if len(f) > 2) + len(cp_ranks) * len(cp_folds))
    panels = {"average": chosen_avg, "one sample": chosen_first}
    chosen: dict[str, Any] = {}
    with tqdm(total=fits, desc="CP fits", unit="fit", disable=args.no_progress) as bar:
        for panel, A in panels.items():
            chosen[panel] = chosen_analysis(A, folds, cp_folds, cp_ranks, rows, seed=args.seed, bar=bar)
    chosen_s = time.perf_counter() - t_chosen
    aggregate = _aggregate(_mean_over_samples(records), layers, folds)

    # ---- plots
    os.makedirs(args.out, exist_ok=True)
    what = f"layer {args.layer}, head {args.head}, {N} tokens"
    written = []
    try:
        spectra = {f"{panel} ({what}{', ' + str(args.samples) + ' windows' if panel == 'average' else ''})":
                   {"matrix": r["matrix"]["spectrum"],
                    **{n: e["kronecker_spectrum"] for n, e in r["folds"].items() if "kronecker_spectrum" in e}}
                   for panel, r in chosen.items()}
        written.append(plots.plot_spectra(os.path.join(args.out, "spectra.png"), spectra,
                                          title=f"{args.model}: sorted normalised spectra, matrix SVD and Kronecker "
                                                f"(Van Loan–Pitsianis) for each 2-dim fold"))
        curves = {}
        for panel, r in chosen.items():
            lines = {"matrix SVD": r["matrix"]["curve"]}
            for n, e in r["folds"].items():
                lines[f"Kronecker {n}" + ("" if n.count("x") == 1 else " (CP)")] = e["kronecker_curve"]
            for n, e in r["folds"].items():
                if "cp_curve" in e:
                    lines[f"CP order-{2 * (n.count('x') + 1)} {n}"] = e["cp_curve"]
            curves[f"{panel} ({what})"] = lines
        written.append(plots.plot_energy(os.path.join(args.out, "energy.png"), curves,
                                         title=f"{args.model}: energy captured against parameters"))
        from .cp import kronecker_cp

        cp_rows = {}
        for panel, A in panels.items():
            fit = kronecker_cp(A, cp_fold, args.cp_rank, seed=args.seed)
            cp_rows[panel] = (A.float(), fit.matrix().float(), fit)
            chosen[panel]["cp_factors"] = {"fold": list(cp_fold), "rank": args.cp_rank, "energy": fit.energy,
                                           "weights": fit.weights.tolist()}
        written.append(plots.plot_cp_factors(
            os.path.join(args.out, "cp_factors.png"), cp_rows,
            title=f"{args.model}, {what}: the first {args.cp_rank} Kronecker (CP) components on the fold "
                  f"{_name(cp_fold)}, A ≈ Σ w_r A_1 ⊗ … ⊗ A_m"))
        per_layer = aggregate["per_layer"]
        x = layers
        kron_lines = {f"Kronecker {n}": [per_layer[str(layer)]["folds"][n]["kron"][0] for layer in x] for n in map(_name, folds)}
        kron_lines["matrix SVD rank 1"] = [per_layer[str(layer)]["matrix"][0] for layer in x]
        tv_lines = {f"complete {n}": [per_layer[str(layer)]["folds"][n]["tv"]["complete"] for layer in x]
                    for n in map(_name, folds)}
        for w in sorted({str(f[-1]) for f in folds}, key=int):
            if w in ("256", "64", "16"):
                tv_lines[f"window {w} + {PILOT_SINKS} sinks"] = [per_layer[str(layer)]["window"][w] for layer in x]
        written.append(plots.plot_folds(
            os.path.join(args.out, "folds.png"), x,
            {"energy captured by one Kronecker product (mean over heads)": kron_lines,
             "attention misplaced by the passes (mean row TV distance)": tv_lines},
            title=f"{args.model}, every head of each layer, {N} tokens ({args.summary_samples} window(s))"))
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'tensorized-attention[analysis]')")

    for panel in chosen.values():  # keep the JSON small: the first 64 values of each spectrum
        panel["matrix"]["spectrum"] = panel["matrix"]["spectrum"][:64]
        for e in panel["folds"].values():
            if "kronecker_spectrum" in e:
                e["kronecker_spectrum"] = e["kronecker_spectrum"][:64]
                e["kronecker_curve"] = [c for c in e["kronecker_curve"] if c["rank"] in (1, 2, 4, 8, 16, 32, 64, 128)]
    import transformers

    elapsed = time.perf_counter() - start
    record = {
        "command": command,
        "model": args.model,
        "model_type": model.config.model_type,
        "layers_total": n_layers,
        "heads_total": n_heads,
        "source": source,
        "length": N,
        "samples": args.samples,
        "summary_samples": args.summary_samples,
        "folds": [list(f) for f in folds],
        "cp_folds": [list(f) for f in cp_folds],
        "cp_ranks": cp_ranks,
        "layer": args.layer,
        "head": args.head,
        "summary_layers": layers,
        "summary_heads": heads,
        "summary_ranks": {"matrix": list(SUMMARY_RANKS), "kronecker (2-dim folds)": list(KRON_RANKS),
                          "kronecker (more dims)": [1]},
        "operator": {"rows": int(len(rows)), "variants": {
            "complete": "mode complete, no gate, no sinks", "block": "mode block, no gate, no sinks",
            "pilot": f"mode complete, gate {PILOT_GATE} on the first (coarse) pass, {PILOT_SINKS} sinks",
            "window": f"the last pass alone (a causal window of n_m keys) with {PILOT_SINKS} sinks"},
            "measure": "mean over the rows of the total-variation distance 0.5 * sum |T[p] - A[p]|, "
                       "scores at sequence positions"},
        "chosen": _round(chosen, 6),
        "summary": _round(aggregate),
        "timing_s": {"load": round(load_s, 1), "maps_and_summary": round(maps_s, 1), "chosen_map": round(chosen_s, 1),
                     "total": round(elapsed, 1)},
        "device": bench.device_info(device),
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    try:
        import tensorly

        record["tensorly"] = tensorly.__version__
    except ImportError:  # pragma: no cover
        pass
    path = os.path.join(args.out, "analysis.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    written.append(path)
    print()
    print(format_summary(record))
    print()
    for p in written:
        print(f"wrote {p}")
    print(f"done in {elapsed:.1f} s")
    return 0


def _mean_over_samples(records: list[dict]) -> list[dict]:
    """One record per (layer, head): the summary numbers averaged over the windows."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["layer"], r["head"]), []).append(r)

    def avg(values):
        if isinstance(values[0], dict):
            return {k: avg([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], list):
            return [avg([v[i] for v in values]) for i in range(len(values[0]))]
        return sum(values) / len(values)

    out = []
    for (layer, head), rs in sorted(groups.items()):
        out.append({"layer": layer, "head": head, "windows": len(rs), "matrix": avg([r["matrix"] for r in rs]),
                    "folds": avg([r["folds"] for r in rs]), "window": avg([r["window"] for r in rs])})
    return out


def format_summary(record: dict) -> str:
    """A table of the summary: per fold, the mean over every map of the energy captured by
    Kronecker rank 1 (and 4, 16 for 2-dim folds) and the mean row TV distance of each
    variant; the matrix SVD's energies below."""
    overall = record["summary"]["overall"]
    lines = [f"every map of {len(record['summary_layers'])} layer(s) x {len(record['summary_heads'])} head(s), "
             f"{record['length']} tokens: energy captured, and attention misplaced by the passes (mean row TV)",
             f"{'fold':>10}  {'kron r=1':>8}  {'r=4':>6}  {'r=16':>6}  {'complete':>8}  {'block':>6}  {'pilot':>6}"]
    for name, e in overall["folds"].items():
        k = e["kron"] + [None] * (3 - len(e["kron"]))
        cells = ["" if v is None else f"{v:.3f}" for v in k]
        lines.append(f"{name:>10}  {cells[0]:>8}  {cells[1]:>6}  {cells[2]:>6}  {e['tv']['complete']:>8.3f}  "
                     f"{e['tv']['block']:>6.3f}  {e['tv']['pilot']:>6.3f}")
    ranks = record["summary_ranks"]["matrix"]
    lines.append("matrix SVD: " + ", ".join(f"rank {r}: {v:.3f}" for r, v in zip(ranks, overall["matrix"],
                                                                                  strict=False)))
    lines.append("sliding window + sinks: " + ", ".join(f"{w} keys: {v:.3f}" for w, v in overall["window"].items()))
    return "\n".join(lines)
