"""The CUDA forward kernel (csrc/kernels/fwd_kernel.h), run on the CPU by the emulator: every
instantiation against the float64 reference under FlashAttention's tolerance rule, with the
race checker on, in more than one thread order; then the emulator's counters (bank
conflicts, coalescing, bytes moved, mma count) against what the design says."""
import math

import pytest
import torch

import flash_cuda
from flash_cuda import emulate
from reference import assert_fa_rule, attention_ref

HEAD_DIMS = (32, 64, 96, 128, 192, 256)  # the instantiations (csrc/kernels/api.h)
DTYPES = (torch.float16, torch.bfloat16)


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g).to(dtype), torch.randn(B, Hkv, Nk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Nk, D, generator=g).to(dtype))


def emulated(q, k, v, causal, order="forward", scale=None, bottom_right=True):
    """(out, lse, launch record) of the forward kernel in the emulator, race checker on."""
    with emulate(order=order, check=True) as emu:
        if bottom_right:
            out, lse = flash_cuda.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        else:
            out = flash_cuda.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
            lse = None
    (rec,) = emu.launches
    assert rec["errors"] == []
    return out, lse, rec


def check_against_reference(q, k, v, out, lse, causal, scale=None, bottom_right=True):
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal, scale=scale, bottom_right=bottom_right)
    plain_out, plain_lse = attention_ref(q, k, v, causal=causal, scale=scale, bottom_right=bottom_right, dtype=q.dtype)
    assert_fa_rule("out", out, plain_out, ref_out, 2)
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)  # rows without keys: -inf exactly
        assert_fa_rule("lse", lse[finite], plain_lse[finite].float(), ref_lse[finite], 2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_instantiation_in_two_orders(D, dtype, causal):
    q, k, v = make_qkv(1, 2, 2, 113, 203, D, dtype, seed=D)
    out, lse, rec = emulated(q, k, v, causal)
    assert rec["kernel"] == f"flash_fwd<{'fp16' if dtype == torch.float16 else 'bf16'},hdim{D}{',band' if causal else ''}>"
    check_against_reference(q, k, v, out, lse, causal)
    out_r, lse_r, _ = emulated(q, k, v, causal, order="reverse")
    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
# (2, 64) and (200, 262): Nk - Nq = 62 (mod 64), where an off-by-one in the band's tile classes
# (mask.h: which key tiles need no mask) first shows; a mutation audit's such edit passed every
# other shape here
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (17, 17), (113, 113), (203, 203), (1025, 1025), (17, 203), (203, 17),
                                   (1, 1025), (1025, 1), (2, 64), (200, 262)])
def test_sequence_lengths(Nq, Nk, causal):
    dtype = torch.bfloat16 if (Nq + Nk) % 2 else torch.float16
    q, k, v = make_qkv(1, 1, 1, Nq, Nk, 64, dtype, seed=Nq * 7 + Nk)
    out, lse, _ = emulated(q, k, v, causal)
    check_against_reference(q, k, v, out, lse, causal)


@pytest.mark.parametrize("D", [1, 8, 40, 59, 80, 111, 160, 255])
def test_head_dims_between_instantiations(D):
    """Padded inside the kernel by predicated loads; odd D is also the unaligned (scalar) path."""
    q, k, v = make_qkv(2, 2, 1, 97, 75, D, torch.float16, seed=D)
    out, lse, _ = emulated(q, k, v, causal=D % 2 == 1)
    check_against_reference(q, k, v, out, lse, causal=D % 2 == 1)


@pytest.mark.parametrize("Hkv", [1, 2, 3])
def test_gqa_and_mqa(Hkv):
    q, k, v = make_qkv(2, 6, Hkv, 70, 90, 64, torch.bfloat16, seed=Hkv)
    for causal in (False, True):
        out, lse, _ = emulated(q, k, v, causal)
        check_against_reference(q, k, v, out, lse, causal)


def test_strided_layouts():
    """(B, N, H, D) storage seen through a transpose, and a head-dim slice of a wider tensor:
    strides go to the kernel as they are (no copies)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 77, 4, 64, generator=g).half().transpose(1, 2)
    kv = torch.randn(2, 2, 99, 2, 64, generator=g).half()
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    out, lse, rec = emulated(q, k, v, causal=False)
    check_against_reference(q, k, v, out, lse, causal=False)
    assert rec["shared"]["cp_async"]["requests"] > 0  # 16-byte aligned rows: the vector path
    assert out.transpose(1, 2).is_contiguous()  # the output keeps q's (B, N, H, D) memory layout
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with emulate():
        flash_cuda.attention(*leaves).sum().backward()
    assert leaves[0].grad.transpose(1, 2).is_contiguous()


def test_self_overlapping_inputs():
    """Heads as sliding windows over the features (x.unfold(-1, D, 1): q's heads and D both of
    stride 1): at::empty_like ordered the heads innermost in out and dq (stride 2 in D; the
    kernels wrote an aligned copy), where the CPU backend's row stores failed on the same
    layout. out and the gradients get unit stride in D on both now (csrc/empty_like.h); values
    and gradients (summed over the overlaps by autograd) against the float64 reference through
    the same views."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 40, 64 + 1, generator=g).half().requires_grad_()
    kv = torch.randn(1, 2, 50, 64, generator=g).half().requires_grad_()
    view = lambda x_: x_.unfold(-1, 64, 1).transpose(1, 2)  # noqa: E731  (1, 2, 40, 64), strides (2600, 1, 65, 1)
    with emulate(check=True):
        out = flash_cuda.attention(view(x), kv, kv, causal=True)
        assert out.stride(-1) == 1
        dout = torch.randn(out.shape, generator=g).half()
        out.backward(dout)
    refs = {}
    for name, dtype in (("ref", torch.float64), ("plain", torch.float16)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, kv)]
        o = attention_ref(view(leaves[0]), leaves[1], leaves[1], causal=True, dtype=dtype)[0]
        o.backward(dout.to(dtype))
        refs[name] = (o, *(t.grad for t in leaves))
    for i, (what, ours) in enumerate((("out", out), ("dx", x.grad), ("dkv", kv.grad))):
        assert_fa_rule(what, ours, refs["plain"][i], refs["ref"][i], 2 if i == 0 else 3)


def test_top_left_causal_and_rows_without_keys():
    q, k, v = make_qkv(1, 2, 2, 150, 60, 64, torch.float16, seed=9)
    out, lse, _ = emulated(q, k, v, causal=True)  # bottom-right: the first 90 rows see no key
    assert torch.all(out[:, :, :90] == 0) and torch.all(lse[:, :, :90] == -math.inf)
    check_against_reference(q, k, v, out, lse, causal=True)
    out_tl, _, _ = emulated(q, k, v, causal=True, bottom_right=False)
    check_against_reference(q, k, v, out_tl, None, causal=True, bottom_right=False)


@pytest.mark.parametrize("scale", [0.0, -1.5, 0.37, 3.0])
def test_scale(scale):
    q, k, v = make_qkv(1, 1, 1, 65, 130, 32, torch.float16, seed=2)
    out, lse, _ = emulated(q, k, v, causal=True, scale=scale)
    check_against_reference(q, k, v, out, lse, causal=True, scale=scale)


def test_random_order_and_block_parallelism():
    q, k, v = make_qkv(2, 3, 3, 130, 130, 96, torch.bfloat16, seed=4)
    out, lse, _ = emulated(q, k, v, causal=True)
    with emulate(order="random", seed=11, workers=2) as emu:
        out2, lse2 = flash_cuda.attention(q, k, v, causal=True, return_lse=True)
    assert emu.launches[0]["errors"] == []
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


# ---------------------------------------------------------------- counters
def tile_config(D):
    """(kBlockM, kBlockN, threads) of csrc/kernels/traits.h (FwdTraits) for an instantiated head dim."""
    return 128, 64, (128 if D <= 128 else 256)


def key_tiles(Nq, Nk, D, causal):
    """Key tiles each query tile visits (causal: up to the bottom-right diagonal)."""
    bm, bn, _ = tile_config(D)
    tiles = []
    for m0 in range(0, Nq, bm):
        end = min(Nk, min(m0 + bm, Nq) + Nk - Nq) if causal else Nk
        tiles.append(max(0, -(-end // bn)))
    return tiles


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_counters(D, causal):
    B, H, Nq, Nk = 1, 2, 256, 320
    q, k, v = make_qkv(B, H, H, Nq, Nk, D, torch.float16)
    _, _, rec = emulated(q, k, v, causal)
    bm, bn, threads = tile_config(D)
    tiles = key_tiles(Nq, Nk, D, causal)
    # Launch shape: (query tile, head, batch), 4 or 8 warps, Q + K + V tiles of shared memory.
    assert rec["grid"] == [Nq // bm, H, B] and rec["block"] == [threads, 1, 1]
    assert rec["dynamic_smem"] == (bm + 2 * bn) * D * 2
    # Q read and O written exactly once; K and V read once per query tile that needs them
    # (causal: fewer, by the skipped tiles; a partial last tile reads only the real rows).
    kv_rows = sum(min(t * bn, Nk) for t in tiles)
    assert rec["global_bytes_read"] == B * H * (Nq * D * 2 + 2 * kv_rows * D * 2)
    assert rec["global_bytes_written"] == B * H * Nq * (D * 2 + 4)  # O, and lse in fp32
    # mma count = FLOPs of the computed tiles / (2 * 16 * 8 * 16): two GEMMs per tile.
    assert rec["mma"] == B * H * sum(tiles) * 2 * (2 * bm * bn * D) // (2 * 16 * 8 * 16)
    assert rec["barriers"] == B * H * sum(2 * t + 1 for t in tiles)
    # Coalesced: every global request touches the minimal number of 32-byte sectors.
    assert rec["global_sectors"] == rec["global_sectors_ideal"]
    # Conflict-free shared memory: ldmatrix, cp.async, the O staging stores and 128-bit loads.
    for kind in ("ldmatrix", "cp_async", "store", "load"):
        s = rec["shared"][kind]
        assert s["requests"] > 0 and s["wavefronts"] == s["ideal"], (kind, s)
    assert rec["shared"]["ldmatrix"]["wavefronts"] == 4 * rec["shared"]["ldmatrix"]["requests"]

