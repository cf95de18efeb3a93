#!/usr/bin/env python3
"""The PTX executor against the source executor on the same launches: wall time, PTX
instructions per second and where the time goes, on the CPU.

For each case both executors run the same emulated calls in one process (one worker thread,
race checker on unless --no-check), each timed as the median of --repeat runs after a warm-up
run; the PTX executor's first run in a fresh emulate() context (which parses the kernels' PTX)
is reported apart as the parse cost. "instr/s" counts PTX thread instructions (predicated-off
ones included) from the launch records.

    python benchmarks/bench_ptx_executor.py [--repeat 3] [--no-check] [--json PATH]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import flash_cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sdpa import cpu_isa, device_name  # noqa: E402


def attention_case(B, H, N, D, dtype, causal, backward):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))

    def call():
        out = flash_cuda.attention(q, k, v, causal=causal)
        if backward:
            out.float().sum().backward()
    return call


def decode_case(Hq, Hkv, N, D, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, 1, D, generator=g).to(dtype)
    kc, vc = (torch.randn(1, Hkv, N, D, generator=g).to(dtype) for _ in range(2))
    return lambda: flash_cuda.attention_with_kvcache(q, kc, vc, num_splits=4)


CASES = {
    "fwd bf16 D64 N256 causal": lambda: attention_case(1, 2, 256, 64, torch.bfloat16, True, False),
    "fwd fp16 D128 N256": lambda: attention_case(1, 2, 256, 128, torch.float16, False, False),
    "fwd+bwd bf16 D64 N128 causal": lambda: attention_case(1, 2, 128, 64, torch.bfloat16, True, True),
    "fwd+bwd fp16 D128 N128": lambda: attention_case(1, 1, 128, 128, torch.float16, False, True),
    "fwd fp32 (3xTF32) D64 N128": lambda: attention_case(1, 2, 128, 64, torch.float32, False, False),
    "decode bf16 D128 Nk2048 GQA 8/2": lambda: decode_case(8, 2, 2048, 128, torch.bfloat16),
}


def timed(call, executor, check, repeat):
    """(median seconds of repeat runs in one context, first run's seconds in a fresh context,
    launch records of one run)."""
    with flash_cuda.emulate(executor=executor, check=check, workers=1) as emu:
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        n = len(emu.launches)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        records = emu.launches[n:2 * n]
    assert all(r["errors"] == [] for r in records), [r["errors"] for r in records]
    return statistics.median(times), first, records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-check", action="store_true", help="race checker and poisoning off")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not flash_cuda.ptx_kernels():
        sys.exit("this build packaged no PTX (build with nvcc and 8.0 in TORCH_CUDA_ARCH_LIST)")
    check = not args.no_check
    print(f"# PTX executor vs source executor: {device_name('cpu')}, ISA {' '.join(cpu_isa()) or '-'}, "
          f"{os.cpu_count()} CPUs, 1 worker, race checker {'on' if check else 'off'}, torch {torch.__version__}")
    head = ["case", "launches", "source (ms)", "ptx (ms)", "ptx / source", "ptx parse+first (ms)", "PTX instr",
            "Minstr/s", "tensor", "fp", "integer", "memory", "control", "sync"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for name, make in CASES.items():
        call = make()
        src, _, _ = timed(call, "source", check, args.repeat)
        ptx, first, records = timed(call, "ptx", check, args.repeat)
        instr = {k: sum(r["instructions"][k] for r in records) for k in records[0]["instructions"]}
        total = sum(instr.values())
        row = dict(case=name, launches=len(records), source_s=src, ptx_s=ptx, ratio=ptx / src, ptx_first_s=first,
                   instructions=total, instr_per_s=total / ptx, by_class=instr)
        rows.append(row)
        print(f"| {name} | {len(records)} | {1e3 * src:.1f} | {1e3 * ptx:.1f} | {ptx / src:.2f}x | {1e3 * first:.1f} | "
              f"{total:,} | {total / ptx / 1e6:.1f} | " + " | ".join(f"{100 * instr[k] / total:.0f}%" for k in instr) + " |")
    ratios = [r["ratio"] for r in rows]
    print(f"\nptx / source wall time: geomean {statistics.geometric_mean(ratios):.2f}x, max {max(ratios):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=device_name("cpu"), isa=cpu_isa(), check=check, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
