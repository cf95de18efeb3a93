"""Every CUDA kernel family once, at odd sizes, for compute-sanitizer (memcheck, racecheck).

Run under the sanitizer with torch's caching allocator off, so that every tensor is its own
cudaMalloc and an access one element past it is reported:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tools/gpu_sanitize.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python3 tools/gpu_sanitize.py --quick

Each case runs the forward, the backward and the deterministic backward of one instantiation
(head dim, dtype, variant) on tensors whose sizes are not multiples of any tile, with GQA and
Nq != Nk (dropout included), and packed sequences (varlen), with cu_seqlens that do not match
the tensors on the GPU. It checks nothing itself beyond the finiteness of the dense cases; the sanitizer does
the checking, and tests/test_kernel_gpu.py checks the values.
"""
import argparse
import time

import torch

import flash_cuda

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
# The kernel variants (csrc/kernels/dispatch.h) and features that select them.
VARIANTS = {"dense": {}, "band": dict(causal=True, window=(37, 5)),
            "mod": dict(window=(50, 9), softcap=4.0, alibi=True, mask=True),
            "dropout": dict(causal=True, dropout_p=0.2)}


def run_case(dev, D, dtype, variant, B=1, Hq=2, Hkv=1, Nq=77, Nk=131):
    g = torch.Generator(device=dev).manual_seed(D)
    mk = lambda h, n: torch.randn(B, h, n, D, device=dev, dtype=dtype, generator=g).requires_grad_()
    q, k, v = mk(Hq, Nq), mk(Hkv, Nk), mk(Hkv, Nk)
    kw = dict(VARIANTS[variant])
    wrt = [q, k, v]
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(Hq, device=dev, generator=g) * 0.1
    if kw.pop("mask", False):
        kw["attn_mask"] = torch.randn(B, Hq, Nq, Nk, device=dev, generator=g).requires_grad_()
        wrt.append(kw["attn_mask"])
    for deterministic in (False, True):
        out = flash_cuda.attention(q, k, v, deterministic=deterministic, **kw)
        grads = torch.autograd.grad(out, wrt, torch.randn_like(out))
        if dev == "cuda":
            torch.cuda.synchronize()
        assert all(torch.isfinite(x).all() for x in (out, *grads)), (D, dtype, variant)


def run_varlen(dev, D, dtype, lens_q=(17, 0, 113, 1), lens_k=(20, 5, 0, 9)):
    """Packed sequences, then cu_seqlens that do not match the tensors (CUDA: clamped, never
    validated on the host)."""
    g = torch.Generator(device=dev).manual_seed(D)
    mk = lambda n, h: torch.randn(n, h, D, device=dev, dtype=dtype, generator=g).requires_grad_()
    q, k, v = mk(sum(lens_q), 2), mk(sum(lens_k), 1), mk(sum(lens_k), 1)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=dev)
    cases = [(cu(lens_q), cu(lens_k))]
    if dev == "cuda":
        cases.append((torch.tensor([0, 90, 30, 10 ** 6, -3], dtype=torch.int32, device=dev),
                      torch.tensor([5, 0, 34, 2, 34], dtype=torch.int32, device=dev)))
    for cq, ck in cases:
        for deterministic in (False, True):
            out = flash_cuda.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True,
                                              deterministic=deterministic, dropout_p=0.1 if deterministic else 0.0)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="head dims 64 and 128, bf16 only (for racecheck)")
    ap.add_argument("--emulate", action="store_true", help="CPU tensors in flash_cuda.emulate() (checks this script)")
    args = ap.parse_args()
    dims = (64, 128) if args.quick else HEAD_DIMS
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16)
    dev = "cpu" if args.emulate else "cuda"
    for dtype in dtypes:
        for D in dims:
            for variant in VARIANTS:
                t0 = time.time()
                if args.emulate:
                    with flash_cuda.emulate(check=True):
                        run_case(dev, D, dtype, variant)
                else:
                    run_case(dev, D, dtype, variant)
                print(f"ok D={D} {str(dtype)[6:]} {variant} ({time.time() - t0:.1f} s)", flush=True)
            t0 = time.time()
            if args.emulate:
                with flash_cuda.emulate(check=True):
                    run_varlen(dev, D, dtype)
            else:
                run_varlen(dev, D, dtype)
            print(f"ok D={D} {str(dtype)[6:]} varlen ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
