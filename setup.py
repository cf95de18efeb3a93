"""Build flash_cuda._C: the CPU backend always; CUDA kernels with nvcc when a CUDA toolkit,
a CUDA build of torch and CUDA sources (csrc/cuda/*.cu) are all present.

    pip install --no-build-isolation .        # or -e .; MAX_JOBS=N limits parallel compiles
"""
import glob
import gzip
import json
import os
import re
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_80 SASS (also run by sm_86/87/89), sm_90 SASS and PTX (compute_80, gencode_flags; the
# driver JIT-compiles it for later GPUs). Turing
# (T4, RTX 20xx) needs "7.5;8.0;9.0+PTX": its kernels compile only in the sm_75 pass (README,
# "Turing"); the default stays lean for build time.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# nvcc's intermediate files (--keep): among them X.ptx (X.compute_80.ptx when 7.5 is in the list
# too: two PTX levels), the PTX that ptxas turned into the sm_80 SASS of the compiled file X.cu
# (csrc/cuda/groups/group_*.cu, dispatch.cu, ...). The build packages those (gzipped) as flash_cuda/ptx/X.ptx.gz
# for the emulator's PTX executor (flash_cuda.emulate(executor="ptx")): it runs the very code
# the sm_80 build runs, at no extra compile cost.
KEEP_DIR = os.path.join(ROOT, "build", "nvcc-keep")


def find_cuda_home():
    """CUDA_HOME if set, else /usr/local/cuda. torch's own guess (from the nvcc on PATH) can
    point at /usr/local, which is wrong on machines with a symlinked nvcc."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def find_cuda_headers(cuda_home):
    """A directory with cuda_fp16.h / cuda_bf16.h for the emulator build (host compiler only):
    the toolkit's, else the one pip installs with CUDA builds of torch (nvidia/cu13/include)."""
    candidates = [os.path.join(cuda_home, "include")] if cuda_home else []
    try:
        import nvidia
        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    for inc in candidates:
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")) and os.path.exists(os.path.join(inc, "cuda_bf16.h")):
            return inc
    return None


def gencode_flags(arch_list, ptx_only=False):
    """nvcc's -gencode flags for TORCH_CUDA_ARCH_LIST, with one PTX per feature level of the kernels:
    compute_75 for sm_75 (Turing's instructions) and compute_80 for every newer entry. The kernels
    use nothing newer than sm_80's instructions (mma.sync, ldmatrix, cp.async), so nvcc's front end
    and optimiser (cicc, most of a file's compile time) run once and ptxas makes each SASS from the
    same PTX; "+PTX" embeds its level's PTX, which the driver compiles for any later GPU (a
    compute_80 PTX runs wherever a compute_90 one would). None (torch's own flags) for a list
    this does not read: names ("Ampere"), arch-specific targets ("9.0a"), anything below 7.5.
    ptx_only: each level's PTX alone, no SASS (ptxas skipped: see FLASH_CUDA_PTX_ONLY)."""
    entries = set()
    for token in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d)(\+PTX)?", token)
        if token and (m is None or int(m.group(1) + m.group(2)) < 75):
            return None
        if token:
            entries.add((int(m.group(1) + m.group(2)), bool(m.group(3))))
    flags = []
    for level in (75, 80):
        mine = sorted(e for e in entries if (e[0] < 80) == (level == 75))
        if not ptx_only:
            flags += [f"-gencode=arch=compute_{level},code=sm_{cc}" for cc in sorted({cc for cc, _ in mine})]
        if mine and (ptx_only or any(ptx for _, ptx in mine)):
            flags.append(f"-gencode=arch=compute_{level},code=compute_{level}")
    return flags


def needs_sm75_sources(arch_list):
    """Whether the build has an sm_75 pass, the only one in which Turing's kernels
    (csrc/cuda/*_sm75.cu) are more than empty stubs: a 7.5 entry, or a list gencode_flags leaves
    to torch (a name such as "Turing" may mean one)."""
    flags = gencode_flags(arch_list)
    return flags is None or any("compute_75" in f for f in flags)


def compiled_cuda_sources():
    """The .cu files nvcc compiles (absolute paths): the kernel instantiations in groups
    (tools/generate_kernels.py: csrc/cuda/groups/group_*.cu, each including single-instantiation
    files csrc/cuda/{fwd,bwd}_*.cu), sharing nvcc's fixed cost per file (the single files are for
    tools that compile one at a time), and the other csrc/cuda files."""
    singles = ("fwd_", "bwd_")
    return sorted([p for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) if not os.path.basename(p).startswith(singles)]
                  + glob.glob(os.path.join(ROOT, "csrc", "cuda", "groups", "*.cu")))


def extension():
    import torch
    from torch.utils import cpp_extension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    cpp_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/emu/*.cpp") + rel("csrc/emu/generated/*.cpp")
    cuda_sources = [os.path.relpath(p, ROOT) for p in compiled_cuda_sources()]
    # -fopenmp: at::parallel_for is a header template whose "omp parallel" compiles in this
    # extension; without the flag it silently runs on one thread. The libgomp it links
    # resolves to the one torch already loaded (same soname), so there is one runtime.
    # -g0: torch's build passes Python's own CFLAGS, -g among them; the debug information of the
    # emulator's kernel instantiations cost a third of their compile time and 110 MB of the .so.
    cxx_flags = ["-O3", "-g0", "-fno-strict-aliasing", "-fopenmp"]
    link_flags = ["-fopenmp"]

    cuda_home = find_cuda_home()
    # The SIMT emulator compiles the CUDA kernel headers with the host compiler against the CUDA
    # fp16/bf16 headers; it needs no GPU and no nvcc.
    cuda_headers = find_cuda_headers(cuda_home)
    if cuda_headers is None:
        raise RuntimeError("flash_cuda needs the CUDA headers cuda_fp16.h and cuda_bf16.h (for its SIMT emulator): "
                           "set CUDA_HOME to a CUDA toolkit, or pip install nvidia-cuda-runtime")
    include_dirs = [os.path.join(ROOT, "csrc"), cuda_headers]
    if cuda_home and torch.version.cuda and cuda_sources:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch read its guess at import time
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        # The launcher refuses, with this list in the message, a GPU it has no code for. Passed
        # as bare tokens joined by ':' (stringised in kernel_launch.cpp): build commands go
        # through a shell, where quotes and ';' would not survive.
        arch_tokens = re.sub(r"[;\s]+", ":", os.environ["TORCH_CUDA_ARCH_LIST"].strip())
        arch_define = [f"-DFLASH_CUDA_ARCH_LIST={arch_tokens}"] if re.fullmatch(r"[0-9A-Za-z.+:]+", arch_tokens) else []
        nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "--keep", f"--keep-dir={KEEP_DIR}"]
        # (torch adds its own -gencode flags only when none are given.) FLASH_CUDA_PTX_ONLY=1 (CI,
        # which has no GPU): the PTX of each level alone, no SASS, which skips ptxas (a fifth to a
        # quarter of a file's compile time); the packaged PTX, the emulator and the PTX executor are
        # the same, and a GPU would JIT-compile the PTX at load time.
        ptx_only = os.environ.get("FLASH_CUDA_PTX_ONLY") == "1"
        nvcc_flags += gencode_flags(os.environ["TORCH_CUDA_ARCH_LIST"], ptx_only) or []
        if not needs_sm75_sources(os.environ["TORCH_CUDA_ARCH_LIST"]):
            # Their kernels are compiled in the sm_75 pass alone; an sm_80+ pass makes empty ones
            # (3 s of host compilation each, 39 files). The dispatch then has no sm_75 branch
            # (the launcher refuses a GPU the arch list does not cover, a T4 included).
            cuda_sources = [s for s in cuda_sources if not s.endswith("_sm75.cu")]
            nvcc_flags.append("-DFLASH_CUDA_NO_SM75")
        os.makedirs(KEEP_DIR, exist_ok=True)
        return cpp_extension.CUDAExtension(
            "flash_cuda._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DFLASH_CUDA_WITH_CUDA"] + arch_define,
                                "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension("flash_cuda._C", cpp_sources, include_dirs=include_dirs,
                                      extra_compile_args={"cxx": cxx_flags},
                                      extra_link_args=link_flags)


def package_ptx(package_dir):
    """Copy the kept sm_80 PTX of every compiled csrc/cuda/**/X.cu into package_dir/ptx/X.ptx.gz (replacing
    what an earlier build left there); remove nvcc's other intermediates (preprocessed sources,
    cubins: about 5 MB per file)."""
    out_dir = os.path.join(package_dir, "ptx")
    shutil.rmtree(out_dir, ignore_errors=True)
    if not os.path.isdir(KEEP_DIR):
        return
    sources = {os.path.splitext(os.path.basename(p))[0] for p in compiled_cuda_sources()}
    index = {}  # entry (mangled kernel name) -> file
    for path in sorted(glob.glob(os.path.join(KEEP_DIR, "*")), key=os.path.getmtime):  # the newest last
        name = os.path.basename(path)
        stem = name.split(".")[0]
        if not name.endswith(".ptx") or stem not in sources:  # (or a file no longer compiled)
            os.remove(path)
            continue
        with open(path, "rb") as src:
            text = src.read()
        # X.ptx (one PTX level: gencode_flags) or X.compute_80.ptx (two, with 7.5): the sm_80 pass's
        if stem in sources and re.search(rb"^\.target\s+sm_80\b", text, re.M):
            os.makedirs(out_dir, exist_ok=True)
            with gzip.GzipFile(os.path.join(out_dir, stem + ".ptx.gz"), "wb", mtime=0) as dst:
                dst.write(text)
            for entry in re.findall(rb"\.entry\s+([A-Za-z0-9_$]+)\s*\(", text):
                index[entry.decode()] = stem + ".ptx.gz"
    if index:
        with open(os.path.join(out_dir, "index.json"), "w") as f:
            json.dump(index, f, indent=0, sort_keys=True)


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithPtx(BuildExtension):
        def run(self):
            super().run()
            package_ptx(os.path.dirname(self.get_ext_fullpath("flash_cuda._C")))

    return {"build_ext": BuildWithPtx}


if __name__ == "__main__":  # (pip and `python setup.py` run it so; tests import the helpers above)
    setup(
        name="flash_cuda",
        version="0.1.0",
        description="FlashAttention for PyTorch: CUDA kernels, a CPU backend and a SIMT emulator",
        packages=["flash_cuda", "flash_cuda.integrations"],
        ext_modules=[extension()],
        cmdclass=build_ext_cmdclass(),
        python_requires=">=3.10",  # torch 2.14.1's
        zip_safe=False,
    )
