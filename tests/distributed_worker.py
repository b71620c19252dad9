"""Worker side of tests/test_distributed.py: runs in each spawned process (gloo, CPU).

Every case draws the whole sequence from one seed on every rank, runs the single-process
operator on it and the sequence-parallel one on this rank's slice, and reports the
largest differences of the outputs and of the gradients of q, k, v and the gate.
"""

from __future__ import annotations

import dataclasses
import traceback
import zlib

import torch
import torch.distributed as dist

from tensorized_attention import TensorPositions, tensorized_attn
from tensorized_attention.distributed import plan_sequence_parallel, sequence_parallel_tensorized_attn


@dataclasses.dataclass(frozen=True)
class Case:
    """One call: the fold, the slice lengths (None: as equal as possible) and the options."""

    shape: tuple[int, ...]
    seqlen: int
    lengths: tuple[int, ...] | None = None
    mode: str = "complete"
    causal: bool = True
    order: tuple[int, ...] | None = None
    gate: str | None = None  # None, "heads" or "shared"
    sinks: int = 0
    positions: str | None = None  # None, "plain" or "rotated"
    heads: int = 4
    kv_heads: int = 2
    headdim: int = 8
    batch: int = 2
    dtype: torch.dtype = torch.float64
    backend: str = "auto"  # the sequence-parallel call's (the single-process one runs "auto")

    def __str__(self):
        return (f"{'x'.join(map(str, self.shape))}-N{self.seqlen}-{self.lengths}-{self.mode}-"
                f"{'causal' if self.causal else 'bidir'}-order{self.order}-gate{self.gate}-S{self.sinks}-"
                f"pos{self.positions}-H{self.heads}kv{self.kv_heads}-{str(self.dtype)[6:]}-{self.backend}")


def run_group(rank: int, world: int, init: str, jobs, results) -> None:
    """Process entry: join the group, run ``jobs`` (a list of (name, function, arguments)),
    put (rank, name, result or the error's text) on ``results``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for name, fn, args in jobs:
            try:
                results.put((rank, name, fn(rank, world, *args)))
            except Exception:  # reported to the test, which fails on it
                results.put((rank, name, "error: " + traceback.format_exc()))
    finally:  # together: a rank leaving while another still tears down can abort it
        dist.barrier()
        dist.destroy_process_group()


def _inputs(case: Case):
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    B, N, H, Hkv, D = case.batch, case.seqlen, case.heads, case.kv_heads, case.headdim
    q, k, v = (torch.randn(B, N, h, D, generator=g).to(case.dtype) for h in (H, Hkv, Hkv))
    weight = torch.randn(B, N, H, D, generator=g).to(case.dtype)
    m = len(case.shape)
    gate = None
    if case.gate == "heads":
        gate = torch.rand(H, m, generator=g).to(case.dtype)
    elif case.gate == "shared":
        gate = torch.rand(m, generator=g).to(case.dtype)
    positions = None
    if case.positions is not None:
        inv_freq = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        if case.positions == "rotated":
            positions = TensorPositions(inv_freq, rotated=True)
        else:
            positions = TensorPositions(inv_freq, attention_scaling=0.8)
    return q, k, v, weight, gate, positions


def _lengths(case: Case, world: int) -> list[int]:
    if case.lengths is not None:
        return list(case.lengths)
    base, extra = divmod(case.seqlen, world)
    return [base + (r < extra) for r in range(world)]


def compare(rank: int, world: int, case: Case) -> dict:
    """Largest absolute differences (output and gradients) against the single-process
    operator, this rank's slice; the gate's gradient summed over the ranks. Also the kinds
    of the passes the plan chose."""
    q, k, v, weight, gate, positions = _inputs(case)
    options = dict(causal=case.causal, mode=case.mode, order=case.order, sinks=case.sinks, positions=positions)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    full_gate = None if gate is None else gate.clone().requires_grad_()
    full = tensorized_attn(*leaves, case.shape, gate=full_gate, **options)
    (full * weight).sum().backward()
    lengths = _lengths(case, world)
    lo = sum(lengths[:rank])
    hi = lo + lengths[rank]
    mine = [x[:, lo:hi].clone().requires_grad_() for x in (q, k, v)]
    my_gate = None if gate is None else gate.clone().requires_grad_()
    out = sequence_parallel_tensorized_attn(*mine, case.shape, gate=my_gate, backend=case.backend, **options)
    (out * weight[:, lo:hi]).sum().backward()
    errors = {"out": (out - full[:, lo:hi]).abs().max().item()}
    for name, a, b in zip("qkv", mine, leaves, strict=True):
        errors["d" + name] = (a.grad - b.grad[:, lo:hi]).abs().max().item()
    if gate is not None:
        summed = my_gate.grad.clone()
        dist.all_reduce(summed)
        errors["dgate"] = (summed - full_gate.grad).abs().max().item()
        errors["dgate_share"] = (my_gate.grad - full_gate.grad).abs().max().item()
    plan = plan_sequence_parallel(case.shape, case.seqlen, world, mode=case.mode, order=case.order,
                                  causal=case.causal, heads=case.heads, kv_heads=case.kv_heads,
                                  headdim=case.headdim, dtype_bytes=q.element_size(), batch=case.batch,
                                  lengths=lengths)
    errors["kinds"] = [e.kind for e in plan]
    errors["scale"] = full.abs().max().item()
    return errors


def count_bytes(rank: int, world: int, case: Case) -> dict:
    """The bytes this rank sends to other ranks through the all-to-alls and the point-to-point
    sends, forward and backward, with the plan's prediction."""
    counted = {"forward": 0, "backward": 0}
    phase = ["forward"]
    real_all_to_all, real_batch = dist.all_to_all_single, dist.batch_isend_irecv

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        row = input[0].numel() * input.element_size() if input.shape[0] else 0
        sizes = input_split_sizes or []
        counted[phase[0]] += sum(c for d, c in enumerate(sizes) if d != dist.get_rank(group)) * row
        return real_all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def batch_isend_irecv(ops):
        counted[phase[0]] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real_batch(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv
    try:
        q, k, v, weight, gate, positions = _inputs(case)
        lengths = _lengths(case, world)
        lo = sum(lengths[:rank])
        mine = [x[:, lo:lo + lengths[rank]].clone().requires_grad_() for x in (q, k, v)]
        out = sequence_parallel_tensorized_attn(*mine, case.shape, causal=case.causal, mode=case.mode,
                                                order=case.order)
        phase[0] = "backward"
        (out * weight[:, lo:lo + lengths[rank]]).sum().backward()
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real_all_to_all, real_batch
    plan = plan_sequence_parallel(case.shape, case.seqlen, world, mode=case.mode, order=case.order,
                                  causal=case.causal, heads=case.heads, kv_heads=case.kv_heads,
                                  headdim=case.headdim, dtype_bytes=q.element_size(), batch=case.batch,
                                  lengths=lengths)
    return {**counted, "plan_send": sum(e.send_bytes[rank] for e in plan),
            "plan_recv": sum(e.recv_bytes[rank] for e in plan), "kinds": [e.kind for e in plan]}


def disagree(rank: int, world: int, what: str) -> str:
    """Call the operator with an input that differs on the last rank; return the error's
    type and message (every rank must raise)."""
    q, k, v = (torch.randn(1, 8, h, 8, dtype=torch.float64) for h in (2, 2, 2))
    shape = (4, 4)
    last = rank == world - 1
    if what == "shape" and last:
        shape = (2, 8)
    if what == "dtype" and last:
        q, k, v = (x.float() for x in (q, k, v))
    if what == "fold" and last:
        shape = (4, 2, 2)
    if what == "input" and last:
        q = q[0]
    if what == "select":
        from tensorized_attention import SelectedPass

        return _call(q, k, v, shape, select=SelectedPass(4, 1) if last else None)
    return _call(q, k, v, shape)


def _call(q, k, v, shape, **kw) -> str:
    try:
        sequence_parallel_tensorized_attn(q, k, v, shape, **kw)
    except (TypeError, ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"
