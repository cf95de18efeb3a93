"""The build's own logic: the nvcc targets setup.py derives from TORCH_CUDA_ARCH_LIST, the sources
it leaves out, and the generated instantiation files matching tools/generate_kernels.py."""
import importlib.util
import json
import os
import re

import pytest

import flash_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (setup.py calls setup() only as __main__)
    return module


setup_py = load("flash_cuda_setup", "setup.py")
generate = load("flash_cuda_generate_kernels", os.path.join("tools", "generate_kernels.py"))


@pytest.mark.parametrize("arch_list, flags", [
    ("8.0", ["-gencode=arch=compute_80,code=sm_80"]),
    # the default: one PTX (compute_80) for the sm_80 and sm_90 SASS, embedded for later GPUs
    ("8.0;9.0+PTX", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=sm_90",
                     "-gencode=arch=compute_80,code=compute_80"]),
    ("7.5;8.0;8.6;9.0+PTX", ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_80,code=sm_80",
                             "-gencode=arch=compute_80,code=sm_86", "-gencode=arch=compute_80,code=sm_90",
                             "-gencode=arch=compute_80,code=compute_80"]),
    ("9.0 8.0 9.0", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=sm_90"]),
    ("7.5+PTX", ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_75,code=compute_75"]),
    ("10.0;12.0+PTX", ["-gencode=arch=compute_80,code=sm_100", "-gencode=arch=compute_80,code=sm_120",
                       "-gencode=arch=compute_80,code=compute_80"]),
    # what it does not read goes to torch's own flags
    ("Ampere", None), ("9.0a", None), ("7.0;8.0", None),
])
def test_gencode_flags(arch_list, flags):
    assert setup_py.gencode_flags(arch_list) == flags


@pytest.mark.parametrize("arch_list, flags", [
    ("8.0", ["-gencode=arch=compute_80,code=compute_80"]),
    ("8.0;9.0+PTX", ["-gencode=arch=compute_80,code=compute_80"]),
    ("7.5;8.0", ["-gencode=arch=compute_75,code=compute_75", "-gencode=arch=compute_80,code=compute_80"]),
    ("Ampere", None),
])
def test_gencode_flags_ptx_only(arch_list, flags):
    """FLASH_CUDA_PTX_ONLY's build (CI): each level's PTX alone, so ptxas never runs."""
    assert setup_py.gencode_flags(arch_list, ptx_only=True) == flags


@pytest.mark.parametrize("arch_list, needed", [
    ("8.0", False), ("8.0;9.0+PTX", False), ("8.6 8.9", False), ("7.5;8.0", True), ("7.5+PTX", True),
    ("Turing", True), ("Ampere", True), ("9.0a", True),  # (lists left to torch: kept)
])
def test_sm75_sources_only_where_the_list_asks(arch_list, needed):
    assert setup_py.needs_sm75_sources(arch_list) == needed


def test_generated_files_are_the_generators():
    """The committed instantiation files are exactly what tools/generate_kernels.py writes (one
    nvcc file per instantiation, the emulator's grouped): a change to the list without rerunning
    it fails here rather than as an undefined symbol at import."""
    files = generate.generated_files()
    assert generate.generated_on_disk() == set(files)
    for path, text in files.items():
        with open(os.path.join(ROOT, path)) as f:
            assert f.read() == text, path
    emu = [p for p in files if p.startswith(generate.EMU_DIR)]
    groups = [p for p in files if p.startswith(generate.GROUP_DIR)]
    singles = [p for p in files if os.path.dirname(p) == generate.CUDA_DIR]
    assert len(singles) == len(generate.instances()) > 3 * len(emu)  # (grouped)
    assert len(files) == len(singles) + len(groups) + len(emu)
    # every single file is in exactly one nvcc group, Turing's in groups of their own (an sm_80+
    # list compiles none of them), and the groups are what setup.py compiles
    included = [line.split('"')[1] for p in groups for line in files[p].splitlines() if line.startswith("#include")]
    assert sorted(included) == sorted(os.path.relpath(p, "csrc") for p in singles)
    for p in groups:
        turing = {inc.endswith("_sm75.cu\"") for inc in files[p].splitlines() if inc.startswith("#include")}
        assert turing == {p.endswith("_sm75.cu")}, p
    compiled = {os.path.relpath(p, ROOT) for p in setup_py.compiled_cuda_sources()}
    assert set(groups) <= compiled and not compiled & set(singles)


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_head_dims_and_split_limits_agree_across_files():
    """The instantiated head dims live in the generator and in the dispatch's switch, the KV-cache
    split limit in the kernels' heuristic, the launcher and the Python API: each copy agrees (a
    head dim generated but not dispatched would never run; one dispatched but not generated would
    be an undefined symbol)."""
    switch = re.search(r"#define FC_HEADDIM_SWITCH.*?\}\(\)", _read("csrc/kernels/dispatch.h"), re.S).group(0)
    dispatched = [int(d) for d in re.findall(r"constexpr int NAME = (\d+)", switch)]
    bounds = [int(d) for d in re.findall(r"D <= (\d+)", switch)]
    assert tuple(dispatched) == generate.HEAD_DIMS and tuple(bounds) == generate.HEAD_DIMS[:-1]
    assert generate.HEAD_DIMS[-1] == flash_cuda.api.MAX_HEAD_DIM
    kernel = int(re.search(r"constexpr int kMaxSplits = (\d+);", _read("csrc/kernels/kv_cache.h")).group(1))
    launcher = int(re.search(r"constexpr int64_t kMaxNumSplits = (\d+);", _read("csrc/kernel_launch.h")).group(1))
    assert kernel == launcher == flash_cuda.api.MAX_NUM_SPLITS


@pytest.mark.skipif(not flash_cuda.has_cuda_kernels(), reason="a CPU-only build packages no PTX")
def test_the_build_packaged_what_its_arch_list_asked_for():
    """The packaged PTX (the sm_80 pass of every compiled .cu: the instantiations in groups) has
    Turing's groups exactly when the list asked for sm_75 code, and every other group, each with
    the kernels of all of its instantiations indexed."""
    arch_list = flash_cuda.cuda_arch_list().replace(":", ";")
    ptx_dir = os.path.join(os.path.dirname(flash_cuda.__file__), "ptx")
    packaged = {f[:-len(".ptx.gz")] for f in os.listdir(ptx_dir) if f.endswith(".ptx.gz")}
    groups = {os.path.basename(p)[:-3]: text for p, text in generate.generated_files().items()
              if p.startswith(generate.GROUP_DIR)}
    sm75 = {g for g in groups if g.endswith("_sm75")}
    want = set(groups) if setup_py.needs_sm75_sources(arch_list) else set(groups) - sm75
    assert {p for p in packaged if p in groups} == want
    assert not {p for p in packaged if p.startswith(("fwd_", "bwd_"))}  # (single files are not compiled)
    with open(os.path.join(ptx_dir, "index.json")) as f:
        index = json.load(f)
    for g in want:  # one launcher per instantiation, and at least one kernel each
        entries = [e for e, file in index.items() if file == g + ".ptx.gz"]
        assert len(entries) >= groups[g].count("#include"), g
    assert re.fullmatch(r"[0-9.;+A-Za-z]+", arch_list)
