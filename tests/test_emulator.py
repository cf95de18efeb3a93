"""The SIMT emulator (csrc/emu/): every primitive against ../shared/ptx-oracle, then small
CUDA kernels against torch, then each checker with a planted bug, then the Python surface.

The oracle is vendored in tests/ptx_oracle/ (so the suite runs on any clone); when the
project's ../shared/ptx-oracle is present, the copy must be identical to it.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import flash_cuda
from flash_cuda import emulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_DIR = os.path.join(ROOT, "tests", "ptx_oracle")
SHARED_ORACLE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "ptx-oracle")
ORDERS = ("forward", "reverse", "random")
ops = torch.ops.flash_cuda


def _load_oracle():
    spec = importlib.util.spec_from_file_location("ptx_oracle_layouts", os.path.join(ORACLE_DIR, "layouts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(ORACLE_DIR, "layouts.json")) as f:
        return mod, json.load(f)


oracle, LAYOUTS = _load_oracle()


def run(fn, *args, order="forward", check=True):
    """fn(*args) inside emulate(); returns (result, launch records)."""
    with emulate(order=order, check=check) as emu:
        out = fn(*args)
    return out, emu.launches


# ---------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("oracle_dir", [ORACLE_DIR, SHARED_ORACLE_DIR])
def test_oracle_self_check(oracle_dir):
    if not os.path.isdir(oracle_dir):
        pytest.skip(f"{oracle_dir} is not on this machine")
    res = subprocess.run([sys.executable, "layouts.py", "--check"], cwd=oracle_dir, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failed" in res.stdout


def test_vendored_oracle_matches_shared():
    if not os.path.isdir(SHARED_ORACLE_DIR):
        pytest.skip("../shared/ptx-oracle is not on this machine")
    for name in ("layouts.py", "layouts.json"):
        with open(os.path.join(ORACLE_DIR, name), "rb") as a, open(os.path.join(SHARED_ORACLE_DIR, name), "rb") as b:
            assert a.read() == b.read(), f"tests/ptx_oracle/{name} differs from ../shared/ptx-oracle/{name}"


# ---------------------------------------------------------------- mma.sync m16n8k16
def _bits16(x, bf16):
    return oracle.bf16_bits(x) if bf16 else oracle.f16_bits(x)


def _pack_fragments(matrix, by_lane, bf16):
    """matrix[row][col] -> per-lane 32-bit registers, element i in register i//2 (even i low)."""
    regs = []
    for lane in range(32):
        elems = [_bits16(matrix[r][c], bf16) for r, c in by_lane[lane]]
        regs.append([oracle.pack_x2(elems[i], elems[i + 1]) for i in range(0, len(elems), 2)])
    return torch.tensor(regs, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
@pytest.mark.parametrize("values", ["identity", "coords", "random"])
def test_mma_every_lane_and_register(bf16, values):
    lay = LAYOUTS["mma"]["m16n8k16"]
    g = torch.Generator().manual_seed(0)
    if values == "identity":  # D = B + C: any misplaced element of B or C shows
        A = torch.eye(16)
        B = torch.arange(128, dtype=torch.float32).reshape(16, 8) - 64
    elif values == "coords":  # small integers: every product and sum is exact
        A = (torch.arange(256, dtype=torch.float32).reshape(16, 16) % 7) - 3
        B = (torch.arange(128, dtype=torch.float32).reshape(16, 8) % 5) - 2
    else:
        A = torch.randn(16, 16, generator=g)
        B = torch.randn(16, 8, generator=g)
    dt = torch.bfloat16 if bf16 else torch.float16
    A, B = A.to(dt).float(), B.to(dt).float()  # representable inputs
    C = torch.arange(128, dtype=torch.float32).reshape(16, 8) * 0.25
    a = _pack_fragments(A.tolist(), lay["A"]["by_lane"], bf16)
    b = _pack_fragments(B.tolist(), lay["B"]["by_lane"], bf16)
    c = torch.tensor([[C[r][col] for r, col in lay["C_D"]["by_lane"][lane]] for lane in range(32)])
    d, launches = run(ops._emu_mma_probe, a, b, c, bf16)
    D = torch.empty(16, 8)
    for lane in range(32):
        for i, (r, col) in enumerate(lay["C_D"]["by_lane"][lane]):
            D[r][col] = d[lane][i]
    ref = A.double() @ B.double() + C.double()
    if values == "random":
        torch.testing.assert_close(D.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(D.double(), ref)
    assert launches[0]["mma"] == 1 and launches[0]["errors"] == []


def test_mma_matches_oracle_functional_model():
    """The oracle's own mma_sync on the same fragments gives the same D, lane by lane."""
    g = torch.Generator().manual_seed(1)
    A = torch.randint(-4, 5, (16, 16), generator=g).float().tolist()
    B = torch.randint(-4, 5, (16, 8), generator=g).float().tolist()
    C = torch.randint(-4, 5, (16, 8), generator=g).float().tolist()
    lay = LAYOUTS["mma"]["m16n8k16"]
    a_frag = oracle.mma_scatter("m16n8k16", "A", A)
    b_frag = oracle.mma_scatter("m16n8k16", "B", B)
    c_frag = oracle.mma_scatter("m16n8k16", "C", C)
    expected = oracle.mma_sync("m16n8k16", a_frag, b_frag, c_frag)
    d, _ = run(ops._emu_mma_probe, _pack_fragments(A, lay["A"]["by_lane"], False),
               _pack_fragments(B, lay["B"]["by_lane"], False), torch.tensor(c_frag, dtype=torch.float32), False)
    assert d.tolist() == [[float(x) for x in lane] for lane in expected]


# ---------------------------------------------------------------- ldmatrix
def _ldmatrix(tile, row_offsets, num, trans):
    return run(ops._emu_ldmatrix_probe, tile.to(torch.int16), torch.tensor(row_offsets, dtype=torch.int32), num, trans)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_every_lane_and_register(num, trans):
    """Matrix m, row r, element c holds m*64 + r*8 + c; rows sit 3 rows apart (the rows
    need not be contiguous), so any wrong address or lane mapping shows."""
    pitch = 8 * 3
    tile = torch.zeros(4 * 8 * pitch, dtype=torch.int32)
    for m in range(4):
        for r in range(8):
            for c in range(8):
                tile[(m * 8 + r) * pitch + c] = m * 64 + r * 8 + c
    lanes = LAYOUTS["ldmatrix_m8n8_b16"]["address_lanes"][f"x{num}"]
    offsets = [0] * 32
    for m in range(num):
        for r, lane in enumerate(lanes[f"matrix{m}"]):
            offsets[lane] = (m * 8 + r) * pitch
    out, launches = _ldmatrix(tile, offsets, num, trans)
    by_lane = LAYOUTS["ldmatrix_m8n8_b16"]["trans_by_lane" if trans else "non_trans_by_lane"]
    for lane in range(32):
        for m in range(num):
            reg = int(out[lane][m]) & 0xFFFFFFFF
            for half, (r, c) in enumerate(by_lane[lane]):
                assert (reg >> (16 * half)) & 0xFFFF == m * 64 + r * 8 + c, (lane, m, half)
    assert launches[0]["shared"]["ldmatrix"]["requests"] == 1


@pytest.mark.parametrize("name", ["A_x4", "Bt_x2", "Bt_x4", "Bk_x2_trans", "Bk_x4_trans"])
def test_ldmatrix_compositions_give_mma_fragments(name):
    """The oracle's address patterns turn a tile into mma A/B registers: checked against the
    mma fragment layout, register by register."""
    comp = LAYOUTS["ldmatrix_m8n8_b16"]["compositions_for_mma_m16n8k16"][name]
    rows, cols = comp["tile_rows_cols"]
    value = lambda r, c: r * 16 + c + 1
    tile = torch.tensor([[value(r, c) for c in range(cols)] for r in range(rows)], dtype=torch.int32).flatten()
    offsets = [0 if rc is None else rc[0] * cols + rc[1] for rc in comp["address_of_lane_tile_row_col"]]
    num = int(re.search(r"x(\d)", comp["instruction"]).group(1))
    out, _ = _ldmatrix(tile, offsets, num, ".trans" in comp["instruction"])
    frag = LAYOUTS["mma"]["m16n8k16"]["A" if name == "A_x4" else "B"]["by_lane"]
    for lane in range(32):
        for reg in range(num):
            got = int(out[lane][reg]) & 0xFFFFFFFF
            for half in range(2):
                if name == "A_x4":
                    r, c = frag[lane][2 * reg + half]  # A[m][k] stored [m][k]
                else:
                    k, n = frag[lane][2 * (reg % 2) + half]  # B[k][n]; regs 2,3 are n-tile 1
                    n += 8 * (reg // 2)
                    r, c = (n, k) if name.startswith("Bt") else (k, n)
                assert (got >> (16 * half)) & 0xFFFF == value(r, c), (name, lane, reg, half)


# ---------------------------------------------------------------- shfl.sync
@pytest.mark.parametrize("mode_name,mode", [("up", 0), ("down", 1), ("bfly", 2), ("idx", 3)])
@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_shfl_every_lane_against_oracle_tables(mode_name, mode, width):
    table = LAYOUTS["shfl_sync"]["tables"][f"{mode_name}_width{width}"]["source_lane[b][lane]"]
    values = torch.arange(32, dtype=torch.int32) * 3 + 100
    for b in range(32):
        out, _ = run(ops._emu_shfl_probe, values, mode, b, width, 0xFFFFFFFF, b % 2 == 1)
        for lane in range(32):
            src = table[b][lane]
            v = 100 + 3 * src
            expected = v | (v + 1) << 32 if b % 2 == 1 else v  # odd b: the 64-bit shuffle
            assert int(out[lane]) == expected, (mode_name, width, b, lane)


@pytest.mark.parametrize("mask", [0x0000FFFF, 0xFFFF0000, 0x00FF00FF])
def test_shfl_partial_mask_against_oracle_model(mask):
    """Lanes outside the mask do not take part; inside it, the PTX pseudo-code decides."""
    values = list(range(7, 39))
    for mode_name, mode in (("bfly", 2), ("down", 1), ("idx", 3)):
        b = {2: 1, 1: 2, 3: 5}[mode]
        c = oracle.cuda_shfl_c(mode_name if mode_name != "bfly" else "bfly", 16)
        expected, _ = oracle.ptx_shfl_sync(mode_name, values, b, c, mask)
        if any(e is None for lane, e in enumerate(expected) if mask >> lane & 1):
            continue  # a source lane outside the mask: undefined, reported (test below)
        out, launches = run(ops._emu_shfl_probe, torch.tensor(values, dtype=torch.int32), mode, b, 16, mask, False)
        for lane in range(32):
            assert int(out[lane]) == (expected[lane] if mask >> lane & 1 else values[lane])
        assert launches[0]["errors"] == []


def test_shfl_from_lane_outside_mask_is_reported():
    with pytest.raises(RuntimeError, match="not in the mask"):
        run(ops._emu_shfl_probe, torch.arange(32, dtype=torch.int32), 2, 16, 32, 0x0000FFFF, False)


# ---------------------------------------------------------------- fp16 / bf16 on the host
def test_host_fp16_bf16_round_to_nearest_even():
    """The CUDA headers' host conversions and the supplied __hfma agree with torch's RNE
    conversions, on ties, subnormals, overflow, infinities and random values."""
    g = torch.Generator().manual_seed(0)
    special = [0.0, -0.0, 1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 ** -24, 2 ** -25,
               3 * 2 ** -26, 65504.0, 65520.0, 1e9, -1e9, float("inf"), float("-inf"), 1 / 3, -2.5e-6]
    x = torch.cat([torch.tensor(special), torch.randn(2000, generator=g) * 10 ** torch.randint(-6, 5, (2000,), generator=g)])
    out, _ = run(ops._emu_convert_probe, x)
    bits = lambda t: t.view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(out[:, 0].to(torch.int64), bits(x.half()))
    assert torch.equal(out[:, 1].to(torch.int64), bits(x.bfloat16()))
    packed = out[:, 2].to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(packed & 0xFFFF, bits(x.half()))  # __floats2half2_rn(a, b): a in the low half
    assert torch.equal(packed >> 16, bits(torch.ones_like(x).half()))
    h = x.half().double()
    finite = torch.isfinite(h * h + h)
    assert torch.equal(out[finite, 3].to(torch.int64), bits((h * h + h)[finite].half()))  # one rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pair_math_matches_torch(dtype):
    """unpack2 (two 16-bit values of a register as fp32, exactly) and pack2 of their fp32
    products (rounded once: the backward's dS = P (dP - D) from the rounded P at head dims 64
    and 128) against torch's own 16-bit multiply, on random, tiny, huge and special values."""
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 2 ** -14, 2 ** -24, 3e-5, 1 + 2 ** -7, 1 + 2 ** -10, 60000.0, 300.0,
                            float("inf"), float("-inf")])
    n = 4000
    x = torch.cat([special, torch.randn(n, generator=g) * 10 ** torch.randint(-8, 4, (n,), generator=g)]).to(dtype)
    y = torch.cat([special.flip(0), torch.randn(n, generator=g) * 10 ** torch.randint(-8, 4, (n,), generator=g)]).to(dtype)
    words = lambda lo, hi: ((hi.view(torch.int16).to(torch.int64) & 0xFFFF) << 16 | (lo.view(torch.int16).to(torch.int64) & 0xFFFF))
    half = (x.numel() // 2) * 2
    a_lo, a_hi, b_lo, b_hi = x[:half:2], x[1:half:2], y[:half:2], y[1:half:2]
    a = words(a_lo, a_hi).to(torch.int32)
    b = words(b_lo, b_hi).to(torch.int32)
    out, _ = run(ops._emu_pair_math_probe, a, b, dtype == torch.bfloat16)
    assert torch.equal(out[:, 1].view(torch.float32), a_lo.float()) and torch.equal(out[:, 2].view(torch.float32), a_hi.float())
    prod = out[:, 0].to(torch.int64) & 0xFFFFFFFF
    expect = words(a_lo * b_lo, a_hi * b_hi)  # torch: the exact product rounded once
    nan = torch.isnan(a_lo * b_lo) | torch.isnan(a_hi * b_hi)
    assert not nan.all() and torch.equal(prod[~nan], expect[~nan])


# ---------------------------------------------------------------- cp.async
def test_cp_async_groups_match_oracle_trace():
    trace = LAYOUTS["cp_async"]["example_trace"]["memory"]
    out, launches = run(ops._emu_cp_async_trace, torch.arange(256, dtype=torch.uint8))
    after_wait0 = next(v for k, v in trace.items() if k.startswith("dst[32:48] after wait_group 0"))
    assert out[:8].tolist() == trace["dst[0:8]"]
    assert out[8:24].tolist() == trace["dst[16:32]"]
    assert out[24:40].tolist() == after_wait0
    assert launches[0]["errors"] == []
    assert launches[0]["global_bytes_read"] == 8 + 16 + 5  # src-size bytes only


# ---------------------------------------------------------------- bank model
@pytest.mark.parametrize("name", sorted(LAYOUTS["shared_memory_banks"]["examples"]))
def test_bank_model_examples(name):
    """Wavefronts counted by the emulator equal the oracle's for each worked example."""
    expected = LAYOUTS["shared_memory_banks"]["examples"][name]["wavefronts"]
    if name.startswith("ldmatrix"):
        variant = name[len("ldmatrix_x4_A_"):]
        addr_of = oracle._ldsm_tile_address_variants()[variant]
        byte_addrs = [addr_of(*oracle.ldsm_addr_A_x4(lane)) for lane in range(32)]
        tile = torch.zeros(max(byte_addrs) // 2 + 8, dtype=torch.int32)
        _, launches = _ldmatrix(tile, [a // 2 for a in byte_addrs], 4, False)
        counted = launches[0]["shared"]["ldmatrix"]
    else:
        width = int(re.match(r"lds(\d+)", name).group(1)) // 8
        addrs = {
            "lds32_consecutive": [4 * l for l in range(32)],
            "lds32_stride2words": [8 * l for l in range(32)],
            "lds32_all_same_word": [0] * 32,
            "lds32_stride32words": [128 * l for l in range(32)],
            "lds64_consecutive": [8 * l for l in range(32)],
            "lds128_consecutive": [16 * l for l in range(32)],
            "lds128_row_pitch_128B_one_row_per_lane": [128 * l for l in range(32)],
            "lds128_lane_mod4": [16 * (l % 4) for l in range(32)],
        }[name]
        # the same addresses the oracle used (its _bank_examples), re-derived and cross-checked
        assert oracle.smem_wavefronts(addrs, width)[0] == expected
        with emulate() as emu:
            ops._emu_shared_load_probe(torch.tensor(addrs, dtype=torch.int32), width, max(addrs) + 16)
        counted = emu.launches[0]["shared"]["load"]
    assert counted["requests"] == 1
    assert counted["wavefronts"] == expected


# ---------------------------------------------------------------- kernels vs torch
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(64, 64, 64), (100, 70, 72), (1, 130, 8), (129, 1, 200)])
def test_gemm_matches_torch_in_every_order(dtype, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype)
    ref = a.double() @ b.double().T
    results = []
    for order in ORDERS:
        c, launches = run(ops._emu_gemm, a, b, True, order=order)
        assert launches[0]["errors"] == []
        torch.testing.assert_close(c.double(), ref, atol=1e-4 * K ** 0.5, rtol=1e-4)
        results.append(c)
    assert all(torch.equal(results[0], r) for r in results[1:])  # thread order does not matter


def test_gemm_counters():
    M, N, K = 128, 192, 128
    a, b = torch.randn(M, K).half(), torch.randn(N, K).half()
    _, (swz,) = run(ops._emu_gemm, a, b, True)
    _, (plain,) = run(ops._emu_gemm, a, b, False)
    blocks, k_tiles = (M // 64) * (N // 64), K // 64
    # 4 warps x 4 k-steps x 8 n-tiles per k tile: one mma per 16x8x16 product
    assert swz["mma"] == M * N * K // (16 * 8 * 16) == blocks * k_tiles * 4 * 4 * 8
    assert swz["barriers"] == blocks * 2 * k_tiles
    assert swz["global_bytes_read"] == blocks * k_tiles * 2 * 64 * 64 * 2
    assert swz["global_bytes_written"] == M * N * 4
    assert swz["global_sectors"] == swz["global_sectors_ideal"]  # 16-byte loads, float2 stores
    lds, cpa = swz["shared"]["ldmatrix"], swz["shared"]["cp_async"]
    assert lds["wavefronts"] == lds["ideal"] == 4 * lds["requests"]  # swizzled: conflict-free
    assert cpa["wavefronts"] == cpa["ideal"] == 4 * cpa["requests"]
    # unswizzled 128-byte rows: the 8 rows of an ldmatrix phase share banks, 8-way conflicts
    assert plain["shared"]["ldmatrix"]["wavefronts"] == 8 * plain["shared"]["ldmatrix"]["ideal"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [1, 255, 256, 100_000])
def test_block_reduce(order, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    s, launches = run(ops._emu_block_reduce, x, order=order)
    torch.testing.assert_close(s.double(), x.double().sum().reshape(1), atol=1e-4 * n ** 0.5, rtol=1e-5)
    assert launches[0]["errors"] == [] and launches[0]["barriers"] == launches[0]["grid"][0]


# ---------------------------------------------------------------- checkers
BUGS = {
    # which access of a racing pair comes second depends on the thread order, so either may be reported
    "race_read": r"shared-memory race: thread \(\d+,0,0\) of block \(0,0,0\) at selftest_kernels\.cpp:\d+ "
                 r"(reads a byte written|writes a byte read), with no __syncthreads between, by thread \(\d+,0,0\)",
    "race_write": r"shared-memory race: .* (writes a byte read|reads a byte written), with no __syncthreads between",
    "uninitialised": r"uninitialised shared memory: thread \(\d+,0,0\) of block \(0,0,0\) at selftest_kernels\.cpp:\d+ "
                     r"reads shared memory that nothing in this block has written",
    "oob_global": r"out-of-bounds global read of 4 bytes .* at selftest_kernels\.cpp:\d+",
    "oob_shared": r"out-of-bounds shared write of 4 bytes at offset \d+ \(dynamic shared memory is 528 bytes\)",
    "missing_wait": r"accesses a cp\.async destination before the wait that completes it",
    "wait_group_uncommitted": r"accesses a cp\.async destination before the wait that completes it",
    "divergent_shfl": r"deadlock: warp collective at selftest_kernels\.cpp:\d+ \(mask 0xffffffff\) is never reached "
                      r"by lane\(s\) 16 \(exited\)",
    "divergent_syncthreads": r"deadlock: __syncthreads at selftest_kernels\.cpp:\d+ is never reached by 64 thread\(s\) "
                             r"that exited",
    "ldmatrix_misaligned": r"ldmatrix at selftest_kernels\.cpp:\d+: row address of lane \d+ is not 16-byte aligned",
    "ldmatrix_unordered": r"shared-memory race: thread \(\d+,0,0\) of block \(0,0,0\) at selftest_kernels\.cpp:\d+ "
                          r"reads a byte written, with no __syncthreads between, by thread \(\d+,0,0\)",
    # two blocks: the race between them in global memory (any order of the blocks)
    "global_race": r"global-memory race: byte \d+ of tensor 0 of the launch is written by block \([01],0,0\) and by "
                   r"thread \(\d+,0,0\) of block \([01],0,0\) at selftest_kernels\.cpp:\d+ without an atomic on both "
                   r"sides",
    "global_mixed": r"global-memory race: byte \d+ of tensor 0 .* block \([01],0,0\)( \(atomically\))? and by thread "
                    r"\(\d+,0,0\) of block \([01],0,0\)( \(atomically\))? at selftest_kernels\.cpp:\d+",
    # before 2026-12-06 let through: the fp32 backward's head-dim halves both stored dbias
    "global_same_value": r"global-memory race: byte \d+ of tensor 0 of the launch is written by block \([01],0,0\) and "
                         r"by thread \(\d+,0,0\) of block \([01],0,0\) at selftest_kernels\.cpp:\d+",
}


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_checker_reports_planted_bug(bug, order):
    buf = torch.zeros(256)
    with pytest.raises(RuntimeError, match=BUGS[bug]):
        with emulate(order=order):
            ops._emu_planted_bug(bug, buf)


@pytest.mark.parametrize("order", ORDERS)
def test_ldmatrix_after_syncwarp_does_not_race(order):
    """The twin of ldmatrix_unordered: lanes' stores, __syncwarp, then ldmatrix rows made of other
    lanes' words is ordered (only __syncwarp orders a warp's shared-memory accesses; before
    2026-12-06 every collective did, and the backward preprocess's __syncwarp could be deleted
    unnoticed: mutation audit). Lane l's fragment is row l / 4's words, b16 pair l % 4."""
    buf = torch.zeros(256)
    with emulate(order=order) as emu:
        ops._emu_planted_bug("ldmatrix_ordered", buf)
    assert emu.launches[0]["errors"] == []
    want = torch.tensor([float(4 * (l // 4) + l % 4) for l in range(32)]).view(torch.int32)
    assert torch.equal(buf[:32].view(torch.int32), want)


@pytest.mark.parametrize("order", ORDERS)
def test_blocks_adding_atomically_do_not_race(order):
    """The twin of global_race: two blocks add into the same words with atomics, which the race
    checker accepts (the backward's dQ accumulator; a mutant with plain adds there passed every
    test before the checker tracked global writes: audit)."""
    buf = torch.zeros(256)
    with emulate(order=order, workers=1) as emu:
        ops._emu_planted_bug("global_atomics", buf)
    assert emu.launches[0]["errors"] == [] and emu.launches[0]["grid"] == [2, 1, 1]
    assert torch.equal(buf[:128], torch.full((128,), 2.0)) and not buf[128:].any()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("twin", ["none", "warp_ordered", "wait_all_uncommitted"])
def test_checker_passes_correct_twin(twin, order):
    buf = torch.arange(256, dtype=torch.float32)
    with emulate(order=order) as emu:
        ops._emu_planted_bug(twin, buf)
    assert emu.launches[0]["errors"] == []
    if twin == "warp_ordered":
        lanes = torch.arange(128)
        assert torch.equal(buf[:128], ((lanes & ~31) | ((lanes % 32 + 1) % 32)).float())
    else:
        assert torch.equal(buf[:128], ((torch.arange(128) + 1) % 128).float())


def test_check_false_skips_race_checking_but_not_bounds():
    with emulate(check=False) as emu:
        ops._emu_planted_bug("race_read", torch.zeros(256))
    assert emu.launches[0]["errors"] == []
    with pytest.raises(RuntimeError, match="out-of-bounds global read"):
        with emulate(check=False):
            ops._emu_planted_bug("oob_global", torch.zeros(256))


def test_failed_launch_is_recorded_with_its_errors():
    with pytest.raises(RuntimeError):
        with emulate() as emu:
            ops._emu_planted_bug("race_read", torch.zeros(256))
    (rec,) = emu.launches
    assert rec["kernel"] == "planted_bug" and any("shared-memory race" in e for e in rec["errors"])


# ---------------------------------------------------------------- Python surface
def test_emulate_records_launches():
    with emulate(order="random", seed=3) as emu:
        ops._emu_block_reduce(torch.ones(1000))
        assert len(emu.launches) == 1  # readable inside the context too
        ops._emu_gemm(torch.ones(64, 64).half(), torch.ones(64, 64).half(), True)
    names = [r["kernel"] for r in emu.launches]
    assert names == ["block_reduce", "gemm"]
    rec = emu.launches[1]
    assert rec["grid"] == [1, 1, 1] and rec["block"] == [128, 1, 1] and rec["threads_per_block"] == 128
    assert rec["dynamic_smem"] == 4 * 64 * 64 * 2
    for key in ("global_bytes_read", "global_bytes_written", "global_requests", "global_sectors",
                "global_sectors_ideal", "mma", "barriers", "shared", "errors"):
        assert key in rec


def test_emulate_arguments():
    with pytest.raises(ValueError, match="order must be one of"):
        emulate(order="sideways")
    with pytest.raises(TypeError, match="check must be a bool"):
        emulate(check=1)
    with pytest.raises(ValueError, match=r"workers must be an int in \[1, 4096\]"):
        emulate(workers=0)
    with emulate():
        with pytest.raises(RuntimeError, match="do not nest"):
            with emulate():
                pass
    assert flash_cuda.emulate is emulate


def test_contexts_do_not_nest_across_threads():
    """emulate() is process-wide. Two threads entering at once both got in (201 of 300 trials, an
    audit), and the first to leave turned emulation off under the other, whose calls then ran the
    CPU backend unchecked. Now one enters, the other gets the error, and leaving restores no
    emulation; the one inside runs its call emulated."""
    import threading
    q = torch.randn(1, 1, 16, 32).half()
    for _ in range(40):
        start = threading.Barrier(2)
        entered, refused, launches = [], [], []

        def body():
            ctx = emulate(check=False, workers=1)
            start.wait()
            try:
                with ctx:
                    entered.append(ctx)
                    flash_cuda.attention(q, q, q)
                    launches.append(len(ctx.launches))
            except RuntimeError as e:
                assert "do not nest" in str(e), e
                refused.append(e)

        threads = [threading.Thread(target=body) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(entered) + len(refused) == 2 and len(entered) >= 1
        assert all(n >= 1 for n in launches), "a call inside a context ran unemulated"
        assert emulate._current is None


# ---------------------------------------------------------------- mma.m16n8k8: f16/bf16 (sm_75's shape) and tf32
def _mma_k8(A, B, C, type_, a_by_lane, b_by_lane, a_regs):
    """One emulated m16n8k8 of A (16x8), B (8x8), C (16x8) given per-lane operand registers."""
    lay_c = LAYOUTS["mma"]["m16n8k16"]["C_D"]["by_lane"]
    c = torch.tensor([[C[r][col] for r, col in lay_c[lane]] for lane in range(32)], dtype=torch.float32)
    a, b = a_regs(A, a_by_lane), a_regs(B, b_by_lane)
    a = torch.nn.functional.pad(a, (0, 4 - a.shape[1]))
    b = torch.nn.functional.pad(b, (0, 2 - b.shape[1]))
    d, launches = run(ops._emu_mma_k8_probe, a, b, c, type_)
    D = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        for i, (r, col) in enumerate(lay_c[lane]):
            D[r][col] = float(d[lane][i])
    return D, launches


def _check_mma_k8(values, type_, representable, a_by_lane, b_by_lane, a_regs):
    """A (16x8) and B (8x8) of one kind of values, made representable in the operand type, through
    one emulated m16n8k8 against A B + C: exact for small integers and the identity (D = B + C
    on the first 8 rows: a misplaced element of B or C shows), within fp32 rounding for random."""
    g = torch.Generator().manual_seed(0)
    if values == "identity":
        A, B = torch.eye(16, 8), torch.arange(64, dtype=torch.float32).reshape(8, 8) - 32
    elif values == "coords":
        A = (torch.arange(128, dtype=torch.float32).reshape(16, 8) % 7) - 3
        B = (torch.arange(64, dtype=torch.float32).reshape(8, 8) % 5) - 2
    else:
        A, B = torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g)
    A, B = representable(A), representable(B)
    C = torch.arange(128, dtype=torch.float32).reshape(16, 8) * 0.25
    D, launches = _mma_k8(A.tolist(), B.tolist(), C.tolist(), type_, a_by_lane, b_by_lane, a_regs)
    ref = A.double() @ B.double() + C.double()
    if values == "random":
        torch.testing.assert_close(D, ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(D, ref)
    assert launches[0]["mma"] == 1 and launches[0]["errors"] == []


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
@pytest.mark.parametrize("values", ["identity", "coords", "random"])
def test_mma_k8_every_lane_and_register(bf16, values):
    """m16n8k8 .f16/.bf16 against the oracle's fragment tables (PTX ISA 9.7.14.5.7)."""
    lay = LAYOUTS["mma"]["m16n8k8"]
    assert lay["A"]["elements_per_lane"] == 4 and lay["B"]["elements_per_lane"] == 2
    dt = torch.bfloat16 if bf16 else torch.float16
    _check_mma_k8(values, "bf16" if bf16 else "f16", lambda M: M.to(dt).float(), lay["A"]["by_lane"],
                  lay["B"]["by_lane"], lambda M, by_lane: _pack_fragments(M, by_lane, bf16))


def _cute_layout(shape, stride, rows):
    """A CuTe thread-value layout ((4, 8), (2, 2)) : strides, evaluated as CuTe does (thread index
    t = t0 + 4 t1, value index v = v0 + 2 v1, colexicographic), to (row, col) of an M-major
    codomain m + rows k: by_lane[lane][v]."""
    (t0n, t1n), vshape = shape
    (s0, s1), vstride = stride
    vshape = vshape if isinstance(vshape, tuple) else (vshape,)
    vstride = vstride if isinstance(vstride, tuple) else (vstride,)
    nv = 1
    for n in vshape:
        nv *= n
    out = []
    for lane in range(t0n * t1n):
        t0, t1 = lane % t0n, lane // t0n
        row = []
        for v in range(nv):
            idx, rem = t0 * s0 + t1 * s1, v
            for n, s in zip(vshape, vstride):
                idx += (rem % n) * s
                rem //= n
            row.append((idx % rows, idx // rows))
        out.append(row)
    return out


# m16n8k8 .tf32 fragments, two independent transcriptions: the PTX ISA's tables (9.7.14.5.7:
# a0, a2 in row groupID, a1, a3 in groupID + 8; a0, a1 in column threadID_in_group, a2, a3 in
# + 4; b0 in row threadID_in_group, b1 in + 4, column groupID) and CuTe's
# MMA_Traits<SM80_16x8x8_F32TF32TF32F32_TN> (ALayout ((4,8),(2,2)):((16,1),(8,64)) over
# m + 16 k; BLayout ((4,8),2):((8,1),32) over n + 8 k).
TF32_A_PTX = [[(l // 4 + 8 * (i % 2), l % 4 + 4 * (i // 2)) for i in range(4)] for l in range(32)]
TF32_B_PTX = [[(l % 4 + 4 * i, l // 4) for i in range(2)] for l in range(32)]


def test_tf32_fragment_tables_agree():
    assert TF32_A_PTX == _cute_layout(((4, 8), (2, 2)), ((16, 1), (8, 64)), 16)
    cute_b = _cute_layout(((4, 8), 2), ((8, 1), 32), 8)  # (n, k) pairs over n + 8 k
    assert TF32_B_PTX == [[(k, n) for n, k in lane] for lane in cute_b]
    for table, (rows, cols) in ((TF32_A_PTX, (16, 8)), (TF32_B_PTX, (8, 8))):  # each element exactly once
        assert sorted(rc for lane in table for rc in lane) == [(r, c) for r in range(rows) for c in range(cols)]


def _tf32_regs(M, by_lane):
    bits = lambda x: int(torch.tensor([x], dtype=torch.float32).view(torch.int32))
    return torch.tensor([[bits(M[r][c]) for r, c in lane] for lane in by_lane], dtype=torch.int32)


def _round_tf32(x):
    """Independent of the emulator: the nearest value with 11 significant bits (10 stored), ties
    away from zero, at fp32's exponent range (subnormal spacing 2^-136)."""
    import math
    if x == 0 or not math.isfinite(x):
        return x
    _, e = math.frexp(x)
    unit = max(2.0 ** (e - 11), 2.0 ** -136)
    q = abs(x) / unit
    return math.copysign(math.floor(q + 0.5) * unit, x)


@pytest.mark.parametrize("values", ["identity", "coords", "random"])
def test_mma_k8_tf32_every_lane_and_register(values):
    """tf32 values (products of 11-bit significands are exact in fp32) in the PTX ISA's
    fragments."""
    tf32 = lambda M: torch.tensor([[_round_tf32(x) for x in r] for r in M.tolist()])
    _check_mma_k8(values, "tf32", tf32, TF32_A_PTX, TF32_B_PTX, _tf32_regs)


def test_mma_tf32_operand_that_is_not_tf32_is_an_error():
    """What the tensor cores do with an fp32 operand's low 13 bits is not specified: the kernels
    must round with cvt.rna.tf32.f32 first, and the emulator says where they did not."""
    A = [[1.0 + 2 ** -20 if (r, c) == (3, 5) else 0.0 for c in range(8)] for r in range(16)]
    B = [[1.0] * 8 for _ in range(8)]
    C = [[0.0] * 8 for _ in range(16)]
    with pytest.raises(RuntimeError, match=r"mma.sync .tf32 at .*an operand is not a tf32 value"):
        _mma_k8(A, B, C, "tf32", TF32_A_PTX, TF32_B_PTX, _tf32_regs)


def test_cvt_rna_tf32():
    import math
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(2000, generator=g) * torch.exp2(torch.randint(-140, 120, (2000,), generator=g).float())
    ties = [1.0 + 2 ** -11, -(1.0 + 3 * 2 ** -11), 1.0 + 2 ** -11 + 2 ** -23, 3 * 2 ** -137, 2 ** -149]
    special = [0.0, -0.0, float("inf"), float("-inf"), 3.4028235e38, 1.1754943e-38, 1e-45]
    x = torch.cat([xs, torch.tensor(ties + special)]).to(torch.float32)
    out, launches = run(ops._emu_tf32_probe, x)
    got = out.view(torch.float32).tolist()
    for xi, gi in zip(x.tolist(), got):
        expect = _round_tf32(xi)
        if abs(expect) > 3.4028235e38:  # rounds past the largest float: infinity
            expect = math.copysign(float("inf"), xi)
        assert gi == expect or (math.isnan(gi) and math.isnan(expect)), (xi, gi, expect)
    assert ((out & 0x1FFF) == 0).all()  # tf32 in a 32-bit register: the low 13 bits clear
    nan = run(ops._emu_tf32_probe, torch.tensor([float("nan")]))[0].view(torch.float32)
    assert torch.isnan(nan).all()


def test_launches_of_an_exited_context_are_its_own():
    """Reading .launches of a context that has exited, while another is active, gives its own
    launches and leaves the active one's records to it (it took them before)."""
    q = torch.randn(1, 1, 8, 16, dtype=torch.float16)
    with flash_cuda.emulate() as a:
        flash_cuda.attention(q, q, q)
    with flash_cuda.emulate() as b:
        flash_cuda.attention(q, q, q)
        assert len(a.launches) == 1
    assert len(b.launches) == 1
