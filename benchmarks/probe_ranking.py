"""Does the selected pass's ranking find the asked needle? Multi-key prompts (passkey.py),
the model with its own attention (full attention within its trained length): at the query
that predicts the first answer token, the share of (layer, query head) whose top-k earlier
blocks (before the query's own, wholly outside its window) hold the asked needle, for
three block scores of the content (unrotated) q and k:

- ``mean``: ``q . mean(k of the block)``, what ``SelectedPass`` ranks by;
- ``max``: ``max over the block's keys of q . k`` (what attention itself would prefer);
- ``bound``: ``q+ . max(k) + q- . min(k)`` per channel over the block (an upper bound of
  ``max``; two products against two summary keys per block, as cheap as ``mean``).

    python benchmarks/probe_ranking.py --lengths 8k --trials 2 --out results/probe_ranking.json

On the CPU in a few minutes at 8k (SmolLM2-135M). Records, per prompt, whether the model
answered right and each score's share for the asked needle and for the other needles.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tensorized_attention import passkey
from tensorized_attention.cli import parse_lengths
from tensorized_attention.setups import load_for_job, parse_attention

SCORES = ("mean", "max", "bound")


def block_scores(q: torch.Tensor, k: torch.Tensor, kind: str) -> torch.Tensor:
    """q ``[Hkv, G, D]``, k ``[Hkv, blocks, block, D]`` -> scores ``[Hkv, G, blocks]``."""
    if kind == "mean":
        return torch.einsum("hgd,hnd->hgn", q, k.mean(2))
    if kind == "max":
        return torch.einsum("hgd,hnwd->hgnw", q, k).amax(-1)
    if kind == "bound":
        return (torch.einsum("hgd,hnd->hgn", q.clamp(min=0), k.amax(2))
                + torch.einsum("hgd,hnd->hgn", q.clamp(max=0), k.amin(2)))
    raise ValueError(f"kind must be one of {SCORES}, got {kind!r}")


def needle_blocks(builder, ids, needles, block) -> list[set[int]]:
    """The blocks each needle's tokens lie in (found by their token sequence)."""
    out = []
    for _, name, key in needles:
        text = builder.encode(passkey.MULTI_NEEDLE.format(name=name, key=key))
        start = next(i for i in range(len(ids) - len(text) + 1) if ids[i:i + len(text)] == text)
        out.append({b // block for b in range(start, start + len(text))})
    return out


def probe(model, builder, length: int, trials: int, keys: int, block: int, topk: int) -> list[dict]:
    cfg = model.config
    layers = model.model.layers
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    acts = {}
    hooks = []
    for i, layer in enumerate(layers):  # content q and k: the projections, before RoPE
        for name in ("q", "k"):
            proj = getattr(layer.self_attn, f"{name}_proj")
            hooks.append(proj.register_forward_hook(lambda m, a, o, key=(name, i): acts.__setitem__(key, o[0])))
    rows = []
    try:
        for trial in passkey.plan_trials([length], passkey.parse_depths("5"), trials, seed=0):
            needles, asked = passkey.multi_needles(trial, keys, seed=0)
            prompt = builder.build_multi(trial.length, needles, asked, filler_offset=0)
            ids = prompt.ids
            with torch.no_grad():
                logits = model(torch.tensor([ids], device=model.device)).logits[0]
            answer = logits[prompt.answer_offset - 1: prompt.length - 1].argmax(-1).tolist()
            p = prompt.answer_offset - 1
            n_blocks = p // block
            blocks = needle_blocks(builder, ids, needles, block)
            outside = {b for b in range(n_blocks) if p - (b * block + block - 1) >= block}
            target = blocks[asked] & outside
            other = set().union(*(bs for j, bs in enumerate(blocks) if j != asked)) & outside - target
            row = dict(length=length, depth=trial.depth, trial=trial.index, correct=answer == ids[prompt.answer_offset:],
                       blocks=n_blocks, asked_blocks=sorted(blocks[asked]))
            if target:
                for kind in SCORES:
                    hit = oth = 0
                    for i in range(len(layers)):
                        q = acts[("q", i)][p].float().reshape(Hkv, H // Hkv, D)
                        k = acts[("k", i)][: n_blocks * block].float().reshape(n_blocks, block, Hkv, D)
                        top = block_scores(q, k.permute(2, 0, 1, 3), kind).topk(min(topk, n_blocks), -1).indices
                        for chosen in top.reshape(H, -1).tolist():
                            hit += bool(target & set(chosen))
                            oth += bool(other & set(chosen))
                    row[kind] = hit / (len(layers) * H)
                    row[kind + "_other"] = oth / (len(layers) * H) if other else None
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    finally:
        for h in hooks:
            h.remove()
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for length in sorted({r["length"] for r in rows}):
        scored = [r for r in rows if r["length"] == length and "mean" in r]
        out[str(length)] = {kind: {
            "asked": sum(r[kind] for r in scored) / len(scored) if scored else None,
            "other": (sum(r[kind + "_other"] for r in scored if r[kind + "_other"] is not None)
                      / max(1, sum(r[kind + "_other"] is not None for r in scored))) if scored else None,
        } for kind in SCORES} | {"prompts": len(scored)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--attention", default="full", help="the attention setup the model runs (default: its own)")
    p.add_argument("--lengths", default="8k")
    p.add_argument("--trials", type=int, default=2, help="trials per depth (depths 0, 0.25, ..., 1)")
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lengths = parse_lengths(args.lengths)
    model, tokenizer, device, _ = load_for_job(args.model, parse_attention(args.attention), device=args.device,
                                               dtype="float32")
    builder = passkey.PromptBuilder(tokenizer)
    rows = [r for n in lengths for r in probe(model, builder, n, args.trials, args.keys, args.block, args.topk)]
    result = dict(command=" ".join(["python", *sys.argv]), model=args.model, attention=args.attention,
                  device=str(device), keys=args.keys, block=args.block, topk=args.topk, rows=rows,
                  summary=summarize(rows))
    for length, s in result["summary"].items():
        for kind in SCORES:
            print(f"{length}: {kind:>5}: asked needle's block in the top {args.topk}: {s[kind]['asked']:.3f} "
                  f"of (layer, head); another needle's: {s[kind]['other']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
