"""The long-context study: the configurations compared side by side, and the one command
that trains (when the configuration is trained) and evaluates one of them.

``tensorized-attention study --config NAME --data CORPUS --out results/study`` runs, in
order and in one process, the commands a user would type (each writes its own JSON into
``OUT/NAME/``):

1. ``train`` (configurations with ``train=True``): continued pretraining at ``--context``
   for ``--train-tokens`` tokens, checkpoints in ``WORK/NAME/train`` (its summary and log
   copied into ``OUT/NAME/``); resumed when a checkpoint is there (a budget larger than one
   call's time runs over several calls), skipped when ``final/`` is there;
2. ``perplexity`` on the corpus' test split at every ``--eval-lengths`` (the same long
   documents at every length), ``OUT/NAME/perplexity.json``;
3. ``passkey`` at ``--passkey-lengths``, ``OUT/NAME/passkey.json`` and a heat map;
4. with ``--multikey K``, the multi-key task at the same lengths, ``OUT/NAME/multikey/``.

The configurations: :data:`CONFIGS` (the long-context study, docs/results.md) and
:data:`RETRIEVAL_CONFIGS` (the content-addressed passes, docs/retrieval.md).

The evaluated model is the trained one (``WORK/NAME/train/final``) or the model as shipped.
``--stages`` runs some of the three (e.g. ``--stages train`` when one call of limited time
should only train); ``--dry-run`` prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
from dataclasses import dataclass

__all__ = ["ALL_CONFIGS", "CONFIGS", "Config", "RETRIEVAL_CONFIGS", "STAGES", "stage_of", "study_commands"]

STAGES = ("train", "perplexity", "passkey", "multikey")
TENSOR_FOLD = '{"shape": [null, 256], "mode": "%s", "order": [0, 1], "positions": "tensor"}'


@dataclass(frozen=True)
class Config:
    """One configuration of the study: its attention setup string (``setups``), whether it
    is trained, what it stands for, and the options its training adds (before
    ``--train-args``)."""

    attention: str
    train: bool
    description: str
    train_args: tuple[str, ...] = ()


#: The configurations of the long-context study (docs/results.md).
CONFIGS: dict[str, Config] = {
    "base": Config("full", False, "SmolLM2 as shipped: full attention, RoPE trained to 8k, no training"),
    "pi4": Config("full:linear=4", False, "full attention, RoPE position interpolation x4 (32k), no training"),
    "yarn16": Config("full:yarn=16", False, "full attention, YaRN x16 (128k), no training"),
    "full-pi4": Config("full:linear=4", True, "full attention, position interpolation x4, trained at the context"),
    "block": Config("tensorized:" + TENSOR_FOLD % "block", True,
                    "tensorized block, fold (*, 256), tensor positions, trained"),
    "complete": Config("tensorized:" + TENSOR_FOLD % "complete", True,
                       "tensorized complete, fold (*, 256), tensor positions, trained"),
    "pilot": Config("tensorized:pilot", True, "complete + gate on the coarse pass + 4 sinks (DESIGN.md §7), trained"),
    "window": Config("window:256+4", True,
                     "sliding window of 256 keys + 4 sinks, tensor positions, trained (the control)"),
}

_PILOT = '"shape": [null, 256], "mode": "complete", "order": [0, 1], "positions": "tensor", "sinks": 4'

#: The retrieval recipe (docs/retrieval.md): the gates learn at a higher rate than the
#: pretrained weights, and a quarter of the rows are synthetic passkey / multi-key prompts
#: (keys, depths and fillers apart from the evaluation's).
RETRIEVAL_RECIPE = ("--new-lr", "1e-3", "--retrieval-share", "0.25")

#: The configurations of the retrieval study (docs/retrieval.md): each content-addressed
#: option on top of ``pilot`` (with ``pilot`` and ``window`` above as the references).
RETRIEVAL_CONFIGS: dict[str, Config] = {
    "select": Config("tensorized:select", False,
                     "window 256 + 4 sinks + the top-2 earlier 256-token blocks (DESIGN.md §8), as shipped"),
    "select-trained": Config("tensorized:select", True, "the same, trained (retrieval recipe)", RETRIEVAL_RECIPE),
    "pilot-select": Config("tensorized:pilot_select", True,
                           "pilot + a gated selected pass (top-2 of 256), trained (retrieval recipe)", RETRIEVAL_RECIPE),
    "pilot-select-open": Config('tensorized:{' + _PILOT + ', "gate": [0.88, null, null], '
                                '"select": {"block": 256, "topk": 2}}', True,
                                "pilot + a selected pass whose output is the layer's (no gate: at 0.88 the gated "
                                "pass passes on 12% of what it reads), trained (retrieval recipe)", RETRIEVAL_RECIPE),
    "pilot-pool": Config('tensorized:{' + _PILOT + ', "gate": [0.88, null, 0.88], "pool": {"block": 256}}', True,
                         "pilot + a gated pooled pass (one summary per 256-token block), trained (retrieval recipe)",
                         RETRIEVAL_RECIPE),
    "pilot-relay": Config('tensorized:{' + _PILOT + ', "gate": [0.88, null], "relay": true}', True,
                          "pilot with key relay, trained (retrieval recipe)", RETRIEVAL_RECIPE),
    "full-pi4-recipe": Config("full:linear=4", True,
                              "full attention, position interpolation x4, trained with the retrieval recipe "
                              "(does the recipe keep the model's retrieval?)", RETRIEVAL_RECIPE),
    "full-recipe": Config("full", True,
                          "full attention, RoPE as shipped (no interpolation), trained with the retrieval recipe "
                          "(the recipe's control without position interpolation)", RETRIEVAL_RECIPE),
    "select4-trained": Config('tensorized:{"shape": [null, 256], "order": [], "positions": "tensor", "sinks": 4, '
                              '"select": {"block": 256, "topk": 4}}', True,
                              "window 256 + 4 sinks + the top-4 earlier 256-token blocks, trained (retrieval recipe)",
                              RETRIEVAL_RECIPE),
    "select4-bound": Config('tensorized:{"shape": [null, 256], "order": [], "positions": "tensor", "sinks": 4, '
                            '"select": {"block": 256, "topk": 4, "score": "bound"}}', True,
                            "select4-trained ranking blocks by the channel-wise bound of their keys, not their mean "
                            "(score='bound'), trained (retrieval recipe)", RETRIEVAL_RECIPE),
    "select4-bound-answers": Config('tensorized:{"shape": [null, 256], "order": [], "positions": "tensor", '
                                    '"sinks": 4, "select": {"block": 256, "topk": 4, "score": "bound"}}', True,
                                    "select4-bound, the synthetic rows' answer tokens weighted 1000 times in the loss "
                                    "(retrieval recipe + --answer-weight 1000)",
                                    (*RETRIEVAL_RECIPE, "--answer-weight", "1000")),
}

ALL_CONFIGS: dict[str, Config] = {**CONFIGS, **RETRIEVAL_CONFIGS}


def study_commands(name: str, args: argparse.Namespace) -> list[list[str]]:
    """The command lines (argv of ``tensorized-attention``) of configuration ``name``."""
    config = ALL_CONFIGS[name]
    out = os.path.join(args.out, name)
    work = os.path.join(args.work, name)
    common = ["--attention", config.attention, "--device", args.device]
    if args.cache_dir:
        common += ["--cache-dir", args.cache_dir]
    commands = []
    model, train_dir = args.model, None
    if config.train:
        model = os.path.join(work, "train", "final")
        if not os.path.isdir(model):  # not trained yet (else: evaluate only)
            train_dir = os.path.join(work, "train")
    if train_dir is not None:
        resume = bool(glob.glob(os.path.join(train_dir, "checkpoint-*")))
        commands.append(["train", "--model", args.model, *common, "--data", args.data,
                         "--context", str(args.context), "--train-tokens", str(args.train_tokens),
                         "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
                         "--lr", str(args.lr), "--seed", str(args.seed), "--gradient-checkpointing",
                         "--out", train_dir, *(["--resume"] if resume else []), *config.train_args,
                         *args.train_args])
    commands.append(["perplexity", "--model", model, *common, "--data", args.data, "--split", "test",
                     "--context", args.eval_lengths, "--max-windows", str(args.eval_windows),
                     *(["--score-last", str(args.eval_score_last)] if args.eval_score_last else []),
                     "--out", os.path.join(out, "perplexity.json")])
    passkey = ["--model", model, *common, "--lengths", args.passkey_lengths, "--depths", str(args.depths),
               "--trials", str(args.trials), "--seed", str(args.seed)]
    commands.append(["passkey", *passkey, "--out", os.path.join(out, "passkey")])
    if args.multikey:
        commands.append(["passkey", *passkey, "--keys", str(args.multikey), "--out", os.path.join(out, "multikey")])
    return commands


def stage_of(argv: list[str]) -> str:
    """The stage a command of :func:`study_commands` belongs to (the multi-key task is a
    ``passkey`` command with ``--keys``)."""
    return "multikey" if argv[0] == "passkey" and "--keys" in argv else argv[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tensorized-attention study``."""
    p.add_argument("--config", required=True, choices=sorted(ALL_CONFIGS),
                   help="; ".join(f"{k}: {c.description}" for k, c in ALL_CONFIGS.items()))
    p.add_argument("--data", required=True, help="a corpus built by 'tensorized-attention corpus'")
    p.add_argument("--model", default="smollm2-135m", help="the pretrained model")
    p.add_argument("--context", type=int, default=32768, help="training context")
    p.add_argument("--train-tokens", default="20000000", help="training token budget")
    p.add_argument("--batch", type=int, default=2, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (the pilot's better one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-lengths", default="2k,8k,32k,64k,128k", help="perplexity contexts")
    p.add_argument("--eval-windows", type=int, default=8, help="perplexity windows per context")
    p.add_argument("--eval-score-last", type=int, default=None, metavar="T",
                   help="perplexity over the same last T tokens of windows that end together, at every "
                        "length (perplexity --score-last); default: whole windows")
    p.add_argument("--passkey-lengths", default="8k,32k,128k", help="passkey prompt lengths")
    p.add_argument("--multikey", type=int, default=0, metavar="K",
                   help="also the multi-key task with K keys at the passkey lengths (OUT/NAME/multikey/); 0: not")
    p.add_argument("--depths", type=int, default=5, help="passkey depths per length")
    p.add_argument("--trials", type=int, default=2, help="passkey trials per (length, depth)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cache-dir", default=None, help="base directory of converted models")
    p.add_argument("--train-args", default="", type=shlex.split,
                   help="more options for 'train', one quoted string (e.g. '--warmup 20')")
    p.add_argument("--out", default=os.path.join("results", "study"),
                   help="results root: OUT/CONFIG/ gets the JSON (train summary and log, perplexity, passkey)")
    p.add_argument("--work", default=os.path.join("results", "study-work"),
                   help="checkpoints root: WORK/CONFIG/train/ (checkpoints, final/; large, not results)")
    p.add_argument("--stages", default=",".join(STAGES), type=_stages,
                   help="the stages to run, a comma list of " + ", ".join(STAGES) + " (default: all; a stage "
                        "whose work is done is skipped anyway)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--stages takes a comma list of {', '.join(STAGES)}, got {text!r}")
    return names


def run(args: argparse.Namespace, command: str) -> int:
    """Run (or print, with --dry-run) the commands of one configuration; stops at the
    first that fails and returns its status."""
    from .cli import PROG, main

    for argv in study_commands(args.config, args):
        if stage_of(argv) not in args.stages:
            continue
        print("$ " + shlex.join([PROG, *argv]), flush=True)
        if args.dry_run:
            continue
        status = main(argv)
        if status:
            return status
        if argv[0] == "train":  # the training record joins the results; the checkpoints stay in WORK
            train_dir = argv[argv.index("--out") + 1]
            os.makedirs(os.path.join(args.out, args.config), exist_ok=True)
            for name in ("train_summary.json", "train_log.jsonl"):
                shutil.copy(os.path.join(train_dir, name), os.path.join(args.out, args.config, name))
            if not os.path.isdir(os.path.join(train_dir, "final")):
                print(f"training stopped before its budget (checkpoints in {train_dir}): run the same command "
                      "again to resume it; the evaluation runs once training is done", flush=True)
                return 0
    return 0
