"""Where the time of one model call goes: the kernels and host gaps of a prefill or a decoding step.

    python benchmarks/profile_model.py --model llama3-8b --layers 1 --seqlen 131072 --measurement prefill
    python benchmarks/profile_model.py --model llama3.2-1b --seqlen 131072 --measurement decode --steps 4
    python benchmarks/profile_model.py --model llama3.2-1b --seqlen 32768 --measurement decode --steps 10 --cprofile

The model and the attention are those of ``tensorized-attention bench model`` (random
weights, ``bench_model.SYSTEMS``). The call is run twice untimed, then ``--steps`` times
under ``torch.profiler``; prints the operators and kernels by their GPU time per call, the
wall time per call and the share of it the GPU was busy (a low share: the host is what
waits), with ``--python`` the Python functions among them (exclusive host time), and
writes them as JSON with ``--out``. ``--cprofile`` instead times ``--steps`` calls with no
profiler (the wall time per call) and then runs them again under cProfile, printing the
Python functions by their own host time: what to read when the host is what waits.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tensorized_attention import bench_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(bench_model.MODELS), default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--measurement", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--system", choices=sorted(bench_model.SYSTEMS), default="tensorized")
    p.add_argument("--steps", type=int, default=2, help="profiled calls")
    p.add_argument("--top", type=int, default=30, help="rows printed")
    p.add_argument("--out", help="JSON of the rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--python", action="store_true",
                   help="record Python functions too: the host-time table then names the Python code that spends it")
    p.add_argument("--cprofile", action="store_true",
                   help="time the calls without a profiler, then print the Python functions by host time (cProfile)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    spec = bench_model.MODELS[args.model]
    model = bench_model.build_model(spec, layers=args.layers, device=device)
    if args.measurement == "decode":
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.seqlen + args.steps + 8)
    bench_model.SYSTEMS[args.system].apply(model)
    ids = torch.randint(0, spec.config["vocab_size"], (1, args.seqlen), device=device)
    with torch.no_grad(), bench_model.SYSTEMS[args.system].enter():
        if args.measurement == "prefill":
            def call():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        else:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            kw = bench_model._cache_kw(model)
            cache = getattr(out, kw)
            token = [out.logits[:, -1:].argmax(-1)]
            del out

            def call():
                out = model(input_ids=token[0], use_cache=True, logits_to_keep=1, **{kw: cache})
                token[0] = out.logits[:, -1:].argmax(-1)
        for _ in range(2):
            call()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if args.cprofile:
            return _cprofile(call, sync, args)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, with_stack=args.python) as prof:
            wall_ms = _ms_per_step(call, sync, args.steps)
    events = prof.key_averages()
    rows = []
    for e in events:
        gpu_us = getattr(e, "self_device_time_total", None)
        if gpu_us is None:
            gpu_us = e.self_cuda_time_total
        rows.append(dict(name=e.key, kernel=e.device_type != torch.autograd.DeviceType.CPU,
                         calls=e.count / args.steps, gpu_ms=gpu_us / 1e3 / args.steps,
                         cpu_ms=e.self_cpu_time_total / 1e3 / args.steps))
    rows.sort(key=lambda r: -r["gpu_ms"])
    busy = sum(r["gpu_ms"] for r in rows if r["kernel"])
    print(f"{args.model} {args.measurement} N={args.seqlen} {args.system}: {wall_ms:.2f} ms per call, "
          f"GPU busy {busy:.2f} ms ({busy / wall_ms:.0%})")
    print(f"{'gpu ms':>9} {'cpu ms':>9} {'calls':>7}  name")
    for r in [r for r in rows if r["kernel"]][:args.top]:
        print(f"{r['gpu_ms']:9.3f} {r['cpu_ms']:9.3f} {r['calls']:7.1f}  {r['name'][:110]}")
    cpu_rows = sorted(rows, key=lambda r: -r["cpu_ms"])[:args.top]
    print("by host time:")
    for r in cpu_rows:
        print(f"{r['gpu_ms']:9.3f} {r['cpu_ms']:9.3f} {r['calls']:7.1f}  {r['name'][:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), wall_ms=wall_ms, gpu_busy_ms=busy,
                           device=torch.cuda.get_device_name() if cuda else "cpu",
                           rows=rows), f, indent=1)


def _ms_per_step(call, sync, steps: int) -> float:
    """Wall milliseconds per call of ``steps`` calls (``sync`` waits for the device)."""
    start = time.perf_counter()
    for _ in range(steps):
        call()
    sync()
    return (time.perf_counter() - start) * 1e3 / steps


def _cprofile(call, sync, args) -> dict:
    import cProfile
    import io
    import pstats

    wall_ms = _ms_per_step(call, sync, args.steps)
    profile = cProfile.Profile()
    profile.enable()
    _ms_per_step(call, sync, args.steps)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"{args.model} {args.measurement} N={args.seqlen} {args.system}: {wall_ms:.2f} ms per call (no profiler)")
    print(text.getvalue())
    result = dict(args=vars(args), wall_ms=wall_ms, cprofile=text.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
