"""fp32 inputs on the CUDA kernels (csrc/kernels/tf32.h), forward and backward, run by the
emulator with the race checker on: TF32 (torch.backends.cuda.matmul.allow_tf32 = True) and
3xTF32 (the default).

Layers: the tf32 rounding of the reference (tests/reference.py) against the emulator's
cvt.rna.tf32; every head dim and variant in both precisions against the float64 reference
(TF32: at most 2x (outputs) or 3x (gradients) the error of the same computation in plain torch at
TF32 precision, every product's operands rounded to tf32, plus 1e-5; 3xTF32: at most 4x the
error of the CPU backend's fp32 attention, plus 1e-6); the precision follows allow_tf32 and costs
exactly three mma per product; one configuration per head dim for every sm_80+ profile, inside
99 KiB; Turing refused; the backward always deterministic, with dropout and the bias gradient;
seeded randomised differential tests over shapes, GQA, layouts, features, devices and both
precisions."""
import contextlib
import random

import pytest
import torch

import flash_cuda
from flash_cuda import emulate
from reference import attention_ref, random_layout, saturation_terms, tf32, tf32_matmul
from test_kernel_fwd import HEAD_DIMS, make_qkv

KIB = 1024


@contextlib.contextmanager
def allow_tf32(flag):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def emulated(q, k, v, kw, precision, device="a100"):
    """(out, lse, launch records) of the fp32 forward in the emulator, race checker on."""
    with allow_tf32(precision == "tf32"), emulate(device=device, check=True) as emu:
        out, lse = flash_cuda.attention(q, k, v, return_lse=True, **kw)
    assert all(r["errors"] == [] for r in emu.launches), [r["errors"] for r in emu.launches]
    return out, lse, emu.launches


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


# 3xTF32's bound on a real GPU: 8x plain fp32's error instead of the emulator's 4x. The hardware
# rounds where the emulator does not: ex2.approx.f32 is within 2 ulp (the emulator's exp2f 1),
# and the tensor cores truncate the sums of their products (Fasi, Higham, Mikaitis, Pranesh,
# "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021: no round-to-nearest in the
# accumulation), while the emulator rounds each mma's fp32 sum to nearest. On an H200 (2026-12-04)
# the worst case of test_kernel_gpu.py's 36 3xTF32 cases was 1.71x the 4x bound (6.8x plain fp32's
# error: dense, head dim 256, dV); TF32 stayed within 0.58x of its rule.
GPU_3XTF32_FACTOR = 8


def check(q, k, v, kw, out, lse, precision):
    """The kernel's error against float64 within the precision's bound; returns (error, bound).
    On CPU copies of any device's tensors (test_kernel_gpu.py uses it too)."""
    factor = GPU_3XTF32_FACTOR if out.is_cuda else 4
    cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x
    q, k, v, out, lse = (cpu(x) for x in (q, k, v, out, lse))
    kw = {name: cpu(x) for name, x in kw.items()}
    ref, ref_lse = attention_ref(q, k, v, **kw)
    finite = torch.isfinite(ref_lse)
    lse_err = lambda x: (x.double()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    if precision == "tf32":  # the same computation in plain torch at TF32 precision
        plain, plain_lse = attention_ref(q, k, v, dtype=torch.float32, matmul=tf32_matmul, **kw)
        bound, lse_bound = 2 * max_err(plain, ref) + 1e-5, 2 * lse_err(plain_lse) + 1e-5
    else:  # plain torch's fp32 attention: the CPU backend's error depends on the kernels this CPU picks
        cpu, cpu_lse = attention_ref(q, k, v, dtype=torch.float32, **kw)
        bound, lse_bound = factor * max_err(cpu, ref) + 1e-6, factor * lse_err(cpu_lse) + 1e-6
    err = max_err(out, ref)
    assert err <= bound, (precision, err, bound)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert lse_err(lse) <= lse_bound, (precision, lse_err(lse), lse_bound)
    return err, bound


# ---------------------------------------------------------------- the rounding
def test_tf32_rounding_matches_the_emulators_cvt():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-6, 6, (4000,), generator=g),
                   torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 0.0, -0.0, 65504.0])])
    cvt = torch.ops.flash_cuda._emu_tf32_probe(x)
    assert torch.equal(cvt.view(torch.int32), tf32(x).view(torch.int32))
    assert tf32(torch.tensor([1 + 2 ** -11])).item() == 1 + 2 ** -10  # a tie goes away from zero


# ---------------------------------------------------------------- every instantiation
VARIANTS = {
    "dense": lambda Hq, Nq, Nk, g: {},
    "band": lambda Hq, Nq, Nk, g: dict(causal=True, window=(45, -1)),
    "mod": lambda Hq, Nq, Nk, g: dict(window=(60, 7), softcap=3.0, alibi_slopes=torch.rand(Hq, generator=g) * 0.2,
                                      attn_mask=torch.randn(1, Hq, Nq, Nk, generator=g)),
}


@pytest.mark.parametrize("precision", ["3xtf32", "tf32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_instantiation(D, variant, precision):
    B, Hq, Hkv, Nq, Nk = 1, 2, 1, 77, 91  # partial tiles at both ends, GQA
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, torch.float32, seed=D)
    kw = VARIANTS[variant](Hq, Nq, Nk, torch.Generator().manual_seed(D))
    out, lse, launches = emulated(q, k, v, kw, precision)
    suffix = {"dense": "", "band": ",band", "mod": ",mod"}[variant]
    assert [r["kernel"] for r in launches] == [f"flash_fwd<fp32,hdim{D}{suffix}>"]
    check(q, k, v, kw, out, lse, precision)


# ---------------------------------------------------------------- the precision
def test_precision_follows_allow_tf32_and_3xtf32_costs_three_mma():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float32, seed=3)
    out3, _, rec3 = emulated(q, k, v, {}, "3xtf32")
    out1, _, rec1 = emulated(q, k, v, {}, "tf32")
    assert rec3[0]["mma"] == 3 * rec1[0]["mma"] > 0
    ref, _ = attention_ref(q, k, v)
    err3, err1 = max_err(out3, ref), max_err(out1, ref)
    assert err3 < 1e-5 < err1 and 50 * err3 < err1  # about 11 more bits per operand
    # the default (allow_tf32 False, as in torch) is 3xTF32
    assert torch.backends.cuda.matmul.allow_tf32 is False
    with emulate():
        assert torch.equal(flash_cuda.attention(q, k, v), out3)


def test_sdpa_dropin_and_varlen_take_fp32():
    q, k, v = make_qkv(2, 2, 2, 40, 40, 32, torch.float32, seed=5)
    with emulate(check=True) as emu:
        out = flash_cuda.scaled_dot_product_attention(q, k, v, is_causal=True)
        cu = torch.tensor([0, 40, 80], dtype=torch.int32)
        packed = flash_cuda.varlen_attention(q.transpose(1, 2).reshape(80, 2, 32), k.transpose(1, 2).reshape(80, 2, 32),
                                             v.transpose(1, 2).reshape(80, 2, 32), cu, cu, 40, 40, causal=True)
    assert all(r["errors"] == [] for r in emu.launches)
    ref, _ = attention_ref(q, k, v, causal=True, bottom_right=False)
    cpu = flash_cuda.attention(q, k, v, causal=True)
    assert max_err(out, ref) <= 4 * max_err(cpu, ref) + 1e-6
    assert torch.equal(packed.reshape(2, 40, 2, 32).transpose(1, 2), out)


# ---------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["a100", "h100", "l4", "rtx4090", "b200"])
def test_one_configuration_for_every_sm80_device(device):
    q, k, v = make_qkv(1, 1, 1, 40, 40, 256, torch.float32)
    sizes = {}
    for variant in VARIANTS:
        kw = VARIANTS[variant](1, 40, 40, torch.Generator().manual_seed(0))
        out, lse, launches = emulated(q, k, v, kw, "3xtf32", device=device)
        assert launches[0]["device"] == device and "KiB" not in launches[0]["kernel"]  # (one configuration)
        sizes[variant] = launches[0]["dynamic_smem"]
        check(q, k, v, kw, out, lse, "3xtf32")
    # head dim 256: 64 query rows x 16 keys, the bias tile too with modifiers at 32 rows
    assert sizes == {"dense": (64 + 2 * 16) * 256 * 4, "band": (64 + 2 * 16) * 256 * 4,
                     "mod": (32 + 2 * 16) * 256 * 4 + 32 * 24 * 4}
    assert max(sizes.values()) <= 99 * KIB


def test_turing_has_no_tf32():
    q, k, v = make_qkv(1, 1, 1, 16, 16, 64, torch.float32)
    with emulate(device="t4"):
        with pytest.raises(NotImplementedError, match=r"compute capability 8.0 or newer .* has 7.5"):
            flash_cuda.attention(q, k, v)


# ---------------------------------------------------------------- randomised
@pytest.mark.parametrize("seed", range(16))
def test_randomised_differential(seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    D = rnd.choice([rnd.randint(1, 256), rnd.choice(HEAD_DIMS)])
    Hkv = rnd.randint(1, 2)
    Hq = Hkv * rnd.choice([1, 2, 3])
    B, Nq, Nk = rnd.randint(1, 2), rnd.randint(1, 150), rnd.randint(1, 150)
    q = random_layout(rnd, g, B, Hq, Nq, D, torch.float32)
    k = random_layout(rnd, g, B, Hkv, Nk, D, torch.float32)
    v = random_layout(rnd, g, B, Hkv, Nk, D, torch.float32)
    kw = {}
    if rnd.random() < 0.4:
        kw["causal"] = True
    if rnd.random() < 0.3:
        kw["window"] = (rnd.randint(0, 80), rnd.choice([-1, rnd.randint(0, 20)]))
    if rnd.random() < 0.3:
        kw["softcap"] = rnd.uniform(1.0, 20.0)
    if rnd.random() < 0.3:
        kw["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.3
    if rnd.random() < 0.3:
        kw["attn_mask"] = torch.randn(B, 1, Nq, Nk, generator=g) if rnd.random() < 0.5 else \
            torch.rand(B, 1, 1, Nk, generator=g) > 0.2
    if rnd.random() < 0.3:
        kw["scale"] = rnd.uniform(0.01, 1.0)
    precision = rnd.choice(["3xtf32", "tf32"])
    device = rnd.choice(["a100", "h100", "l4", "rtx4090"])
    out, lse, launches = emulated(q, k, v, kw, precision, device=device)
    assert launches[0]["kernel"].startswith("flash_fwd<fp32,")
    check(q, k, v, kw, out, lse, precision)


# A soak of these randomised tests over 756 further seeds each (2026-12-03: seeds 2000-2755) found
# 17 backward draws and 1 forward draw outside the 3xTF32 bound; four of them are pinned here
# (and the forward), so that a change which fixes or worsens them shows.
KNOWN_EXCESS = ("known: 3xTF32 exceeds 4x plain fp32's error + 1e-6 in ~2% of randomised draws (soak, seeds "
                "2000-2755: gradients up to 53x plain fp32's error, most at scale 1.0 but also at 0.05 and "
                "1/sqrt(D); one output 15x, D 253, scale 0.45). Plain torch in 3xTF32 arithmetic (three tf32 "
                "hi/lo products per GEMM) has 1.1x-5.5x fp32's error on those draws, the rest is the "
                "kernel's own arithmetic: in part P recomputed from the fp32 lse (twice that rounding's "
                "effect covers 4 of 5 dV excesses examined); the rest not analysed")


# Not strict: the bound is relative to plain fp32 torch's error on the machine, and on an AMD Zen 3
# (MKL's AVX2 kernels, 2026-12-03) plain fp32's error on this draw is larger and the draw passes.
@pytest.mark.xfail(strict=False, reason=KNOWN_EXCESS)
@pytest.mark.parametrize("seed", [2509])
def test_randomised_differential_known_excess(seed):
    test_randomised_differential(seed)


# ---------------------------------------------------------------- the backward
def run_grads(q, k, v, kw, dout, precision, device="a100", order="forward", deterministic=False):
    """(out, grads of q, k, v [and the mask], launch records) of an emulated forward + backward."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    with allow_tf32(precision == "tf32"), emulate(device=device, order=order, check=True) as emu:
        out = flash_cuda.attention(*leaves, deterministic=deterministic, **kw)
        grads = torch.autograd.grad((out * dout).sum(), wrt)
    assert all(r["errors"] == [] for r in emu.launches), [r["errors"] for r in emu.launches]
    return out, grads, emu.launches


def grads_of(fn, q, k, v, kw, dout):
    """Gradients of sum(fn(q, k, v, **kw) * dout) w.r.t. q, k, v and a mask that requires grad."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    if mask is not None and mask.requires_grad:
        mask = mask.detach().clone().requires_grad_()
        kw = dict(kw, attn_mask=mask)
    out = fn(*leaves, **kw)
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    return torch.autograd.grad((out * dout.to(out.dtype)).sum(), wrt)


def check_grads(q, k, v, kw, dout, out, grads, precision):
    """Each gradient's error against float64 within the precision's bound (TF32: 3x the same
    computation in plain torch at TF32 precision + 1e-5; 3xTF32: 4x plain torch's fp32 (8x on a
    GPU: GPU_3XTF32_FACTOR) + 1e-6), plus twice the saturated-softmax term of the rounded O
    (reference.saturation_terms)."""
    on_gpu = out.is_cuda
    cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x
    q, k, v, dout, out = (cpu(x) for x in (q, k, v, dout, out))
    grads = [cpu(g) for g in grads]
    kw = {name: cpu(x) for name, x in kw.items()}
    ref_kw = {n: x for n, x in kw.items() if n not in ("dropout_p", "keep")}
    if "keep" in kw:
        ref_kw.update(dropout_mask=kw["keep"], dropout_p=kw["dropout_p"])
    ref = grads_of(lambda *a, **o: attention_ref(*a, dtype=torch.float64, **o)[0], q, k, v, ref_kw, dout)
    if precision == "tf32":
        plain = grads_of(lambda *a, **o: attention_ref(*a, dtype=torch.float32, matmul=tf32_matmul, **o)[0], q, k, v,
                         ref_kw, dout)
        factor, floor = 3, 1e-5
    else:
        plain = grads_of(lambda *a, **o: attention_ref(*a, dtype=torch.float32, **o)[0], q, k, v, ref_kw, dout)
        factor, floor = (GPU_3XTF32_FACTOR if on_gpu else 4), 1e-6
    sat = saturation_terms(out, ref_kw, dout, q, k, v)
    for name, g, pg, rg, st in zip(("dq", "dk", "dv", "dmask"), grads, plain, ref, sat):
        err, plain_err = max_err(g, rg), max_err(pg, rg)
        bound = factor * plain_err + floor + 2 * (st.abs().max().item() if st is not None else 0.0)
        assert err <= bound, (name, precision, err, bound)


@pytest.mark.parametrize("precision", ["3xtf32", "tf32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_backward_every_instantiation(D, variant, precision):
    B, Hq, Hkv, Nq, Nk = 1, 2, 1, 45, 71
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, torch.float32, seed=D + 1)
    dout = torch.randn(B, Hq, Nq, D, generator=torch.Generator().manual_seed(D))
    kw = VARIANTS[variant](Hq, Nq, Nk, torch.Generator().manual_seed(D))
    if "attn_mask" in kw:
        kw["attn_mask"].requires_grad_()
    out, grads, launches = run_grads(q, k, v, kw, dout, precision)
    suffix = {"dense": "", "band": ",band", "mod": ",mod"}[variant]
    # always the deterministic dQ pass (no atomics, no postprocess); above 128, two blocks per key tile
    names = [r["kernel"] for r in launches]
    assert names[1:] == [f"flash_bwd_preprocess<fp32,hdim{D}{suffix}>", f"flash_bwd<fp32,hdim{D}{suffix}>",
                         f"flash_bwd_dq<fp32,hdim{D}{suffix}>"]
    key_tiles = {32: 2, 64: 2, 96: 2, 128: 2, 192: 3, 256: 3}[D]  # 64 keys per tile up to 128, 32 above
    assert launches[2]["grid"][0] == key_tiles * (2 if D > 128 else 1)
    check_grads(q, k, v, kw, dout, out, grads, precision)


def test_backward_is_deterministic_whatever_the_flag():
    q, k, v = make_qkv(1, 4, 2, 70, 90, 64, torch.float32, seed=11)
    dout = torch.randn(1, 4, 70, 64, generator=torch.Generator().manual_seed(1))
    runs = [run_grads(q, k, v, dict(causal=True), dout, "3xtf32", order=order, deterministic=det)
            for order, det in (("forward", False), ("reverse", False), ("forward", True))]
    for out, grads, launches in runs[1:]:
        assert torch.equal(out, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    assert not any("postprocess" in r["kernel"] for r in runs[0][2])


def test_backward_dropout_and_bias_gradient():
    B, Hq, Nq, Nk, D = 2, 2, 50, 66, 64
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.float32, seed=5)
    g = torch.Generator().manual_seed(2)
    dout = torch.randn(B, Hq, Nq, D, generator=g)
    mask = torch.randn(B, Hq, Nq, Nk, generator=g).requires_grad_()
    for precision in ("3xtf32", "tf32"):
        for extra in (dict(softcap=4.0, attn_mask=mask), dict(causal=True)):
            kw = dict(extra, dropout_p=0.2, generator=torch.Generator().manual_seed(9))
            with allow_tf32(precision == "tf32"), emulate(check=True):
                _, keep = flash_cuda.attention(q, k, v, return_dropout_mask=True, **kw)
            kw["generator"] = torch.Generator().manual_seed(9)  # the same draw again
            out, grads, _ = run_grads(q, k, v, kw, dout, precision)
            check_kw = {n: x for n, x in kw.items() if n != "generator"}
            check_grads(q, k, v, dict(check_kw, keep=keep), dout, out, grads, precision)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_bias_gradient_with_the_head_dim_split(order):
    """Above head dim 128 the fp32 backward splits the head dim over two blocks per key tile;
    both compute the bias gradient and the first alone stores it (run_grads' race checker
    reports two blocks' stores to one byte, equal values too: both halves stored it before
    2026-12-06), in either block order."""
    B, Hq, Nq, Nk, D = 1, 2, 40, 70, 200
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.float32, seed=6)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(B, Hq, Nq, D, generator=g)
    kw = dict(attn_mask=torch.randn(B, 1, Nq, Nk, generator=g).requires_grad_(), softcap=4.0)
    out, grads, launches = run_grads(q, k, v, kw, dout, "3xtf32", order=order)
    bwd = [r for r in launches if "flash_bwd<" in r["kernel"]]
    # two blocks per key tile of 32 (the A100 configuration at head dim 256)
    assert len(bwd) == 1 and "hdim256" in bwd[0]["kernel"] and bwd[0]["grid"][0] == 2 * ((Nk + 31) // 32), bwd
    check_grads(q, k, v, kw, dout, out, grads, "3xtf32")


@pytest.mark.parametrize("seed", range(12))
def test_backward_randomised_differential(seed):
    rnd = random.Random(1000 + seed)
    g = torch.Generator().manual_seed(seed)
    D = rnd.choice([rnd.randint(1, 256), rnd.choice(HEAD_DIMS)])
    Hkv = rnd.randint(1, 2)
    Hq = Hkv * rnd.choice([1, 2, 3])
    B, Nq, Nk = rnd.randint(1, 2), rnd.randint(1, 90), rnd.randint(2, 110)
    q, k, v = (random_layout(rnd, g, B, h, n, D, torch.float32) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    dout = torch.randn(B, Hq, Nq, D, generator=g)
    kw = {"scale": rnd.choice([None, 0.05, 1.0])}
    if rnd.random() < 0.4:
        kw["causal"] = True
    if rnd.random() < 0.3:
        kw["window"] = (rnd.choice([-1, 3, 17]), rnd.choice([-1, 5]))
    if rnd.random() < 0.3:
        kw["softcap"] = rnd.choice([0.5, 5.0, 30.0])
    if rnd.random() < 0.3:
        kw["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.3
    if rnd.random() < 0.3:
        kw["attn_mask"] = torch.randn(1, Hq, Nq, Nk, generator=g).requires_grad_()
    precision = rnd.choice(["3xtf32", "tf32"])
    out, grads, launches = run_grads(q, k, v, kw, dout, precision, device=rnd.choice(["a100", "l4", "h100"]),
                                     order=rnd.choice(["forward", "reverse"]))
    check_grads(q, k, v, kw, dout, out, grads, precision)


@pytest.mark.xfail(strict=True, reason=KNOWN_EXCESS)
@pytest.mark.parametrize("seed", [2413, 2478, 2506, 2689])
def test_backward_randomised_differential_known_excess(seed):
    test_backward_randomised_differential(seed)
