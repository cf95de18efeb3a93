"""The CUDA kernels' band (causal, sliding window) and modifier (softcap, ALiBi, attn_mask)
variants, run by the emulator with the race checker on: every head dim and dtype, forward and
backward (atomic and deterministic dQ), against the float64 reference under FlashAttention's
rule, the mask's gradient included; then the counters: a window visits only the key tiles that
intersect its band, shared memory stays conflict-free and global accesses coalesced, and the
bias costs exactly its tiles' bytes (one row per tile when broadcast over queries)."""
import pytest
import torch

import flash_cuda
from flash_cuda import emulate
from reference import assert_close_fp, assert_fa_rule, attention_ref
from test_kernel_fwd import HEAD_DIMS, make_qkv

VARIANTS = {
    "band": dict(window=(37, 5)),
    "band_causal": dict(causal=True, window=(50, -1)),
    "mod": dict(window=(60, 7), softcap=3.0, alibi=True, mask="heads"),
    "mod_bool": dict(causal=True, softcap=5.0, mask="key_padding"),
}


def features(name, B, Hq, Nq, Nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = dict(VARIANTS[name])
    kw = {k: f[k] for k in ("window", "causal", "softcap") if k in f}
    if f.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.2
    if f.get("mask") == "heads":
        kw["attn_mask"] = torch.randn(1, Hq, Nq, Nk, generator=g).requires_grad_()
    elif f.get("mask") == "key_padding":
        lengths = torch.tensor([Nk - 11 * b for b in range(B)])
        kw["attn_mask"] = (torch.arange(Nk)[None, :] < lengths[:, None])[:, None, None, :]
    return kw


def emulated_run(q, k, v, kw, dout, deterministic=False, order="forward"):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    with emulate(order=order, check=True) as emu:
        out, lse = flash_cuda.attention(*leaves, return_lse=True, deterministic=deterministic, **kw)
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), wrt)
    assert all(r["errors"] == [] for r in emu.launches), [r["errors"] for r in emu.launches]
    return out, lse, grads, emu.launches


def reference(q, k, v, kw, dout, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    ref_mask = mask.detach().clone().requires_grad_() if mask is not None and mask.requires_grad else mask
    ref_kw = dict(kw, attn_mask=ref_mask) if mask is not None else kw
    out, lse = attention_ref(*leaves, dtype=dtype, **ref_kw)
    wrt = leaves + ([ref_mask] if ref_mask is not None and ref_mask.requires_grad else [])
    return out, lse, torch.autograd.grad((out * dout.to(dtype)).sum(), wrt)


def check(q, k, v, kw, dout, out, lse, grads):
    ref_out, ref_lse, ref_grads = reference(q, k, v, kw, dout, torch.float64)
    plain_out, _, plain_grads = reference(q, k, v, kw, dout, q.dtype)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for name, g, pg, rg in zip(("dq", "dk", "dv", "dmask"), grads, plain_grads, ref_grads):
        assert_fa_rule(name, g, pg, rg, 3)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_variant_instantiation(D, dtype, name):
    B, Hq, Nq, Nk = 2, 2, 97, 150
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, dtype, seed=D)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    kw = features(name, B, Hq, Nq, Nk)
    out, lse, grads, launches = emulated_run(q, k, v, kw, dout)
    variant = "mod" if name.startswith("mod") else "band"
    assert all(r["kernel"].endswith(f",{variant}>") for r in launches)
    check(q, k, v, kw, dout, out, lse, grads)


@pytest.mark.parametrize("name", ["band", "mod"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_deterministic_dq_pass_and_thread_orders(D, name):
    B, Hq, Nq, Nk = 1, 2, 130, 77
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.bfloat16, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    kw = features(name, B, Hq, Nq, Nk)
    out, lse, grads, launches = emulated_run(q, k, v, kw, dout, deterministic=True)
    assert "flash_bwd_dq" in {r["kernel"].split("<")[0] for r in launches}
    check(q, k, v, kw, dout, out, lse, grads)
    _, _, grads_r, _ = emulated_run(q, k, v, kw, dout, deterministic=True, order="reverse")
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_r))  # bitwise, dmask too


def test_rows_without_keys_and_top_left_mask_dropin():
    """Window rows that see no key and fully masked rows (bool mask through the drop-in, top-left
    alignment) give 0 in the kernels too, with finite gradients."""
    q, k, v = make_qkv(1, 2, 2, 70, 40, 64, torch.float16)
    dout = torch.randn(q.shape).half()
    kw = dict(window=(3, 0))  # bottom-right: the first 30 rows see no key
    out, lse, grads, _ = emulated_run(q, k, v, kw, dout)
    assert torch.isneginf(lse[:, :, :30]).all() and out[:, :, :30].abs().max() == 0
    check(q, k, v, kw, dout, out, lse, grads)
    mask = torch.rand(70, 40, generator=torch.Generator().manual_seed(0)) < 0.7
    mask[5] = False
    with emulate(check=True) as emu:
        ours = flash_cuda.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert emu.launches[0]["errors"] == [] and ours[:, :, 5].abs().max() == 0
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert (ours.double() - ref).abs().max() < 2e-3


@pytest.mark.parametrize("window,causal", [((2**31 - 1, -1), False), ((-1, 2**31 - 1), False),
                                           ((2**31 - 2, 2**31 - 1), False), ((2**31 - 1, 3), True),
                                           ((2**30 + 5, 40), False)])
def test_window_bounds_near_2_31(window, causal):
    """Bounds past every key offset but below 2^31 (the ops map 2^31 and up to unbounded): the
    kernels' per-tile diagonal (i + offset + bound - n0) wrapped around in 32 bits and hid keys
    (output 0.27 off, no checker error) until 2026-12-04; a bound of Nq + Nk or more is now
    unbounded (BandMask::make). Forward and both dQ paths against the float64 reference with the
    same window."""
    B, Hq, Nq, Nk, D = 1, 2, 97, 150, 64
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.bfloat16, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    kw = dict(window=window, causal=causal)
    for deterministic in (False, True):
        out, lse, grads, _ = emulated_run(q, k, v, kw, dout, deterministic=deterministic)
        check(q, k, v, kw, dout, out, lse, grads)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "dq_pass"])
@pytest.mark.parametrize("value", [torch.finfo(torch.float32).min, -1e30, -1e9, -1e4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rows_fully_masked_by_a_finite_mask(dtype, value, deterministic):
    """A floating attn_mask of finfo.min, -1e30 or -1e9 on every key of a row (the values torch
    and many models pad with): torch gives the plain average of V there, and so do the kernels
    (the modifier variant's softmax subtracts the row max before scaling to base 2; with
    s log2(e) - fl(max log2(e)) these rows were NaN at -1e30 and 0 at finfo.min). Other rows
    partly masked. Gradients by FlashAttention's rule where the fully masked rows' dO is 0 (a
    padding query's); with dO there, finite (their lse cannot hold log(Nk) next to the mask
    value in float32, as on the CPU backend: README "Semantics")."""
    B, Hq, N, D = 1, 2, 100, 64
    q, k, v = make_qkv(B, Hq, 1, N, N, D, dtype, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    masked = N // 6
    mask = torch.zeros(1, 1, N, N)
    mask[..., :masked, :] = value
    mask[..., masked:, N // 2:] = value
    dout[:, :, :masked] = 0
    kw = dict(attn_mask=mask)
    out, lse, grads, launches = emulated_run(q, k, v, kw, dout, deterministic=deterministic)
    assert all(r["kernel"].endswith(",mod>") for r in launches)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_out, _, ref_grads = reference(q, k, v, kw, dout, torch.float64)
    plain_out, _, plain_grads = reference(q, k, v, kw, dout, dtype)
    # the fully masked rows against float32 scores (torch's on fp32 inputs; -1e9 and below leave
    # every such score equal to the mask value there, and the row is the plain average of V),
    # to the output's and P's rounding
    f32_out = reference(q, k, v, kw, dout, torch.float32)[0]
    assert_close_fp("out (fully masked rows)", out[:, :, :masked].double(), f32_out[:, :, :masked].double(),
                    rtol=2**-8 if dtype == torch.bfloat16 else 2**-10)
    # plain torch in fp16/bf16 turns the larger mask values into -inf and has no row to average:
    # the rule on the other rows; the gradients all (dO is 0 on the fully masked rows)
    assert_fa_rule("out", out[:, :, masked:], plain_out[:, :, masked:], ref_out[:, :, masked:], 2)
    for name, g, pg, rg in zip(("dq", "dk", "dv"), grads, plain_grads, ref_grads):
        assert_fa_rule(name, g, pg, rg, 3)
    dout[:, :, :masked] = 1
    _, _, grads, _ = emulated_run(q, k, v, kw, dout, deterministic=deterministic)
    assert all(torch.isfinite(g).all() for g in grads)


def test_window_past_the_kernels_32_bit_diagonals_is_an_error():
    """Past 2^30 keys a window that is not past every key can leave the kernels' 32-bit
    diagonals: an error naming the window, raised before any work (stride-0 inputs, nothing
    allocated for them)."""
    N, D = 2**30 + 10, 8
    x = torch.zeros(1, 1, 1, D, dtype=torch.float16).expand(1, 1, N, D)
    with emulate(check=False), pytest.raises(RuntimeError, match=r"window \(1073741824, -1\) with 1073741834 "
                                                                   r"queries .* must be < 2\^31"):
        flash_cuda.attention(x, x, x, window=(2**30, -1))


def test_mask_gradient_compiles_and_passes_opcheck():
    """The CUDA kernels return dL/d mask as a transposed view of what they write ([B][Hq][Nk][Nq
    rounded up to 8]); the fake kernel says so (it said contiguous, and torch.compile's backward
    failed its stride assertion until 2026-12-04): compiled = eager bitwise, and opcheck of bwd."""
    B, Hq, Nq, Nk, D = 1, 2, 9, 11, 16
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.float16, seed=9)
    mask = torch.randn(B, Hq, Nq, Nk, generator=torch.Generator().manual_seed(10))

    def f(q, k, v, mask):
        return flash_cuda.attention(q, k, v, attn_mask=mask)

    with emulate(check=False):
        runs = []
        for fn in (f, torch.compile(f, fullgraph=True)):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, mask)]
            out = fn(*leaves)
            runs.append((out, torch.autograd.grad(out.float().square().sum(), leaves)))
        out, lse = torch.ops.flash_cuda.fwd(q, k, v, 0.25, False, True, False, -1, -1, 0.0, None, mask)
        torch.library.opcheck(torch.ops.flash_cuda.bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, None, 0.25, False, True, False, -1, -1, 0.0,
                               None, mask, True))
    (eager, eager_grads), (compiled, compiled_grads) = runs
    assert torch.equal(eager, compiled)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, compiled_grads))
    assert eager_grads[3].abs().sum() > 0


def test_mask_gradient_has_one_layout_on_both_backends():
    """dL/d mask in the kernels' transposed layout from the CPU backend too: the fake kernel gives
    one layout, so a graph compiled on one side of emulate() and replayed on the other (torch
    caches compiled graphs in memory and on disk, keyed without it) read the CPU backend's dense
    dbias with the kernels' strides: a size assertion, or with size_asserts off a dbias 5.7 off."""
    B, Hq, Nq, Nk, D = 1, 2, 9, 11, 16
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.float16, seed=9)
    mask = torch.randn(B, Hq, Nq, Nk, generator=torch.Generator().manual_seed(10))
    out, lse = torch.ops.flash_cuda.fwd(q, k, v, 0.25, False, True, False, -1, -1, 0.0, None, mask)
    args = (torch.randn_like(out), q, k, v, out, lse, None, 0.25, False, True, False, -1, -1, 0.0, None, mask, True)
    cpu = torch.ops.flash_cuda.bwd(*args)[3]
    with emulate(check=False):
        kernels = torch.ops.flash_cuda.bwd(*args)[3]
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.ops.flash_cuda.bwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                          for a in args))[3]
    assert cpu.shape == kernels.shape == fake.shape == (B, Hq, Nq, Nk)
    assert cpu.stride() == kernels.stride() == fake.stride() == (Hq * Nk * 16, Nk * 16, 1, 16)
    assert (cpu - kernels).abs().max() < 1e-3 and cpu.abs().sum() > 0

    def f(q, k, v, mask):
        return flash_cuda.attention(q, k, v, attn_mask=mask * 3.0)

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for inside in (False, True, False):
        with (emulate(check=False) if inside else torch.enable_grad()):
            pair = []
            for fn in (f, compiled):
                leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, mask)]
                o = fn(*leaves)
                pair.append(torch.autograd.grad(o.float().square().sum(), leaves)[3])
            results.append(pair)
    for eager, comp in results:
        assert torch.equal(eager, comp)


# ---------------------------------------------------------------- counters
def fwd_tiles(D, mod):
    """(query rows, keys) per forward tile (csrc/kernels/traits.h FwdTraits)."""
    if mod:
        return 128, (32 if D <= 64 else 64)
    return 128, 64


def test_window_visits_only_the_band():
    """N = 1024, window (64, 0): the forward and the backward main kernel visit only the key
    tiles that intersect the band: under a third of the dense causal mma count (the issue's
    criterion), and exactly the tiles the band touches."""
    N, D = 1024, 64
    q, k, v = make_qkv(1, 1, 1, N, N, D, torch.float16)
    dout = torch.randn(q.shape).half()
    runs = {}
    for name, kw in {"causal": dict(causal=True), "window": dict(window=(64, 0))}.items():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with emulate(check=False) as emu:
            out = flash_cuda.attention(*leaves, **kw)
            out.backward(dout)
        runs[name] = {r["kernel"].split("<")[0]: r for r in emu.launches}
    fwd_w, fwd_c = runs["window"]["flash_fwd"]["mma"], runs["causal"]["flash_fwd"]["mma"]
    bwd_w, bwd_c = runs["window"]["flash_bwd"]["mma"], runs["causal"]["flash_bwd"]["mma"]
    assert fwd_w * 3 < fwd_c and bwd_w * 3 < bwd_c
    # exactly the tiles: a 128-row query tile [m0, m0 + 128) needs keys [m0 - 64, m0 + 128)
    bm, bn = fwd_tiles(D, False)
    tiles = sum(len({j // bn for j in range(max(0, m0 - 64), m0 + bm)}) for m0 in range(0, N, bm))
    assert fwd_w == tiles * 2 * bm * bn * D // (16 * 8 * 16)


@pytest.mark.parametrize("D", [64, 128])
def test_modifier_kernels_counters_and_bias_traffic(D):
    """The modifier variant: conflict-free shared memory (the bias tile's cp.async writes and
    fragment reads included) and coalesced global accesses in every kernel; the forward reads
    each visited tile of the bias once, one row of it when the mask is broadcast over queries
    (a key-padding mask), and nothing when there is no mask."""
    B, H, N = 2, 2, 256
    q, k, v = make_qkv(B, H, H, N, N, D, torch.float16)
    dout = torch.randn(q.shape).half()
    bm, bn = fwd_tiles(D, True)
    visited = B * H * (N // bm) * (N // bn)  # no band: every tile
    masks = {"none": None, "key_padding": torch.ones(B, 1, 1, N, dtype=torch.bool),
             "heads": torch.randn(1, H, N, N), "full": torch.randn(B, H, N, N)}
    expected_bias_bytes = {"none": 0, "key_padding": visited * bn * 4, "heads": visited * bm * bn * 4,
                           "full": visited * bm * bn * 4}
    read = {}
    for name, m in masks.items():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with emulate(check=True) as emu:
            out = flash_cuda.attention(*leaves, softcap=20.0, attn_mask=m)
            out.backward(dout)
        for rec in emu.launches:
            assert rec["errors"] == [] and rec["kernel"].endswith(",mod>")
            assert rec["global_sectors"] == rec["global_sectors_ideal"], rec["kernel"]
            for kind in ("ldmatrix", "cp_async", "store", "load"):
                s = rec["shared"][kind]
                assert s["wavefronts"] == s["ideal"], (rec["kernel"], kind, s)
        read[name] = emu.launches[0]["global_bytes_read"]
    for name in masks:
        assert read[name] - read["none"] == expected_bias_bytes[name], name
