"""One forward and one forward + backward of flash_cuda and of torch SDPA's FlashAttention-2 at
the same shape, for Nsight Compute: the kernels' speed-of-light, occupancy and warp stall
figures side by side, to say where flash_cuda's time goes where it loses to SDPA.

Everything runs once to warm up (first-call set-up, autotuning, allocations); only the second
round runs between cudaProfilerStart and cudaProfilerStop, so with `--profile-from-start off`
Nsight Compute measures exactly one launch of each kernel:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python3 tools/gpu_profile.py [--D 128 --N 1024 --B 16 --causal]

The default shape is the FlashAttention sweep's point where flash_cuda is furthest behind
(benchmarks/gpu_runs/h200-2026-11-30: D = 128, 16 x 1024, causal, forward 0.83x).
"""
import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_cuda


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    if not (torch.cuda.is_available() and flash_cuda.has_cuda_kernels()):
        ap.error("needs a CUDA GPU and a flash_cuda build with CUDA kernels")
    H = 2048 // args.D  # the sweep's hidden size of 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(args.B, H, args.N, args.D, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    do = torch.randn_like(q)

    def ours():
        return flash_cuda.attention(q, k, v, causal=args.causal)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    def one_round():
        for fn in (ours, sdpa):
            with torch.no_grad():
                fn()
            torch.autograd.grad(fn(), (q, k, v), do)
        torch.cuda.synchronize()

    one_round()
    torch.cuda.profiler.start()
    one_round()
    torch.cuda.profiler.stop()
    print(f"profiled: B={args.B} H={H} N={args.N} D={args.D} causal={args.causal} bf16; "
          "per implementation a forward (no grad), then a forward and a backward", flush=True)


if __name__ == "__main__":
    main()
