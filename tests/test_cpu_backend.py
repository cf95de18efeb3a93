"""The CPU backend's machine-dependent paths, each forced on this machine and checked against the
float64 reference: fp16/bf16 tile GEMMs in their own precision (oneDNN; AMX-packed operands where
the CPU has AMX) and after a conversion to float (FLASH_CUDA_CPU_GEMM=native | float), bf16 through
oneDNN and through the AVX512-BF16 micro-kernel (FLASH_CUDA_CPU_BF16_GEMM=onednn | dpbf16), fp32
through the BLAS and through the AVX-512 FMA micro-kernel (FLASH_CUDA_CPU_F32_GEMM), the bf16
exponent pass with and without AVX512-BF16 instructions (FLASH_CUDA_CPU_GENERIC_BF16); the online
softmax's one-pass tiles and the rows it redoes; the KV-cache loop that few query rows per kv
group take; the exponent and rounding passes' AVX-512 versions against their portable ones, bit for
bit (test-only ops _cpu_exp2 and _cpu_round_row); the softcap's tanh against float64 (_cpu_softcap).

Shapes are picked for the edges of the packed layout: head dims that are odd (K^T left unpacked)
or not a multiple of 16 (padded packing widths), key counts that are odd (the zero pad row of
the packed V and K), windows whose first key is not on a 64-key block.
"""
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import flash_cuda
from conftest import cpu_has
from reference import assert_close_fp, assert_fa_rule, attention_ref, saturation_terms

LOW = (torch.bfloat16, torch.float16)
SHAPES = [  # B, Hq, Hkv, Nq, Nk, D, causal, window
    (1, 2, 2, 300, 333, 64, False, None),
    (2, 4, 2, 257, 600, 40, True, None),
    (1, 3, 1, 300, 77, 59, False, None),
    (1, 2, 1, 520, 700, 128, True, (100, 7)),
    (1, 2, 2, 300, 1, 96, False, None),
    (2, 4, 2, 45, 70, 8, True, None),  # a head narrower than a vector
]


# "native" and "float": FLASH_CUDA_CPU_GEMM (fp16/bf16). The others force one GEMM for one dtype:
# path -> (dtype, the CPU flag it needs, environment variable).
CHOICES = {"onednn": (torch.bfloat16, None, "FLASH_CUDA_CPU_BF16_GEMM"),
           "dpbf16": (torch.bfloat16, "avx512_bf16", "FLASH_CUDA_CPU_BF16_GEMM"),
           "blas": (torch.float32, None, "FLASH_CUDA_CPU_F32_GEMM"),
           "avx512": (torch.float32, "avx512bw", "FLASH_CUDA_CPU_F32_GEMM")}
PATHS = ["native", "float", "onednn", "dpbf16"]


def set_path(monkeypatch, path, dtype):
    if path == "avx2":  # the decoding loop's AVX2 kernels (any dtype, in the float path)
        if not all(cpu_has(f) for f in ("avx2", "fma", "f16c")):
            pytest.skip("the AVX2 kernels need avx2, fma and f16c")
        monkeypatch.setenv("FLASH_CUDA_CPU_ROWS", "avx2")
        path = "float" if dtype != torch.float32 else "native"
    elif path in CHOICES:
        want, flag, var = CHOICES[path]
        if dtype != want:
            pytest.skip(f"the {path} GEMM is a choice for {want} only")
        if flag and not cpu_has(flag):
            pytest.skip(f"the {path} micro-kernel needs {flag}")
        monkeypatch.setenv(var, path)
        path = "native"
    elif dtype == torch.float32 and path != "native":
        pytest.skip("fp32 inputs have no such path")
    monkeypatch.setenv("FLASH_CUDA_CPU_GEMM", path)


@pytest.fixture
def poisoned_scratch():
    """Every temporary the CPU backend takes from its cache of freed blocks (csrc/cpu/scratch.h)
    comes filled with NaN: a result that reads memory no step of the call wrote (a padding row or
    column, a partial sum not zeroed) comes out NaN and fails the comparison."""
    torch.ops.flash_cuda._cpu_scratch_poison(True)
    try:
        yield
    finally:
        torch.ops.flash_cuda._cpu_scratch_poison(False)


def run(q, k, v, dout, **kw):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = flash_cuda.attention(*leaves, return_lse=True, **kw)
    out.backward(dout)
    return out, lse, [x.grad for x in leaves]


def ref_kw(causal, window):
    return dict(causal=causal, window=window)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_gemm_paths_fa_rule(monkeypatch, poisoned_scratch, path, dtype, shape):
    """Every fp16/bf16 GEMM path meets FlashAttention's rule on every shape (forward, lse and
    gradients, with the saturated-softmax term where Nk = 1), its temporaries handed out as NaN."""
    set_path(monkeypatch, path, dtype)
    B, Hq, Hkv, Nq, Nk, D, causal, window = shape
    g = torch.Generator().manual_seed(Nq + D)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    dout = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    kw = dict(causal=causal, window=window)
    out, lse, grads = run(q, k, v, dout, **kw)

    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_leaves, **ref_kw(causal, window))
    ref_out.backward(dout.double())
    plain_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    plain_out, _ = attention_ref(*plain_leaves, dtype=dtype, **ref_kw(causal, window))
    plain_out.backward(dout)

    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_close_fp("lse", lse[fin], ref_lse[fin], rtol=1e-5)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    sat = saturation_terms(out, ref_kw(causal, window), dout, q, k, v)
    for name, g_, pl, rl, st in zip(("dq", "dk", "dv"), grads, plain_leaves, ref_leaves, sat):
        assert_fa_rule(name, g_, pl.grad, rl.grad, 3, saturation=st)


@pytest.mark.parametrize("f32_gemm", ["avx512", "blas"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_f32_gemm_paths(monkeypatch, poisoned_scratch, f32_gemm, shape):
    """fp32 inputs through either fp32 GEMM (the AVX-512 micro-kernel needs avx512f): forward, lse
    and gradients close to the float64 reference on every edge shape, its temporaries handed out
    as NaN."""
    set_path(monkeypatch, f32_gemm, torch.float32)
    B, Hq, Hkv, Nq, Nk, D, causal, window = shape
    g = torch.Generator().manual_seed(Nq + D + 1)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    dout = torch.randn(B, Hq, Nq, D, generator=g)
    out, lse, grads = run(q, k, v, dout, causal=causal, window=window)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_leaves, causal=causal, window=window)
    ref_out.backward(dout.double())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_close_fp("lse", lse[fin], ref_lse[fin], 1e-5)
    assert_close_fp("out", out, ref_out, 2e-5)
    for name, g_, rl in zip(("dq", "dk", "dv"), grads, ref_leaves):
        assert_close_fp(name, g_, rl.grad, 2e-4)


@pytest.mark.parametrize("f32_gemm", ["avx512", "blas"])
@pytest.mark.parametrize("case", ["long_keys", "gqa_rows", "long_rows"])
def test_f32_sums_over_many_keys_and_rows(monkeypatch, f32_gemm, case):
    """FlashAttention's rule at fp32 where sums run long: the forward's O over 16k keys, the
    backward's dK and dV over 16 query heads of 2k rows sharing a kv head and over one head of 8k
    rows, with positive-mean
    values and output gradients (no cancellation to hide the rounding). One chain of FMAs per
    output over all of them had 9x-21x plain torch's error in O and up to 14x in dV (audit); now
    the micro-kernel's partial sums run over at most 128 keys or rows, the BLAS path's calls too,
    and dK and dV sum in levels (4 query tiles, a head's rows, the group's heads); one head of 8k
    rows over 4 keys had 16x on the BLAS path with one running sum per head."""
    set_path(monkeypatch, f32_gemm, torch.float32)
    g = torch.Generator().manual_seed(5)
    if case == "long_keys":  # q = 0: every key weighs alike, O the mean of 16k values near 3
        Hq, Hkv, Nq, Nk = 1, 1, 320, 16384
        q = torch.zeros(1, Hq, Nq, 64)
    else:
        Hq, Hkv, Nq, Nk = (16, 1, 2048, 4) if case == "gqa_rows" else (1, 1, 8192, 4)
        q = torch.randn(1, Hq, Nq, 64, generator=g)
    k = torch.randn(1, Hkv, Nk, 64, generator=g)
    v = torch.randn(1, Hkv, Nk, 64, generator=g) + 3
    dout = torch.randn(1, Hq, Nq, 64, generator=g) + 1
    out, _, grads = run(q, k, v, dout)
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        ref_out, _ = attention_ref(*leaves, dtype=dtype)
        ref_out.backward(dout.to(dtype))
        results.append((ref_out.detach(), [x.grad for x in leaves]))
    (ref_out, ref_grads), (plain_out, plain_grads) = results
    err = lambda x, ref: (x.double() - ref).abs().max().item()
    assert err(out, ref_out) <= 2 * err(plain_out, ref_out) + 1e-6, (err(out, ref_out), err(plain_out, ref_out))
    if case != "long_keys":
        for name, ours, plain, ref in zip(("dq", "dk", "dv"), grads, plain_grads, ref_grads):
            assert err(ours, ref) <= 3 * err(plain, ref) + 1e-6, (name, err(ours, ref), err(plain, ref))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("hot_score", [5.0, 40.0])
def test_saturated_rows_return_the_value(monkeypatch, path, dtype, hot_score):
    """A row saturated on one key returns that key's value exactly: the output is normalised by
    the probabilities as its GEMM used them. With the hot score 5 the online softmax keeps its
    reference 0 (the hot probability e^5 is not a float that fp16/bf16 hold exactly); with 40
    the tile is redone against its max."""
    set_path(monkeypatch, path, dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 2, 300, 64, dtype=dtype)  # 300 query rows: the tiled loop
    k, v = (torch.randn(1, 2, 700, 64, generator=g).to(dtype) for _ in range(2))
    hot = torch.randint(0, 700, (300,), generator=g)  # the key each row attends to
    bias = torch.full((1, 1, 300, 700), -60.0, dtype=dtype)
    bias[0, 0, torch.arange(300), hot] = hot_score
    out = flash_cuda.attention(q, k, v, attn_mask=bias)
    assert torch.equal(out, v[:, :, hot])


@pytest.mark.parametrize("case", ["later_tile_far_above", "first_tile_far_below", "first_tile_far_above"])
def test_online_softmax_redone_rows(case):
    """Tiles whose max leaves the reference by more than the margin are redone: a later key
    tile 60 above the first, a first tile 300 below zero (its probabilities against 0 would
    underflow) and one 300 above (they would overflow). float32 and float64, tight."""
    g = torch.Generator().manual_seed(1)
    Nq, Nk, D = 300, 1100, 32
    bias = torch.zeros(1, 1, Nq, Nk, dtype=torch.float64)
    if case == "later_tile_far_above":
        bias[..., 600:] = 60.0
    elif case == "first_tile_far_below":
        bias -= 300.0
    else:
        bias += 300.0
    for dtype, rtol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        q, k, v = (torch.randn(1, 2, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (Nq, Nk, Nk))
        out, lse = flash_cuda.attention(q, k, v, attn_mask=bias.to(dtype), return_lse=True)
        ref_out, ref_lse = attention_ref(q, k, v, attn_mask=bias)
        assert_close_fp("out", out, ref_out, rtol)
        assert_close_fp("lse", lse, ref_lse, rtol)


@pytest.mark.parametrize("nq", [8, 4, 2])
@pytest.mark.parametrize("path", PATHS + ["blas", "avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_few_query_rows_take_the_kvcache_loop_and_agree(monkeypatch, path, dtype, nq):
    """Decoding shapes (Nq x group <= 256, more than twice as many keys as queries, no dropout)
    run the KV-cache loop: forward, lse and gradients against the reference, and an output that
    keeps q's memory layout. Nq = 2 with 4 query heads per kv head: 8 rows, the scores as dot
    products along the cache rows on the AVX-512 kernels (fp16 caches widened in registers where
    fp16 is not multiplied natively), or the AVX2 ones (path "avx2", fp16 and bf16 in the float
    path); Nq = 4: 16 rows, one whole 16 x 16 block of the S^T transposition on AMX; Nq = 8: 32
    rows, the GEMM."""
    set_path(monkeypatch, path, dtype)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 32, 64, generator=g)[:, :nq].to(dtype).transpose(1, 2)  # FlashAttention's (B, N, H, D) memory
    k, v = (torch.randn(2, 8, 3000, 64, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(2, 32, 8, 64, generator=g)[:, :, :nq].to(dtype)
    out, lse, grads = run(q, k, v, dout, causal=True)
    assert out.transpose(1, 2).is_contiguous()  # out keeps q's memory layout
    check_against_reference(q, k, v, dout, out, lse, grads, causal=True)


@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_few_rows_gradients_at_larger_scores(nq, seed):
    """fp32 calls with few query rows (the KV-cache loop's forward) at scores up to about 60: the
    output and gradients tight against float64, and dV within 2x the error of torch's own CPU
    flash kernel (SDPA's FLASH_ATTENTION backend, which also recomputes P from an fp32 lse;
    +1e-6; plain torch's dV, P dO with P computed once, is exact to a rounding). The backward
    recomputed its scores on the tiles against the KV-cache loop's lse, whose rows were summed in
    another order: dV was 33x plain fp32 torch's error, 6x the flash kernel's (audit by a helper);
    the backward now takes lse from the tiled forward where it is given the loop's own (a
    blockwise caller's lse is used as given: test_one_hot_shortcut_keeps_nan_and_blockwise_lse)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, nq, 64, generator=g, dtype=torch.float64) * 4
    k = torch.randn(1, 4, 500, 64, generator=g, dtype=torch.float64) * 4
    v, dout = (torch.randn(1, 4, n, 64, generator=g, dtype=torch.float64) for n in (500, nq))

    def run_with(fn, dtype):
        leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return [out.double()] + [x.grad.double() for x in leaves]

    def torch_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    ref = run_with(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v, torch.float64)
    theirs, ours = run_with(torch_flash, torch.float32), run_with(flash_cuda.attention, torch.float32)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert_close_fp(name, a, r)
    err, their_err = (ours[3] - ref[3]).abs().max().item(), (theirs[3] - ref[3]).abs().max().item()
    assert err <= 2 * their_err + 1e-6, ("dv", err, their_err)


@pytest.mark.parametrize("nq,nk", [(5, 7), (1, 50), (20, 20)])
@pytest.mark.parametrize("scale", [1e16, 1e20, 1e30])
def test_fp64_gradients_at_huge_scales(nq, nk, scale):
    """float64 at scales where one ulp of a score is past 1: the few-row forward (the KV-cache
    loop, nq 5 and 1) rounds its scores differently from the backward's tiles, and exp of the
    difference gave inf and NaN gradients (the backward now takes lse from the tiled forward for
    fp64 too; audit). Gradients as float64 torch's, to 1e-9 of their size; the tiled forward (20
    rows) was right before."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, nq, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, nk, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 2, nq, 4, generator=g, dtype=torch.float64)
    out = flash_cuda.attention(q, k, v, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = attention_ref(q, k, v, scale=scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.isfinite().all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * max(b.abs().max().item(), 1.0), msg=name)


@pytest.mark.parametrize("D,scale", [(32, None), (96, None), (64, 0.1)])
@pytest.mark.parametrize("nq", [1, 4, 70])
def test_fp32_saturated_rows_at_scales_not_powers_of_two(D, scale, nq):
    """fp32 rows whose one key outscores the rest by 20 or more (P one-hot but for e^-20: plain
    torch's dV exact to a rounding), at scores of a few hundred and a scale that is not a power of
    two: out and dV within 3x plain fp32 torch's error + 1e-6, dQ and dK within 2x torch's CPU
    flash kernel's. The backward recomputed P with the scale folded into the exponent,
    exp(scale s - lse), where lse kept only the rounded m = fl(scale s_max): P at the max was
    exp(scale s_max - m), up to half an ulp of lse from 1 (dV 2e-5 to 5e-5, 62x torch's CPU flash
    kernel's error at D 32; an audit)."""
    g = torch.Generator().manual_seed(D + nq)
    q = torch.randn(1, 2, nq, D, generator=g, dtype=torch.float64) * 12
    k = torch.randn(1, 2, 130, D, generator=g, dtype=torch.float64) * 12
    sc = D ** -0.5 if scale is None else scale
    # row i's key 5 + i scores 20 above the row's best other key (its P e^-20: not 0, no one-hot
    # shortcut), at scores of a few hundred (at Nq 70 the replaced keys 5..74 held some rows' best:
    # wider gaps there, about half the rows at 20)
    best = (q @ k.transpose(-1, -2) * sc).amax(-1, keepdim=True)  # (1, 2, nq, 1)
    k[:, :, 5:5 + nq] = q * (best.abs() + 20) / (sc * (q * q).sum(-1, keepdim=True))
    v = torch.randn(1, 2, 130, D, generator=g, dtype=torch.float64)
    dout = torch.randn(1, 2, nq, D, generator=g, dtype=torch.float64)

    def run_with(fn, dtype):
        leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return [out.double()] + [x.grad.double() for x in leaves]

    plain_fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * sc, -1) @ v  # noqa: E731
    ref, plain = run_with(plain_fn, torch.float64), run_with(plain_fn, torch.float32)
    ours = run_with(lambda q, k, v: flash_cuda.attention(q, k, v, scale=scale), torch.float32)
    gaps = (q @ k.transpose(-1, -2) * sc).topk(2, -1).values.diff(dim=-1)
    assert gaps.max() < -19 and (gaps > -21).float().mean() > 0.3  # saturated rows, many at 20
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def torch_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sc)
    theirs = run_with(torch_flash, torch.float32)
    # out and dV against plain torch; dQ and dK against torch's flash kernel, which shares
    # FlashAttention's dS = P (dP - D_i): dP's fp32 rounding left where the exact dS is 0 (plain
    # torch cancels dP against its own P dP)
    for name, a, p_, t, r in zip(("out", "dq", "dk", "dv"), ours, plain, theirs, ref):
        err, plain_err, their_err = ((x - r).abs().max().item() for x in (a, p_, t))
        assert err <= (2 * their_err if name in ("dq", "dk") else 3 * plain_err) + 1e-6, (name, err, plain_err, their_err)


@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("nq", [1, 150])
def test_fp32_nearly_one_hot_rows_across_key_tiles(D, nq):
    """A row whose max key (score 1000) is in one key tile and whose runner-up, 11 below (P e^-11),
    in the next: lse = m + log(1 + e^-11) rounds to m, so P at the max recomputes as 1 within an
    ulp, and the one-hot shortcut for a tile that does not hold the whole row took it as the row's
    only weight, dropping e^-11 (dP_max - dP_other) from dS: dQ 1.2e-2 and dK 100% off where plain
    fp32 torch is 5e-6 off (a review). The shortcut now also needs D_i to match dO . v_max: dQ and
    dK within the standard's rule for gradients, 3x plain torch's error + 1e-5 plus twice the
    saturated-softmax term (D_i = rowsum(dO O) on the rounded O; here ours is 13x plain torch's dQ
    error at D 32, 5.1e-5 of a bound of 5.5e-5, on an AMD Zen 4 and a Zen 3 alike). Until
    2026-12-07 the bound was 2x the error of torch's CPU flash kernel, which shares FlashAttention's
    D_i: 5.0e-5 on the Zen 4's AVX-512, but 3.9e-6 on the Zen 3's AVX2, where the test failed."""
    g = torch.Generator().manual_seed(D)
    nk, sc = 300, D ** -0.5
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, nk, D, generator=g, dtype=torch.float64) * 0.1
    qq = q[0, 0, 0]
    targets = 800 - 50 * torch.rand(nk, generator=g, dtype=torch.float64)  # the others: 200 and more below
    targets[10], targets[280] = 1000, 989  # the max in key tile 0, the runner-up in tile 1 (256 keys a tile)
    k[0, 0] += (targets - sc * k[0, 0] @ qq)[:, None] * qq / (sc * (qq @ qq))  # score j = targets[j]
    q = q.expand(1, 1, nq, D).contiguous()
    v = torch.randn(1, 1, nk, D, generator=g, dtype=torch.float64)
    dout = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64).expand(1, 1, nq, D).contiguous()

    def grads(fn, dtype):
        leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return out, [x.grad.double() for x in leaves]

    plain_fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * sc, -1) @ v  # noqa: E731
    (_, ref), (_, plain) = grads(plain_fn, torch.float64), grads(plain_fn, torch.float32)
    out, ours = grads(lambda q, k, v: flash_cuda.attention(q, k, v), torch.float32)
    sat = saturation_terms(out, {}, dout.float(), q.float(), k.float(), v.float())
    for name, a, p_, r, s in zip(("dq", "dk"), ours, plain, ref, sat):
        assert_fa_rule(name, a, p_, r, 3, saturation=s)


@pytest.mark.parametrize("scale", [3e8, 1e12, -1e9, 1e30], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nq,nk,hq,hkv", [(4, 4, 2, 2), (64, 70, 4, 2), (3, 300, 4, 1)])
def test_gradients_at_huge_scores(dtype, scale, nq, nk, hq, hkv):
    """Scaled scores far past 2^24 (the forward runs them prescaled, online_softmax.h): the
    backward recomputes P with the scores the forward rounded. Folding the scale into the
    exponent there, P = exp(scale s - lse) missed by up to half an ulp of lse: dV off by 1.6e4 at
    a scale of 1e8, inf and NaN gradients from 1e9 (audit by a helper), where the output was
    exact. Now the FA rule against plain torch at the dtype, with the saturated-softmax term (the
    rows are one-hot)."""
    g = torch.Generator().manual_seed(nk)
    q, k, v = (torch.randn(1, h, n, 16, generator=g).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    dout = torch.randn(1, hq, nq, 16, generator=g).to(dtype)
    kw = dict(scale=scale)
    out, lse, grads = run(q, k, v, dout, **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_ref(*ref_leaves, **kw)
    ref_out.backward(dout.double())
    plain_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    plain_out, _ = attention_ref(*plain_leaves, dtype=dtype, **kw)
    plain_out.backward(dout)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    sat = saturation_terms(out, kw, dout, q, k, v)
    for name, g_, pl, rl, st in zip(("dq", "dk", "dv"), grads, plain_leaves, ref_leaves, sat):
        assert torch.isfinite(g_).all(), name
        assert_fa_rule(name, g_, pl.grad, rl.grad, 3, saturation=st)


@pytest.mark.parametrize("case", ["causal_edge", "next_tile"])
def test_near_one_hot_rows_across_key_tiles(case):
    """Rows whose weight is almost all on one key of a key tile, the rest in another tile: the
    one-hot shortcut must not take them (a review found it did once it was opened to rows with
    keys in several tiles: dQ 0.04 off where plain fp32 torch is 6.5e-6 off in a causal
    self-attention, dQ 0.55 and dK 0.023 off with the second key in the next tile). FA's rule
    against plain fp32 torch; in "next_tile" (scores of 100, 64 identical rows) not for dV, whose
    error there is lse's rounding, the same with both keys in one tile (README: scores far from 0)."""
    g = torch.Generator().manual_seed(0)
    if case == "causal_edge":  # query 256 reaches key tile [256, 512) by its own key (P 0.9991)
        N, D, causal = 260, 8, True
        q, k = (torch.randn(1, 1, N, D, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
        q[0, 0, 256], k[0, 0, 256], k[0, 0, 10] = 0, 0, 0
        q[0, 0, 256, 0], k[0, 0, 256, 0], k[0, 0, 10, 0] = 10.0, 10.0, 9.3
        nk = N
    else:  # two keys, scores 100 and 93, in different key tiles
        N, nk, D, causal = 64, 512, 4, False
        q = torch.zeros(1, 1, N, D, dtype=torch.float64)
        q[..., 0] = 1
        k = torch.zeros(1, 1, nk, D, dtype=torch.float64)
        k[0, 0, 0, 0], k[0, 0, 256, 0] = 100.0, 93.0
    v = torch.randn(1, 1, nk, D, generator=g, dtype=torch.float64)
    dout = torch.randn(1, 1, N, D, generator=g, dtype=torch.float64)
    kw = dict(causal=causal, scale=1.0)
    out, _, grads = run(*(x.float() for x in (q, k, v, dout)), **kw)
    ref_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_ref(*ref_leaves, **kw)
    ref_out.backward(dout)
    plain_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    plain_out, _ = attention_ref(*plain_leaves, dtype=torch.float32, **kw)
    plain_out.backward(dout.float())
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    names = ("dq", "dk", "dv") if case == "causal_edge" else ("dq", "dk")
    for name, g_, pl, rl in zip(names, grads, plain_leaves, ref_leaves):
        assert_fa_rule(name, g_, pl.grad, rl.grad, 3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,path", [(torch.float32, "native"), (torch.bfloat16, "native"),
                                        (torch.bfloat16, "float"), (torch.float16, "native"),
                                        (torch.float16, "float")], ids=str)
@pytest.mark.parametrize("nq,nk,group", [(15, 15, 1), (16, 32, 1), (16, 33, 1), (20, 20, 4), (32, 32, 4),
                                         (33, 33, 4), (64, 64, 4), (130, 131, 1), (15, 15, 9), (16, 32, 9),
                                         (16, 33, 9)])
def test_both_sides_of_the_loops_boundary_agree(monkeypatch, dtype, path, causal, nq, nk, group):
    """attention_cpu.cpp's takes_kvcache_loop: up to 256 query rows per kv group, a call with at most
    twice as many keys as queries from 16 queries on takes the tiled loop (fp16/bf16 multiplied in
    fp32, path "float": from 129 rows per group, or 128 under a band), else the KV-cache loop.
    Shapes on either side of each edge (15/16 queries, 2x/2x+1 keys, 128/132 rows per group with
    and without causal, 9 query heads a kv head for the float path's query and key edges), forward
    and gradients against the float64 reference."""
    set_path(monkeypatch, path, dtype)
    g = torch.Generator().manual_seed(nq * 1000 + nk + group)
    q = torch.randn(2, 2 * group, nq, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, nk, 32, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(2, 2 * group, nq, 32, generator=g).to(dtype)
    out, lse, grads = run(q, k, v, dout, causal=causal)
    check_against_reference(q, k, v, dout, out, lse, grads, causal=causal)


@pytest.mark.parametrize("nq", [3, 300], ids=["kvcache_loop", "tiled_loop"])
def test_out_layout_is_the_fakes(nq):
    """out's strides are those of the op's fake (what torch.compile and opcheck assume): q's layout
    where q has unit stride in D, else contiguous. The KV-cache loop writes a contiguous out and
    returns it as is only where that is q's layout, else copies it; values against the float64
    reference either way. Strides of size-1 dims are not compared (torch's own stride checks skip
    them, and the fake's empty_like makes them contiguous where the real one keeps q's)."""

    def significant_strides(x):
        return [st for st, n in zip(x.stride(), x.shape) if n > 1]

    from torch._subclasses.fake_tensor import FakeTensorMode
    g = torch.Generator().manual_seed(3)
    layouts = {
        "contiguous": torch.randn(1, 4, nq, 32, generator=g),
        "flash_attention": torch.randn(1, nq, 4, 32, generator=g).transpose(1, 2),
        "sliced_rows": torch.randn(1, 4, nq + 3, 32, generator=g)[:, :, 2:nq + 2],
        "unit_dim_stride": torch.randn(4 * nq * 32, generator=g).as_strided((1, 4, nq, 32), (7, nq * 32, 32, 1)),
        "d_not_innermost": torch.randn(1, 4, 32, nq, generator=g).transpose(2, 3),
    }
    k, v = torch.randn(2, 1, 2, 50, 32, generator=g).unbind(0)
    op = torch.ops.flash_cuda.fwd.default
    for name, q in layouts.items():
        out, lse = op(q, k, v, 0.25, False, True)
        with FakeTensorMode() as mode:
            fake_out, fake_lse = op(*(mode.from_tensor(x) for x in (q, k, v)), 0.25, False, True)
        assert significant_strides(out) == significant_strides(fake_out), name
        assert significant_strides(lse) == significant_strides(fake_lse), name
        ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), scale=0.25)
        assert_close_fp(f"{name} out", out, ref_out)
        assert_close_fp(f"{name} lse", lse, ref_lse)


def self_overlapping_layouts(g, B, H, N, D, dtype):
    """Inputs whose head dim ties in stride with another dim, possible only where they overlap:
    heads as sliding windows over the features (x.unfold(-1, D, 1)), and as_strided ones with
    stride 1 or 0 elsewhere. at::empty_like orders another dim innermost for them."""
    x = torch.randn(B, N, D + H - 1, generator=g).to(dtype)
    return {"unfold_heads": x.unfold(-1, D, 1).transpose(1, 2),  # strides (N F, 1, F, 1)
            "heads_stride_1_batch_stride_0": x.flatten().as_strided((B, H, N, D), (0, 1, D + H - 1, 1)),
            "batch_stride_1_rows_stride_0": x.flatten().as_strided((B, H, N, D), (1, D, 0, 1))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("nq", [3, 300], ids=["kvcache_loop", "tiled_loop"])
def test_self_overlapping_inputs(dtype, nq):
    """Overlapping q, k, v with unit stride in D (any such strides are used as they are): the
    forward's out and the gradients were allocated by at::empty_like, which put another dim
    innermost, and the row stores' internal assert fired ("out.stride(3) == 1 INTERNAL ASSERT
    FAILED ... report a bug to PyTorch"). They get unit stride in D now (contiguous where
    empty_like would not give it), as the ops' fakes do (strides compared); values and gradients
    (summed over the overlaps by autograd) against the float64 reference through the same views.
    varlen too ((T, H, D) q of strides (D, 1, 1))."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    g = torch.Generator().manual_seed(8)
    k_all = self_overlapping_layouts(g, 2, 2, 310, 32, dtype)  # (more keys than queries: every row sees one)
    for name, q in self_overlapping_layouts(g, 2, 4, nq, 32, dtype).items():
        k = v = k_all[name]
        leaves = [q._base if q._base is not None else q, k._base if k._base is not None else k]
        leaves = [x.detach().clone().requires_grad_() for x in leaves]
        views = lambda xq, xk: (xq.as_strided(q.shape, q.stride(), q.storage_offset()),  # noqa: E731
                                xk.as_strided(k.shape, k.stride(), k.storage_offset()))
        qv, kv = views(*leaves)
        out, lse = flash_cuda.attention(qv, kv, kv, causal=True, return_lse=True)
        assert out.stride(-1) == 1, name
        dout = torch.randn(out.shape, generator=g).to(dtype)
        torch.autograd.backward((out,), (dout,))
        grads = [x.grad for x in leaves]
        ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
        ref_out, ref_lse = attention_ref(*views(*ref_leaves), views(*ref_leaves)[1], causal=True)
        ref_out.backward(dout.double())
        assert_close_fp(f"{name} lse", lse, ref_lse, 1e-5)
        if dtype in (torch.float32, torch.float64):
            assert_close_fp(f"{name} out", out, ref_out)
            for what, g_, rl in zip(("dq", "dkv"), grads, ref_leaves):
                assert_close_fp(f"{name} {what}", g_, rl.grad, 2e-4)
        else:
            plain = [x.detach().requires_grad_() for x in leaves]
            plain_out, _ = attention_ref(*views(*plain), views(*plain)[1], causal=True, dtype=dtype)
            plain_out.backward(dout)
            assert_fa_rule(f"{name} out", out, plain_out, ref_out, 2)
            for what, g_, pl, rl in zip(("dq", "dkv"), grads, plain, ref_leaves):
                assert_fa_rule(f"{name} {what}", g_, pl.grad, rl.grad, 3)
        # the ops' strides are their fakes' (what torch.compile assumes)
        fwd, bwd = torch.ops.flash_cuda.fwd.default, torch.ops.flash_cuda.bwd.default
        o, l_ = fwd(q, k, v, 0.25, True, True)
        grads = bwd(dout, q, k, v, o, l_, None, 0.25, True, True)
        with FakeTensorMode() as mode:
            fq, fk, fv, fdout = (mode.from_tensor(x) for x in (q, k, v, dout))
            fo, fl = fwd(fq, fk, fv, 0.25, True, True)
            fgrads = bwd(fdout, fq, fk, fv, fo, fl, None, 0.25, True, True)
        for what, real, fake in zip(("out", "dq", "dk", "dv"), (o, *grads[:3]), (fo, *fgrads[:3])):
            assert real.stride(-1) == 1 and [s for s, n in zip(real.stride(), real.shape) if n > 1] == \
                [s for s, n in zip(fake.stride(), fake.shape) if n > 1], (name, what, real.stride(), fake.stride())
    # varlen: (total, H, D) with heads as windows
    x = torch.randn(nq + 5, 32 + 3, generator=g).to(dtype)
    qp = x.unfold(-1, 32, 1)  # (T, 4, 32), strides (35, 1, 1)
    cu = torch.tensor([0, 5, nq + 5], dtype=torch.int32)
    out = flash_cuda.varlen_attention(qp, qp[:, :2], qp[:, :2], cu, cu, max(nq, 5), max(nq, 5), causal=True)
    for a, b in ((0, 5), (5, nq + 5)):
        seq = qp[a:b].transpose(0, 1)[None]
        ref = attention_ref(seq.double(), seq[:, :2].double(), seq[:, :2].double(), causal=True)[0]
        plain = attention_ref(seq, seq[:, :2], seq[:, :2], causal=True, dtype=dtype)[0]
        if dtype in (torch.float32, torch.float64):
            assert_close_fp("varlen out", out[a:b].transpose(0, 1)[None], ref)
        else:
            assert_fa_rule("varlen out", out[a:b].transpose(0, 1)[None], plain, ref, 2)


@pytest.mark.parametrize("nq", [3, 300], ids=["kvcache_loop", "tiled_loop"])
def test_backward_without_lse_gradient_matches_a_zero_one(nq):
    """An unused lse reaches the backward as None (no tensor of zeros made and subtracted): the
    gradients are bitwise those with an explicit zero gradient of lse."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, nq, 32, generator=g)
    k, v = torch.randn(2, 2, 2, 70, 32, generator=g).unbind(0)
    dout = torch.randn(2, 4, nq, 32, generator=g)
    grads = []
    for with_lse in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = flash_cuda.attention(*leaves, return_lse=True)
        torch.autograd.backward((out, lse) if with_lse else (out,),
                                (dout, torch.zeros_like(lse)) if with_lse else (dout,))
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def check_against_reference(q, k, v, dout, out, lse, grads, **kw):
    """out, lse and the gradients of q, k, v against the float64 reference: fp32 close, fp16 and
    bf16 under FlashAttention's rule (no saturated rows in the callers' draws)."""
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_leaves, **kw)
    ref_out.backward(dout.double())
    assert_close_fp("lse", lse, ref_lse, 1e-5)
    if q.dtype == torch.float32:
        assert_close_fp("out", out, ref_out, 2e-5)
        for name, g_, rl in zip(("dq", "dk", "dv"), grads, ref_leaves):
            assert_close_fp(name, g_, rl.grad, 2e-4)
        return
    plain = [x.detach().requires_grad_() for x in (q, k, v)]
    plain_out, _ = attention_ref(*plain, dtype=q.dtype, **kw)
    plain_out.backward(dout)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    for name, g_, pl, rl in zip(("dq", "dk", "dv"), grads, plain, ref_leaves):
        assert_fa_rule(name, g_, pl.grad, rl.grad, 3)


def test_exp2_versions_agree_bit_for_bit():
    """The exponent passes' 2^t: the version this CPU runs (AVX-512's, with vrndscaleps/vscalefps
    and a mask instead of the lower clamp) gives the bits of the portable polynomial on a dense
    grid over the whole float range, at the rounding edges of n = round(t), at +-inf (-inf: a
    masked score, exactly +0) and NaN (stays NaN); and both are within 2.5e-7 of 2^t (float64)
    where the result is a normal float (the polynomial's 1.3e-7 and the rounding of its float
    arithmetic: 2.1e-7 measured)."""
    grid = torch.arange(-140 * 3072, 130 * 3072 + 1, dtype=torch.float64) / 3072  # steps of 2^-10 / 3
    edges = torch.tensor([-127.5, -127.49999, -126.5, -126.50001, -0.5, 0.5, 1.5, 126.5, 127.49, 127.5, 1e30, -1e30,
                          -0.0, 0.0, float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    t = torch.cat([grid, edges]).float()
    generic = torch.ops.flash_cuda._cpu_exp2(t, True)
    machine = torch.ops.flash_cuda._cpu_exp2(t, False)
    nan = torch.isnan(generic)
    assert torch.equal(nan, torch.isnan(machine))
    assert torch.equal(generic[~nan].view(torch.int32), machine[~nan].view(torch.int32))
    assert torch.isnan(generic[-1]) and generic[-2].item() == 0.0 and not torch.signbit(generic[-2])
    normal = (t >= -126) & (t <= 127)
    ref = torch.exp2(t[normal].double())
    assert ((generic[normal].double() - ref).abs() / ref).max().item() < 2.5e-7


def test_softcap_tanh_accuracy():
    """The softcap's tanh (rowops.cpp tanh_poly: a polynomial below |y| = 0.625, 1 - 2 / (e^(2|y|) + 1)
    above, 16 lanes at a time and a scalar tail): within 2 float ulps of tanh (float64) on a dense
    grid over [-12, 12], at magnitudes from 1e-40 (subnormal) up, on both sides of the branch point
    and at every position of a 16-lane chunk; +-inf give +-c, NaN stays NaN; c tanh(x / c) for a cap
    c (then rounded), and 1 - tanh^2 (the backward's factor) within 2.5e-7."""
    grid = torch.arange(-12 * 8192, 12 * 8192 + 1, dtype=torch.float64) / 8192
    tiny = 10.0 ** torch.arange(-40, 2, 0.05, dtype=torch.float64)
    at_branch = torch.tensor([0.625, 0.62499994, 0.62500006], dtype=torch.float64)
    y = torch.cat([grid, tiny, -tiny, at_branch, -at_branch]).float()
    for c in (1.0, 30.0):
        x = y * c  # (30 y rounded: the reference takes x / c as the op does)
        t_ref = torch.tanh((x / c).double())
        for n in (x.numel(), 17, 5):  # whole chunks and tails
            out, dcap = torch.ops.flash_cuda._cpu_softcap(x[:n], c)
            ulp = lambda v: (v.abs().nextafter(torch.tensor(float("inf"))) - v.abs()).double()  # noqa: E731
            # tanh within 2 ulps, then c times it rounded (half an ulp of out)
            bound = 2 * c * ulp(t_ref[:n].float()) + 0.5 * ulp(out)
            assert ((out.double() - c * t_ref[:n]).abs() <= bound).all(), (c, n)
            assert (dcap.double() - (1 - t_ref[:n] ** 2)).abs().max().item() < 2.5e-7, (c, n)
            assert torch.equal(torch.sign(out), torch.sign(x[:n]))
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 1e30, -1e30])
    out, dcap = torch.ops.flash_cuda._cpu_softcap(special, 4.0)
    assert out[:2].tolist() == [4.0, -4.0] and torch.isnan(out[2]) and out[3].item() == 0.0
    assert out[4:].tolist() == [4.0, -4.0] and dcap[[0, 1, 3]].tolist() == [0.0, 0.0, 1.0]


def has_vector_rounding(dtype):
    """Whether rowops has an AVX-512 version of the rounding passes for `dtype` on this CPU."""
    avx512 = all(cpu_has(f) for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))
    return avx512 and (dtype != "bfloat16" or cpu_has("avx512_bf16"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rounded_exponent_passes_agree_bit_for_bit(dtype):
    """P = exp(a x - m) rounded to fp16/bf16 as the P V operand: the portable version's bits are the
    float32 pass's values rounded by torch, exactly, and its sum of the values is that pass's sum;
    where the CPU has the vector version (AVX-512), it gives the same bits, row max and both sums
    (of the values and of the rounded values). Scores of many magnitudes (probabilities that
    overflow fp16 and ones that underflow it), the row's own max as m (every P <= 1, as in the
    attention loops), -inf (a masked score: exactly 0), special values inside the vector part and a
    tail shorter than a vector; none whose probability is a subnormal float, which AVX512-BF16's
    conversion counts as zero (documented there)."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("-inf"), 0.0, 20.0, -200.0]).repeat(4)
    x = torch.cat([special, torch.randn(4000, generator=g) * 6, torch.randn(13, generator=g)])
    tdtype = getattr(torch, dtype)
    for a, m in [(1.0, 0.0), (0.125, 3.0), (2.0, -1.5), (1.0, x.max().item())]:
        y, s = torch.ops.flash_cuda._cpu_round_row(x, "exp", dtype, a, m, True)
        e, se = torch.ops.flash_cuda._cpu_round_row(x, "exp", "float32", a, m, False)
        assert torch.equal(y, e.to(tdtype).view(torch.int16))
        assert s[0].item() == se[0].item() and s[1].item() == x.max().item()
        assert y[0].item() == 0  # -inf: exactly +0
        rounded = y.view(tdtype).double().sum().item()
        if math.isfinite(rounded):
            assert s[2].item() == pytest.approx(rounded, rel=1e-6)
        if has_vector_rounding(dtype):
            yv, sv = torch.ops.flash_cuda._cpu_round_row(x, "exp", dtype, a, m, False)
            assert torch.equal(yv, y) and torch.equal(sv, s)


def test_fp16_rounding_pass_agrees_with_torch():
    """round_fp16 (P and dS as fp16 GEMM operands): the portable version and, where the CPU has it,
    the vector one (AVX-512) give torch's round-to-nearest-even bits: ties, overflow to inf,
    underflow to subnormals and to -0, +-inf, NaN (in the vector part and in the tail)."""
    g = torch.Generator().manual_seed(1)
    halves = torch.randn(2000, generator=g).half()
    up = torch.nextafter(halves, torch.tensor(float("inf"), dtype=torch.half))
    ties = (halves.float() + up.float()) / 2  # exactly halfway between two halves
    special = torch.tensor([70000.0, -70000.0, 65520.0, 65519.0, -1e-8, 3e-6, 1e-7, float("nan"), float("inf"),
                            float("-inf"), 0.0, -0.0, 2.0 ** -25, 3 * 2.0 ** -26, 1.0, -1.0])
    x = torch.cat([special, torch.randn(2000, generator=g) * 100, ties, special[:9]])
    ref = x.half().view(torch.int16)
    nan = torch.isnan(x)
    for generic in (True, False) if has_vector_rounding("float16") else (True,):
        y, _ = torch.ops.flash_cuda._cpu_round_row(x, "round", "float16", 0.0, 0.0, generic)
        assert torch.equal(torch.isnan(y.view(torch.half)), nan)
        assert torch.equal(y[~nan], ref[~nan])


@pytest.mark.parametrize("nq", [1, 4])
def test_bf16_decoding_follows_the_mkldnn_switch(nq):
    """torch.backends.mkldnn.flags(enabled=False) after a first call: the AMX paths (which brgemm
    refuses then) are not taken, bf16 decoding (4 and 16 rows per kv group) still meets the FA rule."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, nq, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 1000, 64, generator=g).bfloat16() for _ in range(2))
    flash_cuda.attention_with_kvcache(q, k, v)
    with torch.backends.mkldnn.flags(enabled=False):
        out = flash_cuda.attention_with_kvcache(q, k, v)
    ref, _ = attention_ref(q.double(), k.double(), v.double())
    plain, _ = attention_ref(q, k, v, dtype=torch.bfloat16)
    assert_fa_rule("out", out, plain, ref, 2)


def test_generic_bf16_exponent_pass():
    """The bf16 exponent pass without AVX512-BF16 (the version machines without it run; chosen once
    per process, so in a child process): the GEMM-path and saturation tests above pass with it."""
    env = dict(os.environ, FLASH_CUDA_CPU_GENERIC_BF16="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "bfloat16 and (fa_rule or saturated)"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def _calls_reading_the_kernel_choices():
    """Calls that between them consult every per-call kernel choice: tiled and decoding, fp32,
    bf16 and fp16."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for nq in (300, 1):
            q = torch.randn(1, 2, nq, 64, generator=g).to(dtype)
            k = torch.randn(1, 2, 300, 64, generator=g).to(dtype)
            yield lambda q=q, k=k: flash_cuda.attention(q, k, k)


@pytest.mark.parametrize("var,bad", [("FLASH_CUDA_CPU_GEMM", "Native"), ("FLASH_CUDA_CPU_GEMM", "fp32"),
                                     ("FLASH_CUDA_CPU_BF16_GEMM", "oneDNN"), ("FLASH_CUDA_CPU_F32_GEMM", "mkl"),
                                     ("FLASH_CUDA_CPU_ROWS", "AVX2"), ("FLASH_CUDA_CPU_ROWS", "0")])
def test_a_kernel_choice_variable_with_another_value_is_an_error(monkeypatch, var, bad):
    """A value other than the variable's two (a typo, another case) is a ValueError naming the
    variable, its values and the value given: it ran the automatic choice silently (audit). Empty
    means unset."""
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=rf"{var} must be \w+ or \w+ \(or unset.*got '{bad}'"):
        for call in _calls_reading_the_kernel_choices():
            call()
    monkeypatch.setenv(var, "")
    for call in _calls_reading_the_kernel_choices():
        call()


def test_a_bad_kernel_choice_leaves_the_kv_cache_as_it_was(monkeypatch):
    """The check comes before the KV cache's in-place append: a refused call writes nothing (it
    appended first and raised in the attention after; review)."""
    monkeypatch.setenv("FLASH_CUDA_CPU_GEMM", "typo")
    kc, vc = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="FLASH_CUDA_CPU_GEMM must be native or float"):
        flash_cuda.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=3)
    assert not kc.any() and not vc.any()


@pytest.mark.parametrize("value,ok", [("0", True), ("", True), ("yes", False)])
def test_generic_bf16_variable_values(value, ok):
    """FLASH_CUDA_CPU_GENERIC_BF16 (read once per process: a child process) takes 1 or 0 (or unset,
    or empty); any other value is a ValueError naming it (every value, 0 included, turned it on)."""
    code = ("import torch, flash_cuda; q = torch.randn(1, 2, 300, 64).bfloat16(); "
            "flash_cuda.attention(q, q, q); print('ran')")
    env = dict(os.environ, FLASH_CUDA_CPU_GENERIC_BF16=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0 and "ran" in r.stdout, r.stderr[-2000:]
    else:  # (checked at every CPU call, on every CPU)
        assert r.returncode != 0 and "ValueError: flash_cuda: FLASH_CUDA_CPU_GENERIC_BF16 must be 1 or 0" in r.stderr, \
            r.stderr[-2000:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["sliced_rows", "flash_attention", "broadcast_batch"])
def test_gemm_paths_on_views(monkeypatch, path, layout):
    """Inputs that are views (rows sliced out of longer ones, FlashAttention's (B, N, H, D) memory,
    a batch broadcast with stride 0) reach the prepared and packed operands with the right
    elements: bf16 through the tiled loop (Nq x group > 256), forward and gradients under the FA
    rule."""
    set_path(monkeypatch, path, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    B, H, Nq, Nk, D = 2, 2, 300, 334, 64  # an even Nk: no padded copy of V or K

    def make(n):
        if layout == "sliced_rows":
            return torch.randn(B, H, n + 5, D, generator=g).bfloat16()[:, :, 3:n + 3]
        if layout == "flash_attention":
            return torch.randn(B, n, H, D, generator=g).bfloat16().transpose(1, 2)
        return torch.randn(1, H, n, D, generator=g).bfloat16().expand(B, H, n, D)

    q, k, v = make(Nq), make(Nk), make(Nk)
    dout = torch.randn(B, H, Nq, D, generator=g).bfloat16()
    out, lse, grads = run(q, k, v, dout)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_ref(*ref_leaves)
    ref_out.backward(dout.double())
    plain_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    plain_out, _ = attention_ref(*plain_leaves, dtype=torch.bfloat16)
    plain_out.backward(dout)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    for name, g_, pl, rl in zip(("dq", "dk", "dv"), grads, plain_leaves, ref_leaves):
        assert_fa_rule(name, g_, pl.grad, rl.grad, 3)


CASES_FROM_ROWS = {  # B, Hq, Hkv, Nq, Nk, D, keyword arguments
    "tail_of_5_keys": (1, 4, 2, 300, 517, 64, {}),
    "band_edges": (1, 2, 1, 300, 333, 64, dict(causal=True, window=(40, 0))),
    "odd_head_dim": (1, 2, 2, 300, 333, 59, {}),
    "odd_row_stride": (2, 2, 2, 300, 200, 48, {}),
    "unaligned_rows": (2, 2, 2, 300, 200, 48, {}),
    "d_not_innermost": (1, 2, 2, 300, 200, 48, {}),
    "flash_attention_layout": (2, 4, 2, 300, 290, 64, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES_FROM_ROWS))
def test_operands_packed_from_the_key_rows(monkeypatch, dtype, case):
    """K^T (and the backward's V^T) packed for the micro-kernels straight from the key rows, a
    word transpose per panel (bf16: where the rows hold whole aligned words, else a dense copy
    first: an odd head dim, rows an odd number of elements apart or half a word off); key blocks narrower than a
    vector (a last tile of 5 keys, a band's edges) gathered from those rows; dK and dV stored
    through a transpose and store_rows, or by ATen where their rows are not unit-stride in D; Q^T
    and dO^T transposed in parallel (fp32). Forward and gradients against the float64 reference
    (fp32: close; bf16: the FA rule), on the micro-kernel paths."""
    set_path(monkeypatch, "avx512" if dtype == torch.float32 else "dpbf16", dtype)
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, Nq, Nk, D, kw = CASES_FROM_ROWS[case]

    def make(h, n):
        if case == "d_not_innermost":  # (B, H, D, N) memory: unit stride along N
            return torch.randn(B, h, D, n, generator=g).to(dtype).transpose(2, 3)
        if case == "flash_attention_layout":
            return torch.randn(B, n, h, D, generator=g).to(dtype).transpose(1, 2)
        if case == "odd_row_stride":  # rows D + 1 elements apart
            return torch.randn(B, h, n, D + 1, generator=g).to(dtype)[..., :D]
        if case == "unaligned_rows":  # rows D + 2 apart, from their second element (bf16: half a word in)
            return torch.randn(B, h, n, D + 2, generator=g).to(dtype)[..., 1:D + 1]
        return torch.randn(B, h, n, D, generator=g).to(dtype)

    q, k, v = make(Hq, Nq), make(Hkv, Nk), make(Hkv, Nk)
    dout = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    out, lse, grads = run(q, k, v, dout, **kw)
    if case not in ("odd_row_stride", "unaligned_rows"):  # dK, dV in the inputs' layouts (a sliced input's are dense)
        assert grads[1].stride() == k.stride() and grads[2].stride() == v.stride()
    check_against_reference(q, k, v, dout, out, lse, grads, **kw)


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_tiles_handed_between_our_gemms_and_torchs(threads):
    """The packed (AMX) GEMMs keep brgemm's tile configuration across a worker's tiles and release
    it when the worker is done and before oneDNN's own GEMMs run (release_tiles). Interleaved in
    one thread: bf16 attention with an even head dim (packed K^T and V), torch's bf16 matmul
    (oneDNN, configures the tiles itself), attention with an odd head dim (K^T through oneDNN's
    unpacked GEMM between the packed P V of every tile), decoding (packed Q^T): every result keeps
    the FA rule against the float64 reference, and the matmul its own."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(11)
        a, b = (torch.randn(96, 96, generator=g).bfloat16() for _ in range(2))
        for _ in range(2):
            for D in (64, 59):
                q, k, v = (torch.randn(1, 2, 300, D, generator=g).bfloat16() for _ in range(3))
                out = flash_cuda.attention(q, k, v)
                ref, _ = attention_ref(q.double(), k.double(), v.double())
                plain, _ = attention_ref(q, k, v, dtype=torch.bfloat16)
                assert_fa_rule("out", out, plain, ref, 2)
                mm = a @ b
                assert_fa_rule("matmul", mm, (a.float() @ b.float()).bfloat16(), a.double() @ b.double(), 2)
            q = torch.randn(1, 8, 4, 64, generator=g).bfloat16()
            k, v = (torch.randn(1, 2, 500, 64, generator=g).bfloat16() for _ in range(2))
            out = flash_cuda.attention_with_kvcache(q, k, v)
            ref, _ = attention_ref(q.double(), k.double(), v.double())
            plain, _ = attention_ref(q, k, v, dtype=torch.bfloat16)
            assert_fa_rule("decode", out, plain, ref, 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("path", ["native", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4, 6, 6, 40, 40, 32, True), (1, 4, 2, 130, 600, 59, False)],
                         ids=["short_causal", "key_splits_odd_d_gqa"])
def test_scratch_cache_reuses_blocks_and_results_do_not_depend_on_them(monkeypatch, path, dtype, shape):
    """A call's temporaries (operands, dQ partials) come from blocks earlier calls freed
    (csrc/cpu/scratch.h), holding whatever those calls left in them. The same call before and
    after a call on other inputs of the same shape (the reused blocks then hold that call's
    values) gives the same bits, and both meet the float64 reference; the later calls are served
    from the cache (hits), the cache stays within its 32 MiB, and empty_cpu_cache() frees what it
    holds. Shapes: 40 tokens (the tiled loop in fp32 and native bf16/fp16; the KV-cache loop's
    forward where fp16/bf16 are multiplied in float), and 600 keys in three key tiles, split
    across the threads (dQ partials summed), an odd head dim, 2 query heads a kv head."""
    set_path(monkeypatch, path, dtype)
    B, Hq, Hkv, Nq, Nk, D, causal = shape
    g = torch.Generator().manual_seed(5)

    def inputs(mult):
        return [torch.randn(B, h, n, D, generator=g).mul(mult).to(dtype)
                for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk), (Hq, Nq))]

    x, y = inputs(1), inputs(3)
    flash_cuda.empty_cpu_cache()
    assert torch.ops.flash_cuda._cpu_scratch_stats()[2] == 0
    first = run(*x, causal=causal)
    hits, misses, idle = torch.ops.flash_cuda._cpu_scratch_stats()
    assert 0 < idle <= 32 << 20
    run(*y, causal=causal)
    again = run(*x, causal=causal)
    hits2, misses2, idle2 = torch.ops.flash_cuda._cpu_scratch_stats()
    assert hits2 > hits and idle2 <= 32 << 20
    for a, b in zip([first[0], first[1], *first[2]], [again[0], again[1], *again[2]]):
        assert torch.equal(a, b)

    ref_leaves = [t.detach().double().requires_grad_() for t in x[:3]]
    ref_out, _ = attention_ref(*ref_leaves, causal=causal)
    ref_out.backward(x[3].double())
    if dtype == torch.float32:
        assert_close_fp("out", first[0], ref_out)
        for name, g_, rl in zip(("dq", "dk", "dv"), first[2], ref_leaves):
            assert_close_fp(name, g_, rl.grad, 2e-4)
    else:
        plain_leaves = [t.detach().requires_grad_() for t in x[:3]]
        plain_out, _ = attention_ref(*plain_leaves, causal=causal, dtype=dtype)
        plain_out.backward(x[3])
        assert_fa_rule("out", first[0], plain_out, ref_out, 2)
        for name, g_, pl, rl in zip(("dq", "dk", "dv"), first[2], plain_leaves, ref_leaves):
            assert_fa_rule(name, g_, pl.grad, rl.grad, 3)
    assert flash_cuda.empty_cpu_cache() == idle2
    assert torch.ops.flash_cuda._cpu_scratch_stats()[2] == 0


def test_concurrent_calls_share_the_scratch_cache():
    """Calls from several Python threads at once (torch releases the GIL inside the ops) take and
    free blocks of the shared cache concurrently: each thread's forward and backward, repeated,
    give the bits the same call gives alone."""
    import threading
    g = torch.Generator().manual_seed(9)
    shapes = [(4, 6, 40, 32), (2, 4, 130, 64), (1, 8, 300, 40), (4, 6, 40, 32)]
    cases = [[torch.randn(s, generator=g) for _ in range(4)] for s in shapes]
    alone = [run(*c, causal=i % 2 == 1) for i, c in enumerate(cases)]
    results, errors = [None] * len(cases), []

    def work(i):
        try:
            for _ in range(5):
                results[i] = run(*cases[i], causal=i % 2 == 1)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, alone):
        for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["one_key", "diagonal_window", "causal_first_row", "lse_grad"])
def test_one_hot_rows_get_exact_gradients(dtype, case):
    """A row that sees one key has P = 1 and an exact dS of 0 (plain torch's softmax backward gives
    0: dQ of the row and its key's share of dK vanish). FlashAttention's dS = P (dP - D) with D =
    rowsum(dO o O) leaves the difference of two roundings of the same dot product there (the dP
    GEMM's, D's), which scale 3.0 and large values lifted over the FA rule's 1e-5 (soaks: test_masks
    seeds 2024, 2033, 2407, 2578, 18985, 19014; test_dropout 2378). The backward takes D_i = dP_ij
    in a one-hot row (bwd_impl): dQ and dK come out exactly 0, and with a gradient flowing into lse
    (dS = P dlse there) they match the float64 reference."""
    g = torch.Generator().manual_seed(3)
    Nq, Nk = {"one_key": (79, 1), "diagonal_window": (50, 50), "causal_first_row": (40, 40),
              "lse_grad": (79, 1)}[case]
    kw = {"scale": 3.0}
    if case == "diagonal_window":
        kw["window"] = (0, 0)
    if case == "causal_first_row":  # only query 0 sees one key (key 0, which every query sees)
        kw["causal"] = True
    q = (torch.randn(2, 6, Nq, 64, generator=g) * 4).to(dtype)
    k, v = ((torch.randn(2, 2, Nk, 64, generator=g) * 4).to(dtype) for _ in range(2))
    dout = torch.randn(2, 6, Nq, 64, generator=g).to(dtype)
    w = torch.randn(2, 6, Nq, generator=g).float()
    lse_grad = case == "lse_grad"

    def grads(fn, dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        out, lse = fn(*leaves)
        loss = (out.to(dt) * dout.to(dt)).sum() + ((lse.to(dt) * w.to(dt)).sum() if lse_grad else 0)
        return torch.autograd.grad(loss, leaves)

    ours = grads(lambda *x: flash_cuda.attention(*x, return_lse=True, **kw), dtype)
    ref = grads(lambda *x: attention_ref(*x, **kw), torch.float64)
    plain = grads(lambda *x: attention_ref(*x, dtype=dtype, **kw), dtype)
    if case in ("one_key", "diagonal_window"):  # every row one-hot: the exact dQ and dK are 0
        assert ref[0].abs().max() < 1e-12 and ref[1].abs().max() < 1e-12
        assert torch.count_nonzero(ours[0]) == 0 and torch.count_nonzero(ours[1]) == 0
    if case == "causal_first_row":
        assert ref[0][:, :, 0].abs().max() < 1e-12 and torch.count_nonzero(ours[0][:, :, 0]) == 0
    for name, a, pl, r in zip(("dq", "dk", "dv"), ours, plain, ref):
        if dtype == torch.float32:
            assert_close_fp(name, a, r, 2e-4)
        else:
            assert_fa_rule(name, a, pl, r, 3)


def test_one_hot_shortcut_keeps_nan_and_blockwise_lse():
    """The backward's one-hot rows (P = 1, dS = dlse) only where lse is this row's own: a NaN in q
    (lse NaN, P NaN) propagates to dq, dk and dv as plain torch's backward propagates it; and bwd
    called per key chunk with the whole forward's out and lse (blockwise / ring attention: the
    chunks' gradients sum to the whole's), where a chunk of one key gives rows with one nonzero P
    below 1, matches the float64 gradients of the whole."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 9, 16, generator=g)
    k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    q[0, 1, 4, 3] = float("nan")
    dout = torch.randn(1, 2, 9, 16, generator=g)
    _, _, ours = run(q, k, v, dout, scale=3.0)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    attention_ref(*ref, scale=3.0)[0].backward(dout.double())
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(r.grad)), name
        fin = ~torch.isnan(r.grad)
        assert_close_fp(name, a[fin], r.grad[fin], 2e-4)

    # two keys, the second holding 4.5e-5 to 6.7e-3 of each row's mass (scores 0 and -5 q_0, q_0 in
    # [1, 2]): the whole's out and lse
    q = torch.randn(1, 1, 6, 16, generator=g) * 0.01
    q[..., 0] = 1 + torch.rand(1, 1, 6, generator=g)
    k = torch.zeros(1, 1, 2, 16)
    k[..., 1, 0] = -5.0
    v, dout = torch.randn(1, 1, 2, 16, generator=g), torch.randn(1, 1, 6, 16, generator=g)
    scale = 1.0
    out, lse = torch.ops.flash_cuda.fwd(q, k, v, scale, False, True)
    dq = torch.zeros_like(q)
    dkv = []
    for c in range(2):
        gq, gk, gv, _ = torch.ops.flash_cuda.bwd(dout, q, k[:, :, c:c + 1], v[:, :, c:c + 1], out, lse, None, scale,
                                                 False, True)
        dq += gq
        dkv.append((gk, gv))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    attention_ref(*ref, scale=scale)[0].backward(dout.double())
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1)
    assert 4e-5 < p[..., 1].min() and p[..., 1].max() < 0.01  # the one-key chunks' P is below 1
    assert_close_fp("dq", dq, ref[0].grad, 1e-5)
    assert_close_fp("dk", torch.cat([d[0] for d in dkv], 2), ref[1].grad, 1e-5)
    assert_close_fp("dv", torch.cat([d[1] for d in dkv], 2), ref[2].grad, 1e-5)


def with_grads(fn, q, k, v, dout, kw):
    """out, lse and the gradients of q, k, v (and of a mask that requires grad) of
    fn(q, k, v, **kw) -> (out, lse)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    if mask is not None and mask.requires_grad:
        mask = mask.detach().requires_grad_()
        kw = dict(kw, attn_mask=mask)
    out, lse = fn(*leaves, **kw)
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    return out, lse, torch.autograd.grad((out * dout.to(out.dtype)).sum(), wrt)


def in_chunks(pairs, q, k, v, dout, **kw):
    """with_grads of the CPU forward and backward with their operands prepared `pairs` (batch, kv
    head) pairs at a time (0: the automatic chunks)."""
    before = torch.ops.flash_cuda._cpu_force_chunk_pairs(pairs)
    try:
        return with_grads(lambda *a, **o: flash_cuda.attention(*a, return_lse=True, **o), q, k, v, dout, kw)
    finally:
        torch.ops.flash_cuda._cpu_force_chunk_pairs(before)


@pytest.mark.parametrize("seed", range(12))
def test_operands_in_chunks(monkeypatch, poisoned_scratch, seed):
    """The tiled forward and backward prepare their operands (and the backward its dQ partials) a
    chunk of (batch, kv head) pairs at a time (whole batches, or some kv heads of one batch):
    every chunking gives the one-chunk result bit for bit (out, lse, the gradients of q, k, v and
    the mask, with dropout the same draws), and that one is the float64 reference's (fp32 close,
    fp16 and bf16 under FlashAttention's rule). Random shapes, GQA, dtypes, GEMM paths, views and
    options; the temporaries handed out as NaN."""
    rnd = random.Random(7000 + seed)
    g = torch.Generator().manual_seed(seed)
    dtype = rnd.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64])
    if dtype in LOW:
        set_path(monkeypatch, rnd.choice(["native", "float"]), dtype)
    elif dtype == torch.float32:  # the BLAS or the AVX-512 micro-kernel (which transposes no operand)
        monkeypatch.setenv("FLASH_CUDA_CPU_F32_GEMM", rnd.choice(["blas", "avx512"]) if cpu_has("avx512bw")
                           else "blas")
    B, Hkv, group = rnd.randint(1, 3), rnd.randint(1, 3), rnd.choice([1, 2, 3])
    Hkv += B * Hkv == 1  # at least two pairs to chunk
    Nq = rnd.randint(16, 300)
    Nk, D = rnd.randint(1, 2 * Nq), rnd.choice([8, 40, 59, 64, 128])  # self-attention-like: the tiled loop

    def make(h, n):
        if rnd.random() < 0.3:  # FlashAttention's (B, N, H, D) memory
            return torch.randn(B, n, h, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, D, generator=g).to(dtype)

    q, k, v = make(Hkv * group, Nq), make(Hkv, Nk), make(Hkv, Nk)
    dout = torch.randn(B, Hkv * group, Nq, D, generator=g).to(dtype)
    kw = {}
    if rnd.random() < 0.4:
        kw["causal"] = True
    if rnd.random() < 0.3:
        kw["window"] = (rnd.choice([-1, 3, 70]), rnd.choice([-1, 0, 9]))
    if rnd.random() < 0.3:
        kw["softcap"] = rnd.choice([2.0, 30.0])
    if rnd.random() < 0.3:
        kw["alibi_slopes"] = torch.rand(Hkv * group, generator=g) * 0.3
    if rnd.random() < 0.3:
        kw["attn_mask"] = torch.randn(B, 1, Nq, Nk, generator=g).to(dtype).requires_grad_(rnd.random() < 0.5)
    drop = rnd.random() < 0.3
    runs = []
    for pairs in (B * Hkv, 1, rnd.randint(2, max(2, B * Hkv - 1)), 0):
        if drop:
            kw.update(dropout_p=0.25, generator=torch.Generator().manual_seed(seed))
        runs.append((pairs, in_chunks(pairs, q, k, v, dout, **kw)))
    for pairs, (out, lse, grads) in runs[1:]:
        assert torch.equal(out, runs[0][1][0]) and torch.equal(lse, runs[0][1][1]), (pairs, B, Hkv, kw)
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1][2])), (pairs, B, Hkv, kw)
    if drop:
        return  # (the dropout tests check the CPU backend's mask against the reference)
    out, lse, grads = runs[0][1]
    ref = in_reference(q, k, v, dout, torch.float64, kw)
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
    names = ("out", "dq", "dk", "dv", "dmask")
    if dtype in (torch.float32, torch.float64):
        assert_close_fp("lse", lse[fin], ref[1][fin], 1e-5)
        for name, x, r in zip(names, (out, *grads), (ref[0], *ref[2])):
            assert_close_fp(name, x, r, 2e-5 if name == "out" else 2e-4)
    else:
        plain = in_reference(q, k, v, dout, dtype, kw)
        sat = saturation_terms(out, kw, dout, q, k, v)
        assert_fa_rule("out", out, plain[0], ref[0], 2)
        for name, x, p_, r, st in zip(names[1:], grads, plain[2], ref[2], sat):
            assert_fa_rule(name, x, p_, r, 3, saturation=st)


def in_reference(q, k, v, dout, dtype, kw):
    """with_grads of the reference computed in `dtype`."""
    return with_grads(lambda *a, **o: attention_ref(*a, dtype=dtype, **o), q, k, v, dout, kw)
