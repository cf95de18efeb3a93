#!/usr/bin/env python3
"""The CUDA kernels in the SIMT emulator: wall time of an emulated forward and backward, and
the counters of each launch (what Nsight Compute would report on a GPU), on the CPU.

    python benchmarks/emulator_report.py [--B 1 --H 2 --N 256 --D 64 --dtype float16 --causal]
"""
import argparse
import time

import torch

import flash_cuda


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="race checker and poisoning off")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    q, k, v = (torch.randn(args.B, args.H, args.N, args.D, dtype=dt, requires_grad=True) for _ in range(3))
    with flash_cuda.emulate(check=not args.no_check) as emu:
        t0 = time.perf_counter()
        out = flash_cuda.attention(q, k, v, causal=args.causal, deterministic=args.deterministic)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        t2 = time.perf_counter()
    print(f"B={args.B} H={args.H} N={args.N} D={args.D} {args.dtype} causal={args.causal} "
          f"check={not args.no_check}: emulated forward {t1 - t0:.3f} s, backward {t2 - t1:.3f} s "
          f"({torch.get_num_threads()} worker threads)\n")
    head = ["kernel", "grid", "block", "smem", "mma", "barriers", "gmem read", "gmem written",
            "sectors/ideal", "ldmatrix wavefronts/ideal", "cp.async wavefronts/ideal", "st/ld.shared wavefronts/ideal"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in emu.launches:
        s = r["shared"]
        ratio = lambda *kinds: f"{sum(s[x]['wavefronts'] for x in kinds)}/{sum(s[x]['ideal'] for x in kinds)}"
        row = [r["kernel"], "x".join(map(str, r["grid"])), r["block"][0], r["dynamic_smem"], r["mma"], r["barriers"],
               r["global_bytes_read"], r["global_bytes_written"], f"{r['global_sectors']}/{r['global_sectors_ideal']}",
               ratio("ldmatrix"), ratio("cp_async"), ratio("store", "load")]
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
