"""Sliding window, softcap, ALiBi and attn_mask (flash_cuda.attention and the drop-in) against
the float64 reference (tests/reference.py, which writes each modifier out on the full score
matrix): each feature alone and all combined, odd lengths, Nq != Nk both ways, GQA, outputs and
every gradient (the float mask's included, summed over its broadcast dims), gradcheck, the
drop-in against torch SDPA's math backend, opcheck, torch.compile, and a seeded randomised
differential test. CPU backend here; the emulated CUDA kernels in test_masks_kernels.py."""
import random

import pytest
import torch
import torch.nn.functional as F

import flash_cuda
from conftest import load_benchmark
from reference import assert_close_fp, assert_fa_rule, attention_ref, saturation_terms, random_layout

LOW = (torch.float16, torch.bfloat16)

# name: keyword arguments of flash_cuda.attention, with "alibi" / "mask" placeholders
FEATURES = {
    "window": dict(window=(5, 3)),
    "window_left_only": dict(window=(7, -1)),
    "window_right_only": dict(window=(-1, 4)),
    "causal_window": dict(causal=True, window=(6, -1)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi="heads"),
    "alibi_per_batch": dict(alibi="batch"),
    "bool_key_padding": dict(mask=("bool", "key_padding")),
    "bool_full": dict(mask=("bool", "full")),
    "float_per_head": dict(mask=("float", "heads")),
    "float_2d": dict(mask=("float", "2d")),
    "all": dict(causal=True, window=(9, -1), softcap=2.0, alibi="heads", mask=("float", "heads")),
    "all_bool": dict(window=(11, 2), softcap=3.0, alibi="batch", mask=("bool", "key_padding")),
}


def alibi_slopes(kind, B, Hq):
    """FlashAttention/BLOOM-style geometric slopes; per batch: scaled differently per row."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)], dtype=torch.float32)
    return base if kind == "heads" else torch.stack([base * (1 + 0.5 * b) for b in range(B)])


def make_mask(kind, shape_kind, B, Hq, Nq, Nk, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = {"key_padding": (B, 1, 1, Nk), "full": (B, Hq, Nq, Nk), "heads": (1, Hq, Nq, Nk), "2d": (Nq, Nk)}[shape_kind]
    if kind == "bool":
        m = torch.rand(shape, generator=g) < 0.8
        if shape_kind == "key_padding":  # padded keys at the end of each sequence, at least one real key
            lengths = torch.randint(1, Nk + 1, (B,), generator=g)
            m = (torch.arange(Nk)[None, :] < lengths[:, None])[:, None, None, :]
        return m
    return torch.randn(shape, generator=g)


def resolve(feats, B, Hq, Nq, Nk, mask_grad=False):
    """flash_cuda.attention kwargs and the reference's, from a FEATURES entry."""
    kw = {k: v for k, v in feats.items() if k not in ("alibi", "mask")}
    ref = dict(causal=kw.get("causal", False), window=kw.get("window"), softcap=kw.get("softcap", 0.0))
    if "alibi" in feats:
        kw["alibi_slopes"] = ref["alibi_slopes"] = alibi_slopes(feats["alibi"], B, Hq)
    if "mask" in feats:
        m = make_mask(*feats["mask"], B, Hq, Nq, Nk)
        if mask_grad and m.dtype != torch.bool:
            m.requires_grad_()
        kw["attn_mask"] = ref["attn_mask"] = m
    return kw, ref


def qkv(dtype, B, Hq, Hkv, Nq, Nk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]


def run_ours(q, k, v, kw, dout):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = flash_cuda.attention(*leaves, return_lse=True, **kw)
    mask = kw.get("attn_mask")
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    grads = torch.autograd.grad((out * dout).sum(), wrt)
    return out, lse, grads


def run_ref(q, k, v, ref_kw, dout, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = attention_ref(*leaves, dtype=dtype, **ref_kw)
    mask = ref_kw.get("attn_mask")
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    grads = torch.autograd.grad((out * dout.to(dtype)).sum(), wrt)
    return out, lse, grads, leaves


def check(dtype, B, Hq, Hkv, Nq, Nk, D, feats, seed=0, mask_grad=True, saturation=False):
    q, k, v = qkv(dtype, B, Hq, Hkv, Nq, Nk, D, seed)
    dout = torch.randn(B, Hq, Nq, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    kw, ref_kw = resolve(feats, B, Hq, Nq, Nk, mask_grad)
    out, lse, grads = run_ours(q, k, v, kw, dout)
    ref_out, ref_lse, ref_grads, _ = run_ref(q, k, v, ref_kw, dout, torch.float64)
    names = ["dq", "dk", "dv", "dmask"][:len(grads)]
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys: lse -inf exactly"
    fin = torch.isfinite(ref_lse)
    if dtype in LOW:
        plain_out, _, plain_grads, _ = run_ref(q, k, v, ref_kw, dout, dtype)
        assert_fa_rule("out", out, plain_out, ref_out, 2)
        assert_close_fp("lse", lse[fin], ref_lse[fin], rtol=1e-4)
        sat = saturation_terms(out, ref_kw, dout, q, k, v) if saturation else [None] * 4
        for name, g, pg, rg, st in zip(names, grads, plain_grads, ref_grads, sat):
            assert_fa_rule(name, g, pg, rg, 3, saturation=st)
    else:
        rtol = 1e-10 if dtype == torch.float64 else 2e-5
        assert_close_fp("out", out, ref_out, rtol)
        assert_close_fp("lse", lse[fin], ref_lse[fin], rtol)
        for name, g, rg in zip(names, grads, ref_grads):
            assert_close_fp(name, g, rg, 1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(FEATURES))
def test_each_feature(name, dtype):
    check(dtype, 2, 4, 2, 37, 53, 24, FEATURES[name])


@pytest.mark.parametrize("Nq,Nk", [(53, 37), (1, 40), (40, 1), (130, 130), (40, 100)])  # (40, 100): the KV-cache loop's GEMMs
@pytest.mark.parametrize("name", ["window", "causal_window", "all", "all_bool"])
def test_lengths(name, Nq, Nk):
    check(torch.float32, 1, 2, 1, Nq, Nk, 16, FEATURES[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("feats", [dict(causal=True), dict(causal=True, window=(130, -1)), dict(window=(100, 30)),
                                   dict(window=(-1, 70), softcap=5.0, alibi="heads")],
                         ids=["causal", "causal_window", "window", "right_window_mods"])
@pytest.mark.parametrize("Nq,Nk", [(700, 900), (600, 600), (900, 520)])
def test_band_edge_blocks(feats, Nq, Nk, dtype):
    """Sequences long enough that the CPU forward's tiles on the band's edge (256 query rows by 512
    keys) go in several blocks of 64 rows, each over the keys its rows see from a 64-key boundary
    (causal diagonals bottom-right aligned with Nq < Nk, Nq = Nk and Nq > Nk, window sides)."""
    check(dtype, 1, 2, 1, Nq, Nk, 64, feats, seed=4)


@pytest.mark.parametrize("seed", range(6))
def test_randomised_band_edge_blocks(seed):
    """Random long shapes (Nq, Nk 150 to 800, either longer), GQA ratios, dtypes, head dims and band
    shapes (causal, windows of random sides, with softcap or ALiBi) against the float64 reference:
    the CPU passes' edge tiles split into 64-row and 64-key blocks at every offset."""
    rnd = random.Random(seed)
    dtype = rnd.choice([torch.float32, torch.float16, torch.bfloat16])
    hkv = rnd.choice([1, 2])
    Nq, Nk, D = rnd.randint(150, 800), rnd.randint(150, 800), rnd.choice([16, 40, 64, 96])
    feats = {}
    if rnd.random() < 0.5:
        feats["causal"] = True
    if not feats or rnd.random() < 0.5:
        feats["window"] = (rnd.choice([-1, rnd.randint(0, 300)]), -1 if feats else rnd.choice([-1, rnd.randint(0, 300)]))
    if rnd.random() < 0.3:
        feats["softcap"] = rnd.choice([2.0, 20.0])
    if rnd.random() < 0.3:
        feats["alibi"] = rnd.choice(["heads", "batch"])
    check(dtype, rnd.randint(1, 2), hkv * rnd.choice([1, 2]), hkv, Nq, Nk, D, feats, seed=seed, saturation=True)


def test_window_equals_explicit_band_mask():
    """window=(l, r) is exactly the boolean band mask (bottom-right aligned), and causal=True is
    window right = 0."""
    q, k, v = qkv(torch.float32, 1, 2, 2, 45, 70, 16)
    d = torch.arange(70)[None, :] - (torch.arange(45)[:, None] + 70 - 45)
    band = (d >= -6) & (d <= 2)
    torch.testing.assert_close(flash_cuda.attention(q, k, v, window=(6, 2)), flash_cuda.attention(q, k, v, attn_mask=band),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flash_cuda.attention(q, k, v, causal=True, window=(6, 5)),
                               flash_cuda.attention(q, k, v, window=(6, 0)), atol=0, rtol=0)
    torch.testing.assert_close(flash_cuda.attention(q, k, v, causal=True),
                               flash_cuda.attention(q, k, v, window=(-1, 0)), atol=0, rtol=0)


def test_fully_masked_rows_give_zero_and_finite_grads():
    q, k, v = qkv(torch.float32, 1, 2, 2, 8, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[3] = False
    float_mask = torch.zeros(1, 2, 8, 8).masked_fill(~mask, float("-inf")).requires_grad_()
    for m in (mask, float_mask):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = flash_cuda.attention(*leaves, attn_mask=m, return_lse=True)
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and torch.isneginf(lse[:, :, 3]).all()
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert torch.isfinite(float_mask.grad).all() and float_mask.grad[:, :, 3].abs().max() == 0
    # a window that leaves a row no key (Nq > Nk, right = 0): 0 and -inf too
    out, lse = flash_cuda.attention(*qkv(torch.float32, 1, 1, 1, 10, 4, 8), window=(1, 0), return_lse=True)
    assert torch.isneginf(lse[0, 0, :6]).all() and out[0, 0, :6].abs().max() == 0


def test_mask_gradient_summed_over_broadcast_dims():
    B, Hq, Nq, Nk = 3, 4, 19, 23
    q, k, v = qkv(torch.float64, B, Hq, 2, Nq, Nk, 8)
    for shape in [(1, Hq, Nq, Nk), (B, 1, 1, Nk), (Nq, Nk), (B, 1, Nq, 1)]:
        m = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        out = flash_cuda.attention(q, k, v, attn_mask=m, softcap=2.0)
        (g,) = torch.autograd.grad(out.square().sum(), m)
        m_ref = m.detach().clone().requires_grad_()
        ref, _ = attention_ref(q, k, v, attn_mask=m_ref, softcap=2.0)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), m_ref)
        assert g.shape == shape
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-9)


def test_half_precision_mask_keeps_its_dtype_gradient():
    q, k, v = qkv(torch.float32, 1, 2, 2, 9, 11, 8)
    m = torch.randn(1, 1, 9, 11).half().requires_grad_()
    flash_cuda.attention(q, k, v, attn_mask=m).sum().backward()
    assert m.grad.dtype == torch.float16 and m.grad.shape == m.shape


@pytest.mark.parametrize("name", ["window", "causal_window", "softcap", "alibi_per_batch", "float_per_head", "all",
                                  "all_bool"])
def test_gradcheck(name):
    B, Hq, Hkv, Nq, Nk, D = 2, 2, 1, 6, 9, 4
    q, k, v = (x.requires_grad_() for x in qkv(torch.float64, B, Hq, Hkv, Nq, Nk, D))
    kw, _ = resolve(FEATURES[name], B, Hq, Nq, Nk)
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double().requires_grad_()
        fn = lambda q, k, v, m: flash_cuda.attention(q, k, v, attn_mask=m, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, mask))
    else:
        fn = lambda q, k, v: flash_cuda.attention(q, k, v, attn_mask=mask, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


# ------------------------------------------------------------------ the drop-in and torch SDPA
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ["key_padding", "full", "2d"])
def test_dropin_matches_torch_sdpa_math(kind, shape):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, L, S, E = 2, 3, 17, 29, 16
    q, k, v = qkv(torch.float32, B, H, H, L, S, E, seed=5)
    m = make_mask(kind, shape, B, H, L, S)
    if kind == "bool":  # a fully masked row and a fully masked key column
        m = m.expand(B, H, L, S).clone() if shape != "2d" else m.clone()
        m[..., 4, :] = False
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ours = flash_cuda.scaled_dot_product_attention(*leaves, attn_mask=m)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = F.scaled_dot_product_attention(*ref_leaves, attn_mask=m)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=2e-5)
    dout = torch.randn(ours.shape)
    ours.backward(dout)
    theirs.backward(dout)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-4)


def test_dropin_mask_with_is_causal_is_rejected_like_torch():
    q, k, v = qkv(torch.float32, 1, 2, 2, 4, 5, 8)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal=True"):
        flash_cuda.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True)


def test_dropin_three_and_five_dim_inputs_with_mask():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 7, 8), (2, 2, 3, 7, 8)]:
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        m = torch.randn(7, 7, generator=g)
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(flash_cuda.scaled_dot_product_attention(q, k, v, attn_mask=m), ref,
                                   atol=2e-6, rtol=2e-5)


# ------------------------------------------------------------------ ops, compile
def test_opcheck_extended_ops():
    B, Hq, Hkv, Nq, Nk, D = 2, 2, 1, 9, 13, 16
    q, k, v = qkv(torch.float32, B, Hq, Hkv, Nq, Nk, D)
    slopes = alibi_slopes("heads", B, Hq).reshape(1, Hq)
    bias = torch.randn(1, Hq, Nq, Nk).expand(B, Hq, Nq, Nk)
    args = (q, k, v, 0.3, True, True, False, 5, -1, 2.0, slopes, bias)
    torch.library.opcheck(torch.ops.flash_cuda.fwd.default, args)
    out, lse = torch.ops.flash_cuda.fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.flash_cuda.bwd.default,
                          (dout, q, k, v, out, lse, None, 0.3, True, True, False, 5, -1, 2.0, slopes, bias, True))


def test_compile_fullgraph_every_feature():
    B, Hq, Nq, Nk, D = 2, 4, 21, 33, 16
    q, k, v = qkv(torch.float32, B, Hq, 2, Nq, Nk, D)
    slopes = alibi_slopes("heads", B, Hq)
    mask = torch.randn(1, Hq, Nq, Nk, requires_grad=True)
    pad = make_mask("bool", "key_padding", B, Hq, Nq, Nk)

    def f(q, k, v, mask):
        a = flash_cuda.attention(q, k, v, causal=True, window=(7, -1), softcap=2.5, alibi_slopes=slopes, attn_mask=mask)
        b = flash_cuda.attention(q, k, v, window=(3, 3), attn_mask=pad)
        return a + b

    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + [mask]
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    ref = f(*ref_leaves)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ randomised differential test
@pytest.mark.parametrize("seed", range(12))
def test_randomised_against_reference(seed):
    """Random shapes, GQA ratios, dtypes, layouts (FlashAttention's (B, N, H, D) views, sliced
    views) and feature combinations against the float64 reference. Low precision uses the
    saturated-softmax term of the standard (random scales and Nk = 1 make one-hot rows; draws where
    every row sees at most one key: test_randomised_one_key_rows)."""
    rnd = random.Random(seed)
    dtype = rnd.choice([torch.float32, torch.float16, torch.bfloat16])
    hkv = rnd.choice([1, 2])
    hq = hkv * rnd.choice([1, 2, 3])
    B, Nq, Nk, D = rnd.randint(1, 3), rnd.randint(1, 70), rnd.randint(1, 70), rnd.choice([8, 16, 40, 64])
    g = torch.Generator().manual_seed(seed)

    q, k, v = (random_layout(rnd, g, B, h, n, D, dtype) for h, n in ((hq, Nq), (hkv, Nk), (hkv, Nk)))
    scale = rnd.choice([None, 0.05, 1.0, 3.0])
    kw, ref_kw = {"scale": scale}, {"scale": scale}
    if rnd.random() < 0.5:
        kw["causal"] = ref_kw["causal"] = True
    if rnd.random() < 0.6:
        kw["window"] = ref_kw["window"] = (rnd.choice([-1, 0, 3, 17]), rnd.choice([-1, 0, 5]))
    if rnd.random() < 0.5:
        kw["softcap"] = ref_kw["softcap"] = rnd.choice([0.5, 5.0, 30.0])
    if rnd.random() < 0.5:
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = alibi_slopes(rnd.choice(["heads", "batch"]), B, hq)
    if rnd.random() < 0.6:
        kind = rnd.choice(["bool", "float"])
        m = make_mask(kind, rnd.choice(["key_padding", "full", "heads", "2d"]), B, hq, Nq, Nk, seed)
        if kind == "float":
            m = (m * 2).requires_grad_()
        kw["attn_mask"] = ref_kw["attn_mask"] = m
    dout = torch.randn(B, hq, Nq, D, generator=g).to(dtype)
    out, lse, grads = run_ours(q, k, v, kw, dout)
    ref_out, ref_lse, ref_grads, _ = run_ref(q, k, v, ref_kw, dout, torch.float64)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    names = ["dq", "dk", "dv", "dmask"]
    if dtype == torch.float32:
        assert_close_fp("out", out, ref_out, 2e-5)
        for name, a, b in zip(names, grads, ref_grads):
            assert_close_fp(name, a, b, 2e-4)
        return
    plain_out, _, plain_grads, _ = run_ref(q, k, v, ref_kw, dout, dtype)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    sat = saturation_terms(out, ref_kw, dout, q, k, v)
    for name, a, pg, b, st in zip(names, grads, plain_grads, ref_grads, sat):
        assert_fa_rule(f"{name} ({kw})", a, pg, b, 3, saturation=st)


# Soaks found these draws outside the rule (seeds 2000-2755 on 2026-12-03: 2024, 2033, 2407, 2578;
# 18970-19219 on 2026-12-05: 18985, 19014), each one where every row sees at most one key (Nk = 1,
# a window of left 0 with causal or right 0) at scale 3.0: dS = P (dP - D) left the difference of
# two roundings of dP_ij where the exact dS (and plain torch's) is 0. The backward now takes P = 1
# and D_i = dP_ij in a one-hot row (test_cpu_backend.py::test_one_hot_rows_get_exact_gradients);
# kept as a regression test.
@pytest.mark.parametrize("seed", [2024, 2033, 2407, 2578, 18985, 19014])
def test_randomised_one_key_rows(seed):
    test_randomised_against_reference(seed)


def test_bench_masks_runs(tmp_path):
    """benchmarks/bench_masks.py end to end (its quick points, every case): not dead on arrival.
    Its rows carry the measured ratio, peak memory and both implementations' errors."""
    import json
    bench = load_benchmark("bench_masks")
    out = tmp_path / "masks.json"
    rows = bench.main(["--device", "cpu", "--quick", "--reps", "1", "--json", str(out)])
    assert {r["case"] for r in rows} == {"window", "padded", "scaling"}
    for r in rows:
        if r["case"] != "scaling":
            assert r["speed_ratio_sdpa_over_ours"] > 0 and r["flash_cuda_err"] < 1e-4 and r["sdpa_err"] < 1e-4
            assert r["status"] == "ok"
    assert json.loads(out.read_text())["meta"]["device"]
    # a wrong output is marked so (its error is checked against SDPA's, not only printed)
    good = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    res = {"flash_cuda": (1.0, 0, torch.zeros_like(good)), "sdpa": (2.0, 0, good)}
    assert bench.row("x", {}, "fwd", torch.float64, res, good[0, 0])["status"].startswith("wrong")
