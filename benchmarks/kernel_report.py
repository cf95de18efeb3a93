#!/usr/bin/env python3
"""Kernel report: what the compiled kernels are, per instantiation, with no GPU needed.

For every generated instantiation (csrc/cuda/fwd_*.cu, bwd_*.cu, fwd_kvcache_*.cu) and each architecture:
  - ptxas -v: registers per thread, spill stores/loads (must be 0), stack frame;
  - dynamic shared memory per block, from the emulator running the real launcher;
  - theoretical occupancy on the architecture's card (sm_75 T4, sm_80 A100, sm_86 A10, sm_89 L4,
    sm_90 H100) from registers, shared memory and threads (CUDA occupancy rules: registers allocated
    per warp in units of 256, 1 KiB of shared memory reserved per block; 0 where the block's
    shared memory exceeds the card's per-block maximum: the dispatcher never launches it there);
  - the SASS instruction mix (cuobjdump -sass): tensor-core HMMA, LDSM (ldmatrix), LDGSTS
    (cp.async), 128-bit global loads (sm_75's tile copies), MUFU.EX2, SHFL, BAR, 128-bit global
    stores, and the total.

    python benchmarks/kernel_report.py [--arch 80 90] [--filter hdim64] [--jobs 2]
    python benchmarks/kernel_report.py --arch 80 86 89 --filter 99kib   # the compact configurations
    python benchmarks/kernel_report.py --arch 75 --filter sm75          # the Turing ones

Writes benchmarks/results/kernel_report.md and prints it. Needs nvcc (CUDA_HOME) and
cuobjdump with nvdisasm beside it (the toolkit's, or
pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm).
"""
import argparse
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {  # per-SM limits and shared memory per block (CUDA C++ Programming Guide, compute capability tables)
    "75": {"name": "T4", "regs": 65536, "threads": 1024, "blocks": 16, "smem": 64 * 1024, "smem_block": 64 * 1024},
    "80": {"name": "A100", "regs": 65536, "threads": 2048, "blocks": 32, "smem": 164 * 1024, "smem_block": 163 * 1024},
    "86": {"name": "A10", "regs": 65536, "threads": 1536, "blocks": 16, "smem": 100 * 1024, "smem_block": 99 * 1024},
    "89": {"name": "L4", "regs": 65536, "threads": 1536, "blocks": 24, "smem": 100 * 1024, "smem_block": 99 * 1024},
    "90": {"name": "H100", "regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024, "smem_block": 227 * 1024},
}
# The emulator profile whose dispatch launches an instantiation's budget (csrc/kernels/device.h):
# the compact (99 KiB) ones run on sm_86/89/120 cards; with the default build they run there as
# sm_80 SASS (sm_86 and sm_89 execute sm_80 code), so their sm_80 build is the one users get.
# The sm_75 ones (fp16, 64 KiB) run on T4s and RTX 20xx cards as sm_75 SASS. The large ones
# (227 KiB) run on sm_90 and sm_100 cards (H100, H200, B200).
BUDGET_DEVICE = {"": "a100", "_99kib": "l4", "_sm75": "t4", "_227kib": "h100"}
SASS_OPS = {"HMMA": r"\bHMMA\.", "LDSM": r"\bLDSM\.", "LDGSTS": r"\bLDGSTS\.", "LDG.128": r"\bLDG\.E\.128\b", "EX2": r"\bMUFU\.EX2\b",
            "SHFL": r"\bSHFL\.", "BAR": r"\bBAR\.SYNC", "STG.128": r"\bSTG\.E\.128\b", "LDS.128": r"\bLDS\.128\b"}


def tool(name):
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.path.join(home, "bin", name), shutil.which(name)):
        if cand and os.path.exists(cand):
            return cand
    try:
        import nvidia
        for base in nvidia.__path__:
            hits = glob.glob(os.path.join(base, "*", "bin", name))
            if hits:
                return hits[0]
    except ImportError:
        pass
    sys.exit(f"{name} not found: set CUDA_HOME or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


ROLES = (("flash_bwd_preprocess_kernel", "bwd preprocess"), ("flash_bwd_postprocess_kernel", "bwd postprocess"),
         ("flash_bwd_dq_kernel", "bwd dQ pass (deterministic)"), ("splitkv_combine_kernel", "fwd kvcache combine"))


def role(demangled):
    """The kernel's role; the backward main and dQ kernels' last template flag is kVarlen
    (csrc/kernels/seqlen.h), the forward's the one before kCache (its KV-cache instantiation),
    kDropout the one before kVarlen (csrc/kernels/dropout.h; the dQ kernel has none):
    packed-batch instantiations get " (packed)", the kernels with dropout's code " (dropout)"
    (see split_roles)."""
    flags = re.findall(r"\b(true|false)\b", demangled.split("(flash_cuda::")[0])
    if "flash_fwd_kernel<" in demangled:  # <Traits, kBand, kMod, kDropout, kVarlen, kCache>
        if flags[-1] == "true":
            return "fwd kvcache"
        return "fwd" + (" (packed)" if flags[-2] == "true" else "") + (" (dropout)" if flags[-3] == "true" else "")
    for key, name in ROLES:
        if key + "<" in demangled:
            return name + (" (packed)" if key == "flash_bwd_dq_kernel" and flags[-1] == "true" else "")
    if "flash_bwd_kernel<" in demangled:  # template flags <Traits, kBand, kMod, kAtomicDq, kDropout, kVarlen>
        return (("bwd main (atomic dQ)" if flags[-3] == "true" else "bwd main (deterministic)") +
                (" (packed)" if flags[-1] == "true" else "") + (" (dropout)" if flags[-2] == "true" else ""))
    return demangled


def split_roles(kernels):
    """{role: v} with " (dropout)" kept only where the same role exists without it: where an
    instantiation's only kernel of a role has dropout's code (modifier variant, fp32), it is that
    role's kernel and runs every call."""
    return {(r[:-len(" (dropout)")] if r.endswith(" (dropout)") and r[:-len(" (dropout)")] not in kernels else r): v
            for r, v in kernels.items()}


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def gencode(arch):
    """The target as the build compiles it (setup.py's gencode_flags): SASS for sm_<arch> from
    the PTX of its feature level, compute_75 below sm_80, compute_80 from there on."""
    return f"-gencode=arch=compute_{75 if int(arch) < 80 else 80},code=sm_{arch}"


def compile_one(src, arch, nvcc, cuobjdump):
    """{kernel role: {regs, spills, stack, SASS mix}} for every kernel in one generated file."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [nvcc, "-std=c++17", "-O3", "--use_fast_math", gencode(arch), "-cubin", "-Xptxas=-v",
               "-I", os.path.join(ROOT, "csrc"), src, "-o", cubin]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr)
        ptxas = {m.group(1): {"stack": int(m.group(2)), "spill_st": int(m.group(3)), "spill_ld": int(m.group(4)),
                              "regs": int(m.group(5))}
                 for m in re.finditer(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes "
                                      r"spill stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers",
                                      res.stderr, re.S)}
        env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True, env=env).stdout
        for section in re.split(r"\n\s*Function : ", sass)[1:]:
            name = section.split()[0]
            instrs = [l for l in section.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", l)]
            mix = {k: sum(bool(re.search(p, l)) for l in instrs) for k, p in SASS_OPS.items()}
            mix["total"] = len(instrs)
            ptxas[name]["mix"] = mix
            ptxas[name]["sass"] = section
        names = demangle(list(ptxas))
        return split_roles({role(names[n]): v for n, v in ptxas.items()})


def occupancy(regs, threads, smem, arch):
    """(blocks per SM, occupancy); (0, 0.0) for a block the architecture cannot launch."""
    a = ARCH[arch]
    if smem > a["smem_block"]:
        return 0, 0.0
    warps = threads // 32
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (a["regs"] // regs_per_warp) // warps
    by_smem = a["smem"] // (smem + 1024) if smem else a["blocks"]
    blocks = min(by_regs, by_smem, a["threads"] // threads, a["blocks"])
    return blocks, blocks * warps / (a["threads"] // 32)


def launch_shapes(name, n=8):
    """{kernel role: (threads, dynamic smem)} of an instantiation's kernels, from emulated
    launches through the real launcher (forward, backward, deterministic backward)."""
    return {k: v[:2] for k, v in launch_records(name, n).items()}


def launch_records(name, n=8, executor="source"):
    """{kernel role: (threads, dynamic smem, grid, mma count, PTX instructions by class)} of an
    instantiation's kernels for B = H = 1, Nq = Nk = n, emulated through the real launcher
    without the checkers (the instruction counts: under executor="ptx")."""
    import torch
    import flash_cuda
    m = re.match(r"(fwd|bwd|fwd_kvcache)_hdim(\d+)_(fp16|bf16|fp32)(_band|_mod)?(_99kib|_227kib|_sm75)?$", name)
    kind, d, dtype, variant = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
    device = BUDGET_DEVICE[m.group(5) or ""]
    if kind == "fwd_kvcache":
        return kvcache_launch_records(d, torch.float16 if dtype == "fp16" else torch.bfloat16, n, device, executor)
    # what makes the dispatcher pick the variant (csrc/kernels/dispatch.h)
    kwargs = {"": {}, "_band": dict(causal=True), "_mod": dict(causal=True, softcap=30.0)}[variant]
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    shapes = {}
    for deterministic in (False, True):
        q, k, v = (torch.randn(1, 1, n, d, dtype=dt, requires_grad=True) for _ in range(3))
        with flash_cuda.emulate(check=False, device=device, executor=executor) as emu:
            out = flash_cuda.attention(q, k, v, deterministic=deterministic, **kwargs)
            if kind == "bwd":  # (a forward's file has only the forward: sm_75 has no backward at 256)
                out.sum().backward()
        for r in emu.launches:
            base = r["kernel"].split("<")[0]
            key = {"flash_fwd": "fwd", "flash_bwd_preprocess": "bwd preprocess", "flash_bwd_postprocess": "bwd postprocess",
                   "flash_bwd_dq": "bwd dQ pass (deterministic)",
                   # (fp32: always the deterministic pass)
                   "flash_bwd": "bwd main (deterministic)" if deterministic or dtype == "fp32" else "bwd main (atomic dQ)"}[base]
            shapes[key] = (r["threads_per_block"], r["dynamic_smem"], tuple(r["grid"]), r["mma"], r["instructions"])
    return shapes


def kvcache_launch_records(d, dt, n, device="a100", executor="source"):
    """The KV-cache forward and its merge, launched for one decoding step split in two."""
    import torch
    import flash_cuda
    q, kc, vc = torch.randn(1, 2, 1, d, dtype=dt), torch.randn(1, 1, n, d, dtype=dt), torch.randn(1, 1, n, d, dtype=dt)
    with flash_cuda.emulate(check=False, device=device, executor=executor) as emu:
        flash_cuda.attention_with_kvcache(q, kc, vc, num_splits=2)
    names = {"flash_fwd_kvcache": "fwd kvcache", "flash_fwd_kvcache_combine": "fwd kvcache combine"}
    return {names[r["kernel"].split("<")[0]]: (r["threads_per_block"], r["dynamic_smem"], tuple(r["grid"]), r["mma"],
                                               r["instructions"]) for r in emu.launches}


PTX_CLASSES = ("tensor", "fp", "integer", "memory", "control", "sync")


def ptx_per_warp(rec):
    """The PTX executor's thread instructions of a launch by class, over 32 x its warps: warp
    instructions per warp where the warp's lanes stay converged."""
    if rec is None:
        return ""
    threads, _, grid, _, instr = rec
    warps = (threads + 31) // 32 * grid[0] * grid[1] * grid[2]
    per = [instr[c] / (32 * warps) for c in PTX_CLASSES]
    return "/".join(f"{x:.0f}" for x in per) + f" ({sum(per):.0f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["80", "90"], choices=sorted(ARCH))
    ap.add_argument("--filter", default="", help="substring of the instantiation file name")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--ptx-counts", type=int, metavar="N", default=0,
                    help="add the PTX executor's dynamic instruction counts per warp by class for B = H = 1, "
                         "Nq = Nk = N (e.g. 128: one key tile), beside the static SASS counts")
    args = ap.parse_args()
    nvcc, cuobjdump = tool("nvcc"), tool("cuobjdump")
    srcs = sorted(p for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_hdim*.cu")) if args.filter in p)
    jobs = {(s, a): None for s in srcs for a in args.arch}
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        futs = {ex.submit(compile_one, s, a, nvcc, cuobjdump): (s, a) for s, a in jobs}
        for f in cf.as_completed(futs):
            jobs[futs[f]] = f.result()

    head = ["instantiation", "kernel", "arch", "regs", "spill st/ld (B)", "threads", "smem/block", "blocks/SM",
            "occupancy"] + list(SASS_OPS) + ["total"] + (
        [f"PTX executed per warp at N={args.ptx_counts}: " + "/".join(PTX_CLASSES) + " (total)"] if args.ptx_counts else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    spills = {"dense": 0, "packed": 0, "kvcache": 0}
    stack = {"dense": 0, "packed": 0, "kvcache": 0}
    for s in srcs:
        name = os.path.basename(s)[:-3]
        shapes = launch_shapes(name)
        dynamic = launch_records(name, args.ptx_counts, "ptx") if args.ptx_counts else {}
        for a in args.arch:
            for kernel, r in sorted(jobs[(s, a)].items()):
                launch = kernel.replace(" (packed)", "").replace(" (dropout)", "")
                threads, smem = shapes[launch]  # same launch as the dense kernel without dropout
                batch = "packed" if "(packed)" in kernel else ("kvcache" if "kvcache" in kernel else "dense")
                spills[batch] += r["spill_st"] + r["spill_ld"]
                stack[batch] += r["stack"]
                blocks, occ = occupancy(r["regs"], threads, smem, a)
                row = [name, kernel, f"sm_{a} ({ARCH[a]['name']})", r["regs"], f"{r['spill_st']}/{r['spill_ld']}",
                       threads, f"{smem / 1024:.1f} KiB", blocks, f"{occ:.0%}"] + \
                      [r["mix"][k] for k in SASS_OPS] + [r["mix"]["total"]]
                if args.ptx_counts:
                    row.append(ptx_per_warp(dynamic.get(kernel)) if kernel == launch else "")
                lines.append("| " + " | ".join(str(x) for x in row) + " |")
    report = "\n".join(lines) + (
        f"\n\nTotal spill bytes over all instantiations and architectures: {spills['dense']} in the kernels of "
        f"dense batches, {spills['packed']} in those of packed batches (kVarlen), {spills['kvcache']} in the "
        f"KV-cache ones\n"
        f"Total stack frame bytes: {stack['dense']} dense, {stack['packed']} packed, {stack['kvcache']} KV cache\n")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "kernel_report.md"), "w") as f:
        f.write(report)
    print(report)
    return 1 if spills["dense"] or stack["dense"] else 0


if __name__ == "__main__":
    sys.exit(main())
