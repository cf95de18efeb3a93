"""The PTX executor (csrc/emu/ptx_parse.cpp, ptx_exec.cpp): the PTX nvcc emitted for the shipped
sm_80 build, run thread by thread on the CPU through the emulator's runtime.

Layers: single instructions in hand-written PTX against hand-computed values (ftz, NaN and inf,
shifts past the width, signed division, cvt rounding and saturation, predication, divergence
before a collective, undefined registers); then every instantiation of the build, forward and
backward, against the float64 reference under FlashAttention's rule in two thread orders with
the race checker on, and against the source executor; the feature kernels (dropout,
deterministic dQ, packed batches, the KV cache); bad input; and planted bugs that only the
PTX executor can see: an mma with swapped operands, a cp.async wait without its "memory"
clobber compiled by nvcc, and a 32-bit batch offset in the dense kernels only nvcc compiles."""
import collections
import os
import re
import struct
import subprocess

import pytest
import torch

import flash_cuda
from conftest import find_nvcc
from flash_cuda import emulate
from reference import assert_fa_rule, attention_ref, max_err
from test_kernel_fwd import HEAD_DIMS, make_qkv
from test_masks_kernels import check as check_features, features

KERNELS = flash_cuda.ptx_kernels()
needs_ptx = pytest.mark.skipif(not KERNELS, reason="this build packaged no PTX (built without an sm_80 pass)")


# ---- single instructions ------------------------------------------------------------------------

def module(body, regs=""):
    """A PTX module of one kernel `t` taking the address of a buffer, as %rd1 (global)."""
    return f""".version 8.0
.target sm_80
.address_size 64

.visible .entry t(.param .u64 t_param_0)
{{
  .reg .pred %p<8>;
  .reg .b16 %h<8>;
  .reg .b32 %r<40>;
  .reg .f32 %f<40>;
  .reg .b64 %rd<8>;
{regs}
  ld.param.u64 %rd0, [t_param_0];
  cvta.to.global.u64 %rd1, %rd0;
{body}
  ret;
}}
"""


def run(body, buf, threads=1, blocks=1, smem=0, regs=""):
    torch.ops.flash_cuda._emu_ptx_run(module(body, regs), "t", buf, threads, blocks, smem)
    return buf


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def words(*xs):
    """An int32 buffer: floats by their bits, ints as they are."""
    return torch.tensor([f32_bits(x) if isinstance(x, float) else x for x in xs], dtype=torch.int64).to(torch.int32)


def as_f32(buf):
    return buf.view(torch.float32)


def load_f(n, at=0):
    return "\n".join(f"  ld.global.f32 %f{i}, [%rd1+{4 * (at + i)}];" for i in range(n))


def load_r(n, at=0):
    return "\n".join(f"  ld.global.u32 %r{i}, [%rd1+{4 * (at + i)}];" for i in range(n))


def test_ftz_flushes_subnormal_inputs_and_results():
    sub = 1e-40  # subnormal in fp32
    buf = run(load_f(2) + """
  add.ftz.f32 %f10, %f0, 0f00000000;
  add.f32 %f11, %f0, 0f00000000;
  mul.ftz.f32 %f12, %f1, %f1;
  mul.rn.f32 %f13, %f1, %f1;
  st.global.f32 [%rd1+8], %f10;
  st.global.f32 [%rd1+12], %f11;
  st.global.f32 [%rd1+16], %f12;
  st.global.f32 [%rd1+20], %f13;""", words(sub, 1e-20, 0, 0, 0, 0))
    got = as_f32(buf)
    assert got[2].item() == 0.0 and got[3].item() == torch.tensor(sub).item()  # flushed / kept
    assert got[4].item() == 0.0 and got[5].item() == (torch.tensor(1e-20) * torch.tensor(1e-20)).item() != 0


def test_nan_and_inf_through_max_min_and_ex2():
    nan, inf = float("nan"), float("inf")
    buf = run(load_f(4) + """
  max.f32 %f10, %f0, %f1;
  min.f32 %f11, %f1, %f0;
  max.f32 %f12, %f0, %f0;
  ex2.approx.ftz.f32 %f13, %f2;
  neg.f32 %f20, %f2;
  ex2.approx.ftz.f32 %f14, %f20;
  ex2.approx.ftz.f32 %f15, %f0;
  ex2.approx.ftz.f32 %f16, %f3;
  ex2.approx.ftz.f32 %f17, 0fC2FE0000;
  ex2.approx.f32 %f18, 0fC2FE0000;
  ex2.approx.ftz.f32 %f19, 0f3F800000;""" + "".join(
        f"\n  st.global.f32 [%rd1+{4 * (4 + i)}], %f{10 + i};" for i in range(10)),
        words(nan, 1.5, inf, -0.0, *[0] * 10))
    got = as_f32(buf)[4:].tolist()
    assert got[0] == 1.5 and got[1] == 1.5  # max/min: the non-NaN operand (PTX ISA, max)
    assert got[2] != got[2]  # both NaN: NaN
    assert got[3] == inf and got[4] == 0.0 and got[5] != got[5]  # ex2(+inf), ex2(-inf), ex2(NaN)
    assert got[6] == 1.0  # ex2(-0)
    assert got[7] == 0.0 and got[8] == 2.0 ** -127  # 2^-127 is subnormal: .ftz flushes it
    assert got[9] == 2.0


def test_copysign_takes_the_first_operands_sign():
    """copysign.f32 d, a, b: b's magnitude with a's sign (PTX ISA, copysign; libdevice's tanhf
    ends with one, which the fp32 kernels' softcap calls)."""
    inf = float("inf")
    buf = run(load_f(4) + """
  copysign.f32 %f10, %f0, %f1;
  copysign.f32 %f11, %f1, %f0;
  copysign.f32 %f12, %f2, %f3;
  copysign.f32 %f13, %f3, %f2;""" + "".join(
        f"\n  st.global.f32 [%rd1+{4 * (4 + i)}], %f{10 + i};" for i in range(4)),
        words(-2.5, 0.75, -0.0, inf, *[0] * 4))
    got = as_f32(buf)[4:].tolist()
    assert got[0] == -0.75 and got[1] == 2.5  # sign of the first, magnitude of the second
    assert got[2] == -inf and got[3] == 0.0 and str(got[3]) == "0.0"  # -0's sign; +inf's sign on 0


def test_shifts_of_the_width_or_more_clamp():
    """PTX ISA, shl/shr: shift amounts greater than the register width are clamped to it."""
    buf = run(load_r(2) + """
  shl.b32 %r10, %r0, 32;
  shl.b32 %r11, %r0, 40;
  shr.u32 %r12, %r1, 33;
  shr.s32 %r13, %r1, 40;
  shr.s32 %r14, %r1, 4;
  shl.b32 %r15, %r0, 31;""" + "".join(
        f"\n  st.global.u32 [%rd1+{4 * (2 + i)}], %r{10 + i};" for i in range(6)), words(3, -256, *[7] * 6))
    assert buf[2:].tolist() == [0, 0, 0, -1, -16, -2 ** 31]


def test_signed_division_and_remainder():
    buf = run(load_r(4) + """
  div.s32 %r10, %r0, %r1;
  rem.s32 %r11, %r0, %r1;
  div.u32 %r12, %r0, %r1;
  div.s32 %r13, %r2, %r3;
  rem.s32 %r14, %r2, %r3;""" + "".join(
        f"\n  st.global.u32 [%rd1+{4 * (4 + i)}], %r{10 + i};" for i in range(5)),
        words(-7, 2, -2 ** 31, -1, *[0] * 5))
    # truncation toward zero; -7 as unsigned is 4294967289; INT_MIN / -1 wraps (no trap)
    assert buf[4:].tolist() == [-3, -1, (2 ** 32 - 7) // 2, -2 ** 31, 0]
    with pytest.raises(RuntimeError, match="division by zero"):
        run(load_r(2) + "\n  div.s32 %r10, %r0, %r1;\n  st.global.u32 [%rd1+8], %r10;", words(5, 0, 0))


def test_cvt_rounding_ties_and_saturation():
    tie_even, tie_odd = f32_bits(1 + 2 ** -8), f32_bits(1 + 3 * 2 ** -8)  # halfway between bf16 neighbours
    buf = run(load_f(8) + """
  cvt.rn.bf16x2.f32 %r20, %f0, %f1;
  cvt.rni.s32.f32 %r21, %f2;
  cvt.rni.s32.f32 %r22, %f3;
  cvt.rni.s32.f32 %r23, %f4;
  cvt.rni.s32.f32 %r24, %f5;
  cvt.rzi.s32.f32 %r25, %f6;
  cvt.rni.s32.f32 %r26, %f7;
  cvt.rn.f16.f32 %h1, %f2;
  cvt.u32.u16 %r27, %h1;""" + "".join(
        f"\n  st.global.u32 [%rd1+{4 * (8 + i)}], %r{20 + i};" for i in range(8)),
        words(tie_even, tie_odd, 2.5, -2.5, 3e9, float("nan"), -2.7, -3e9, *[0] * 8))
    got = [x & 0xFFFFFFFF for x in buf[8:].tolist()]
    # a goes to the upper half (PTX ISA, cvt with two sources); ties round to the even mantissa
    assert got[0] == (0x3F80 << 16 | 0x3F82)
    assert [torch.tensor(x).to(torch.int32).item() for x in got[1:7]] == [2, -2, 2 ** 31 - 1, 0, -2, -2 ** 31]
    assert got[7] == 0x4100  # 2.5 in fp16


def test_saturating_integer_add_and_sub():
    """add.sat.s32 / sub.sat.s32 clamp to the int32 range (they wrapped: the flag was ignored)."""
    buf = run(load_r(2) + """
  add.sat.s32 %r10, %r0, 1;
  sub.sat.s32 %r11, %r1, 1;
  add.sat.s32 %r12, %r0, %r1;
  add.s32 %r13, %r0, 1;""" + "".join(
        f"\n  st.global.u32 [%rd1+{4 * (2 + i)}], %r{10 + i};" for i in range(4)), words(2 ** 31 - 1, -2 ** 31, 0, 0, 0, 0))
    assert buf[2:].tolist() == [2 ** 31 - 1, -2 ** 31, -1, -2 ** 31]


def test_misaligned_loads_and_stores_fault():
    """PTX ISA, ld/st: an address aligned to the access's (whole vector's) size, else the GPU faults;
    the executor read and wrote them (audit). Global, shared and vector accesses."""
    buf = torch.zeros(16, dtype=torch.int32)
    run("  ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1+16];\n  st.global.v2.u32 [%rd1+8], {%r1, %r2};", buf.clone())
    for body, smem in (("  ld.global.u32 %r1, [%rd1+1];", 0),
                       ("  ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1+4];", 0),
                       ("  ld.global.u64 %rd2, [%rd1+4];", 0),
                       ("  st.global.v2.u32 [%rd1+4], {%r0, %r0};", 0),
                       ("  mov.u32 %r0, 0;\n  st.shared.u32 [2], %r0;", 16)):
        with pytest.raises(RuntimeError, match=r"misaligned address: a \d+-byte access"):
            run(body if "mov" in body else "  mov.u32 %r0, 0;\n" + body, buf.clone(), smem=smem)


def test_modifiers_and_operands_the_executor_does_not_compute_fail_at_load():
    """A modifier the executor does not compute for an opcode and type was dropped silently
    (max.relu.s32 kept negatives, .ftz on integers passed); a vector list shorter than .v4 took
    the next registers' places; an immediate past 64 bits became -1; vote, activemask, constant
    memory, integer atomics and named barriers parsed and failed only when reached (audit)."""
    for body in ("max.relu.s32 %r1, %r2, %r3;", "add.ftz.s32 %r1, %r2, %r3;", "mul.approx.lo.u32 %r1, %r2, %r3;",
                 "and.sat.b32 %r1, %r2, %r3;", "add.sat.u32 %r1, %r2, %r3;", "shl.clamp.b32 %r1, %r2, 3;",
                 "add.wide.s32 %rd2, %r2, %r3;", "add.f16x2.sat %r1, %r2, %r3;", "max.relu.f32 %f1, %f2, %f3;",
                 "add.v2.u32 %r1, %r2, %r3;", "cvt.rn.sat.f32.s32 %f1, %r2;", "fma.rn.ftz.f16x2 %r1, %r2, %r3, %r4;"):
        with pytest.raises(ValueError, match=r"unsupported modifier \.(relu|ftz|approx|sat|clamp|wide|v2) of"):
            torch.ops.flash_cuda._emu_ptx_check(module("  " + body), "t")
    for body, what in (("ld.global.v4.u32 {%r1, %r2}, [%rd1];", "list of 4 registers"),
                       ("st.global.v2.u32 [%rd1], {%r1, %r2, %r3};", "list of 2 registers"),
                       ("ld.global.u32 {%r1, %r2}, [%rd1];", "one register"),
                       ("mov.u32 %r1, 123456789012345678901234567890;", "out of the 64-bit range"),
                       ("vote.sync.ballot.b32 %r1, %p1, -1;", "vote is not supported"),
                       ("activemask.b32 %r1;", "activemask is not supported"),
                       ("ld.const.u32 %r1, [%rd1];", "constant memory is not supported"),
                       ("atom.global.add.u32 %r1, [%rd1], 1;", "only atom/red .add.f32"),
                       ("bar.sync 1;", "only bar.sync 0"), ("bar.sync 0, 64;", "only bar.sync 0")):
        with pytest.raises(ValueError, match=what):
            torch.ops.flash_cuda._emu_ptx_check(module("  " + body), "t")


def test_endless_loops_end_with_an_error():
    """A loop that never ends (a self-branch; one thread spinning while the others wait at a
    barrier) hung the process, deaf to Ctrl-C (audit): past FLASH_CUDA_PTX_STEP_LIMIT
    instructions in a thread, or 1/256 of it in barrier rounds of a block, it is an error naming
    the line, reported once for the grid. In a child process, with a low bound (the default is
    2^27); a kernel within it runs."""
    loop = module("LOOP:\n  add.u32 %r1, %r1, 1;\n  bra.uni LOOP;")
    spin = module("  mov.u32 %r1, %tid.x;\n  setp.ne.u32 %p1, %r1, 0;\n  @%p1 bra DONE;\nSPIN:\n  bra.uni SPIN;\n"
                  "DONE:\n  bar.sync 0;")
    # every thread looping around a barrier: each round switches all of them, so the per-thread
    # bound took about 10 minutes a block (128 threads), and every block of the grid ran to it (an
    # audit); the rounds are bounded too (by 1/256 of it), and the launch stops at the first error
    barrier_loop = module("SPIN:\n  bar.sync 0;\n  bra.uni SPIN;")
    short = module("  mov.u32 %r1, 7;\n  st.global.u32 [%rd1], %r1;")
    script = f"""
import torch, flash_cuda
buf = torch.zeros(4, dtype=torch.int32)
torch.ops.flash_cuda._emu_ptx_run({short!r}, "t", buf, 64, 1, 0)  # (one block: two would race on buf[0])
assert buf[0].item() == 7
for text, threads, blocks, error in (({loop!r}, 1, 1, "issued more than 100000 instructions in one thread"),
                                    ({spin!r}, 64, 4, "issued more than 100000 instructions in one thread"),
                                    ({barrier_loop!r}, 128, 8, "released more than 390 times")):
    try:
        torch.ops.flash_cuda._emu_ptx_run(text, "t", buf, threads, blocks, 0)
    except RuntimeError as e:
        assert str(e).count(error) == 1, e
    else:
        raise AssertionError("no error")
print("ok")
"""
    env = dict(os.environ, FLASH_CUDA_PTX_STEP_LIMIT="100000")
    done = subprocess.run(["python3", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    # a bound that is no positive integer is an error, not no bound ("-1" read as 2^64 - 1: review)
    bad = f"import torch, flash_cuda\ntorch.ops.flash_cuda._emu_ptx_run({short!r}, 't', torch.zeros(4, dtype=torch.int32), 1, 1, 0)"
    done = subprocess.run(["python3", "-c", bad], env=dict(env, FLASH_CUDA_PTX_STEP_LIMIT="-1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "FLASH_CUDA_PTX_STEP_LIMIT must be a positive integer" in done.stderr
    # read where the launch starts, in the caller's thread: the source executor's barrier rounds
    # read it in a worker thread, and a bad value there ended the process (std::terminate; review)
    bad = ("import torch, flash_cuda\nq = torch.randn(1, 4, 16, 32).half()\n"
           "with flash_cuda.emulate(workers=2):\n    flash_cuda.attention(q, q, q)")
    done = subprocess.run(["python3", "-c", bad], env=dict(env, FLASH_CUDA_PTX_STEP_LIMIT="abc"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "FLASH_CUDA_PTX_STEP_LIMIT must be a positive integer" in done.stderr, \
        (done.returncode, done.stderr[-2000:])


def test_launch_sizes_past_cudas_limits_are_refused():
    """Grids and blocks past CUDA's limits were truncated to 32 bits or sized a host allocation."""
    text = module("  ret;")
    buf = torch.zeros(1, dtype=torch.int32)
    for threads, blocks in ((0, 1), (1025, 1), (1, 0), (1, 2 ** 31), (1, 2 ** 32 + 1)):
        with pytest.raises(ValueError, match=r"(grid|block): each size in \[1, \d+\]"):
            torch.ops.flash_cuda._emu_ptx_run(text, "t", buf, threads, blocks, 0)
    params = torch.zeros(8, dtype=torch.uint8)
    for grid, block in (([1, 65536, 1], [1, 1, 1]), ([1, 1, 1], [32, 32, 2]), ([1, 1, 1], [1, 1, 65])):
        with pytest.raises(ValueError, match=r"(grid: each size|block: at most 1024 threads|block: each size)"):
            torch.ops.flash_cuda._emu_ptx_launch(text, "t", [buf], params, grid, block, 0)


def test_predicated_off_instructions_have_no_effect():
    buf = run(load_r(1) + """
  setp.eq.u32 %p1, %r0, 0;
  @%p1 st.global.u32 [%rd1+4], 7;
  @!%p1 st.global.u32 [%rd1+8], 9;
  @%p1 bra SKIP;
  st.global.u32 [%rd1+12], 11;
SKIP:
  ld.global.u32 %r1, [%rd1+4];""", words(1, 5, 6, 0))
    assert buf.tolist() == [1, 5, 9, 11]


BRANCHY = """
  mov.u32 %r0, %tid.x;
  setp.lt.u32 %p1, %r0, 16;
  @%p1 bra LOW;
  add.u32 %r1, %r0, 100;
  bra.uni JOIN;
LOW:
  shl.b32 %r1, %r0, 1;
JOIN:
"""


def test_divergent_branches_reconverge_before_a_shuffle():
    buf = run(BRANCHY + """
  shfl.sync.bfly.b32 %r2, %r1, 16, 31, -1;
  mul.wide.u32 %rd2, %r0, 4;
  add.s64 %rd3, %rd1, %rd2;
  st.global.u32 [%rd3], %r2;""", torch.zeros(32, dtype=torch.int32), threads=32)
    x = [2 * l if l < 16 else l + 100 for l in range(32)]
    assert buf.tolist() == [x[l ^ 16] for l in range(32)]


def test_collective_member_mask_must_match_the_lanes_that_reach_it():
    # half the warp skips a full-mask shuffle: its lanes never arrive
    with pytest.raises(RuntimeError, match="mask|never|deadlock"):
        run(BRANCHY + """
  @%p1 bra END;
  shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
END:""", torch.zeros(32, dtype=torch.int32), threads=32)
    # every lane reaches a shuffle whose mask names only the lower half
    with pytest.raises(RuntimeError, match="not in its mask"):
        run("  mov.u32 %r1, %tid.x;\n  shfl.sync.bfly.b32 %r2, %r1, 1, 31, 65535;",
            torch.zeros(32, dtype=torch.int32), threads=32)


def test_undefined_registers():
    """A register nothing wrote may feed arithmetic whose result is unused (nvcc's if-conversion
    does that); reaching memory it is an error naming the register."""
    buf = run("  add.u32 %r5, %r30, 1;\n  st.global.u32 [%rd1], 3;", torch.zeros(1, dtype=torch.int32))
    assert buf.tolist() == [3]
    with pytest.raises(RuntimeError, match=r"%r30"):
        run("  add.u32 %r5, %r30, 1;\n  st.global.u32 [%rd1], %r5;", torch.zeros(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"%r31"):
        run("  mul.wide.u32 %rd2, %r31, 4;\n  add.s64 %rd3, %rd1, %rd2;\n  st.global.u32 [%rd3], 1;",
            torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_rows_and_bounds(trans):
    """ldmatrix.x4 (PTX ISA, ldmatrix): lane l gives row l % 8 of matrix l // 8; each lane gets, of
    matrix m, row l // 4's 16-bit pair 2 (l % 4), 2 (l % 4) + 1 (.trans: that pair of column l // 4).
    Row addresses outside shared memory are reported at the address the kernel computed, for the
    lanes whose address is used (x1: lanes 0-7) only."""
    src = torch.randint(0, 1 << 16, (256,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    buf = torch.cat([src.to(torch.int16).view(torch.int32), torch.zeros(128, dtype=torch.int32)])
    op = "ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "") + ".shared.b16"
    body = f"""  mov.u32 %r1, %tid.x;
  mul.lo.u32 %r2, %r1, 16;
  cvt.u64.u32 %rd2, %r2;
  add.s64 %rd3, %rd1, %rd2;
  ld.global.v4.u32 {{%r4, %r5, %r6, %r7}}, [%rd3];
  st.shared.v4.u32 [%r2], {{%r4, %r5, %r6, %r7}};
  bar.sync 0;
  {op} {{%r8, %r9, %r10, %r11}}, [%r2];
  st.global.v4.u32 [%rd3+512], {{%r8, %r9, %r10, %r11}};"""
    out = run(body, buf, threads=32, smem=512)[128:].view(torch.int16).to(torch.int32) & 0xFFFF
    el = (src & 0xFFFF).reshape(4, 8, 8)  # (matrix, row, column)
    lane = torch.arange(32)
    for m in range(4):
        for h in range(2):
            want = el[m, lane // 4, 2 * (lane % 4) + h] if not trans else el[m, 2 * (lane % 4) + h, lane // 4]
            assert torch.equal(out.reshape(32, 4, 2)[:, m, h], want), (m, h)
    bad = """  mov.u32 %r1, %tid.x;
  mad.lo.u32 %r2, %r1, 16, 496;
  ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r4}, [%r2];
  st.global.u32 [%rd1], %r4;"""
    with pytest.raises(RuntimeError) as e:
        run(bad, torch.zeros(1, dtype=torch.int32), threads=32, smem=512)
    reported = [int(x) for x in re.findall(r"out-of-bounds shared read of 16 bytes at shared address (\d+)", str(e.value))]
    assert sorted(reported) == list(range(512, 624, 16)), str(e.value)


def test_unwritten_local_memory():
    """The .local frame as registers: a load of bytes no store wrote (a GPU's frame holds what an
    earlier kernel left there) gives an undefined value, an error where it reaches memory, naming
    the first unwritten byte; loaded and unused, or written first, it is none."""
    depot = "  .local .align 8 .b8 __depot[16];"
    spill = "  mov.u64 %rd2, __depot;\n  st.local.u32 [%rd2], 7;\n"
    buf = run(spill + "  ld.local.u32 %r1, [%rd2];\n  ld.local.u32 %r2, [%rd2+8];\n  st.global.u32 [%rd1], %r1;",
              torch.zeros(1, dtype=torch.int32), regs=depot)
    assert buf.tolist() == [7]
    # a vector load: each element by its own bytes (%r1's written, %r2's not)
    buf = run(spill + "  ld.local.v2.u32 {%r1, %r2}, [%rd2];\n  st.global.u32 [%rd1], %r1;",
              torch.zeros(1, dtype=torch.int32), regs=depot)
    assert buf.tolist() == [7]
    for body, offset, through in (
            ("  ld.local.u32 %r1, [%rd2+12];\n  st.global.u32 [%rd1], %r1;", 12, "%r1"),
            ("  ld.local.v2.u32 {%r1, %r2}, [%rd2];\n  st.global.u32 [%rd1], %r2;", 4, "%r2"),
            ("  ld.local.u32 %r1, [%rd2+6];\n", None, None),  # misaligned: a fault, before any value
            ("  ld.local.u32 %r1, [__depot+8];\n  add.u32 %r3, %r1, 1;\n  st.global.u32 [%rd1], %r3;", 8, "%r3")):
        if offset is None:
            with pytest.raises(RuntimeError, match="misaligned address"):
                run(spill + body, torch.zeros(1, dtype=torch.int32), regs=depot)
            continue
        want = rf"the stored value or the address depends on the \.local frame's bytes at offset {offset}, which no store wrote"
        with pytest.raises(RuntimeError, match=want + rf" \(through {through}\)"):
            run(spill + body, torch.zeros(1, dtype=torch.int32), regs=depot)


def test_unknown_opcode_and_bad_text_fail_at_load_naming_the_line():
    text = module("  frobnicate.u32 %r1, %r2;")
    line = text.splitlines().index("  frobnicate.u32 %r1, %r2;") + 1
    with pytest.raises(ValueError, match=rf"frobnicate.*|.*:{line}:"):
        torch.ops.flash_cuda._emu_ptx_check(text, "t")
    with pytest.raises(ValueError, match=str(line)):
        torch.ops.flash_cuda._emu_ptx_check(text, "t")
    with pytest.raises(ValueError):
        torch.ops.flash_cuda._emu_ptx_check(module("  add.u32 %r1, %r2"), "t")  # no ';'
    with pytest.raises(ValueError):
        torch.ops.flash_cuda._emu_ptx_check(module("  add.u32 %r1, %nope, 1;"), "t")  # undeclared register
    # a register count past any kernel's (or past long's range) is refused at once: it looped,
    # declaring registers until memory ran out
    for count in ("99999999999999999999", "2000000", "131073", "-3", "12x"):
        with pytest.raises(ValueError, match=r"register count must be an integer in \[0, 131072\]"):
            torch.ops.flash_cuda._emu_ptx_check(module("", regs=f"  .reg .b32 %q<{count}>;"), "t")
    # likewise a thread's local frame past 512 KiB (it was allocated per thread at run time)
    for align, size in (("4", "99999999999999999999"), ("4", "200000000000"), ("4", "524289"), ("0", "16")):
        with pytest.raises(ValueError, match=r"PTX line \d+: \.local needs an alignment in \[1, 4096\]"):
            torch.ops.flash_cuda._emu_ptx_check(module("", regs=f"  .local .align {align} .b8 __depot[{size}];"), "t")
    # the bounds are the kernel's, over all its declarations: each one under them passed, and 14
    # of them would take this machine's memory (an audit)
    with pytest.raises(ValueError, match=r"the kernel declares more than 131072 registers in all"):
        torch.ops.flash_cuda._emu_ptx_check(module("", regs="  .reg .b32 %q<70000>;\n  .reg .b32 %s<70000>;"), "t")
    with pytest.raises(ValueError, match=r"the kernel declares more than 131072 registers in all"):
        torch.ops.flash_cuda._emu_ptx_check(module("", regs="  .reg .b32 %q<130900>;\n  .reg .b32 " +
                                                   ", ".join(f"%s{i}" for i in range(200)) + ";"), "t")
    with pytest.raises(ValueError, match=r"the kernel's \.local declarations take more than 524288 bytes in all"):
        torch.ops.flash_cuda._emu_ptx_check(
            module("", regs="  .local .align 4 .b8 a[300000];\n  .local .align 4 .b8 b[300000];"), "t")
    torch.ops.flash_cuda._emu_ptx_check(
        module("", regs="  .local .align 4 .b8 a[262144];\n  .local .align 4 .b8 b[262144];"), "t")  # 512 KiB


# ---- every instantiation -------------------------------------------------------------------------

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# the variant kernels: plain, band (causal and sliding windows), mod (softcap, ALiBi, a bias)
VARIANT_ARGS = {"plain": None, "band": "band", "mod": "mod"}


def fwd_bwd(q, k, v, kw, dout, executor, order="forward", **emu_kw):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    with emulate(order=order, check=True, executor=executor, **emu_kw) as emu:
        out, lse = flash_cuda.attention(*leaves, return_lse=True, **kw)
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), wrt)
    assert all(r["errors"] == [] for r in emu.launches), [r["errors"] for r in emu.launches]
    return out, lse, grads, emu.launches


def assert_agree(ptx, source, grads=False):
    """The PTX executor's result against the source executor's: within an output ulp (the
    softmax's row sums differ by nvcc's contraction, see test_forward_differences_are_nvccs_
    contraction), gradients within what that changes."""
    tol = 2e-3 if grads else 2 * torch.finfo(source.dtype).eps
    assert max_err(ptx, source.double()) <= tol * source.abs().max().item() + 1e-6


@needs_ptx
@pytest.mark.parametrize("variant", list(VARIANT_ARGS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_instantiation_against_the_reference_and_the_source_executor(D, dtype, variant):
    B, Hq, Nq, Nk = 1, 2, 37, 83
    q, k, v = make_qkv(B, Hq, 1, Nq, Nk, D, DTYPES[dtype], seed=D)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    kw = features(VARIANT_ARGS[variant], B, Hq, Nq, Nk) if VARIANT_ARGS[variant] else {}
    if dtype == "fp32":
        kw.pop("attn_mask", None)  # (the bias gradient of fp32 is test_fp32_kernels.py's)
    out, lse, grads, launches = fwd_bwd(q, k, v, kw, dout, "ptx")
    assert {r["executor"] for r in launches} == {"ptx"} and all(r["entry"] in KERNELS for r in launches)
    suffix = {"plain": ">", "band": ",band>", "mod": ",mod>"}[variant]
    assert {r["kernel"].split("<")[0] for r in launches} >= {"flash_fwd", "flash_bwd"}
    assert all(r["kernel"].endswith(suffix) for r in launches if r["kernel"].startswith(("flash_fwd<", "flash_bwd<")))
    assert all(r["instructions"]["tensor"] == 32 * r["mma"] for r in launches)
    if dtype == "fp32":
        import test_fp32_kernels
        test_fp32_kernels.check(q, k, v, kw, out, lse, "3xtf32")
    else:
        check_features(q, k, v, kw, dout, out, lse, grads)
    # the other thread order: the same output; dK, dV bitwise (sums in registers), dQ by atomics
    out_r, lse_r, grads_r, _ = fwd_bwd(q, k, v, kw, dout, "ptx", order="reverse")
    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)
    assert torch.equal(grads[1], grads_r[1]) and torch.equal(grads[2], grads_r[2])
    # the source executor: the same launches and mma counts, the same output up to nvcc's
    # contraction of the softmax's row_sum * alpha + p into one fma (see
    # test_forward_differences_are_nvccs_contraction): an fp32 ulp or so in the row sums, which
    # may flip an output's last bit, and what that changes in the gradients
    s_out, s_lse, s_grads, s_launches = fwd_bwd(q, k, v, kw, dout, "source")
    assert [(r["kernel"], r["grid"], r["mma"], r["barriers"]) for r in s_launches] == \
           [(r["kernel"], r["grid"], r["mma"], r["barriers"]) for r in launches]
    assert max_err(lse, s_lse.double()) <= 4 * 2 ** -24 * s_lse.abs().max().item()
    # the PTX's shared-memory accesses conflict-free wherever the source's are (nvcc made the
    # backward preprocess's 16-byte staging store of O four 32-bit stores until 2026-12-06: four
    # store wavefronts for one, seen by these counters alone); the counts of requests may differ
    # (nvcc's code motion)
    for r, s_r in zip(launches, s_launches):
        for kind in ("store", "load", "ldmatrix", "cp_async"):
            if s_r["shared"][kind]["wavefronts"] == s_r["shared"][kind]["ideal"]:
                assert r["shared"][kind]["wavefronts"] == r["shared"][kind]["ideal"], (r["kernel"], kind, r["shared"])
    assert_agree(out, s_out)
    for g, s_g in zip(grads, s_grads):
        assert_agree(g, s_g, grads=True)


FMA = re.compile(r"fma\.rn\.ftz\.f32\s+(%f\d+),\s*(\S+),\s*(\S+),\s*(\S+);")


def without_contraction(text):
    """The PTX with every fma that is not the source's fmaf(score, c, -max) (the one multiplier
    c they share) split into mul.rn + add.rn: what the host compiler computes for
    row_sum * alpha + p, which nvcc (--use_fast_math implies --fmad=true) contracts."""
    ops = FMA.findall(text)
    c = collections.Counter(o[2] for o in ops).most_common(1)[0][0]
    split = lambda m: m.group(0) if m.group(3) == c else (
        f"mul.rn.ftz.f32 %ftmp, {m.group(2)}, {m.group(3)};\n\tadd.rn.ftz.f32 {m.group(1)}, %ftmp, {m.group(4)};")
    return FMA.sub(split, text).replace(".reg .pred", ".reg .f32 %ftmp;\n\t.reg .pred", 1), sum(o[2] != c for o in ops)


@needs_ptx
@pytest.mark.parametrize("D,dtype,kw", [(128, torch.bfloat16, dict(window=(37, 5))), (64, torch.float32, {}),
                                        (128, torch.float32, dict(causal=True))], ids=["bf16_window", "fp32", "fp32_causal"])
def test_forward_differences_are_nvccs_contraction(D, dtype, kw):
    """The forward's differences between the executors (an lse off by an ulp, fp32 outputs off
    by a few) all come from nvcc's fma contraction: split those fma and the PTX executor's
    output and lse equal the source executor's bit for bit."""
    q, k, v = make_qkv(1, 2, 1, 37, 83, D, dtype, seed=D)
    with emulate(executor="source"):
        s_out, s_lse = flash_cuda.attention(q, k, v, return_lse=True, **kw)
    with emulate(executor="ptx") as emu:
        out, lse = flash_cuda.attention(q, k, v, return_lse=True, **kw)
    assert not (torch.equal(out, s_out) and torch.equal(lse, s_lse))
    entry = emu.launches[0]["entry"]
    text, n = without_contraction(KERNELS[entry])
    assert n == 8  # row_sum * alpha + p: 2 rows, in the masked and the unmasked loop, both copies
    with emulate(executor="ptx", ptx={entry: text}):
        u_out, u_lse = flash_cuda.attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(u_out, s_out) and torch.equal(u_lse, s_lse)


# Every packaged forward/backward entry: dense batches (as a GPU runs them: the kVarlen = false
# kernels, which the source executor never runs) and packed ones, atomic and deterministic dQ,
# on an A100, on a 99 KiB card (the compact instantiations) and at head dim 128 on an H100 (the
# large ones, 16-bit), each call against the float64
# reference and the source executor.
# "dropout": the band variant's kernels with dropout's code (csrc/kernels/dropout.h), against the
# source executor alone (the reference has no mask; test_dropout.py checks them against it)
VARIANT_KW = {"plain": {}, "band": dict(causal=True, window=(40, -1)), "mod": dict(window=(30, 9), softcap=4.0),
              "dropout": dict(causal=True, window=(40, -1), dropout_p=0.3)}
TRAITS_DTYPE = {"fp16": "6__half", "bf16": "13__nv_bfloat16", "fp32": "f"}


def packed_call(q, k, v, lens_q, lens_k, kw, deterministic):
    cq = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    return flash_cuda.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), deterministic=deterministic, **kw)


def coverage_call(dtype, D, variant, packed, deterministic, device, executor):
    """(out, grads, launch records) of one forward + backward; packed: two sequences."""
    g = torch.Generator().manual_seed(D)
    kw = VARIANT_KW[variant]
    if "dropout_p" in kw:  # the same mask under both executors
        kw = dict(kw, generator=torch.Generator().manual_seed(D + 1))
    if packed:
        lens_q, lens_k = [19, 30], [41, 25]
        q, k, v = (torch.randn(sum(lens), 2, D, generator=g).to(dtype).requires_grad_()
                   for lens in (lens_q, lens_k, lens_k))
    else:
        q, k, v = (torch.randn(1, 2, n, D, generator=g).to(dtype).requires_grad_() for n in (30, 45, 45))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    with emulate(check=True, device=device, executor=executor) as emu:
        out = packed_call(q, k, v, lens_q, lens_k, kw, deterministic) if packed else \
            flash_cuda.attention(q, k, v, deterministic=deterministic, **kw)
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v))
    assert all(r["errors"] == [] for r in emu.launches), [r["errors"] for r in emu.launches]
    if "dropout_p" in kw:
        return out, grads, emu.launches
    if packed:  # the reference per sequence
        refs, plains = [], []
        for b in range(2):
            sq, sk = slice(sum(lens_q[:b]), sum(lens_q[:b + 1])), slice(sum(lens_k[:b]), sum(lens_k[:b + 1]))
            qb, kb, vb = (x.detach()[s].transpose(0, 1)[None] for x, s in ((q, sq), (k, sk), (v, sk)))
            refs.append(attention_ref(qb, kb, vb, **kw)[0][0].transpose(0, 1))
            plains.append(attention_ref(qb, kb, vb, dtype=dtype, **kw)[0][0].transpose(0, 1))
        ref, plain = torch.cat(refs), torch.cat(plains)
    else:
        ref, plain = attention_ref(q.detach(), k.detach(), v.detach(), **kw)[0], \
            attention_ref(q.detach(), k.detach(), v.detach(), dtype=dtype, **kw)[0]
    if dtype == torch.float32:  # 3xTF32: within a few times fp32 attention's error
        assert max_err(out, ref) <= 4 * max_err(plain, ref) + 1e-6
    else:
        assert_fa_rule("out", out, plain, ref, 2)
    return out, grads, emu.launches


@needs_ptx
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_packaged_kernel_runs(dtype):
    launched = set()
    for D in HEAD_DIMS:
        for variant in VARIANT_KW:
            # (l4: the compact kernels; h100: the large ones, 16-bit at 128)
            for device in ("a100", "l4") + (("h100",) if D == 128 and dtype != "fp32" else ()) if D >= 96 else ("a100",):
                for packed in (False, True):
                    for deterministic in (False, True) if dtype != "fp32" else (True,):
                        args = (DTYPES[dtype], D, variant, packed, deterministic, device)
                        out, grads, launches = coverage_call(*args, "ptx")
                        s_out, s_grads, s_launches = coverage_call(*args, "source")
                        assert [r["kernel"] for r in launches] == [r["kernel"] for r in s_launches]
                        assert_agree(out, s_out)
                        for a, b in zip(grads, s_grads):
                            assert_agree(a, b, grads=True)
                        launched |= {r["entry"] for r in launches}
    families = ("flash_fwd_kernel", "flash_bwd_kernel", "flash_bwd_dq_kernel", "flash_bwd_preprocess_kernel",
                "flash_bwd_postprocess_kernel")
    wanted = {e for e in KERNELS if any(f"{len(f)}{f}I" in e for f in families)
              and f"TraitsI{TRAITS_DTYPE[dtype]}Li" in e
              and not e.endswith("ELb1ELb1ELb0ELb1ELb1EEEvNS_9FwdParamsE")  # (the KV-cache forward: test_kvcache_kernels)
              and "ELi64EE" not in e}  # (the Turing instantiations: a T4 runs their sm_75 code, never this PTX)
    assert wanted and wanted <= launched, sorted(wanted - launched)[:5]


# ---- feature kernels ------------------------------------------------------------------------------

@needs_ptx
def test_dropout_deterministic_and_99kib_kernels_agree_with_the_source_executor():
    q, k, v = make_qkv(1, 2, 1, 45, 70, 64, torch.bfloat16, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.dtype)
    for kw, emu_kw in ((dict(dropout_p=0.3, causal=True), {}),
                       (dict(causal=True, deterministic=True), {}),
                       (dict(softcap=20.0, window=(30, 4)), dict(device="l4")),
                       (dict(causal=True), dict(device="h100"))):
        torch.manual_seed(0)
        out, lse, grads, launches = fwd_bwd(q, k, v, kw, dout, "ptx", **emu_kw)
        torch.manual_seed(0)
        s_out, s_lse, s_grads, s_launches = fwd_bwd(q, k, v, kw, dout, "source", **emu_kw)
        assert [r["kernel"] for r in launches] == [r["kernel"] for r in s_launches]
        assert_agree(out, s_out)
        for g, s_g in zip(grads, s_grads):
            assert_agree(g, s_g, grads=True)
        if kw.get("deterministic"):
            assert "flash_bwd_dq" in {r["kernel"].split("<")[0] for r in launches}
            _, _, grads_r, _ = fwd_bwd(q, k, v, kw, dout, "ptx", order="reverse", **emu_kw)
            assert all(torch.equal(a, b) for a, b in zip(grads, grads_r))  # bitwise in any order


def param_bytes(text, values):
    """The .param space of a module's one entry, filled from values in declaration order: an
    int, or a tensor (its address), or bytes for a .b8 array."""
    decls = re.findall(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\w+(?:\[(\d+)\])?", text)
    out = bytearray()
    for (align, kind, count), value in zip(decls, values, strict=True):
        size = int(count) if count else int(kind[1:]) // 8
        align = int(align) if align else size
        out += bytes(-len(out) % align)
        if isinstance(value, torch.Tensor):
            value = value.data_ptr()
        out += value if isinstance(value, bytes) else (value % 2 ** (8 * size)).to_bytes(size, "little")
    return torch.frombuffer(bytearray(out), dtype=torch.uint8)


def cuda_only_kernel(name):
    (entry,) = [e for e in KERNELS if name in e]
    return entry, KERNELS[entry]


@needs_ptx
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_dropout_mask_kernel(packed):
    """The CUDA build's keep-mask kernel (behind return_dropout_mask on a GPU; its PTX keeps a
    16-byte local frame), which the emulator's launcher does not launch: run from its PTX with
    the op's arguments, it writes the CPU backend's mask bit for bit."""
    entry, text = cuda_only_kernel("dropout_mask_kernel")
    B, H, nq, nk, p = 2, 3, 19, 37, 0.3
    state = torch.tensor([0x1234_5678_9ABC, 64], dtype=torch.int64)
    cu_q, cu_k = (torch.tensor([0, 11, 30], dtype=torch.int32), torch.tensor([0, 37, 50], dtype=torch.int32)) \
        if packed else (None, None)
    expected = torch.ops.flash_cuda.dropout_mask(state, p, B, H, nq, nk, cu_q, cu_k)
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    total, threshold = out.numel(), int(p * 2 ** 32)
    params = param_bytes(text, [out, state, threshold, H, nq, nk, total, cu_q if packed else 0, cu_k if packed else 0])
    buffers = [out, state] + ([cu_q, cu_k] if packed else [])
    torch.ops.flash_cuda._emu_ptx_launch(text, entry, buffers, params, [(total + 255) // 256, 1, 1], [256, 1, 1], 0)
    assert torch.equal(out, expected)
    assert 0.6 < out.float().mean().item() < 0.8 if not packed else not out[0, :, 11:].any()


@needs_ptx
def test_philox_state_kernel():
    """The CUDA build's (seed, offset) kernel: by value, and through the pointers a CUDA graph
    capture passes (offset + the intra-graph increment)."""
    entry, text = cuda_only_kernel("philox_state_kernel")
    out, seed, offset = torch.zeros(2, dtype=torch.int64), torch.tensor([77]), torch.tensor([1000])
    pack = lambda *xs: b"".join((x.data_ptr() if isinstance(x, torch.Tensor) else x).to_bytes(8, "little") for x in xs)
    for source, want in ((pack(5, 96, 0, 0, 0), [5, 96]), (pack(0, 0, seed, offset, 32), [77, 1032])):
        torch.ops.flash_cuda._emu_ptx_launch(text, entry, [out, seed, offset], param_bytes(text, [out, source]),
                                             [1, 1, 1], [1, 1, 1], 0)
        assert out.tolist() == want


@needs_ptx
def test_packed_batches_agree_with_the_source_executor():
    D, lens = 64, [5, 70, 33]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lens), 2, D, generator=g).to(torch.float16) for _ in range(3))
    outs = []
    for executor in ("ptx", "source"):
        with emulate(executor=executor) as emu:
            outs.append(flash_cuda.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True))
        assert all(r["errors"] == [] for r in emu.launches)
    assert_agree(*outs)


@needs_ptx
@pytest.mark.parametrize("dtype,D,deterministic,order", [(torch.float16, 64, False, "forward"),
                                                         (torch.bfloat16, 128, True, "reverse")])
def test_one_key_rows_get_exact_gradients(dtype, D, deterministic, order):
    """Nk = 1: the preprocess's D sums as the dP product does (bwd_preprocess.h row_dots), so the
    compiled kernels give dQ = dK = 0 exactly, as plain torch does (test_devices.py has the
    source executor's cases)."""
    q, k, v = make_qkv(1, 2, 1, 37, 1, D, dtype, seed=5)
    leaves = [(x * 4).detach().requires_grad_() for x in (q, k, v)]
    dout = torch.randn(1, 2, 37, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    with emulate(executor="ptx", check=True, order=order) as emu:
        out = flash_cuda.attention(*leaves, scale=1.0, deterministic=deterministic)
        dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    assert all(r["errors"] == [] for r in emu.launches)
    assert any(r["kernel"].startswith("flash_bwd_dq") for r in emu.launches) == deterministic
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
    ls = [x.detach().double().requires_grad_() for x in leaves]
    ref_dv = torch.autograd.grad(attention_ref(*ls, scale=1.0)[0], ls[2], dout.double())[0]
    plain = [x.detach().requires_grad_() for x in leaves]
    plain_dv = torch.autograd.grad(attention_ref(*plain, scale=1.0, dtype=dtype)[0], plain[2], dout)[0]
    assert_fa_rule("dv", dv, plain_dv, ref_dv, 3)


@needs_ptx
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_kernels_with_leftpad(paged):
    """cache_leftpad (each sequence's keys from its pad): the shipped PTX against the source
    executor and the float64 reference, split-KV, causal."""
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N, bs, D = 2, 4, 2, 96, 16, 64
    q = torch.randn(B, Hq, 3, D, generator=g).half()
    kn, vn = (torch.randn(B, Hkv, 1, D, generator=g).half() for _ in range(2))
    if paged:
        kc0, vc0 = (torch.randn(B * N // bs, Hkv, bs, D, generator=g).half() for _ in range(2))
        table = torch.randperm(B * N // bs, generator=g).to(torch.int32).view(B, N // bs)
    else:
        kc0, vc0 = (torch.randn(B, Hkv, N, D, generator=g).half() for _ in range(2))
        table = None
    lens, pad = torch.tensor([50, 90], dtype=torch.int32), torch.tensor([13, 70], dtype=torch.int32)
    results = []
    for executor in ("ptx", "source"):
        kc, vc = kc0.clone(), vc0.clone()
        with emulate(executor=executor) as emu:
            out = flash_cuda.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table,
                                                    cache_leftpad=pad, causal=True, num_splits=2)
        assert all(r["errors"] == [] for r in emu.launches)
        results.append((out, kc, vc))
    assert_agree(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
    out, kc, vc = results[0]
    for b in range(B):
        n, p = int(lens[b]) + 1, int(pad[b])
        keys, vals = ((torch.cat([x[i] for i in table[b]], dim=1) if paged else x[b])[:, p:n][None] for x in (kc, vc))
        ref, _ = attention_ref(q[b:b + 1], keys, vals, causal=True)
        plain, _ = attention_ref(q[b:b + 1], keys, vals, causal=True, dtype=torch.float16)
        assert_fa_rule("out", out[b:b + 1], plain, ref, 2)


@needs_ptx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_kvcache_kernels(D, dtype):
    """Contiguous and paged caches, split-KV with its combine kernel and the in-place append."""
    g = torch.Generator().manual_seed(D)
    B, Hq, Hkv, N, bs = 2, 4, 2, 96, 16
    q = torch.randn(B, Hq, 3, D, generator=g).to(dtype)
    kn, vn = (torch.randn(B, Hkv, 2, D, generator=g).to(dtype) for _ in range(2))
    pool_k, pool_v = (torch.randn(B * N // bs, Hkv, bs, D, generator=g).to(dtype) for _ in range(2))
    table = torch.randperm(B * N // bs, generator=g).to(torch.int32).view(B, N // bs)
    lens = torch.tensor([50, 77], dtype=torch.int32)
    results = []
    for executor in ("ptx", "source"):
        kc, vc = pool_k.clone(), pool_v.clone()
        with emulate(executor=executor) as emu:
            out = flash_cuda.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table,
                                                    causal=True, num_splits=3)
        assert all(r["errors"] == [] for r in emu.launches)
        assert {r["kernel"].split("<")[0] for r in emu.launches} >= {"flash_fwd_kvcache", "flash_fwd_kvcache_combine"}
        results.append((out, kc, vc))
    assert_agree(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])  # the append
    # and against the float64 reference over each sequence's valid keys
    out, kc, vc = results[0]
    for b in range(B):
        n = int(lens[b]) + 2
        keys = torch.cat([kc[i] for i in table[b]], dim=1)[:, :n][None]
        vals = torch.cat([vc[i] for i in table[b]], dim=1)[:, :n][None]
        ref, _ = attention_ref(q[b:b + 1], keys, vals, causal=True)
        plain, _ = attention_ref(q[b:b + 1], keys, vals, causal=True, dtype=dtype)
        assert_fa_rule("out", out[b:b + 1], plain, ref, 2)


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_arguments():
    with pytest.raises(ValueError, match="executor"):
        emulate(executor="sass")
    with pytest.raises(ValueError, match="executor"):
        emulate(ptx={})
    with pytest.raises(TypeError, match="ptx"):
        emulate(executor="ptx", ptx={"x": 3})
    with pytest.raises(ValueError, match="sm_80"):
        emulate(executor="ptx", device="t4")


@needs_ptx
def test_every_packaged_kernel_parses():
    """Every opcode any kernel of the build emits is implemented: parsing fails on one that is
    not, naming it and its PTX line."""
    for entry, text in KERNELS.items():
        torch.ops.flash_cuda._emu_ptx_check(text, entry)


@needs_ptx
def test_softcap_tanh_of_fp32_inputs_is_libdevices():
    """--use_fast_math makes tanhf one tanh.approx.f32 (relative error up to 2^-10.987): fine for
    fp16/bf16 inputs, 2^12 fp32 ulps for fp32 ones, where it failed the 3xTF32 bound on an H200.
    The fp32 kernels' PTX has no tanh.approx (score_mod.h calls libdevice's tanhf, which ends in a
    copysign); the 16-bit modifier forwards keep the one instruction."""
    traits = re.compile(r"(Fwd|Bwd|BwdDq)TraitsI(f|6__half|13__nv_bfloat16)Li\d+ELb([01])E")
    seen = set()
    for entry, text in KERNELS.items():
        m = traits.search(entry)
        if not m:
            continue
        kind, dtype, mod = m.groups()
        if dtype == "f":
            assert "tanh.approx" not in text, entry
        if kind == "Fwd" and mod == "1":
            assert ("copysign" in text) if dtype == "f" else ("tanh.approx" in text), entry
            seen.add(dtype)
    assert seen == {"f", "6__half", "13__nv_bfloat16"}


@needs_ptx
def test_bad_replacements():
    entry = next(iter(KERNELS))
    with pytest.raises(ValueError, match="does not have"):
        emulate(executor="ptx", ptx={"_Z9no_kernelv": KERNELS[entry]})
    with pytest.raises(ValueError):
        emulate(executor="ptx", ptx={entry: KERNELS[entry].replace("ld.param", "ld.parm", 1)})
    with pytest.raises(ValueError):
        emulate(executor="ptx", ptx={entry: "not ptx at all"})


@needs_ptx
def test_ptx_kernels_are_the_launched_entries():
    q, k, v = make_qkv(1, 1, 1, 20, 20, 64, torch.float16)
    with emulate(executor="ptx") as emu:
        flash_cuda.attention(q, k, v)
    (rec,) = emu.launches
    assert rec["executor"] == "ptx" and rec["entry"] in KERNELS
    text = KERNELS[rec["entry"]]
    assert ".target sm_80" in text and len(torch.ops.flash_cuda._emu_ptx_entries(text)) == 1
    assert sum(rec["instructions"].values()) > 0
    with emulate() as emu:
        flash_cuda.attention(q, k, v)
    assert emu.launches[0]["executor"] == "source" and sum(emu.launches[0]["instructions"].values()) == 0


# ---- planted bugs ---------------------------------------------------------------------------------

MMA = re.compile(r"mma\.sync\.aligned\.m16n8k16\S*\s+\{[^}]*\},\s*\{([^}]*)\}")


@needs_ptx
def test_swapped_mma_operands_are_caught():
    """What nvcc emits for an asm string with {%4,%6,%5,%7} in place of {%4,%5,%6,%7}: the A
    fragment's second and third registers swapped in the first mma. The source executor never
    reads asm strings; the PTX executor's output is wrong against the reference."""
    q, k, v = make_qkv(1, 2, 1, 64, 64, 64, torch.bfloat16, seed=9)
    with emulate(executor="ptx") as emu:
        flash_cuda.attention(q, k, v)
    entry = emu.launches[0]["entry"]
    text = KERNELS[entry]
    m = MMA.search(text)
    a = [x.strip() for x in m.group(1).split(",")]
    assert len(a) == 4 and a[1] != a[2]
    planted = text[:m.start(1)] + ", ".join([a[0], a[2], a[1], a[3]]) + text[m.end(1):]
    with emulate(executor="ptx", ptx={entry: planted}):
        out = flash_cuda.attention(q, k, v)
    ref, _ = attention_ref(q, k, v)
    plain, _ = attention_ref(q, k, v, dtype=q.dtype)
    with pytest.raises(AssertionError):
        assert_fa_rule("out", out, plain, ref, 2)
    with emulate(executor="ptx"):
        good = flash_cuda.attention(q, k, v)
    assert_fa_rule("out", good, plain, ref, 2)


PLANTED_SOURCE = r"""
// A shared-memory load written as inline asm, the way ptx.h's wrappers are. QUALIFIERS is
// "volatile" with a "memory" clobber (ptx.h's rule) or neither: then nvcc takes the asm for a
// pure function of its operands.
__device__ __forceinline__ float lds(unsigned addr) {
  float x;
  asm VOLATILE("ld.shared.f32 %0, [%1];\n" : "=f"(x) : "r"(addr) CLOBBER);
  return x;
}
// Each of 4 steps copies a word per thread into shared memory with cp.async, waits, and adds
// the neighbour's word.
extern "C" __global__ void t(float* buf) {
  extern __shared__ float s[];
  const unsigned i = threadIdx.x;
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(s + i));
  float acc = 0.0f;
#pragma unroll 1
  for (int k = 0; k < 4; ++k) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(buf + 32 * k + i) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();
    acc += lds(dst ^ 4);
    __syncthreads();
  }
  buf[128 + i] = acc;
}
"""


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("wrapper", ["volatile_memory", "plain"])
def test_asm_load_without_volatile_or_memory_clobber(tmp_path, wrapper):
    """Compiled by nvcc for sm_80, as the extension is: with a plain asm load nvcc hoists it out
    of the loop, above the first cp.async, its wait and the barrier (loop-invariant code motion
    of what it takes for a pure function), so it reads shared memory nothing has written yet;
    the PTX executor reports that. With volatile and "memory" the load stays after the wait and
    the kernel is clean and right. The source executor cannot see this: in it the wrapper is a
    C++ function whose effects the host compiler knows."""
    src = tmp_path / "planted.cu"
    good = wrapper == "volatile_memory"
    src.write_text(PLANTED_SOURCE.replace("VOLATILE", "volatile" if good else "")
                   .replace("CLOBBER", ': "memory"' if good else ""))
    out = tmp_path / "planted.ptx"
    subprocess.run([find_nvcc(), "-arch=sm_80", "-O3", "-ptx", str(src), "-o", str(out)], check=True)
    text = out.read_text()
    body = text[text.index(".entry t"):]
    wait, load = body.index("cp.async.wait_group"), body.index("ld.shared.f32")
    buf = torch.zeros(160, dtype=torch.float32)
    buf[:128] = torch.arange(128, dtype=torch.float32) + 1
    expected = [sum(buf[32 * k + (i ^ 1)].item() for k in range(4)) for i in range(32)]
    if good:
        assert wait < load
        torch.ops.flash_cuda._emu_ptx_run(text, "t", buf, 32, 1, 128)  # (always the PTX executor)
        assert buf[128:].tolist() == expected
    else:
        assert load < wait  # nvcc's reordering, in its own output
        with pytest.raises(RuntimeError, match="uninitialised shared memory"):
            torch.ops.flash_cuda._emu_ptx_run(text, "t", buf, 32, 1, 128)


# The dense forward's batch term of q's address, batch * q.batch_stride, as nvcc emits it: the
# batch (ctaid.z) widened, the int64 stride loaded, a 64-bit product.
BATCH_TERM = re.compile(r"mov\.u32\s+(%r\d+), %ctaid\.z;\s*cvt\.s64\.s32\s+(%rd\d+), \1;\s*"
                        r"ld\.param\.u64\s+(%rd\d+), \[([^\]]+)\];\s*mul\.lo\.s64\s+(%rd\d+), \3, \2;")


OUTSIDE = r"out-of-bounds global {} of 8 bytes .*outside every tensor"


@needs_ptx
@pytest.mark.parametrize("access, message", [("ld.global.u64 %rwild, [%rwild];", OUTSIDE.format("read")),
                                             ("ld.u64 %rwild, [%rwild];", OUTSIDE.format("read")),
                                             ("st.global.u64 [%rwild], %rwild;", OUTSIDE.format("write")),
                                             ("cp.async.ca.shared.global [0], [%rwild], 8;", OUTSIDE.format("read")),
                                             ("ld.param.u64 %rwild, [%rwild];", r"reads past the kernel's parameters")])
def test_global_address_near_the_top_is_caught(access, message):
    """A wild address 8 bytes below 2^64: the bounds checks formed address + size, which wrapped
    past zero, so the access passed as inside a tensor and the executor touched host memory there
    (a crash; the store was reported as a write to a read-only input). An audit's find, and a
    review's for the parameter space: now reported as outside every tensor (past the parameters),
    as a wild address anywhere else is."""
    q = torch.randn(1, 1, 16, 16).half()
    with emulate(executor="ptx", workers=1) as emu:
        flash_cuda.attention(q, q, q)
    entry = emu.launches[0]["entry"]
    text = KERNELS[entry]
    body = text.index("{", text.index(")", text.index(".entry"))) + 1
    planted = text[:body] + f"\n\t.reg .b64 %rwild;\n\tmov.u64 %rwild, -8;\n\t{access}\n" + text[body:]
    with emulate(executor="ptx", workers=1, ptx={entry: planted}):
        with pytest.raises(RuntimeError, match=message):
            flash_cuda.attention(q, q, q)


@needs_ptx
def test_32_bit_batch_offset_is_caught():
    """A 32-bit overflow in an address computation that exists only in nvcc's build: the dense
    (kVarlen = false) forward kernels are compiled for the GPU alone (the source executor runs
    the packed-batch kernels, which take a dense batch at run time). The planted PTX is what nvcc
    emits for head_ptr's batch term written batch * int(t.batch_stride): the stride's low half
    and a 32-bit mul.lo.s32, sign-extended. On q with 2^30 + 4096 elements between batches
    (a 4 GiB view, untouched but for its rows), batch 2's offset passes 2^31 and wraps 4 GiB
    below q: the PTX executor reports the read outside every tensor. The shipped PTX and the
    source executor get the right output on the same q."""
    b, h, n, d = 3, 1, 64, 64
    stride = (1 << 30) + n * d
    storage = torch.empty(2 * stride + n * d, dtype=torch.bfloat16)  # 4 GiB of address space
    q = storage.as_strided((b, h, n, d), (stride, n * d, d, 1))
    q0, k, v = make_qkv(b, h, h, n, n, d, torch.bfloat16, seed=11)
    q.copy_(q0)
    ref, _ = attention_ref(q0, k, v)
    plain, _ = attention_ref(q0, k, v, dtype=q0.dtype)
    with emulate(executor="ptx") as emu:
        out = flash_cuda.attention(q, k, v)
    assert_fa_rule("out", out, plain, ref, 2)  # 64-bit offsets past 4 GiB, as shipped
    entry = emu.launches[0]["entry"]
    assert entry.endswith("Lb0ELb0ELb0ELb0ELb0EEEvNS_9FwdParamsE")  # the dense kernel (kVarlen = false)
    with emulate():
        assert_fa_rule("out", flash_cuda.attention(q, k, v), plain, ref, 2)

    text = KERNELS[entry]
    m = BATCH_TERM.search(text)
    assert m is not None, "the batch term of q's address was not found in the dense forward's PTX"
    batch, _, wide_stride, param, product = m.groups()
    planted = (text[:m.start()] + m.group(0)[:m.group(0).rindex("mul.lo.s64")]
               + f"ld.param.u32 %rovf, [{param}];\n\tmul.lo.s32 %rovf, %rovf, {batch};\n\t"
               + f"cvt.s64.s32 {product}, %rovf;" + text[m.end():])
    planted = planted.replace(".reg .b64", ".reg .b32 %rovf;\n\t.reg .b64", 1)
    with emulate(executor="ptx", ptx={entry: planted}):
        with pytest.raises(RuntimeError, match=r"out-of-bounds global read .*outside every tensor.* block \(\d+,\d+,2\)"):
            flash_cuda.attention(q, k, v)
