"""The CUDA backward kernels (csrc/kernels/bwd_*.h), run on the CPU by the emulator: every
instantiation's dq, dk, dv against the float64 reference under FlashAttention's 3x rule, with
the race checker on (atomics included) in more than one thread order; deterministic=True
bitwise repeatable across runs and orders; then the counters."""
import pytest
import torch

import flash_cuda
from flash_cuda import emulate
from reference import assert_fa_rule, attention_ref
from test_kernel_fwd import HEAD_DIMS, make_qkv

# BwdTraits per head dim: (keys per block, query rows per step, warps)
BWD_TILES = {32: (128, 32, 4), 64: (128, 32, 4), 96: (64, 64, 8), 128: (128, 64, 8), 192: (64, 64, 8),
             256: (64, 64, 8)}


def emulated_grads(q, k, v, dout, causal, order="forward", deterministic=False, use_lse=False, seed=0, workers=1,
                   device="a100"):
    """dq, dk, dv and the launch records of one emulated forward + backward."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with emulate(order=order, seed=seed, workers=workers, device=device) as emu:
        out, lse = flash_cuda.attention(*leaves, causal=causal, return_lse=True, deterministic=deterministic)
        loss = (out.float() * dout.float()).sum() + ((lse * 0.1).sum() if use_lse else 0)
        grads = torch.autograd.grad(loss, leaves)
    assert all(r["errors"] == [] for r in emu.launches)
    return grads, emu.launches


def check_grads(q, k, v, dout, grads, causal, use_lse=False):
    def loss_and_grads(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = attention_ref(*leaves, causal=causal, dtype=dtype)
        loss = (out * dout.to(dtype)).sum() + ((lse * 0.1).sum() if use_lse else 0)
        return torch.autograd.grad(loss, leaves)

    ref, plain = loss_and_grads(torch.float64), loss_and_grads(q.dtype)
    for name, g, pg, rg in zip(("dq", "dk", "dv"), grads, plain, ref):
        assert_fa_rule(name, g, pg, rg, 3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_instantiation_in_two_orders(D, dtype, causal):
    q, k, v = make_qkv(1, 2, 1, 113, 150, D, dtype, seed=D)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads, launches = emulated_grads(q, k, v, dout, causal)
    assert [r["kernel"].split("<")[0] for r in launches] == [
        "flash_fwd", "flash_bwd_preprocess", "flash_bwd", "flash_bwd_postprocess"]
    check_grads(q, k, v, dout, grads, causal)
    grads_r, _ = emulated_grads(q, k, v, dout, causal, order="reverse")
    # dk, dv are sums in registers in a fixed order: bitwise equal; dq is summed by atomics,
    # whose order follows the block order, so it is equal up to rounding.
    assert torch.equal(grads[1], grads_r[1]) and torch.equal(grads[2], grads_r[2])
    torch.testing.assert_close(grads[0], grads_r[0], atol=2e-3, rtol=2e-2)


# (77, 203) and (2, 64): Nk - Nq = 62 (mod 64), where an off-by-one in the band's tile classes
# first shows (a mutation audit's such edits were caught by (77, 203) alone)
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (17, 17), (1, 130), (130, 1), (203, 77), (77, 203), (257, 257), (2, 64)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sequence_lengths(Nq, Nk, causal):
    dtype = torch.bfloat16 if (Nq + Nk) % 2 else torch.float16
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, 64, dtype, seed=Nq + 3 * Nk)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads, _ = emulated_grads(q, k, v, dout, causal)
    check_grads(q, k, v, dout, grads, causal)


@pytest.mark.parametrize("Hkv", [1, 2, 3], ids=["mqa", "gqa2", "gqa3"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa_and_mqa(Hkv, deterministic):
    q, k, v = make_qkv(2, 6, Hkv, 70, 90, 40, torch.bfloat16, seed=Hkv)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for causal in (False, True):
        grads, _ = emulated_grads(q, k, v, dout, causal, deterministic=deterministic)
        check_grads(q, k, v, dout, grads, causal)


@pytest.mark.parametrize("D", [8, 59, 96, 160])
def test_gradient_through_lse_and_odd_head_dims(D):
    q, k, v = make_qkv(1, 2, 1, 97, 75, D, torch.float16, seed=D)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).half()
    grads, _ = emulated_grads(q, k, v, dout, causal=True, use_lse=True)
    check_grads(q, k, v, dout, grads, causal=True, use_lse=True)


@pytest.mark.parametrize("D", [64, 256])
def test_deterministic_is_bitwise_repeatable(D):
    q, k, v = make_qkv(2, 4, 2, 150, 190, D, torch.bfloat16, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    runs = [emulated_grads(q, k, v, dout, True, order=o, deterministic=True, seed=s, workers=w)
            for o, s, w in (("forward", 0, 1), ("reverse", 0, 2), ("random", 1, 2), ("random", 2, 2))]
    first, launches = runs[0]
    assert [r["kernel"].split("<")[0] for r in launches][-1] == "flash_bwd_dq"  # no atomics, no postprocess
    for grads, _ in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, grads))
    check_grads(q, k, v, dout, first, causal=True)


@pytest.mark.parametrize("Nq,Nk", [(113, 150), (2, 64), (200, 262)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_deterministic_dq_at_head_dim_128(Nq, Nk, causal):
    """The deterministic dQ pass at head dim 128 against the reference, dense and causal (a
    mutation audit: a lane's second row reading another row's D in the dense kernel, and a key
    tile classified unmasked one key early in the band kernel, showing where Nk - Nq = 62 mod
    64, passed every test, which ran this pass at head dims 40, 64 and 256 only)."""
    dtype = torch.float16 if causal else torch.bfloat16
    q, k, v = make_qkv(1, 2, 1, Nq, Nk, 128, dtype, seed=Nq + Nk)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    grads, launches = emulated_grads(q, k, v, dout, causal, deterministic=True)
    assert launches[-1]["kernel"].startswith("flash_bwd_dq<") and "hdim128" in launches[-1]["kernel"]
    check_grads(q, k, v, dout, grads, causal)


# ---------------------------------------------------------------- counters
def visited_tile_pairs(Nq, Nk, causal, bn, bm):
    """(bn-key tile, bm-query tile) pairs the main kernel visits, per (batch, query head)."""
    pairs = 0
    for n0 in range(0, Nk, bn):
        first_row = max(0, n0 - (Nk - Nq)) if causal else 0
        pairs += max(0, -(-Nq // bm) - first_row // bm)
    return pairs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D,device", [(32, "a100"), (64, "a100"), (128, "a100"), (256, "a100"), (128, "h100")])
def test_counters(D, device, causal):
    """(On an H100 profile at 128: the large configuration's padded tiles, traits.h.)"""
    B, Hq, Hkv, N = 1, 2, 1, 256
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, torch.float16)
    dout = torch.randn(q.shape).half()
    _, launches = emulated_grads(q, k, v, dout, causal, device=device)
    fwd, pre, main, post = launches
    assert main["kernel"].endswith(",227KiB>") == (device == "h100"), main["kernel"]
    bn, bm, warps = BWD_TILES[D]
    pairs = B * Hq * visited_tile_pairs(N, N, causal, bn, bm)
    # Five products per (bn keys x bm queries) pair, each bn * bm * D MACs: 2.5x the forward's
    # two for the same tiles (the forward of one such pair: 2 * bn * bm * D / 2048 mma).
    fwd_mma_same_tiles = pairs * 2 * (bn * bm * D) // (16 * 8 * 16)
    assert main["mma"] * 2 == 5 * fwd_mma_same_tiles
    if not causal:
        assert main["mma"] * 2 == 5 * fwd["mma"]  # same work when nothing is skipped
    assert main["grid"] == [N // bn, Hkv, B] and main["block"] == [32 * warps, 1, 1]
    for rec in launches:
        assert rec["global_sectors"] == rec["global_sectors_ideal"], rec["kernel"]  # coalesced, atomics too
        for kind in ("ldmatrix", "cp_async", "store", "load"):
            s = rec["shared"][kind]
            assert s["wavefronts"] == s["ideal"], (rec["kernel"], kind, s)  # no bank conflicts
    assert main["shared"]["ldmatrix"]["requests"] > 0 and main["shared"]["cp_async"]["requests"] > 0
    # K and V read once per block; Q and dO once per visited pair; dK, dV written once.
    assert main["global_bytes_written"] >= 2 * B * Hkv * N * D * 2
    qdo_bytes = pairs * 2 * bm * D * 2
    kv_bytes = 2 * B * Hkv * N * D * 2
    # lse and D: each lane loads those of its own S^T columns (global memory, as FlashAttention-2
    # does): the 8 row groups of a warp and the 4 warps of a query column block (kSdpWarpsN = 4 in
    # every configuration tested here) request the same bytes, served by one sector per request
    # (global_sectors == ideal, above); the counter sums the lanes' requests. At head dim 256 one
    # copy per step into shared memory (bwd_kernel.h kStatsFromGlobal).
    stats_bytes = pairs * 2 * bm * 4 * (1 if D == 256 else 8 * 4)
    assert main["global_bytes_read"] == qdo_bytes + kv_bytes + stats_bytes + main["global_bytes_written"] - 2 * B * Hkv * N * D * 2
