"""The CUDA kernels on a real GPU (skipped without one): every instantiation (head dims 32, 64,
96, 128, 192, 256, fp16/bf16, the dense, band (causal, window) and modifier (softcap, ALiBi,
attn_mask, dropout) variants, forward, backward and the deterministic pass, in both shared-memory
budgets: the compact ones of sm_86/89/120 forced on a larger GPU; fp32 forwards in TF32 and 3xTF32)
against the float64 reference under FlashAttention's rule and against torch SDPA, on the current
stream, allocating nothing but the outputs. The same kernel source is tested without a GPU in
test_kernel_fwd.py / test_kernel_bwd.py (emulator), and test_gpu_paths_fake.py runs these very
test functions on CPU tensors inside flash_cuda.emulate() so that they are not dead on arrival.

Each test takes `dev`, the device its tensors live on: "cuda" here, "cpu" under the fake."""
import pytest
import torch
import torch.nn.functional as F

import flash_cuda
from reference import assert_fa_rule, attention_ref

HEAD_DIMS = (32, 64, 96, 128, 192, 256)  # every instantiated head dim


@pytest.fixture
def dev():
    if not (torch.cuda.is_available() and flash_cuda.has_cuda_kernels()):
        pytest.skip("needs a CUDA GPU and a build with the CUDA kernels")
    return "cuda"


def make(dev, B, Hq, Hkv, Nq, Nk, D, dtype, requires_grad=False):
    g = torch.Generator(device=dev).manual_seed(B * 1000 + Nq + D)
    mk = lambda h, n: torch.randn(B, h, n, D, device=dev, dtype=dtype, generator=g).requires_grad_(requires_grad)
    return mk(Hq, Nq), mk(Hkv, Nk), mk(Hkv, Nk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS + (40, 59))
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (113, 203), (1025, 1025), (203, 17)])
def test_forward_vs_reference_and_sdpa(dev, dtype, causal, D, Nq, Nk):
    q, k, v = make(dev, 2, 4, 2, Nq, Nk, D, dtype)
    out, lse = flash_cuda.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=causal)
    plain, _ = attention_ref(q, k, v, causal=causal, dtype=dtype)
    assert_fa_rule("out", out, plain, ref, 2)
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-3)
    if not causal or Nq == Nk:  # SDPA's causal is top-left; equal lengths make both agree
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert (out.float() - sdpa.float()).abs().max() <= 2 * (plain.float() - ref.float()).abs().max() + 1e-3


@pytest.mark.parametrize("precision", ["3xtf32", "tf32"])
@pytest.mark.parametrize("variant", ["dense", "band", "mod"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_fp32_forward_vs_reference(dev, D, variant, precision, Nq=203, Nk=331):
    """fp32 on tf32 tensor cores (test_fp32_kernels.py: the rule of each precision)."""
    from test_fp32_kernels import VARIANTS, allow_tf32, check
    q, k, v = make(dev, 2, 4, 2, Nq, Nk, D, torch.float32)
    kw = {name: x.to(dev) if isinstance(x, torch.Tensor) else x
          for name, x in VARIANTS[variant](4, Nq, Nk, torch.Generator().manual_seed(D)).items()}
    with allow_tf32(precision == "tf32"):
        out, lse = flash_cuda.attention(q, k, v, return_lse=True, **kw)
    check(q, k, v, kw, out, lse, precision)


@pytest.mark.parametrize("precision", ["3xtf32", "tf32"])
@pytest.mark.parametrize("variant", ["dense", "band", "mod"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_fp32_backward_vs_reference(dev, D, variant, precision, Nq=203, Nk=331):
    """fp32 backward on tf32 tensor cores (test_fp32_kernels.py: the rule of each precision)."""
    from test_fp32_kernels import VARIANTS, allow_tf32, check_grads
    q, k, v = make(dev, 2, 4, 2, Nq, Nk, D, torch.float32, requires_grad=True)
    kw = {name: x.to(dev) if isinstance(x, torch.Tensor) else x
          for name, x in VARIANTS[variant](4, Nq, Nk, torch.Generator().manual_seed(D)).items()}
    if "attn_mask" in kw:
        kw["attn_mask"].requires_grad_()
    dout = torch.randn(2, 4, Nq, D, device=dev, generator=torch.Generator(device=dev).manual_seed(D))
    wrt = [q, k, v] + ([kw["attn_mask"]] if "attn_mask" in kw else [])
    with allow_tf32(precision == "tf32"):
        out = flash_cuda.attention(q, k, v, **kw)
        grads = torch.autograd.grad((out * dout).sum(), wrt)
    check_grads(q, k, v, kw, dout, out, grads, precision)


def test_forward_on_a_side_stream_allocates_only_outputs(dev):
    q, k, v = make(dev, 2, 4, 4, 512, 512, 64, torch.float16)
    expected = flash_cuda.attention(q, k, v)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.cuda.stream(stream):
        out, lse = flash_cuda.attention(q, k, v, return_lse=True)
        assert torch.cuda.memory_allocated() - before == out.numel() * 2 + lse.numel() * 4
    stream.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS + (59,))
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_vs_reference_and_sdpa(dev, dtype, causal, D, deterministic, N=203):
    q, k, v = make(dev, 2, 4, 2, N, N, D, dtype, requires_grad=True)
    out = flash_cuda.attention(q, k, v, causal=causal, deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = attention_ref(*leaves, causal=causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    plain_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    plain, _ = attention_ref(*plain_leaves, causal=causal, dtype=dtype)
    plain_grads = torch.autograd.grad(plain, plain_leaves, dout)
    for name, g, pg, rg in zip("qkv", grads, plain_grads, ref_grads):
        assert_fa_rule("d" + name, g, pg, rg, 3)
    sdpa_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*sdpa_leaves, is_causal=causal, enable_gqa=True)
    sdpa_grads = torch.autograd.grad(sdpa, sdpa_leaves, dout)
    for g, sg, pg, rg in zip(grads, sdpa_grads, plain_grads, ref_grads):
        assert (g.float() - sg.float()).abs().max() <= 3 * (pg.float() - rg.float()).abs().max() + 1e-3


# Rows that see one key (Nk = 1; a diagonal window): plain torch's dQ and dK are exactly 0, and
# so are the kernels' where the preprocess's D sums as the dP product does (bwd_preprocess.h
# row_dots). That equality rests on the tensor cores summing an element alike wherever it sits in
# the tile and whichever operand its products come from: the emulator does by construction, this
# checks the hardware (not run on one yet: 2026-12-05).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", ["one_key", "diagonal_window"])
def test_one_key_rows_get_exact_gradients(dev, dtype, D, deterministic, case, Nq=203):
    Nk, kw = (1, {}) if case == "one_key" else (Nq, dict(window=(0, 0)))
    q, k, v = make(dev, 2, 4, 2, Nq, Nk, D, dtype)
    q, k, v = ((x * 4).requires_grad_() for x in (q, k, v))
    out = flash_cuda.attention(q, k, v, scale=1.0, deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = attention_ref(*leaves, scale=1.0, **kw)
    ref_dv = torch.autograd.grad(ref, leaves[2], dout.double())[0]
    plain_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    plain, _ = attention_ref(*plain_leaves, scale=1.0, dtype=dtype, **kw)
    assert_fa_rule("dv", dv, torch.autograd.grad(plain, plain_leaves[2], dout)[0], ref_dv, 3)


def test_deterministic_backward_is_bitwise_repeatable(dev, N=777):
    q, k, v = make(dev, 1, 8, 2, N, N, 128, torch.bfloat16, requires_grad=True)
    runs = []
    for _ in range(3):
        out = flash_cuda.attention(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))


# Each variant's features (csrc/kernels/dispatch.h): band = causal / sliding window; mod =
# softcap, ALiBi and an additive mask, with a window, the mask's gradient included.
VARIANT_FEATURES = {"band": dict(window=(37, 0)), "mod": dict(window=(50, 9), softcap=4.0, alibi=True, mask=True)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANT_FEATURES))
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_variants_forward_backward_vs_reference(dev, dtype, variant, D, deterministic, Nq=203, Nk=230):
    B, Hq = 2, 4
    q, k, v = make(dev, B, Hq, 2, Nq, Nk, D, dtype, requires_grad=True)
    feats = dict(VARIANT_FEATURES[variant])
    kw = dict(window=feats["window"], softcap=feats.get("softcap", 0.0))
    g = torch.Generator(device=dev).manual_seed(7)
    if feats.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq, device=dev, generator=g) * 0.1
    wrt = [q, k, v]
    if feats.get("mask"):
        kw["attn_mask"] = torch.randn(1, Hq, Nq, Nk, device=dev, generator=g).requires_grad_()
        wrt.append(kw["attn_mask"])
    out = flash_cuda.attention(q, k, v, deterministic=deterministic, **kw)
    dout = torch.randn(out.shape, device=dev, generator=g).to(dtype)
    grads = torch.autograd.grad(out, wrt, dout)

    def reference(dtype_):
        leaves = [x.detach().to(dtype_).requires_grad_() for x in wrt]
        ref_kw = dict(kw, attn_mask=leaves[3]) if len(leaves) == 4 else kw
        out_, _ = attention_ref(*leaves[:3], dtype=dtype_, **ref_kw)
        return out_, torch.autograd.grad(out_, leaves, dout.to(dtype_))

    ref, ref_grads = reference(torch.float64)
    plain, plain_grads = reference(dtype)
    assert_fa_rule("out", out, plain, ref, 2)
    for name, g_, pg, rg in zip(("dq", "dk", "dv", "dmask"), grads, plain_grads, ref_grads):
        assert_fa_rule(name, g_, pg, rg, 3)


# The compact (99 KiB) configurations that sm_86/89/120 cards run (csrc/kernels/traits.h):
# FLASH_CUDA_SMEM_PER_BLOCK lowers the dispatcher's limit to theirs, so a larger GPU runs them.
COMPACT_SMEM = 99 * 1024


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["dense", "causal", "mod"])
@pytest.mark.parametrize("D", (96, 128, 192, 256))
@pytest.mark.parametrize("deterministic", [False, True])
def test_compact_configurations_vs_reference(dev, monkeypatch, dtype, variant, D, deterministic):
    monkeypatch.setenv("FLASH_CUDA_SMEM_PER_BLOCK", str(COMPACT_SMEM))
    if variant == "mod":
        test_variants_forward_backward_vs_reference(dev, dtype, "mod", D, deterministic)
    else:
        test_backward_vs_reference_and_sdpa(dev, dtype, variant == "causal", D, deterministic)


# The wide configurations that a GPU with 227 KiB a block (sm_90, sm_100) replaces by large ones of
# its own (the backward at head dim 128: padded tiles, traits.h kBwdLargeConfig): at sm_80's 163
# KiB the dispatcher picks the wide ones, which an A100 runs by default; on such a GPU the other
# tests run the large ones.
WIDE_SMEM = 163 * 1024


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", (128,))
@pytest.mark.parametrize("deterministic", [False, True])
def test_wide_configurations_vs_reference(dev, monkeypatch, dtype, causal, D, deterministic):
    monkeypatch.setenv("FLASH_CUDA_SMEM_PER_BLOCK", str(WIDE_SMEM))
    test_backward_vs_reference_and_sdpa(dev, dtype, causal, D, deterministic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", (128, 192, 256))
def test_compact_kvcache_vs_reference(dev, monkeypatch, dtype, D):
    monkeypatch.setenv("FLASH_CUDA_SMEM_PER_BLOCK", str(COMPACT_SMEM))
    test_kvcache_vs_reference(dev, dtype, D, "paged16")


# Packed sequences (varlen_attention): the same kernels reading cu_seqlens.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap_alibi"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_varlen_vs_per_sequence_reference(dev, dtype, feature, D):
    """Lengths 17, 0, 113, 1, 130 (queries) against 20, 5, 113, 0, 97 (keys), GQA, every head dim,
    out, lse and gradients against the per-sequence float64 reference; deterministic at D >= 128."""
    import test_varlen as vl
    q, k, v, cu_q, cu_k = (x.to(dev) for x in vl.packed(dtype, vl.LENS_Q, vl.LENS_K, d=D))
    kw = vl.resolve(vl.FEATURES[feature], len(vl.LENS_Q), q.shape[1])
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].to(dev)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = flash_cuda.varlen_attention(*leaves, cu_q, cu_k, max(vl.LENS_Q), max(vl.LENS_K), return_lse=True,
                                           deterministic=D >= 128, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    def ref(dt):
        ls = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        o, l = vl.reference(*ls, cu_q.cpu(), cu_k.cpu(), dt, **dict(kw))
        return o, l, torch.autograd.grad(o, ls, dout.to(dt))

    ref_out, ref_lse, ref_grads = ref(torch.float64)
    plain_out, _, plain_grads = ref(dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() <= 1e-4 * ref_lse[fin].abs().max().clamp(min=1)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    for name, g_, pg, rg in zip(("dq", "dk", "dv"), grads, plain_grads, ref_grads):
        assert_fa_rule(name, g_, pg, rg, 3)


def test_varlen_wrong_cu_seqlens_stay_in_bounds(dev):
    """CUDA cu_seqlens are not validated (that would synchronise); whatever they hold, the kernels
    clamp them to the tensors: no illegal access, no error, the call completes. (CPU tensors are
    validated instead: test_varlen.py.)"""
    if dev != "cuda":
        pytest.skip("CPU tensors are validated before any work")
    q, k, v = (torch.randn(n, h, 64, device=dev, dtype=torch.float16, requires_grad=True)
               for n, h in ((50, 4), (40, 2), (40, 2)))
    for cu_q, cu_k in (([0, 30, 10, 9999], [0, -5, 40, 41]), ([-7, 2 ** 31 - 1, 3, 50], [40, 0, 0, 7]),
                       ([0, 50, 50, 50], [0, 0, 0, 0])):
        cq, ck = (torch.tensor(c, dtype=torch.int32, device=dev) for c in (cu_q, cu_k))
        for deterministic in (False, True):
            out = flash_cuda.varlen_attention(q, k, v, cq, ck, 64, 64, causal=True, deterministic=deterministic)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            torch.cuda.synchronize()


# Dropout: the modifier kernels drawing the keep mask in registers (csrc/kernels/dropout.h).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_vs_reference_with_its_mask(dev, dtype, D, deterministic, Nq=203, Nk=230):
    """out and gradients against the float64 reference computed with the mask the call returns;
    causal GQA with a sliding window at odd lengths."""
    B, Hq, p = 2, 4, 0.17
    q, k, v = make(dev, B, Hq, 2, Nq, Nk, D, dtype, requires_grad=True)
    kw = dict(causal=True, window=(150, -1))
    torch.manual_seed(D)
    out, keep = flash_cuda.attention(q, k, v, dropout_p=p, return_dropout_mask=True, deterministic=deterministic,
                                     **kw)
    g = torch.Generator(device=dev).manual_seed(3)
    dout = torch.randn(out.shape, device=dev, generator=g).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01

    def reference(dtype_):
        leaves = [x.detach().to(dtype_).requires_grad_() for x in (q, k, v)]
        out_, _ = attention_ref(*leaves, dtype=dtype_, dropout_mask=keep, dropout_p=p, **kw)
        return out_, torch.autograd.grad(out_, leaves, dout.to(dtype_))

    ref, ref_grads = reference(torch.float64)
    plain, plain_grads = reference(dtype)
    assert_fa_rule("out", out, plain, ref, 2)
    for name, g_, pg, rg in zip(("dq", "dk", "dv"), grads, plain_grads, ref_grads):
        assert_fa_rule(name, g_, pg, rg, 3)


def test_dropout_under_cuda_graph_capture(dev):
    """The (seed, offset) are read on the device: each replay of a captured step draws a fresh
    mask, and each replay's output is exact with the mask it drew."""
    if dev != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    q, k, v = make(dev, 1, 2, 2, 150, 150, 64, torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        flash_cuda.attention(q, k, v, dropout_p=0.3, return_dropout_mask=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, keep = flash_cuda.attention(q, k, v, dropout_p=0.3, return_dropout_mask=True)
    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((out.clone(), keep.clone()))
    assert not torch.equal(results[0][1], results[1][1])
    for o, m in results:
        ref, _ = attention_ref(q, k, v, dropout_mask=m, dropout_p=0.3)
        plain, _ = attention_ref(q, k, v, dtype=torch.float16, dropout_mask=m, dropout_p=0.3)
        assert_fa_rule("out", o, plain, ref, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", HEAD_DIMS + (40,))
@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged256"])
def test_kvcache_vs_reference(dev, dtype, D, layout, capacity=700):
    """attention_with_kvcache: every KV-cache instantiation, decoding (GQA packed, split chosen
    by the device and forced to 3), a causal 5-token step with ALiBi (heads apart) and a step of
    left-padded sequences, the append bitwise (tests/test_kvcache.py's run_case, tensors on `dev`)."""
    import test_kvcache as kv
    ps = {"contiguous": None, "paged16": 16, "paged256": 256}[layout]
    for splits in (0, 3):
        kv.run_case(dtype, B=3, hq=8, hkv=2, nq=1, n_new=1, D=D, capacity=capacity, page_size=ps,
                    num_splits=splits, dev=dev)
    kv.run_case(dtype, B=3, hq=8, hkv=2, nq=5, n_new=5, D=D, capacity=capacity, page_size=ps, causal=True,
                alibi_slopes=torch.rand(8) * 0.2, dev=dev)
    kv.run_case(dtype, B=3, hq=8, hkv=2, nq=2, n_new=1, D=D, capacity=capacity, page_size=ps, causal=True,
                seqlens=[0, capacity // 2, capacity - 1], leftpad=[0, capacity // 2, capacity // 5], num_splits=3,
                dev=dev)


def test_kvcache_common_call_skips_the_python_checks(dev, monkeypatch):
    """A decoding step on CUDA (no window, softcap or ALiBi) goes straight to the op, which checks
    it (api._kvcache_checked_by_op): a step's fixed cost is what the GPU waits for at small
    batches. The same bits, append included, as the checked path (taken by an explicit unbounded
    window); refused input still gets the checked path's message. Inside flash_cuda.emulate() (the
    twin in test_gpu_paths_fake.py) the checked path runs: it checks the values there."""
    B, hkv, cap, D = 2, 2, 48, 64
    g = torch.Generator(device=dev).manual_seed(7)
    q = torch.randn(B, 8, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, hkv, 1, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    cache = torch.randn(2, B, hkv, cap, D, device=dev, dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([5, 40], dtype=torch.int32, device=dev)
    caches = [(cache[0].clone(), cache[1].clone()) for _ in range(2)]
    with torch.no_grad():
        ref = flash_cuda.attention_with_kvcache(q, *caches[0], k, v, cache_seqlens=lens, window=(-1, -1),
                                                return_lse=True)
        checked_ran = []
        check_tensors = flash_cuda.api._check_tensors
        monkeypatch.setattr(flash_cuda.api, "_check_tensors", lambda *a, **kw: checked_ran.append(1) or
                            check_tensors(*a, **kw))
        got = flash_cuda.attention_with_kvcache(q, *caches[1], k, v, cache_seqlens=lens, return_lse=True)
        assert bool(checked_ran) == (dev != "cuda")
        for a, b in zip(got + caches[1], ref + caches[0]):
            assert torch.equal(a, b)
        with pytest.raises(RuntimeError, match=r"cache_seqlens must be on the device of q"):
            flash_cuda.attention_with_kvcache(q, *caches[1], cache_seqlens=lens.to("meta"))
        with pytest.raises(ValueError, match=r"k_cache must have the head dim of q \(64\)"):
            flash_cuda.attention_with_kvcache(q, caches[1][0][..., :32], caches[1][1][..., :32], cache_seqlens=3)


def test_kvcache_wrong_lengths_stay_in_bounds(dev):
    """CUDA cache_seqlens and table entries are not read on the host: lengths past the capacity,
    negative ones and pages past the pool are clamped in the kernels (run under compute-sanitizer
    by tools/gpu_sanitize.py for the proof; here: no error, finite outputs)."""
    if dev != "cuda":
        pytest.skip("the emulated twin is tests/test_kvcache.py::test_emulated_bad_lengths_stay_in_bounds")
    kc, vc = (torch.randn(6, 2, 16, 64, device=dev, dtype=torch.float16) for _ in range(2))
    table = torch.tensor([[0, 1, 2], [3, 1000, -4]], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(2, h, 1, 64, device=dev, dtype=torch.float16) for h in (4, 2, 2))
    out = torch.ops.flash_cuda.kvcache_fwd(q, kc, vc, k, v, torch.tensor([-5, 900], dtype=torch.int32, device=dev),
                                           table, 0.125, True)[0]
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    for pad in ([7, 2 ** 30], [-(2 ** 30), 3]):  # left pads past the lengths, negative: clamped too
        out = torch.ops.flash_cuda.kvcache_fwd(q, kc, vc, None, None, torch.tensor([5, 900], dtype=torch.int32,
                                                                                   device=dev), table, 0.125, True,
                                               cache_leftpad=torch.tensor(pad, dtype=torch.int32, device=dev))[0]
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
