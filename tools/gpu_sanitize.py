"""Every CUDA kernel family once, at odd sizes, for compute-sanitizer (memcheck, racecheck).

Run under the sanitizer with torch's caching allocator off, so that every tensor is its own
cudaMalloc and an access one element past it is reported:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tools/gpu_sanitize.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python3 tools/gpu_sanitize.py --quick

Each case runs the forward, the backward and the deterministic backward of one instantiation
(head dim, dtype, variant) on tensors whose sizes are not multiples of any tile, with GQA and
Nq != Nk (dropout included), in fp16, bf16 and fp32 (TF32 kernels), packed sequences (varlen), with cu_seqlens that do not match
the tensors on the GPU, and KV caches (paged and contiguous, with appends, splits, and lengths and
block tables that do not match the cache). It checks nothing itself beyond the finiteness of the dense cases; the sanitizer does
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


def run_kvcache(dev, D, dtype):
    """KV cache: a paged pool (page size 16, pages shuffled) and a contiguous cache, appends, split
    and unsplit, decoding (GQA packed) and a causal 5-token step; then lengths past the capacity,
    negative ones, table entries past the pool and left pads past the lengths or negative, which
    the kernels must clamp (direct op calls: the Python API would reject them)."""
    g = torch.Generator(device=dev).manual_seed(D)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
    kp, vp = mk(13, 2, 16, D), mk(13, 2, 16, D)
    table = torch.randperm(13, device=dev, generator=g)[:12].reshape(3, 4).to(torch.int32)
    kc, vc = mk(3, 2, 61, D), mk(3, 2, 61, D)
    for nq, splits in ((1, 0), (1, 3), (5, 1)):
        q, k, v = mk(3, 4, nq, D), mk(3, 2, nq, D), mk(3, 2, nq, D)
        seqlens = torch.tensor([0, 17, 61 - nq], dtype=torch.int32, device=dev)
        flash_cuda.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=seqlens, block_table=table, causal=True,
                                          num_splits=splits)
        flash_cuda.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, causal=True, num_splits=splits)
        pad = torch.tensor([0, 5, 61 - nq], dtype=torch.int32, device=dev)  # left pads: none, some, all
        flash_cuda.attention_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table, cache_leftpad=pad,
                                          causal=True, num_splits=splits)
        flash_cuda.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, cache_leftpad=pad, num_splits=splits)
    bad_table = table.clone()
    bad_table[1, 1], bad_table[2, 0] = 1000, -3
    bad_lengths = torch.tensor([-5, 70, 2 ** 30], dtype=torch.int32, device=dev)
    q, k, v = mk(3, 4, 1, D), mk(3, 2, 1, D), mk(3, 2, 1, D)
    torch.ops.flash_cuda.kvcache_fwd(q, kp, vp, k, v, bad_lengths, bad_table, 0.1, True, num_splits=2)
    torch.ops.flash_cuda.kvcache_fwd(q, kc, vc, k, v, bad_lengths, None, 0.1, False)
    bad_pads = torch.tensor([7, -(2 ** 30), 2 ** 30], dtype=torch.int32, device=dev)  # left pads clamped too
    torch.ops.flash_cuda.kvcache_fwd(q, kp, vp, None, None, bad_lengths, bad_table, 0.1, True, num_splits=2,
                                     cache_leftpad=bad_pads)
    torch.ops.flash_cuda.kvcache_fwd(q, kc, vc, None, None, bad_lengths, None, 0.1, False, cache_leftpad=bad_pads)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="head dims 64 and 128, bf16 only (for racecheck)")
    ap.add_argument("--emulate", action="store_true", help="CPU tensors in flash_cuda.emulate() (checks this script)")
    args = ap.parse_args()
    if not args.emulate and not (torch.cuda.is_available() and flash_cuda.has_cuda_kernels()):
        ap.error("needs a CUDA GPU and a flash_cuda build with CUDA kernels (or --emulate)")
    dims = (64, 128) if args.quick else HEAD_DIMS
    # float32: the TF32 / 3xTF32 kernels (attention and packed sequences; the KV cache takes 16-bit)
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16, torch.float32)
    dev = "cpu" if args.emulate else "cuda"

    def run(name, fn, *a):
        t0 = time.time()
        if args.emulate:
            with flash_cuda.emulate(check=True):
                fn(dev, *a)
        else:
            fn(dev, *a)
        print(f"ok D={a[0]} {str(a[1])[6:]} {name} ({time.time() - t0:.1f} s)", flush=True)

    for dtype in dtypes:
        for D in dims:
            for variant in VARIANTS:
                run(variant, run_case, D, dtype, variant)
            run("varlen", run_varlen, D, dtype)
            if dtype != torch.float32:
                run("kvcache", run_kvcache, D, dtype)


if __name__ == "__main__":
    main()
