"""A call's fixed cost beside torch SDPA's, at sizes where the kernels' work is negligible.

At short sequences a GPU waits for the host: the Python checks, the autograd layer, the op's
allocations and launches. This times flash_cuda's calls and the same calls of
torch.nn.functional.scaled_dot_product_attention on tiny inputs, in one process, interleaved
round by round: forward without gradients, forward + backward (the gradients of q, k and v), and
KV-cache decoding (one query token against a short cache), both sides taking the one kv head as
it is (SDPA with enable_gqa=True; until 2026-12-06 SDPA and flash_cuda both got the kv heads
expanded, and only q had a gradient). Per call: the fastest
round's mean (the least disturbed). On a CPU the figures include the tiny kernels' own time; on
CUDA each round ends with a synchronisation, so a figure is the host's cost where the host is
slower than the GPU.

    python benchmarks/host_overhead.py [--device cpu|cuda] [--calls 1500] [--rounds 7] [--threads N] [--json PATH]
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import flash_cuda  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sdpa import cpu_isa, device_name, pick_device  # noqa: E402


def per_call_us(fns, calls, rounds, sync):
    """{name: fastest round's mean microseconds a call}, the functions interleaved round by round."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm up (allocator, thread pool, first-call dispatch)
        for _ in range(min(calls, 50)):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) / calls * 1e6)
    return best


def cases(device, dtype):
    """(name, flash_cuda call, SDPA call) on tiny inputs: B = 1, 4 query heads, 1 kv head, D = 64."""
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = make(1, 4, 8, 64), make(1, 1, 8, 64), make(1, 1, 8, 64)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = make(1, 4, 8, 64)
    qd, kc, vc = make(1, 4, 1, 64), make(1, 1, 64, 64), make(1, 1, 64, 64)

    def no_grad(fn, *args):
        def call():
            with torch.no_grad():
                fn(*args)
        return call

    # (both sides take the one kv head as it is: flash_cuda's GQA, SDPA's enable_gqa; gradients of
    # q, k and v, returned rather than accumulated into .grad)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), dout)

    return [("forward, no gradients", no_grad(flash_cuda.attention, q, k, v), no_grad(sdpa, q, k, v)),
            ("forward + backward", fwd_bwd(flash_cuda.attention), fwd_bwd(sdpa)),
            ("KV-cache decoding step", no_grad(lambda: flash_cuda.attention_with_kvcache(qd, kc, vc, cache_seqlens=64)),
             no_grad(sdpa, qd, kc, vc))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--calls", type=int, default=1500, help="calls a round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error("--calls and --rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        pick_device(ap, args.device)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    isa = cpu_isa() if args.device == "cpu" else None
    print(f"# {device_name(args.device)}" + (f" ({' '.join(isa)})" if isa else "") +
          f", {torch.get_num_threads()} threads, torch {torch.__version__}, {dtype}, "
          f"{args.rounds} rounds of {args.calls} calls")
    rows = []
    print("| call | flash_cuda us | SDPA us | SDPA / ours |\n|---|---|---|---|")
    for name, ours, sdpa in cases(args.device, dtype):
        t = per_call_us({"ours": ours, "sdpa": sdpa}, args.calls, args.rounds, sync)
        rows.append({"call": name, "ours_us": t["ours"], "sdpa_us": t["sdpa"], "device": args.device,
                     "device_name": device_name(args.device), "isa": isa, "dtype": str(dtype)})
        print(f"| {name} | {t['ours']:.1f} | {t['sdpa']:.1f} | {t['sdpa'] / t['ours']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
