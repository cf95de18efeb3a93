"""flash_cuda.attention against the float64 reference: outputs, lse and gradients over odd
sizes, Nq != Nk, GQA/MQA, causal and not, many (batch, head) pairs, FlashAttention layout.

float32/float64 are held to a tight relative bound; float16/bfloat16 to FlashAttention's
rule (2x plain torch's error for the output, 3x for gradients, plus 1e-5).
"""
import pytest
import torch

import flash_cuda
from conftest import dtypes_for, skip_unless_supported, widest_dtype
from reference import assert_close_fp, assert_fa_rule, attention_ref, saturation_terms

LOW_PRECISION = (torch.float16, torch.bfloat16)


def make_qkv(device, dtype, B, Hq, Hkv, Nq, Nk, D, fa_layout=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(h, n):
        if fa_layout:  # (B, N, H, D) memory, passed as a (B, H, N, D) view
            return torch.randn(B, n, h, D, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(B, h, n, D, generator=g).to(device, dtype)

    return rand(Hq, Nq), rand(Hkv, Nk), rand(Hkv, Nk)


def check_case(device, dtype, B, Hq, Hkv, Nq, Nk, D, causal, fa_layout=False):
    q, k, v = make_qkv(device, dtype, B, Hq, Hkv, Nq, Nk, D, fa_layout)
    dout = torch.randn(B, Hq, Nq, D, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = flash_cuda.attention(*leaves, causal=causal, return_lse=True)
    out.backward(dout)
    grads = [x.grad for x in leaves]

    ref_leaves = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_leaves, causal=causal)
    ref_out.backward(dout.to(torch.float64))
    ref_grads = [x.grad for x in ref_leaves]

    assert out.dtype == dtype and out.shape == (B, Hq, Nq, D)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all() and all(torch.isfinite(g_).all() for g_ in grads)
    # lse: -inf exactly where the reference has no key, else close to it
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert_close_fp("lse", lse[fin], ref_lse[fin], rtol=1e-5 if dtype != torch.float64 else 1e-12)

    names = ("dq", "dk", "dv")
    if dtype in LOW_PRECISION:
        plain_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        plain_out, _ = attention_ref(*plain_leaves, causal=causal, dtype=dtype)
        plain_out.backward(dout)
        assert_fa_rule("out", out, plain_out, ref_out, 2)
        sat = saturation_terms(out, dict(causal=causal), dout, q, k, v)  # Nk = 1: one-hot rows
        for name, g_, pl, rg, st in zip(names, grads, plain_leaves, ref_grads, sat):
            assert_fa_rule(name, g_, pl.grad, rg, 3, saturation=st)
    else:
        rtol = 1e-12 if dtype == torch.float64 else 2e-5
        assert_close_fp("out", out, ref_out, rtol)
        for name, g_, rg in zip(names, grads, ref_grads):
            assert_close_fp(name, g_, rg, 10 * rtol)


@pytest.mark.parametrize("N", [1, 17, 97, 113, 203, 1025])
@pytest.mark.parametrize("D", [8, 40, 59, 64, 80, 96, 111, 128, 256])
def test_odd_sizes_fp32(device, N, D):
    skip_unless_supported(device, torch.float32)
    check_case(device, torch.float32, 1, 2, 2, N, N, D, causal=(N + D) % 2 == 1)


@pytest.mark.parametrize("N", [17, 113, 1025])
@pytest.mark.parametrize("D", [40, 64, 111, 256])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_odd_sizes_low_precision(device, N, D, dtype, causal):
    check_case(device, dtype, 1, 2, 2, N, N, D, causal)


@pytest.mark.parametrize("Nq,Nk", [(17, 203), (203, 17), (1, 1025), (1025, 1), (113, 97), (97, 113)])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_lengths(device, Nq, Nk, causal):
    for dtype in dtypes_for(device):
        check_case(device, dtype, 1, 2, 2, Nq, Nk, 64, causal)


@pytest.mark.parametrize("Hkv", [1, 2, 3, 6])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(device, Hkv, causal):
    for dtype in dtypes_for(device):
        check_case(device, dtype, 2, 6, Hkv, 97, 113, 40, causal)


def test_many_batch_heads(device):
    """B*H far above the thread count: every (batch, head) pair is a separate work item."""
    threads = torch.get_num_threads()
    check_case(device, widest_dtype(device), 3, 4 * threads, 2 * threads, 65, 70, 32, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_layout(device, causal):
    """(B, N, H, D) tensors passed as x.transpose(1, 2)."""
    for dtype in (torch.float32, torch.bfloat16):
        if dtype in dtypes_for(device):
            check_case(device, dtype, 2, 4, 2, 203, 97, 64, causal, fa_layout=True)
    q, k, v = make_qkv(device, widest_dtype(device), 2, 4, 2, 33, 33, 16, fa_layout=True)
    out = flash_cuda.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # out keeps q's memory layout


def test_rows_without_keys_give_zero(device):
    """Bottom-right causal with Nq > Nk: the first Nq - Nk rows see no key."""
    q, k, v = make_qkv(device, widest_dtype(device), 1, 2, 2, 9, 4, 16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse = flash_cuda.attention(*leaves, causal=True, return_lse=True)
    out.sum().backward()
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    assert torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def test_scale(device):
    dtype = widest_dtype(device)
    for scale in (0.0, 0.37, -1.5, 3.0):
        q, k, v = make_qkv(device, dtype, 1, 2, 1, 50, 60, 24)
        out, lse = flash_cuda.attention(q, k, v, scale=scale, causal=True, return_lse=True)
        ref_out, ref_lse = attention_ref(q, k, v, causal=True, scale=scale)
        if dtype in LOW_PRECISION:
            assert_fa_rule("out", out, attention_ref(q, k, v, causal=True, scale=scale, dtype=dtype)[0], ref_out, 2)
            assert_close_fp("lse", lse, ref_lse, rtol=1e-5)
        else:
            assert_close_fp("out", out, ref_out)
            assert_close_fp("lse", lse, ref_lse)


def test_soak_tool_reports_failing_draws(monkeypatch):
    """tools/soak.py (the randomised tests over further seeds) runs a draw of each test it names and
    returns the failing ones with their seeds: real KV-cache draws pass, and a draw made to fail
    (the test replaced for seed 1) is reported with its seed."""
    import importlib.util
    import os
    import test_kvcache
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "soak.py")
    spec = importlib.util.spec_from_file_location("flash_cuda_soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert soak.main(["--start", "0", "--count", "1", "--only", "test_kvcache"]) == []
    real = test_kvcache.test_randomised

    def fails_at_1(seed):
        assert seed != 1, "planted failure"
        real(seed)
    monkeypatch.setattr(test_kvcache, "test_randomised", fails_at_1)
    failing = soak.main(["--start", "0", "--count", "2", "--only", "test_kvcache"])
    assert failing == [("test_kvcache", "test_randomised", 1)]


# ---- scores far from 0 (CPU backend: rowops.h exp2_arg, online_softmax.h kFoldedScaleMax) ----

@pytest.mark.parametrize("dtype,mult", [(torch.float32, 1e5), (torch.float32, 3e4), (torch.bfloat16, 1e5),
                                        (torch.float16, 5e3), (torch.float64, 1e5)])
@pytest.mark.parametrize("N", [4, 130, 700])  # queries; 300 keys at least: the KV-cache loop up to 130, then tiled
@pytest.mark.parametrize("gemm", ["default", "native"])
def test_huge_scores(dtype, mult, N, gemm, monkeypatch):
    """Scaled scores up to ~1e10 (one-hot rows): exp(scale s - m) with the scale folded in put the
    rounding of m = scale max(s) into every exponent, e^64 and more from 2^31 on, and rows came out
    0 with lse -inf, or inf; such rows now run prescaled (exactly 1 at the max). Against the float64
    reference: out within 2e-5 (float32/float64) or 2^-8 (fp16/bf16: its rounding) of its magnitude,
    lse within 1e-6, both finite."""
    if gemm == "native":
        if dtype not in (torch.float16, torch.bfloat16):
            pytest.skip("the native path is for fp16/bf16")
        monkeypatch.setenv("FLASH_CUDA_CPU_GEMM", "native")
    g = torch.Generator().manual_seed(N)
    q = torch.randn(1, 2, N, 64, generator=g)
    k, v = (torch.randn(1, 2, max(N, 300), 64, generator=g) for _ in range(2))
    q, k, v = (q * mult).to(dtype), (k * mult).to(dtype), v.to(dtype)
    out, lse = flash_cuda.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # one-hot rows: out is a row of V, exact but for its rounding to fp16/bf16 (plain torch's fp16
    # scores overflow here: it is no yardstick)
    assert_close_fp("out", out, ref_out, rtol=2**-8 if dtype in LOW_PRECISION else 2e-5)
    assert_close_fp("lse", lse, ref_lse, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [torch.finfo(torch.float32).min, -1e30, -1e4])
@pytest.mark.parametrize("N", [12, 40, 300, 700])  # 12 (and 40 where fp16 is multiplied in fp32): the KV-cache loop
def test_rows_fully_masked_by_a_finite_mask(dtype, value, N):
    """A floating attn_mask of finfo.min or -1e30 (torch's and many models' mask values) on every
    key of a row: torch gives the plain average of V there (all its scores round to the mask
    value), and so do we; the exponent's log2(e) folded into the row max made it -inf (finfo.min)
    or garbage, and the row NaN. Other rows partly masked, -1e4 (BERT's value) as a control.
    Outputs by FlashAttention's rule (float32 too); gradients too where dO is 0 on the fully masked rows (a
    padding query's, as in training). With dO there, their lse cannot hold log(row sum) next to
    the mask value in float32, so their P in the backward is off by that factor, as in torch
    SDPA's CPU flash kernel (README "Semantics"): only finite values are checked then."""
    g = torch.Generator().manual_seed(N)
    q, k, v, dout = (torch.randn(1, 2, N, 64, generator=g).to(dtype) for _ in range(4))
    masked = N // 6
    mask = torch.zeros(1, 1, N, N)
    mask[..., :masked, :] = value
    mask[..., masked:, N // 2:] = value
    dout[:, :, :masked] = 0
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_cuda.attention(*leaves, attn_mask=mask)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*ref_leaves, attn_mask=mask.double())[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    plain_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    plain = attention_ref(*plain_leaves, attn_mask=mask, dtype=dtype)[0]
    plain_grads = torch.autograd.grad(plain, plain_leaves, dout)
    # FlashAttention's rule in float32 too: a score next to -1e4 is rounded to 2^-11 in float32,
    # plain torch's as much as ours
    assert_fa_rule("out", out, plain, ref, 2)
    for name, a, p, r in zip(("dq", "dk", "dv"), grads, plain_grads, ref_grads):
        assert_fa_rule(name, a, p, r, 3)
    dout[:, :, :masked] = 1
    assert all(torch.isfinite(x).all() for x in torch.autograd.grad(flash_cuda.attention(*leaves, attn_mask=mask),
                                                                      leaves, dout))


@pytest.mark.parametrize("where,dtype,N", [("cpu", dt, n) for dt in (torch.float32, torch.bfloat16, torch.float64)
                                            for n in (9, 400)]
                         + [("emulated", dt, n) for dt in (torch.bfloat16, torch.float16) for n in (9, 70)])
def test_rows_of_nan_scores(where, dtype, N):
    """A NaN in a query row makes every score of the row NaN: its output, lse and (through its
    P = exp(s - lse)) dV are NaN as in torch (logsumexp NaN; SDPA's dV NaN). Such a row has no max
    (NaN never wins a comparison) and was taken for one that sees no key: lse -inf, and its NaN
    left out of dV; the CUDA kernels (emulated) kept doing so after the CPU backend was fixed
    (audit). The other rows' outputs stay finite and match torch."""
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g).to(dtype) for _ in range(3))
    q[0, 1, 2, 0] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with flash_cuda.emulate() if where == "emulated" else torch.enable_grad():
        out, lse = flash_cuda.attention(*leaves, return_lse=True)
        out.sum().backward()
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = attention_ref(*ref_leaves)
    ref.sum().backward()
    for name, ours, theirs in (("out", out, ref), ("lse", lse, ref_lse)) + tuple(
            (n, a.grad, b.grad) for n, a, b in zip(("dq", "dk", "dv"), leaves, ref_leaves)):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), name
    assert torch.isnan(lse[0, 1, 2]) and torch.isnan(leaves[2].grad[0, 1]).all()
    fine = ~torch.isnan(ref)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}.get(dtype, 2e-5)
    assert (out[fine].double() - ref[fine]).abs().max() < tol
