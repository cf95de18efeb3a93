#!/usr/bin/env python3
"""flash_cuda's CUDA kernels side by side with torch's own FlashAttention-2 kernels, from the
machine code alone (no GPU needed).

torch's wheel ships SDPA's flash backend, FlashAttention-2 (namespace pytorch_flash), compiled
for sm_80 and sm_90 in torch/lib/libtorch_cuda.so. For each of our instantiations (pass, head
dim, dtype, causal) and each architecture this script reads, for our kernel (nvcc -cubin of the
generated .cu) and for the torch kernel SDPA would launch for the same problem:
  - registers, stack frame, spill bytes (ours: ptxas -v; torch: cuobjdump -res-usage, whose
    STACK is the frame; spill bytes are not recorded in a shipped binary: its STL/LDL count in
    the SASS is reported instead), shared memory per block, threads, theoretical occupancy on
    A100 and H100;
  - the steady-state main loop in the SASS and its static instruction counts per unit of work,
    one 64x64 tile of attention (64 query rows x 64 keys x head dim), so tile shapes compare;
  - a predicted fraction of tensor-core peak from a static per-SM cycle model
    (benchmarks/sass_model.py), calibrated on FlashAttention-2's published A100 results.

Which torch kernel. torch's launcher (aten/src/ATen/native/transformers/cuda/flash_attn/
flash_{fwd,bwd}_launch_template.h) picks a tile configuration per head dim from the device's
shared memory (TORCH_CONFIGS below: A100 for sm_80, H100 for sm_90), then template flags from
the problem. The problem compared is a long, tile-aligned one (seqlen a multiple of 128, d equal
to the head dim, no dropout/window/alibi/softcap), torch's best case: Is_even_K, and Is_even_MN
where the launcher allows it (head dim <= 128). Each chosen kernel must exist in the library;
the script stops with the missing name otherwise.

    python benchmarks/sass_compare.py [--arch 80 90] [--filter hdim64] [--json PATH] [--jobs 2]
    python benchmarks/sass_compare.py --summary PATH [--before EARLIER] [--dtype fp16]   # the README's table

Writes benchmarks/results/sass_compare.md (and --json) and prints it. Needs nvcc (CUDA_HOME),
cuobjdump and nvdisasm (the toolkit's, or pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm), torch with CUDA kernels in its wheel, and the flash_cuda extension (the
emulator supplies our launch shapes).
"""
import argparse
import concurrent.futures as cf
import glob
import hashlib
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sass_model as sm  # noqa: E402
from kernel_report import ROOT, compile_one, demangle, launch_records, occupancy, tool  # noqa: E402

# torch's tile configurations without dropout (launch templates named above):
#   fwd: Flash_fwd_kernel_traits<D, kBlockM, kBlockN, warps>
#   bwd: Flash_bwd_kernel_traits<D, kBlockM, kBlockN, warps, AtomLayoutMSdP, AtomLayoutNdKV,
#        AtomLayoutMdQ, Is_V_in_regs, No_double_buffer>
# fwd D=256: 128x64 x 8 warps where a block may take 2*D*(128+2*64) bytes and the SM holds less
# than 4*D*(64+2*64) (A100), else 64x64 x 4 warps (H100: two blocks per SM).
# bwd: the >= 144/116/136/176 KiB-per-block branches (both A100 and H100 take them, except
# D=256 on A100: 163 KiB < 176 KiB, so no double buffer).
TORCH_CONFIGS = {
    "80": {"fwd": {32: (128, 128, 4), 64: (128, 128, 4), 96: (128, 64, 4), 128: (128, 64, 4),
                   192: (128, 64, 8), 256: (128, 64, 8)},
           "bwd": {32: (128, 128, 8, 4, 4, 4, True, False), 64: (128, 128, 8, 4, 4, 4, False, False),
                   96: (64, 128, 8, 2, 4, 4, True, False), 128: (64, 128, 8, 2, 4, 2, False, False),
                   192: (64, 64, 8, 4, 2, 2, False, False), 256: (64, 64, 8, 4, 2, 2, False, True)}},
    "90": {"fwd": {32: (128, 128, 4), 64: (128, 128, 4), 96: (128, 64, 4), 128: (128, 64, 4),
                   192: (128, 64, 8), 256: (64, 64, 4)},
           "bwd": {32: (128, 128, 8, 4, 4, 4, True, False), 64: (128, 128, 8, 4, 4, 4, False, False),
                   96: (64, 128, 8, 2, 4, 4, True, False), 128: (64, 128, 8, 2, 4, 2, False, False),
                   192: (64, 64, 8, 4, 2, 2, False, False), 256: (64, 64, 8, 4, 2, 2, False, False)}},
    # sm_86 (A10, RTX 3090; sm_89 takes the same branches): 99 KiB per block and the launcher's
    # is_sm8x branches: forward 96 and 128 pick square 64x64 tiles when causal (a dict by
    # causal), 128 picks 128x32 otherwise, 256 64x64 x 4 warps; backward the < 144 / 116 / 136 /
    # 144 KiB branches: V in registers (and no double buffer at 192, 256: 64 queries x 32 keys).
    "86": {"fwd": {32: (128, 128, 4), 64: (128, 128, 4), 96: {False: (128, 64, 4), True: (64, 64, 4)},
                   128: {False: (128, 32, 4), True: (64, 64, 4)}, 192: (128, 64, 8), 256: (64, 64, 4)},
           "bwd": {32: (128, 128, 8, 4, 4, 4, True, False), 64: (64, 128, 8, 2, 4, 4, True, False),
                   96: (64, 128, 8, 2, 4, 4, True, False), 128: (64, 64, 8, 4, 2, 2, True, False),
                   192: (64, 64, 8, 4, 2, 2, True, True), 256: (64, 32, 8, 4, 1, 2, True, True)}},
}


def torch_config(arch, kind, d, causal):
    cfg = TORCH_CONFIGS[arch][kind][d]
    return cfg[causal] if isinstance(cfg, dict) else cfg
CUTLASS = {"fp16": "cutlass::half_t", "bf16": "cutlass::bfloat16_t"}
# FlashAttention-2's published A100 results (Dao 2023, "FlashAttention-2", abstract and
# section 4.1: forward up to 73% of the 312 TFLOP/s peak, backward up to 63%, 50-73% overall;
# about 70% forward and 50-60% backward at head dims 64 and 128), fp16, not causal.
CALIBRATION = {("fwd", 64): 0.70, ("fwd", 128): 0.70, ("bwd", 64): 0.55, ("bwd", 128): 0.55}


def b(x):
    return "true" if x else "false"


def torch_kernel(arch, kind, d, dtype, causal):
    """(demangled name pattern, threads, smem bytes, expected HMMA per warp per iteration, units
    per block-iteration) of the kernel SDPA launches."""
    cfg = torch_config(arch, kind, d, causal)
    el = CUTLASS[dtype]
    even_mn = d <= 128
    if kind == "fwd":
        m, n, w = cfg
        traits = f"Flash_fwd_kernel_traits<{d}, {m}, {n}, {w}, false, false, {el}, Flash_kernel_traits<{d}, {m}, {n}, {w}, {el}> >"
        name = (f"void pytorch_flash::flash_fwd_kernel<{traits}, false, {b(causal)}, false, false, {b(even_mn)}, "
                f"true, false, false>(pytorch_flash::Flash_fwd_params)")
        smem = 2 * d * (m + 2 * n)
        hmma = (m // (16 * w)) * n * d // 64
        return name, 32 * w, smem, hmma, m * n / 4096
    m, n, w, a1, a2, a3, v_regs, no_db = cfg
    traits = (f"Flash_bwd_kernel_traits<{d}, {m}, {n}, {w}, {a1}, {a2}, {a3}, {b(v_regs)}, {b(no_db)}, {el}, "
              f"Flash_kernel_traits<{d}, {m}, {n}, {w}, {el}> >")
    name = (f"void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<{traits}, false, {b(causal)}, false, "
            f"false, {b(even_mn)}, true, false>(pytorch_flash::Flash_bwd_params)")
    qdo = 2 * m * d * (2 if no_db else 3)  # Q (double-buffered unless No_double_buffer) and dO
    kv = 2 * 2 * n * d
    ds_p = 2 * 2 * m * n
    smem = qdo + (kv + ds_p if not v_regs else max(kv, kv // 2 + ds_p))
    return name, 32 * w, smem, 5 * m * n * d // (2048 * w), m * n / 4096


def cache_dir():
    d = os.path.join(os.path.expanduser("~"), ".cache", "flash_cuda_sass")
    os.makedirs(d, exist_ok=True)
    return d


def lib_tag(lib):
    """A key of this build of the library, for the cache."""
    st = os.stat(lib)
    return hashlib.sha1(f"{lib}:{st.st_size}:{st.st_mtime}".encode()).hexdigest()[:12]


def torch_library():
    try:
        import torch
    except ImportError:
        sys.exit("torch is not installed: pip install torch (a CUDA build: its wheel holds the kernels)")
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")
    if not os.path.exists(lib):
        sys.exit(f"{lib} not found: this torch is a CPU-only build; install a CUDA build of torch "
                 "(e.g. pip install torch==2.14.1) to compare against its FlashAttention-2 kernels")
    return lib


def torch_resources(lib, cuobjdump):
    """{demangled name: {arch: (elf index, mangled, regs, stack)}} for pytorch_flash kernels."""
    path = os.path.join(cache_dir(), f"resusage-{lib_tag(lib)}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    text = subprocess.run([cuobjdump, "-res-usage", lib], capture_output=True, text=True, check=True).stdout
    elf, arch, func, rows = 0, None, None, []
    for line in text.splitlines():
        if line.startswith("Fatbin elf code"):
            elf += 1
        m = re.match(r"arch = sm_(\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
        m = re.match(r"\s*REG:(\d+) STACK:(\d+)", line)
        if m and func and "pytorch_flash" in func:
            rows.append((elf, arch, func, int(m.group(1)), int(m.group(2))))
            func = None
    names = demangle(sorted({r[2] for r in rows}))
    out = {}
    for elf_i, a, mangled, regs, stack in rows:
        out.setdefault(names[mangled], {})[a] = (elf_i, mangled, regs, stack)
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def torch_sass(lib, cuobjdump, wanted):
    """{(elf index, mangled): SASS} for the wanted kernels; ELF files extracted once and cached."""
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
    elfs = sorted({e for e, _ in wanted})
    d = os.path.join(cache_dir(), lib_tag(lib))
    os.makedirs(d, exist_ok=True)
    listing = subprocess.run([cuobjdump, "-lelf", lib], capture_output=True, text=True, check=True).stdout
    files = {int(m.group(1)): m.group(2) for m in re.finditer(r"ELF file\s+(\d+): (\S+)", listing)}
    missing = [files[e] for e in elfs if not os.path.exists(os.path.join(d, files[e]))]
    if missing:
        subprocess.run([cuobjdump, "-xelf", ",".join(missing), lib], cwd=d, check=True, capture_output=True)
    out = {}
    for e in elfs:
        sass = subprocess.run([cuobjdump, "-sass", os.path.join(d, files[e])], capture_output=True, text=True,
                              check=True, env=env).stdout
        funcs = sm.split_functions(sass)
        for ee, mangled in wanted:
            if ee == e:
                out[(e, mangled)] = funcs[mangled]
    return out


def spill_instructions(sass):
    return sum(1 for _a, _p, op, _x in sm.parse_sass(sass) if op.startswith(("STL", "LDL")))


N_PROBE = 257  # ceil(257 / t) and ceil(257 / t) * t differ for every tile size t in TILES
TILES = (16, 32, 64, 128, 256)


def tile_from_launch(kind, d, grid_x, mma, causal):
    """(kBlockM, kBlockN) of our kernel from an emulated launch at Nq = Nk = N_PROBE: the grid
    gives the tile the grid walks (query tiles fwd, key tiles bwd), the mma count the other."""
    tiles = lambda t: -(-N_PROBE // t)
    grid_tile = next(t for t in TILES if tiles(t) == grid_x)
    per_mma = (4 if kind == "fwd" else 10) * d / 4096  # mma per (query row x key) pair
    for other in TILES:
        bm, bn = (grid_tile, other) if kind == "fwd" else (other, grid_tile)
        full = tiles(bm) * tiles(bn) * bm * bn * per_mma
        if not causal and abs(full - mma) < 0.5:
            return bm, bn
        if causal:  # tiles above the diagonal are skipped: count the visited ones
            visited = sum(1 for i in range(tiles(bm)) for j in range(tiles(bn)) if j * bn <= min((i + 1) * bm, N_PROBE) - 1)
            if abs(visited * bm * bn * per_mma - mma) < 0.5:
                return bm, bn
    raise RuntimeError(f"cannot infer the tile of {kind} hdim {d} from grid {grid_x} and {mma} mma")


def sources_for(arch, filt):
    """The instantiations the dispatcher launches on arch's card: dense and band (causal) ones;
    on sm_86 (99 KiB per block) the compact ones where they exist, on sm_90 (227 KiB) the large
    ones where they exist (the backward at head dim 128); on sm_75 the Turing ones
    (fp16; torch's FlashAttention-2 has no sm_75 kernels to set beside them). The modifier variant
    (softcap, ALiBi, bias) and the KV-cache one have no counterpart among the kernels SDPA
    launches for a plain or causal problem."""
    srcs = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_hdim*.cu"))
            if filt in os.path.basename(p) and not re.search(r"_mod[._]", os.path.basename(p))
            and "_kvcache_" not in p and "_fp32" not in p}
    if arch == "75":
        return [srcs[n] for n in sorted(srcs) if n.endswith("_sm75")]
    budget = {"86": "_99kib", "90": "_227kib"}.get(arch, "")
    wide = sorted({re.sub(r"_(99kib|227kib)$", "", n) for n in srcs if not n.endswith("_sm75")})
    return [srcs.get(n + budget, srcs.get(n)) for n in wide if n + budget in srcs or n in srcs]


def our_rows(archs, filt, jobs, nvcc, cuobjdump):
    jobs_list = [(s, a) for a in archs for s in sources_for(a, filt)]
    compiled = {}
    with cf.ThreadPoolExecutor(jobs) as ex:
        futs = {ex.submit(compile_one, s, a, nvcc, cuobjdump): (s, a) for s, a in jobs_list}
        for f in cf.as_completed(futs):
            compiled[futs[f]] = f.result()
    rows = []
    for s, a in jobs_list:
        name = os.path.basename(s)[:-3]
        m = re.match(r"(fwd|bwd)_hdim(\d+)_(fp16|bf16)(_band)?(_99kib|_227kib|_sm75)?$", name)
        kind, d, dtype, causal = m.group(1), int(m.group(2)), m.group(3), bool(m.group(4))
        rec = launch_records(name, N_PROBE)
        role = "fwd" if kind == "fwd" else "bwd main (atomic dQ)"
        r = compiled[(s, a)][role]
        threads, smem, grid, mma = rec[role][:4]
        bm, bn = tile_from_launch(kind, d, grid[0], mma // 2 if a == "75" else mma, causal)  # (sm_75: two mma per k16)
        # HMMA per warp per iteration: the 64x64-tile work (fwd 2 GEMMs, bwd 5) over the warps
        # (sm_75: HMMA.1688, half an m16n8k16's work each)
        hmma = (2 if kind == "fwd" else 5) * bm * bn * d // ((1024 if a == "75" else 2048) * (threads // 32))
        units = bm * bn / 4096
        rows.append(dict(side="flash_cuda", arch=f"sm_{a}", kernel=f"{name} ({role})", pass_=kind, head_dim=d,
                         dtype=dtype, causal=causal, registers=r["regs"], stack_bytes=r["stack"],
                         spill_bytes=r["spill_st"] + r["spill_ld"], smem_bytes=smem, threads=threads,
                         sass=r["sass"], hmma=hmma, warps=threads // 32, units=units, tile=f"{bm}x{bn}"))
    return rows


def torch_rows(archs, lib, cuobjdump, ours):
    res = torch_resources(lib, cuobjdump)
    rows, wanted = [], set()
    keys = sorted({(r["pass_"], r["head_dim"], r["dtype"], r["causal"]) for r in ours})
    for a in archs:
        if a == "75":
            continue  # (no sm_75 FlashAttention-2 in torch)
        for kind, d, dtype, causal in keys:
            name, threads, smem, hmma, units = torch_kernel(a, kind, d, dtype, causal)
            if name not in res or a not in res[name]:
                sys.exit(f"torch kernel not found in {lib} for sm_{a}: {name}\n(the launcher mapping in "
                         f"TORCH_CONFIGS does not match this torch version)")
            elf, mangled, regs, stack = res[name][a]
            wanted.add((elf, mangled))
            cfg = torch_config(a, kind, d, causal)
            rows.append(dict(side="torch", arch=f"sm_{a}", kernel=name.split("(")[0].replace("void ", ""), pass_=kind,
                             head_dim=d, dtype=dtype, causal=causal, registers=regs, stack_bytes=stack,
                             spill_bytes=None, smem_bytes=smem, threads=threads, key=(elf, mangled), hmma=hmma,
                             warps=threads // 32, units=units, tile=f"{cfg[0]}x{cfg[1]}"))
    sass = torch_sass(lib, cuobjdump, wanted)
    for r in rows:
        r["sass"] = sass[r.pop("key")]
    return rows


def fit_eta(rows):
    """Overlap efficiency per pass reproducing the calibration points best (least max error):
    {pass: eta}, and [(pass, head dim, published, predicted)]."""
    pts = [r for r in rows if r["side"] == "torch" and r["arch"] == "sm_80" and r["dtype"] == "fp16"
           and not r["causal"] and (r["pass_"], r["head_dim"]) in CALIBRATION and r["analysis"]]
    if len(pts) < len(CALIBRATION):
        return None, []
    etas, calib = {}, []
    for kind in ("fwd", "bwd"):
        mine = [r for r in pts if r["pass_"] == kind]
        err = lambda eta: max(abs(sm.predict(r["analysis"], eta)[1] - CALIBRATION[(kind, r["head_dim"])]) for r in mine)
        etas[kind] = min((i / 1000 for i in range(1001)), key=err)
        calib += [(kind, r["head_dim"], CALIBRATION[(kind, r["head_dim"])], sm.predict(r["analysis"], etas[kind])[1])
                  for r in mine]
    return etas, calib


CARD = {"sm_80": "a100", "sm_90": "h100", "sm_86": "a10", "sm_75": "t4"}  # the card each architecture's rows model


def summary(path, before_path=None, head_dims=(64, 128, 256), dtype="bf16"):
    """The README's table from a --json file: flash_cuda beside torch per (arch, pass, head dim,
    causal), with the proxies the retune must win (no stack or spills, instructions per unit <=
    torch's, occupancy >= torch's on the row's card, predicted tensor fraction >= torch's), and optionally the
    instructions and prediction of an earlier run (--before)."""
    rows = json.load(open(path))
    before = {}
    if before_path:
        before = {(r["side"], r["arch"], r["pass"], r["head_dim"], r["dtype"], r["causal"]): r
                  for r in json.load(open(before_path))}
    key = lambda r: (r["arch"], r["pass"], r["head_dim"], r["dtype"], r["causal"])
    theirs = {key(r): r for r in rows if r["side"] == "torch"}
    if not any(r["side"] == "flash_cuda" and r["dtype"] == dtype for r in rows):
        sys.exit(f"{path} holds no flash_cuda rows in {dtype} (it has: "
                 f"{', '.join(sorted({r['dtype'] for r in rows})) or 'no rows'})")
    head = ["arch", "pass", "D", "causal", "tile ours / torch", "regs", "stack B", "occ A100", "occ H100",
            "instr/unit" + (" (before)" if before else ""), "pred. tensor" + (" (before)" if before else ""),
            "proxies lost"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted((r for r in rows if r["side"] == "flash_cuda" and r["dtype"] == dtype and r["head_dim"] in head_dims),
                    key=lambda r: (r["pass"] != "fwd", r["arch"], r["head_dim"], r["causal"])):
        t = theirs.get(key(r))
        if t is None:  # a --filter run, or a torch library without this instantiation
            out.append(f"| {r['arch']} | {r['pass']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | "
                       f"no torch kernel in {path} |" + " |" * (len(head) - 5))
            continue
        b = before.get(("flash_cuda",) + key(r))
        lost = [name for name, ok in (
            ("stack/spills", r["stack_bytes"] == 0 and r["spill_bytes"] == 0),
            ("instructions", r["instructions_per_unit"] <= t["instructions_per_unit"]),
            # on the card of the row's architecture: an sm_90 kernel's A100 occupancy is information only
            # (the large configurations do not fit an A100, which runs the wide ones: their sm_80 rows)
            ("occupancy", r[f"occupancy_{CARD[r['arch']]}"] >= t[f"occupancy_{CARD[r['arch']]}"]),
            ("prediction", r["predicted_tensor_fraction"] >= t["predicted_tensor_fraction"])) if not ok]
        was = lambda k, f: f" ({format(b[k], f)})" if b else ""
        out.append("| " + " | ".join(str(x) for x in [
            r["arch"], r["pass"], r["head_dim"], "yes" if r["causal"] else "no", f"{r['tile']} / {t['tile']}",
            f"{r['registers']} / {t['registers']}", f"{r['stack_bytes']} / {t['stack_bytes']}",
            f"{r['occupancy_a100']:.0%} / {t['occupancy_a100']:.0%}", f"{r['occupancy_h100']:.0%} / {t['occupancy_h100']:.0%}",
            f"{r['instructions_per_unit']:.0f}{was('instructions_per_unit', '.0f')} / {t['instructions_per_unit']:.0f}",
            f"{r['predicted_tensor_fraction']:.1%}{was('predicted_tensor_fraction', '.1%')} / "
            f"{t['predicted_tensor_fraction']:.1%}", ", ".join(lost) or "none"]) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["80", "90"], choices=sorted(sm.ARCHS))
    ap.add_argument("--filter", default="", help="substring of the instantiation file name, e.g. hdim64")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--eta", type=float, nargs=2, metavar=("FWD", "BWD"),
                    help="use these overlap efficiencies instead of fitting them")
    ap.add_argument("--summary", metavar="JSON", help="print the README's summary table of a --json file and exit")
    ap.add_argument("--before", metavar="JSON", help="with --summary: an earlier run's --json, shown in parentheses")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="with --summary: which dtype's rows")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary, args.before, dtype=args.dtype))
        return 0
    nvcc, cuobjdump = tool("nvcc"), tool("cuobjdump")
    tool("nvdisasm")
    lib = torch_library()
    ours = our_rows(args.arch, args.filter, args.jobs, nvcc, cuobjdump)
    if not ours:
        sys.exit(f"no instantiation matches --filter {args.filter!r}")
    theirs = torch_rows(args.arch, lib, cuobjdump, ours)
    rows = ours + theirs
    for r in rows:
        a = r["arch"][3:]
        r["analysis"] = sm.analyse(r["sass"], r["hmma"], r["warps"], r["units"], a)
        r["spill_instructions"] = spill_instructions(r["sass"])
        r["occupancy_a100"] = occupancy(r["registers"], r["threads"], r["smem_bytes"], "80")[1]
        r["occupancy_h100"] = occupancy(r["registers"], r["threads"], r["smem_bytes"], "90")[1]
        r["occupancy_a10"] = occupancy(r["registers"], r["threads"], r["smem_bytes"], "86")[1]
        r["occupancy_t4"] = occupancy(r["registers"], r["threads"], r["smem_bytes"], "75")[1]
    calib = []
    if args.eta is not None:
        eta = {"fwd": args.eta[0], "bwd": args.eta[1]}
    else:
        # the calibration points need torch's fp16 non-causal hdim 64/128 kernels at sm_80
        need = [r for r in rows if r["side"] == "torch"]
        eta, calib = fit_eta(need)
        if eta is None:
            extra = torch_rows(["80"], lib, cuobjdump,
                               [dict(pass_=k, head_dim=d, dtype="fp16", causal=False) for k, d in CALIBRATION])
            for r in extra:
                r["analysis"] = sm.analyse(r["sass"], r["hmma"], r["warps"], r["units"], "80")
            eta, calib = fit_eta(extra)
    for r in rows:
        an = r["analysis"]
        r["predicted_cycles_per_unit"], r["predicted_tensor_fraction"] = sm.predict(an, eta[r["pass_"]]) if an else (None, None)
    report = render(rows, eta, calib)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "sass_compare.md"), "w") as f:
        f.write(report)
    print(report)
    if args.json:
        keep = []
        for r in rows:
            an = r["analysis"] or {}
            keep.append({"side": r["side"], "arch": r["arch"], "kernel": r["kernel"], "pass": r["pass_"],
                         "head_dim": r["head_dim"], "dtype": r["dtype"], "causal": r["causal"], "tile": r["tile"],
                         "registers": r["registers"], "stack_bytes": r["stack_bytes"], "spill_bytes": r["spill_bytes"],
                         "spill_instructions": r["spill_instructions"], "smem_bytes": r["smem_bytes"],
                         "threads": r["threads"], "occupancy_a100": r["occupancy_a100"],
                         "occupancy_h100": r["occupancy_h100"], "occupancy_a10": r["occupancy_a10"],
                         "occupancy_t4": r["occupancy_t4"],
                         "instructions_per_unit": an.get("instructions_per_unit"),
                         "hmma_per_unit": (an.get("counts_per_unit") or {}).get("HMMA"),
                         "counts_per_unit": an.get("counts_per_unit"),
                         "pipe_cycles_per_unit": an.get("pipe_cycles_per_unit"),
                         "issue_cycles_per_unit": an.get("issue_cycles_per_unit"),
                         "predicted_cycles_per_unit": r["predicted_cycles_per_unit"],
                         "predicted_tensor_fraction": r["predicted_tensor_fraction"], "model_eta": eta[r["pass_"]]})
        with open(args.json, "w") as f:
            json.dump(keep, f, indent=1)
    return 0


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def render(rows, eta, calib):
    out = [f"Static SASS comparison: flash_cuda vs torch {torch_version()}'s FlashAttention-2 (SDPA flash backend).",
           "Counts are per unit of work (one 64x64 tile of attention, all warps of the block), from the steady-state "
           "main loop of the SASS. 'pred. tensor' is a PREDICTION of the fraction of tensor-core peak from the static "
           "cycle model in benchmarks/sass_model.py (sm_90: of mma.sync's peak, about 2/3 of H100's wgmma peak).", ""]
    out.append(f"Model calibration: overlap efficiency eta = {eta['fwd']:.3f} (forward), {eta['bwd']:.3f} (backward), "
               "fitted to FlashAttention-2's published A100 results with torch's own kernels (fp16, not causal):")
    for kind, d, target, pred in calib:
        out.append(f"  {kind} hdim {d}: published ~{target:.0%}, model {pred:.1%} (error {pred - target:+.1%})")
    if calib:
        out.append(f"  model error on the calibration points: at most {max(abs(p - t) for *_x, t, p in calib):.1%} "
                   "(absolute fraction of peak)")
    out.append("")
    head = ["arch", "pass", "D", "dtype", "causal", "side", "tile", "regs", "stack B", "spill", "smem KiB", "threads",
            "occ A100", "occ H100", "occ A10", "occ T4", "instr/unit", "HMMA", "LDSM", "LDGSTS", "LDG+STG", "FP32 ops", "FMNMX", "EX2",
            "SHFL", "BAR", "pred. tensor"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = lambda r: (r["arch"], r["pass_"], r["head_dim"], r["dtype"], r["causal"], r["side"] != "flash_cuda")
    for r in sorted(rows, key=key):
        an = r["analysis"]
        c = an["counts_per_unit"] if an else {}
        g = lambda k: c.get(k) if an else None
        spill = r["spill_bytes"] if r["side"] == "flash_cuda" else f"{r['spill_instructions']} STL/LDL"
        row = [r["arch"], r["pass_"], r["head_dim"], r["dtype"], "yes" if r["causal"] else "no", r["side"], r["tile"],
               r["registers"], r["stack_bytes"], spill, f"{r['smem_bytes'] / 1024:.1f}", r["threads"],
               f"{r['occupancy_a100']:.0%}", f"{r['occupancy_h100']:.0%}", f"{r['occupancy_a10']:.0%}",
               f"{r['occupancy_t4']:.0%}",
               fmt(an and an["instructions_per_unit"], ".0f"),
               fmt(g("HMMA"), ".0f"), fmt(g("LDSM"), ".0f"), fmt(g("LDGSTS"), ".0f"),
               fmt(an and c["LDG"] + c["STG"], ".0f"), fmt(an and c["FFMA"] + c["FMUL"] + c["FADD"], ".0f"),
               fmt(g("FMNMX"), ".0f"), fmt(g("MUFU.EX2"), ".0f"), fmt(g("SHFL"), ".0f"), fmt(g("BAR"), ".1f"),
               fmt(r["predicted_tensor_fraction"], ".1%")]
        out.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(out) + "\n"


def torch_version():
    import torch
    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
