"""How fast one rank's tensor reaches the next rank, by each torch.distributed way of sending it.

    torchrun --standalone --nproc-per-node 2 benchmarks/transfer.py --mib 2829 --out FILE

Rank r sends ``--mib`` MiB to rank r + 1 (the halo of a sequence-parallel pass,
docs/distributed.md) by: point-to-point (``batch_isend_irecv``), a broadcast in a group of
the two ranks, and an all-to-all with zero counts for the other pairs. Prints and writes the
median milliseconds over ``--iters`` transfers (after 2 untimed) and the bandwidth.
``--device cpu`` runs it with gloo (for the tests; times from time.perf_counter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from process_group import exit_at_once, join, leave


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=2829.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    rank, world, device, _ = join(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = int(args.mib * 2**20) // 2
    buf = torch.randn(n, device=device).to(torch.bfloat16)
    pairs = [dist.new_group([r, r + 1], use_local_synchronization=True) if r in (rank - 1, rank) else None
             for r in range(world - 1)]

    def p2p():
        ops = []
        if rank + 1 < world:
            ops.append(dist.P2POp(dist.isend, buf, rank + 1))
        if rank > 0:
            ops.append(dist.P2POp(dist.irecv, buf, rank - 1))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def pair_broadcast():
        for r in (rank - 1, rank):  # receive from the previous rank, then send to the next
            if 0 <= r < world - 1:
                dist.broadcast(buf, r, group=pairs[r])

    def all_to_all():
        out = torch.empty_like(buf)
        send = [n if d == rank + 1 else 0 for d in range(world)]
        recv = [n if d == rank - 1 else 0 for d in range(world)]
        dist.all_to_all_single(out[:sum(recv)], buf[:sum(send)], recv, send)

    rows = {}
    for name, fn in (("batch_isend_irecv", p2p), ("broadcast in a pair group", pair_broadcast),
                     ("all_to_all_single", all_to_all)):
        times = []
        for i in range(args.iters + 2):
            dist.barrier()
            sync()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            fn()
            if cuda:
                end.record()
            sync()
            if i >= 2:
                times.append(start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3)
        ms = torch.tensor([statistics.median(times)], device=device, dtype=torch.float64)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        rows[name] = {"ms": ms.item(), "gb_per_s": n * 2 / ms.item() / 1e6}
    if rank == 0:
        result = {"command": " ".join(["torchrun", f"--nproc-per-node {world}", *sys.argv]),
                  "device": torch.cuda.get_device_name(device) if cuda else "cpu", "ranks": world, "mib": args.mib,
                  "rows": rows, "torch": torch.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}
        for name, r in rows.items():
            print(f"{name:>28}: {r['ms']:8.2f} ms {r['gb_per_s']:7.1f} GB/s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    leave()


if __name__ == "__main__":
    main()
    exit_at_once()
