"""SASS of a kernel -> its steady-state main loop -> per-pipe work -> a static cycle estimate.

Used by sass_compare.py for flash_cuda's kernels and for torch's FlashAttention-2 kernels alike,
so both are judged by the same rules. Nothing here needs a GPU: the input is the text that
`cuobjdump -sass` prints.

The loop. Each backward branch (BRA to a lower address) closes a loop whose body is the address
range [target, branch]. The steady-state loop of an attention kernel is the smallest loop whose
body issues the whole tile's tensor-core work: the number of HMMA.16816 instructions one warp
executes per iteration is known from the tile shape (expected_hmma), so the loop is the smallest
body holding exactly that many. A body may hold inner loops (a k loop nvcc kept rolled): their
instructions are counted once per trip, the trip count read from the loop's own compare of an
induction register against an immediate; where that pattern is not found the inner trip count
is solved from the HMMA total, one common count for all such loops that issue HMMAs (reported
as `trips_solved`); an unresolved loop without HMMAs counts once. A loop that a second back
edge enters from below (a rotated loop: one iteration's path runs through both) is merged with
it. Instructions predicated on !PT (never executed: ptxas pads with them) take an issue slot
and nothing else. Counts are static: both sides of a
branch inside the body are counted (masking code a steady-state iteration skips included), so a
kernel with the masked tiles peeled out of its main loop is credited for it.

The model (per SM, per iteration, in cycles). Each instruction class has a pipe with a published
per-SM throughput (results per clock per SM, CUDA C++ Programming Guide, "Arithmetic
Instructions" table; tensor cores from the A100 and H100 whitepapers):
    tensor   HMMA.16816 = 2048 multiply-adds: A100 1024 FMA/clk/SM (312 TFLOP/s dense fp16 at
             1410 MHz, 108 SMs); H100 mma.sync reaches about 2/3 of the 2048 FMA/clk/SM that
             wgmma does (FlashAttention-3 paper, Shah et al. 2024, section 1), so 1365. sm_86
             is modelled as an A10 (the data-center GA102: fp32 accumulation at full rate):
             125 TFLOP/s dense fp16 at 1695 MHz on 72 SMs = 512 FMA/clk/SM (GeForce GA102
             cards accumulate fp32 at half that). sm_75 is modelled as a T4: 65 TFLOP/s
             fp16 with fp32 accumulation at 1590 MHz on 40 SMs = 512 FMA/clk/SM; its
             HMMA.1688 (the only fp16 shape) is 1024 multiply-adds.
    fma      FFMA/FMUL/FADD and the integer multiplies IMAD (with its MOV/SHL/IADD forms)/IMUL/IDP,
             which run on the FMA pipe, not the ALU (NVIDIA on its forums for GV100, GA100 and
             GH100: https://forums.developer.nvidia.com/t/108729/4 and /t/302018/7; Nsight
             Compute's pipe metrics count them as fma): sm_75, sm_80 one pipe of 64/clk; sm_86,
             sm_90 an FMA-heavy and an FMA-lite pipe of 64/clk each, FP32 on both (128/clk),
             integer multiplies on the heavy one alone:
             t_fma = max(imad / 64, (fp32 + imad [+ fp16x2]) / 128) x 32
    fp16     HFMA2/HMUL2/HADD2: on sm_75 and sm_80 a pipe of its own that shares its dispatch
             port with the tensor pipe (the same posts), 64 (sm_75) and 128 (sm_80) lanes/clk
             (128 and 256 results, the Programming Guide's 16-bit rows), so it is added to the
             tensor pipe's time for the bound; on sm_86 and sm_90 dual-issued to both FMA pipes
    alu      integer add/compare/min/max/select/logic/shift, LEA, moves: 64/clk
    uniform  the uniform datapath's scalar instructions (U*: UIADD3, UIMAD, ULDC, ...): a unit
             of its own beside the vector pipes (Nsight Compute's "uniform" pipe; NVIDIA on its
             forums, https://forums.developer.nvidia.com/t/261562); its rate is not published:
             taken as one warp instruction per clock per sub-partition (4 per SM)
    mufu     MUFU.EX2/RCP/LG2...: 16/clk
    conv     F2F/F2FP/I2F/F2I conversions: 16/clk (sm_75, sm_80, sm_86), 64/clk (sm_90)
    shfl     SHFL: 32/clk
    mem      shared memory and L1 data path, 128 bytes/clk: wavefronts (128 B each) of LDSM,
             LDS/STS, LDGSTS (its shared-memory side), LDG/STG/RED/ATOM (their L1 side)
    issue    4 warp instructions/clk (one scheduler per SM sub-partition)
t_p = warp instructions on pipe p x 32 / throughput_p (mem: wavefronts). A perfectly
overlapped SM would take max(t_issue, max_p t_p) (the tensor and fp16 pipes as one, where they
share a port); a fully serial one sum_p t_p. The estimate is
    T = B + (1 - eta) * (sum_p t_p - B),   B = max(t_issue, max_p t_p),
with one parameter per pass (forward, backward), the overlap efficiency eta, fitted once so that
torch's FlashAttention-2 kernels reproduce FlashAttention-2's published A100 results (see
sass_compare.py, which prints the fit and its residuals). predicted tensor fraction = t_tensor / T. It is a prediction: it
knows nothing of latency chains, barriers stalls, memory-bound phases or the tail of the grid.
(Until 2026-12-02 IMAD and the uniform instructions were counted on the ALU pipe and FP16x2 on
the FP32 pipe at every architecture; the corrected model moves every kernel's prediction, torch's
included, and was refitted: the fit came out the same.)
"""
import re

ARCHS = {
    "80": {"name": "A100", "tensor_fma": 1024.0, "fp32": 64, "imad": 64, "fp16": 128, "fp16_with_tensor": True,
           "alu": 64, "uniform": 128, "mufu": 16, "conv": 16, "shfl": 32, "mem_bytes": 128, "issue": 4},
    "90": {"name": "H100", "tensor_fma": 2048.0 * 2 / 3, "fp32": 128, "imad": 64, "fp16": 128,
           "fp16_with_tensor": False, "alu": 64, "uniform": 128, "mufu": 16, "conv": 64, "shfl": 32,
           "mem_bytes": 128, "issue": 4},
    "86": {"name": "A10", "tensor_fma": 512.0, "fp32": 128, "imad": 64, "fp16": 128, "fp16_with_tensor": False,
           "alu": 64, "uniform": 128, "mufu": 16, "conv": 16, "shfl": 32, "mem_bytes": 128, "issue": 4},
    "75": {"name": "T4", "tensor_fma": 512.0, "fp32": 64, "imad": 64, "fp16": 64, "fp16_with_tensor": True,
           "alu": 64, "uniform": 128, "mufu": 16, "conv": 16, "shfl": 32, "mem_bytes": 128, "issue": 4},
}


def hmma_fma(op):
    """Multiply-adds of one HMMA: m16n8k8 (sm_75's fp16 shape, tf32) 1024, m16n8k16 2048."""
    return 1024 if op.startswith("HMMA.1688") else 2048
PIPES = ("tensor", "fp16", "fma", "alu", "uniform", "mufu", "conv", "shfl", "mem")
# Counted instruction kinds (the issue's list), by opcode prefix.
KINDS = {"HMMA": ("HMMA",), "LDSM": ("LDSM",), "LDGSTS": ("LDGSTS",), "LDG": ("LDG",), "STG": ("STG",),
         "LDS": ("LDS",), "STS": ("STS",), "RED/ATOM": ("RED", "ATOM"),
         "FFMA": ("FFMA",), "FMUL": ("FMUL",), "FADD": ("FADD",), "FMNMX": ("FMNMX",),
         "MUFU.EX2": ("MUFU.EX2",), "SHFL": ("SHFL",), "BAR": ("BAR",)}

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\s*([^;]*);")


def parse_sass(text):
    """[(address, predicate, opcode, operands)] of one function's SASS."""
    out = []
    for line in text.splitlines():
        m = _INSTR.search(line)
        if m:
            out.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return out


def split_functions(sass):
    """{mangled name: SASS text} from `cuobjdump -sass` output."""
    funcs = {}
    for section in re.split(r"\n\s*Function : ", sass)[1:]:
        name = section.split()[0]
        funcs[name] = section
    return funcs


def _loops(instrs):
    """[(start index, end index)] of every loop: a backward BRA closes [target, branch]."""
    index = {a: i for i, (a, *_rest) in enumerate(instrs)}
    loops = []
    for i, (addr, _pred, op, args) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
                loops.append((index[int(m.group(1), 16)], i))
    return loops


def _trip_count(instrs, start, end):
    """Trip count of the loop [start, end] from `ISETP ... Rc, imm` feeding its branch, the
    `IADD3 Rc, Rc, step` in the body and the last `MOV Rc, imm` / `Rc = RZ` before it; None
    if the pattern is not there."""
    pred = instrs[end][1].lstrip("@!")
    for i in range(end - 1, start - 1, -1):
        op, args = instrs[i][2], instrs[i][3]
        if op.startswith("ISETP") and args.startswith(pred + ","):
            parts = [a.strip() for a in args.split(",")]
            if len(parts) < 4 or not parts[3].startswith("0x") and not parts[3].isdigit():
                return None
            reg, limit = parts[2], int(parts[3], 0)
            step = None
            for j in range(start, end):
                a = [x.strip() for x in instrs[j][3].split(",")]
                if instrs[j][2].startswith("IADD3") and a[0] == reg and reg in a[1:3]:
                    imm = [x for x in a[1:] if re.fullmatch(r"-?0x[0-9a-f]+|-?\d+", x)]
                    step = int(imm[0], 0) if imm else None
            init = None
            for j in range(start - 1, max(start - 200, -1), -1):
                a = [x.strip() for x in instrs[j][3].split(",")]
                if a and a[0] == reg:
                    if instrs[j][2].startswith("MOV") and re.fullmatch(r"-?0x[0-9a-f]+|-?\d+", a[1]):
                        init = int(a[1], 0)
                    elif a[1:] and all(x == "RZ" for x in a[1:] if x != "PT"):
                        init = 0
                    break
            if step and init is not None and (limit - init) % step == 0 and (limit - init) // step > 0:
                return (limit - init) // step
            return None
    return None


def _weights(instrs, start, end, expected_hmma):
    """Per-instruction execution count within one iteration of the loop [start, end]."""
    w = [1.0] * (end - start + 1)
    inner = [(s, e) for s, e in _loops(instrs) if start <= s and e < end and (s, e) != (start, end)]
    # outermost inner loops only (their own inner loops are handled recursively)
    tops = [(s, e) for s, e in inner if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in inner)]
    solved = False
    unresolved = []
    for s, e in tops:
        trips = _trip_count(instrs, s, e)
        sub = _weights(instrs, s, e, None)[0]
        if trips is None:
            unresolved.append((s, e, sub))
            trips = 1
        for k in range(s, e + 1):
            w[k - start] = sub[k - s] * trips
    hm = lambda k: instrs[k][2].startswith("HMMA")
    with_hmma = [(s, e, sub) for s, e, sub in unresolved if any(hm(k) for k in range(s, e + 1))]
    if with_hmma and expected_hmma:
        # one common trip count for the unresolved inner loops that issue HMMAs (k loops over
        # the head dim share theirs); loops without HMMA keep one trip
        fixed = sum(w[k - start] for k in range(start, end + 1) if hm(k) and not any(s <= k <= e for s, e, _ in with_hmma))
        var = sum(sub[k - s] for s, e, sub in with_hmma for k in range(s, e + 1) if hm(k))
        trips = (expected_hmma - fixed) / var
        for s, e, sub in with_hmma:
            for k in range(s, e + 1):
                w[k - start] = sub[k - s] * trips
        solved = True
    return w, solved


def main_loop(instrs, expected_hmma):
    """(start, end, weights, trips_solved) of the smallest loop executing expected_hmma HMMAs
    per iteration, or None. A loop that another back edge enters from below (nvcc's rotated
    loops: the path of an iteration runs through both) is merged with it while the HMMA count
    of the union stays that of one iteration."""
    loops = _loops(instrs)

    def hmma_of(s, e):
        w, solved = _weights(instrs, s, e, expected_hmma)
        return sum(wk for k, wk in zip(range(s, e + 1), w) if instrs[k][2].startswith("HMMA")), w, solved

    best = None
    for s, e in loops:
        hmma, w, solved = hmma_of(s, e)
        if abs(hmma - expected_hmma) < 0.5 and (best is None or sum(w) < sum(best[2])):
            best = (s, e, w, solved)
    if best is None:
        return None
    s, e = best[0], best[1]
    grown = True
    while grown:
        grown = False
        for s2, e2 in loops:
            if (s2 < s <= e2 < e or s < s2 <= e < e2) and abs(hmma_of(min(s, s2), max(e, e2))[0] - expected_hmma) < 0.5:
                s, e = min(s, s2), max(e, e2)
                grown = True
    if (s, e) != best[:2]:
        _h, w, solved = hmma_of(s, e)
        best = (s, e, w, solved)
    return best


def _wavefronts(op):
    """128-byte shared/L1 wavefronts of one warp instruction with all lanes active."""
    if op.startswith("LDSM"):
        return {"4": 4, "2": 2}.get(op.split(".")[-1], 1)  # LDSM.16.M88.4: four 8x8 matrices, 128 B each
    parts = op.split(".")
    return 4 if "128" in parts else 2 if "64" in parts else 1  # 32 lanes x 16 / 8 / <=4 bytes


def pipe_of(op):
    """The instruction class of an opcode: "tensor", "fp32", "imad", "fp16" (FP16x2), "alu",
    "uniform", "mufu", "conv", "shfl", "mem", or None (an issue slot only). analyse maps the
    classes to pipes per architecture (fp32 and imad share the FMA pipes)."""
    if op.startswith("HMMA"):
        return "tensor"
    if op.startswith(("FFMA", "FMUL", "FADD")):
        return "fp32"
    if op.startswith(("IMAD", "IMUL", "IDP")):
        return "imad"
    if op.startswith(("HFMA2", "HMUL2", "HADD2")):
        return "fp16"
    if op.startswith("MUFU"):
        return "mufu"
    if op.startswith(("F2F", "F2FP", "I2F", "F2I", "FRND")):
        return "conv"
    if op.startswith("SHFL"):
        return "shfl"
    # (before the memory classes: LDGDEPBAR, which starts like LDG, only closes a group of
    # cp.async copies; until 2026-12-07 it was charged a wavefront)
    if op.startswith(("BAR", "BRA", "EXIT", "NOP", "DEPBAR", "WARPSYNC", "BSYNC", "BSSY", "YIELD", "RET", "CALL",
                      "LDGDEPBAR", "MEMBAR", "ERRBAR", "CCTL")):
        return None  # issue slot only
    if op.startswith(("LDSM", "LDS", "STS", "LDGSTS", "LDG", "STG", "RED", "ATOM", "LD.", "ST.", "LDL", "STL")):
        return "mem"
    if op.startswith("U") or op.startswith(("R2UR", "S2UR")):
        return "uniform"
    return "alu"


def analyse(sass_text, expected_hmma, warps, units, arch):
    """Counts and cycle terms of one kernel's main loop, per unit of work, on one SM.
    warps: warps per block (each runs the loop body once per iteration); units: 64x64 tiles of
    attention one block-iteration covers."""
    instrs = parse_sass(sass_text)
    loop = main_loop(instrs, expected_hmma)
    if loop is None:
        return None
    s, e, w, solved = loop
    a = ARCHS[arch]
    scale = warps / units  # warp-instructions per unit
    counts = {k: 0.0 for k in KINDS}
    pipes = {p: 0.0 for p in PIPES}
    lanes = {}  # thread-instructions per class (pipe_of), before the pipes
    total = 0.0
    for k in range(s, e + 1):
        op = instrs[k][2]
        n = w[k - s] * scale
        total += n
        if instrs[k][1] == "@!PT":
            continue  # never executed (ptxas pads with such): an issue slot, no pipe, not counted
        for kind, prefixes in KINDS.items():
            if op.startswith(prefixes) and not (kind == "LDS" and op.startswith(("LDSM",))) \
                    and not (kind == "LDG" and op.startswith("LDGSTS")) and not (kind == "LDG" and op.startswith("LDGDEPBAR")):
                counts[kind] += n
        c = pipe_of(op)
        if c == "tensor":
            pipes["tensor"] += n * hmma_fma(op) / a["tensor_fma"]
        elif c == "mem":
            pipes["mem"] += n * _wavefronts(op) * 128 / a["mem_bytes"]
        elif c:
            lanes[c] = lanes.get(c, 0.0) + n * 32
    # the FMA pipes: integer multiplies on the heavy one (64/clk), FP32 (and FP16x2 where it is
    # dual-issued) on both
    h2 = 0.0 if a["fp16_with_tensor"] else lanes.get("fp16", 0.0)
    pipes["fma"] = max(lanes.get("imad", 0.0) / a["imad"],
                       (lanes.get("fp32", 0.0) + lanes.get("imad", 0.0) + h2) / a["fp32"])
    if a["fp16_with_tensor"]:
        pipes["fp16"] = lanes.get("fp16", 0.0) / a["fp16"]
    for c in ("alu", "uniform", "mufu", "conv", "shfl"):
        pipes[c] = lanes.get(c, 0.0) / a[c]
    t_issue = total / a["issue"]
    return {"loop_instructions": e - s + 1, "trips_solved": solved, "instructions_per_unit": total,
            "counts_per_unit": counts, "pipe_cycles_per_unit": pipes, "issue_cycles_per_unit": t_issue}


def predict(analysis, eta):
    """Predicted cycles per unit and tensor fraction under overlap efficiency eta. The tensor
    and fp16 pipes share a dispatch port (sm_75, sm_80): their sum is one pipe for the bound."""
    pipes = analysis["pipe_cycles_per_unit"]
    busiest = max([v for k, v in pipes.items() if k not in ("tensor", "fp16")]
                  + [pipes["tensor"] + pipes.get("fp16", 0.0)])
    bound = max(analysis["issue_cycles_per_unit"], busiest)
    serial = sum(pipes.values())
    t = bound + (1 - eta) * max(0.0, serial - bound)
    return t, pipes["tensor"] / t
