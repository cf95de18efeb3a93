"""The static SASS model behind benchmarks/sass_compare.py, on hand-written SASS: loop finding,
inner-loop trip counts, per-unit counts and the cycle terms (no GPU, no nvcc needed)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import sass_model as sm  # noqa: E402


def sass(lines):
    """cuobjdump-style text from (opcode and operands) lines, 16 bytes apart."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x0 */" for i, text in enumerate(lines))


# prologue; outer loop [2, 12] holding an inner k loop [4, 8] (4 trips: R9 = 0, += 1, != 4) with
# 2 HMMAs, plus 2 HMMAs, an LDSM.x4, an MUFU and a BAR outside it
KERNEL = [
    "MOV R1, c[0x0][0x28]",          # 0
    "MOV R2, RZ",                    # 1
    "LDSM.16.M88.4 R20, [R3]",       # 2  outer head
    "MOV R9, RZ",                    # 3
    "HMMA.16816.F32.BF16 R4, R20, R24, R4",   # 4 inner head
    "HMMA.16816.F32.BF16 R8, R20, R26, R8",   # 5
    "IADD3 R9, R9, 0x1, RZ",         # 6
    "ISETP.NE.AND P0, PT, R9, 0x4, PT",  # 7
    "@P0 BRA 0x40",                  # 8  back to 4
    "HMMA.16816.F32.BF16 R12, R20, R28, R12",  # 9
    "MUFU.EX2 R30, R31",             # 10
    "BAR.SYNC.DEFER_BLOCKING 0x0",   # 11
    "@P1 BRA 0x20",                  # 12 back to 2
    "STG.E.128 [R40.64], R4",        # 13
    "EXIT",                          # 14
]


def test_parse_and_loops():
    ins = sm.parse_sass(sass(KERNEL))
    assert [op for _a, _p, op, _x in ins][:3] == ["MOV", "MOV", "LDSM.16.M88.4"]
    assert ins[8][1] == "@P0" and ins[8][2] == "BRA"
    assert sorted(sm._loops(ins)) == [(2, 12), (4, 8)]
    assert sm._trip_count(ins, 4, 8) == 4


def test_main_loop_weights_inner_trips():
    ins = sm.parse_sass(sass(KERNEL))
    s, e, w, solved = sm.main_loop(ins, expected_hmma=9)  # 2 x 4 in the k loop + 1
    assert (s, e, solved) == (2, 12, False)
    assert w[4 - s] == 4 and w[9 - s] == 1
    assert sm.main_loop(ins, expected_hmma=8) is None  # no loop issues exactly 8


def test_unresolved_trip_count_is_solved_from_hmma():
    kernel = list(KERNEL)
    kernel[7] = "ISETP.NE.AND P0, PT, R9, R10, PT"  # limit in a register: pattern not found
    ins = sm.parse_sass(sass(kernel))
    s, e, w, solved = sm.main_loop(ins, expected_hmma=9)
    assert solved and w[4 - s] == pytest.approx(4)


def test_analyse_counts_per_unit_and_cycles():
    a = sm.analyse(sass(KERNEL), expected_hmma=9, warps=4, units=2.0, arch="80")
    per = 4 / 2.0  # warp-instructions per unit per instruction executed once per iteration
    c = a["counts_per_unit"]
    assert c["HMMA"] == 9 * per and c["LDSM"] == per and c["MUFU.EX2"] == per and c["BAR"] == per
    assert c["STG"] == 0  # outside the loop
    # instructions per iteration: 1 + 1 + 4 x 5 (k loop) + 4 = 26
    assert a["instructions_per_unit"] == 26 * per
    p = a["pipe_cycles_per_unit"]
    assert p["tensor"] == pytest.approx(9 * per * 2)   # A100: 2048 FMA / 1024 per clock
    assert p["mem"] == pytest.approx(4 * per)           # LDSM.x4: four 128-byte wavefronts
    assert p["mufu"] == pytest.approx(per * 32 / 16)
    assert a["issue_cycles_per_unit"] == pytest.approx(26 * per / 4)
    h = sm.analyse(sass(KERNEL), 9, 4, 2.0, "90")["pipe_cycles_per_unit"]["tensor"]
    assert h == pytest.approx(9 * per * 1.5)            # H100 mma.sync: 2/3 of 2048 FMA per clock


def test_wavefronts_and_pipes():
    assert sm._wavefronts("LDSM.16.MT88.4") == 4 and sm._wavefronts("LDSM.16.M88.2") == 2
    assert sm._wavefronts("LDGSTS.E.BYPASS.LTC128B.128") == 4 and sm._wavefronts("LDS.64") == 2
    assert sm._wavefronts("STS.U16") == 1 and sm._wavefronts("RED.E.ADD.F32.FTZ.RN.STRONG.GPU") == 1
    assert sm.pipe_of("FFMA.FTZ") == "fp32" and sm.pipe_of("F2FP.BF16.F32.PACK_AB") == "conv"
    assert sm.pipe_of("BAR.SYNC") is None and sm.pipe_of("LOP3.LUT") == "alu" and sm.pipe_of("LEA.HI.X") == "alu"
    # LDGDEPBAR closes a group of cp.async copies: an issue slot, not a load (until 2026-12-07 a wavefront)
    assert sm.pipe_of("LDGDEPBAR") is None and sm.pipe_of("LDG.E.64") == "mem" and sm.pipe_of("LDGSTS.E.BYPASS.128") == "mem"
    # integer multiplies run on the FMA pipe, the uniform datapath on its own, FP16x2 apart
    assert sm.pipe_of("IMAD.WIDE") == "imad" and sm.pipe_of("IMAD.MOV.U32") == "imad"
    assert sm.pipe_of("UIADD3") == "uniform" and sm.pipe_of("ULDC.64") == "uniform" and sm.pipe_of("USHF.L.U32") == "uniform"
    assert sm.pipe_of("HMUL2.BF16_V2") == "fp16" and sm.pipe_of("HFMA2.MMA") == "fp16"


def loop_of(body):
    """A one-HMMA loop around body (one warp, one unit): its pipe cycles at each architecture."""
    kernel = ["MOV R1, RZ", "HMMA.16816.F32.BF16 R4, R8, R12, R4"] + body + ["@P1 BRA 0x10"]
    return {a: sm.analyse(sass(kernel), expected_hmma=1, warps=1, units=1.0, arch=a) for a in ("80", "90")}


def test_fma_pipes_take_fp32_and_integer_multiplies():
    # 4 FFMA + 4 IMAD: sm_80 one FMA pipe of 64 lanes/clk, 8 x 32 / 64 = 4 cycles
    a = loop_of(["FFMA R1, R2, R3, R1"] * 4 + ["IMAD R5, R6, R7, R5"] * 4)
    assert a["80"]["pipe_cycles_per_unit"]["fma"] == pytest.approx(4.0)
    assert a["80"]["pipe_cycles_per_unit"]["alu"] == 0.0
    # sm_90: FP32 on both halves (128/clk), IMAD on the heavy one (64/clk): max(4 x 32 / 64, 8 x 32 / 128) = 2
    assert a["90"]["pipe_cycles_per_unit"]["fma"] == pytest.approx(2.0)
    b = loop_of(["IMAD R5, R6, R7, R5"] * 8)  # the heavy half bounds: 8 x 32 / 64 = 4
    assert b["90"]["pipe_cycles_per_unit"]["fma"] == pytest.approx(4.0)


def test_uniform_and_fp16_pipes():
    a = loop_of(["UIADD3 UR4, UR4, 0x1, URZ"] * 8 + ["HMUL2 R1, R2, R3"] * 4)
    for arch in ("80", "90"):
        p = a[arch]["pipe_cycles_per_unit"]
        assert p["uniform"] == pytest.approx(8 * 32 / 128) and p["alu"] == 0.0
    # sm_80: FP16x2 has its own pipe (128 lanes/clk) on the tensor pipe's dispatch port
    assert a["80"]["pipe_cycles_per_unit"]["fp16"] == pytest.approx(1.0) and a["80"]["pipe_cycles_per_unit"]["fma"] == 0
    # sm_90: dual-issued to the FMA pipes
    assert a["90"]["pipe_cycles_per_unit"]["fp16"] == 0 and a["90"]["pipe_cycles_per_unit"]["fma"] == pytest.approx(1.0)


def test_predict_between_roofline_and_serial():
    a = {"pipe_cycles_per_unit": {"tensor": 100.0, "fp16": 0.0, "fma": 60.0, "alu": 0.0, "uniform": 0.0,
                                  "mufu": 40.0, "conv": 0.0, "shfl": 0.0, "mem": 0.0}, "issue_cycles_per_unit": 50.0}
    assert sm.predict(a, 1.0) == (100.0, 1.0)       # perfect overlap: the tensor pipe bounds
    assert sm.predict(a, 0.0) == (200.0, 0.5)       # no overlap: the sum of the pipes
    t, f = sm.predict(a, 0.5)
    assert t == 150.0 and f == pytest.approx(2 / 3)
    # FP16x2 sharing the tensor pipe's port (sm_80): the two bound together
    a["pipe_cycles_per_unit"].update(fp16=30.0, fma=0.0, mufu=0.0)
    assert sm.predict(a, 1.0) == (130.0, pytest.approx(100 / 130))


def test_predicated_off_instructions_take_no_pipe():
    kernel = ["MOV R1, RZ",                  # 0
              "@!PT LDS RZ, [RZ]",           # 1 loop head: ptxas padding, never executed
              "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 2
              "LDGSTS.E.BYPASS.128 [R0], [R2.64], P0",  # 3
              "@P1 BRA 0x10"]                # 4 back to 1
    a = sm.analyse(sass(kernel), expected_hmma=1, warps=1, units=1.0, arch="80")
    assert a["counts_per_unit"]["LDS"] == 0 and a["instructions_per_unit"] == 4
    assert a["pipe_cycles_per_unit"]["mem"] == 4  # the LDGSTS's four wavefronts only


def test_rotated_loop_is_merged():
    # the iteration's path: 1..4 (K prefetch), 5..8 (HMMAs), back edge 8 -> 2 and a second one,
    # 6 -> 1, entering the first loop from below: one iteration runs through [1, 8]
    kernel = ["MOV R1, RZ",                  # 0
              "LDGSTS.E.BYPASS.128 [R0], [R2.64], P0",   # 1
              "HMMA.16816.F32.BF16 R4, R8, R12, R4",     # 2
              "IADD3 R1, R1, 0x1, RZ",       # 3
              "ISETP.NE.AND P1, PT, R1, R5, PT",         # 4
              "HMMA.16816.F32.BF16 R6, R8, R12, R6",     # 5
              "@P2 BRA 0x10",                # 6 back to 1
              "NOP",                         # 7
              "@P1 BRA 0x20"]                # 8 back to 2
    ins = sm.parse_sass(sass(kernel))
    s, e, _w, _solved = sm.main_loop(ins, expected_hmma=2)
    assert (s, e) == (1, 8)


def _row(side, dtype, head_dim, instr, regs=200, stack=0):
    return {"side": side, "arch": "sm_80", "pass": "fwd", "head_dim": head_dim, "dtype": dtype, "causal": False,
            "tile": "128x64", "registers": regs, "stack_bytes": stack, "spill_bytes": 0, "occupancy_a100": 0.125,
            "occupancy_h100": 0.125, "instructions_per_unit": instr, "predicted_tensor_fraction": 0.7}


def test_summary_table_per_dtype_and_without_torch_rows(tmp_path):
    import json
    import sass_compare
    rows = [_row("flash_cuda", "fp16", 64, 1000), _row("torch", "fp16", 64, 900, stack=56),
            _row("flash_cuda", "fp16", 128, 2000)]   # no torch kernel for 128: a --filter run
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows))
    table = sass_compare.summary(str(path), dtype="fp16").splitlines()
    assert len(table) == 4 and all(line.count("|") == table[0].count("|") for line in table)
    assert table[2].endswith("| instructions |") and "1000 / 900" in table[2] and "0 / 56" in table[2]
    assert "no torch kernel" in table[3]
    with pytest.raises(SystemExit, match="no flash_cuda rows in bf16"):
        sass_compare.summary(str(path))


def test_summary_judges_occupancy_on_the_rows_card(tmp_path):
    """An sm_90 row's A100 occupancy is information only (a large configuration does not fit an
    A100, which runs the wide one: its sm_80 row); an sm_80 row's H100 occupancy likewise."""
    import json
    import sass_compare
    rows = []
    for arch, ours in (("sm_90", dict(occupancy_a100=0.0)), ("sm_80", dict(occupancy_h100=0.0)),
                       ("sm_90", dict(occupancy_h100=0.0625))):
        head_dim = 64 if not rows else 128 if len(rows) == 2 else 256
        rows += [dict(_row("flash_cuda", "bf16", head_dim, 1000), arch=arch, **ours),
                 dict(_row("torch", "bf16", head_dim, 1100), arch=arch)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows))
    table = sass_compare.summary(str(path)).splitlines()[2:]
    lost = {line.split("|")[1].strip() + "/" + line.split("|")[3].strip(): line.split("|")[-2].strip() for line in table}
    assert lost == {"sm_90/64": "none", "sm_80/128": "none", "sm_90/256": "occupancy"}, lost
