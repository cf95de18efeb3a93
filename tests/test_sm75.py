"""sm_75 (T4, RTX 20xx) without one: the Turing kernels in the emulator under the t4 profile.

sm_75 has mma.sync m16n8k8 (f16) and ldmatrix, but no m16n8k16, no cp.async, no bf16 or tf32
tensor cores and 64 KiB of shared memory per block (csrc/kernels/device.h). Layers: the
emulator's sm_75 instruction set (m16n8k16 as two m16n8k8, cp.async as a copy through
registers, sm_80 instructions refused); the dispatch (which configuration, named ",sm75", each
head dim and variant gets; what is refused: bf16, fp32, the backward at head dim 256; GPUs
older than sm_75: test_devices.py); every sm_75 instantiation against the float64 reference under
FlashAttention's rule with the race checker on (forward, backward with atomic and
deterministic dQ, the KV-cache forward); the register staging of the main loops' tiles; and a
seeded randomised differential test."""
import random

import pytest
import torch

import flash_cuda
from flash_cuda import emulate
from reference import assert_fa_rule, attention_ref, random_layout, saturation_terms
from test_devices import VARIANT_KW, check_kvcache_on, random_features, run
from test_emulator import LAYOUTS, _pack_fragments
from test_kernel_fwd import HEAD_DIMS, make_qkv
from test_masks_kernels import check as check_all, features, reference as masks_reference

KIB = 1024
ops = torch.ops.flash_cuda
T4 = flash_cuda.EMULATED_DEVICES["t4"]
BWD_HEAD_DIMS = [d for d in HEAD_DIMS if d <= 192]  # (256: no configuration fits 64 KiB)


# ---------------------------------------------------------------- the emulator's sm_75
def _mma16(A, B, C, device, bf16=False):
    """One m16n8k16 through the ptx.h wrapper on `device`: D (16 x 8, float64) and the launch."""
    lay = LAYOUTS["mma"]["m16n8k16"]
    a = _pack_fragments(A.tolist(), lay["A"]["by_lane"], bf16)
    b = _pack_fragments(B.tolist(), lay["B"]["by_lane"], bf16)
    c = torch.tensor([[C[r][col] for r, col in lay["C_D"]["by_lane"][lane]] for lane in range(32)])
    with emulate(device=device) as emu:
        d = ops._emu_mma_probe(a, b, c, bf16)
    D = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        for i, (r, col) in enumerate(lay["C_D"]["by_lane"][lane]):
            D[r][col] = float(d[lane][i])
    return D, emu.launches[0]


@pytest.mark.parametrize("values", ["coords", "random"])
def test_mma_k16_on_sm75_is_two_k8(values):
    """On a T4 the k16 wrapper issues two m16n8k8 (k 0..7, then 8..15): A B + C exactly for small
    integers, within fp32 rounding for random fp16 values, and two mma instead of one."""
    g = torch.Generator().manual_seed(3)
    if values == "coords":
        A = (torch.arange(256, dtype=torch.float32).reshape(16, 16) % 7) - 3
        B = (torch.arange(128, dtype=torch.float32).reshape(16, 8) % 5) - 2
    else:
        A, B = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)
    A, B = A.half().float(), B.half().float()
    C = torch.arange(128, dtype=torch.float32).reshape(16, 8) * 0.25
    ref = A.double() @ B.double() + C.double()
    D75, rec75 = _mma16(A, B, C, "t4")
    D80, rec80 = _mma16(A, B, C, "a100")
    assert rec75["mma"] == 2 and rec80["mma"] == 1 and rec75["errors"] == [] == rec80["errors"]
    if values == "coords":
        assert torch.equal(D75, ref) and torch.equal(D80, ref)
    else:
        torch.testing.assert_close(D75, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("probe,match", [
    ("bf16_k16", r"mma.m16n8k8.bf16 at .* needs sm_80; the emulated t4 is sm_75"),
    ("bf16_k8", r"mma.m16n8k8.bf16 at .* needs sm_80; the emulated t4 is sm_75"),
    ("tf32_k8", r"mma.m16n8k8.tf32 at .* needs sm_80; the emulated t4 is sm_75"),
])
def test_sm80_instructions_fail_on_sm75(probe, match):
    """What ptxas would refuse for sm_75 fails the emulated launch on a T4 (and runs on an A100)."""
    z4, z2, c = torch.zeros(32, 4, dtype=torch.int32), torch.zeros(32, 2, dtype=torch.int32), torch.zeros(32, 4)
    call = {"bf16_k16": lambda: ops._emu_mma_probe(z4, z2, c, True),
            "bf16_k8": lambda: ops._emu_mma_k8_probe(z4, z2, c, "bf16"),
            "tf32_k8": lambda: ops._emu_mma_k8_probe(z4, z2, c, "tf32")}[probe]
    with emulate(device="t4"), pytest.raises(RuntimeError, match=match):
        call()
    with emulate(device="a100") as emu:
        call()
    assert emu.launches[0]["errors"] == []


def test_cp_async_on_sm75_copies_through_registers():
    """ptx.h's cp.async wrappers on a T4: the same bytes (src-size bytes read, the rest zero),
    copied at once through registers: no cp.async reaches shared memory."""
    trace = LAYOUTS["cp_async"]["example_trace"]["memory"]
    src = torch.arange(256, dtype=torch.uint8)
    with emulate(device="t4") as emu:
        out = ops._emu_cp_async_trace(src)
    after_wait0 = next(v for k, v in trace.items() if k.startswith("dst[32:48] after wait_group 0"))
    assert out[:8].tolist() == trace["dst[0:8]"] and out[8:24].tolist() == trace["dst[16:32]"]
    assert out[24:40].tolist() == after_wait0
    rec = emu.launches[0]
    assert rec["errors"] == [] and rec["global_bytes_read"] == 8 + 16 + 5
    assert rec["shared"]["cp_async"]["requests"] == 0 and rec["shared"]["store"]["requests"] > 0


# ---------------------------------------------------------------- dispatch
def test_dispatch_on_t4():
    """fp16 on a T4 runs the sm_75 configuration of every kernel, within 64 KiB; the backward at
    head dim 256 has none (its smallest tiles need 68.25 KiB, 72.75 with modifiers) and says so."""
    for D in HEAD_DIMS:
        q, k, v = make_qkv(1, 2, 1, 24, 40, D, torch.float16, seed=D)
        dout = torch.randn(q.shape).half()
        for variant, kw in VARIANT_KW.items():
            suffix = "" if variant == "dense" else f",{variant}"
            if D == 256:
                _, _, _, launches = run("t4", q, k, v, kw, check=False)
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                need = 74496 if variant == "mod" else 69888  # (32 x 32 tiles; with the bias tiles)
                with emulate(device="t4", check=False), pytest.raises(
                        RuntimeError, match=r"no configuration of the backward fits the device's 65536 bytes of "
                                            rf"shared memory per block \(the smallest needs {need}\)"):
                    flash_cuda.attention(*leaves, **kw).sum().backward()
            else:
                _, _, _, launches = run("t4", q, k, v, kw, dout, check=False)
            names = [r["kernel"] for r in launches]
            expected = [f"flash_fwd<fp16,hdim{D}{suffix},sm75>"]
            if D != 256:
                expected += [f"{n}<fp16,hdim{D}{suffix},sm75>"
                             for n in ("flash_bwd_preprocess", "flash_bwd", "flash_bwd_postprocess")]
            assert names == expected, names
            for r in launches:
                assert r["device"] == "t4" and r["dynamic_smem"] <= 64 * KIB, r
        kc, vc, _ = make_qkv(1, 1, 1, 64, 64, D, torch.float16)
        with emulate(device="t4", check=False) as emu:
            flash_cuda.attention_with_kvcache(q[:, :, :1], kc, vc, cache_seqlens=64)
        assert emu.launches[0]["kernel"] == f"flash_fwd_kvcache<fp16,hdim{D},sm75>"
        assert emu.launches[0]["dynamic_smem"] <= 64 * KIB


@pytest.mark.parametrize("fn,dtype,name", [("attention", torch.bfloat16, "bfloat16"), ("attention", torch.float32, "float32"),
                                           ("kvcache", torch.bfloat16, "bfloat16")])  # (fp32 caches: TypeError anywhere)
def test_t4_takes_fp16_only(fn, dtype, name):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 64, dtype)
    with emulate(device="t4"), pytest.raises(NotImplementedError, match=(
            rf"flash_cuda: {name} inputs need compute capability 8.0 or newer \(bf16 and tf32 tensor cores\); "
            r"the emulated t4 has 7.5: pass float16 q, k, v there")):
        if fn == "attention":
            flash_cuda.attention(q, k, v)
        else:
            flash_cuda.attention_with_kvcache(q, k, v, cache_seqlens=16)


# ---------------------------------------------------------------- every sm_75 instantiation's numerics
CASES = [("fwd", d, v) for d in HEAD_DIMS for v in VARIANT_KW] + [("bwd", d, v) for d in BWD_HEAD_DIMS for v in VARIANT_KW]


@pytest.mark.parametrize("kind,D,variant", CASES, ids=[f"{k}-{d}-{v}" for k, d, v in CASES])
def test_sm75_configurations(kind, D, variant):
    """On a T4 profile: out and lse (and dq, dk, dv, the mask's gradient; atomic and
    deterministic dQ, two thread orders) against the float64 reference under the FA rule, race
    checker on; the mod variant with every modifier."""
    B, Hq, Nq, Nk = 1, 2, 77, 150
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, torch.float16, seed=D)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).half()
    kw = {"dense": {}, "band": dict(causal=True), "mod": features("mod", B, Hq, Nq, Nk)}[variant]
    out, lse, grads, launches = run("t4", q, k, v, kw, dout if kind == "bwd" else None)
    assert all(r["kernel"].endswith(",sm75>") for r in launches if r["kernel"].startswith("flash_")), launches
    assert all(r["shared"]["cp_async"]["requests"] == 0 for r in launches)  # sm_75 has none
    if kind == "bwd":
        check_all(q, k, v, kw, dout, out, lse, grads)
        det_out, _, det_grads, det_launches = run("t4", q, k, v, kw, dout, deterministic=True, order="reverse")
        assert any(r["kernel"] == f"flash_bwd_dq<fp16,hdim{D}{'' if variant == 'dense' else ',' + variant},sm75>"
                   for r in det_launches)
        check_all(q, k, v, kw, dout, det_out, lse, det_grads)
    else:
        ref_out, ref_lse = attention_ref(q, k, v, **kw)
        plain_out, plain_lse = attention_ref(q, k, v, dtype=torch.float16, **kw)
        assert_fa_rule("out", out, plain_out, ref_out, 2)
        assert_fa_rule("lse", lse, plain_lse.float(), ref_lse, 2)
        out_r, lse_r, _, _ = run("t4", q, k, v, kw, order="reverse")
        assert torch.equal(out, out_r) and torch.equal(lse, lse_r)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_sm75_kvcache(D):
    """The KV-cache forward's sm_75 configuration, split and unsplit, with a paged cache and an
    append, against the float64 reference."""
    check_kvcache_on("t4", D, f"flash_fwd_kvcache<fp16,hdim{D},sm75>")


# ---------------------------------------------------------------- register staging
def test_forward_tiles_pass_through_registers():
    """The sm_75 forward's K and V tiles: 128-bit global loads into registers, 128-bit shared
    stores after the wait (copy.h's TileStage), the same traffic as the A100's cp.async: every
    K and V byte read once per query tile, stored once."""
    D, Nq, Nk = 64, 128, 256
    q, k, v = make_qkv(1, 1, 1, Nq, Nk, D, torch.float16)
    launches = {dev: run(dev, q, k, v, {})[3][0] for dev in ("t4", "a100")}
    t4, a100 = launches["t4"], launches["a100"]
    assert t4["kernel"] == "flash_fwd<fp16,hdim64,sm75>" and t4["grid"] == [1, 1, 1]  # one 128-row query tile
    assert t4["shared"]["cp_async"]["requests"] == 0 and a100["shared"]["cp_async"]["requests"] > 0
    assert t4["global_bytes_read"] == a100["global_bytes_read"] == (Nq + 2 * Nk) * D * 2
    # Q, K and V land by 16-byte shared stores (one request per warp per 512 bytes); O is staged
    # through shared memory by 32-bit stores on both
    assert t4["shared"]["store"]["requests"] - a100["shared"]["store"]["requests"] == (Nq + 2 * Nk) * D * 2 // 512


# ---------------------------------------------------------------- randomised differential test
@pytest.mark.parametrize("seed", range(24))
def test_randomised_t4_against_reference(seed):
    """Random head dims (1..192 with gradients, up to 256 forward only), shapes, GQA ratios,
    layouts, deterministic or atomic dQ and feature combinations on the T4 profile, race
    checker on, against the float64 reference under the FA rule (saturated-softmax term
    included; Nk = 1 and left-0 windows too, as in test_devices' randomised test)."""
    rnd = random.Random(1000 + seed)
    hkv = rnd.choice([1, 2])
    hq = hkv * rnd.choice([1, 2, 3])
    B, Nq, Nk = rnd.randint(1, 2), rnd.randint(1, 80), rnd.randint(1, 100)
    grads_wanted = rnd.random() < 0.75
    D = rnd.choice([rnd.randint(1, 192), 96, 128, 192]) if grads_wanted else rnd.choice([rnd.randint(193, 256), 256])
    g = torch.Generator().manual_seed(seed)
    q, k, v = (random_layout(rnd, g, B, h, n, D, torch.float16) for h, n in ((hq, Nq), (hkv, Nk), (hkv, Nk)))
    dout = torch.randn(B, hq, Nq, D, generator=g).half()
    kw = random_features(rnd, g, hq, Nq, Nk, mask_grad=grads_wanted)
    out, lse, grads, launches = run("t4", q, k, v, kw, dout if grads_wanted else None,
                                    deterministic=rnd.random() < 0.5, order=rnd.choice(["forward", "reverse"]))
    for r in launches:
        assert r["device"] == "t4" and r["dynamic_smem"] <= T4.smem_per_block, r
        assert not r["kernel"].startswith(("flash_fwd<", "flash_bwd<")) or r["kernel"].endswith(",sm75>"), r
    ref_out, _, ref_grads = masks_reference(q, k, v, kw, dout, torch.float64)
    plain_out, _, plain_grads = masks_reference(q, k, v, kw, dout, torch.float16)
    assert_fa_rule(f"out (D={D}, {kw})", out, plain_out, ref_out, 2)
    if grads_wanted:
        sat = saturation_terms(out, kw, dout, q, k, v)
        for name, a, pg, b, st in zip(("dq", "dk", "dv", "dmask"), grads, plain_grads, ref_grads, sat):
            assert_fa_rule(f"{name} (D={D}, {kw})", a, pg, b, 3, saturation=st)
