"""``tensorized-attention train --sequence-parallel``: the sequences sharded over processes
(gloo on the CPU, spawned here as torchrun would start them) and the parameters over FSDP2
train the tiny model exactly as one process does: the same losses, the same final weights."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tensorized_attention import train as T  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402
from tiny_model import TEXT  # noqa: E402

# a fold whose passes cross the slices' boundaries (windows of 8, strides 8 and 1), a gate, sinks
ATTENTION = 'tensorized:{"shape": [null, 8], "gate": [0.88, null], "sinks": 2, "positions": "tensor"}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(checkpoint, tokens, out, context, *extra):
    return ["train", "--model", str(checkpoint), "--tokens", str(tokens), "--attention", ATTENTION,
            "--context", str(context), "--batch", "2", "--micro-batch", "1", "--train-tokens", str(3 * 2 * context),
            "--warmup", "1", "--lr", "3e-3", "--dtype", "float32", "--device", "cpu", "--log-every", "1",
            "--out", str(out), "--no-progress", *extra]


def _worker(rank, world, port, argv, codes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        codes[rank] = main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world, argv):
    codes = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_worker, args=(world, _free_port(), argv, codes), nprocs=world, start_method="spawn")
    return [codes[r] for r in range(world)]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, checkpoint):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(checkpoint)(TEXT * 4, add_special_tokens=False)["input_ids"]
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.asarray(ids, dtype=np.uint16))
    return path


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / T.LOG_FILE).read_text().splitlines()]


@pytest.mark.parametrize("world,context", [(2, 37), (3, 48)])
def test_sequence_parallel_training_equals_one_process(checkpoint, tokens, tmp_path, world, context):
    """3 steps over 2 ranks with slices of 19 and 18 positions, and over 3 ranks of 16: the
    log's losses and the final weights (gate logits included) equal one process's."""
    one, many = tmp_path / "one", tmp_path / "many"
    torch.set_num_threads(1)
    assert main(_argv(checkpoint, tokens, one, context)) == 0
    assert _spawn(world, _argv(checkpoint, tokens, many, context, "--sequence-parallel")) == [0] * world
    np.testing.assert_allclose(_losses(many), _losses(one), rtol=1e-5)
    summary = json.loads((many / T.SUMMARY_FILE).read_text())
    assert summary["finished"] and summary["checkpoints"] == [] and "--sequence-parallel" in summary["command"]
    a, b = (load_file(str(d / T.FINAL_DIR / "model.safetensors")) for d in (one, many))
    assert a.keys() == b.keys() and any(k.endswith("tensorized_gate_logit") for k in a)
    for name in a:  # Adam's steps (at most lr = 3e-3 each) turn a gradient's rounding into up to ~1e-5
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)


def test_sequence_parallel_needs_torchrun_and_tensorized_attention(checkpoint, tokens, tmp_path, capsys,
                                                                   monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(_argv(checkpoint, tokens, tmp_path / "a", 32, "--sequence-parallel")) == 2
    assert "runs under torchrun" in capsys.readouterr().err
    argv = _argv(checkpoint, tokens, tmp_path / "b", 32, "--sequence-parallel")
    argv[argv.index("--attention") + 1] = "full"
    assert main(argv) == 2
    assert "needs tensorized attention" in capsys.readouterr().err
    assert main(_argv(checkpoint, tokens, tmp_path / "c", 32, "--sequence-parallel", "--resume")) == 2
    assert "writes no intermediate checkpoint" in capsys.readouterr().err
