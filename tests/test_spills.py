"""ptxas's register allocation of the kernels the 99 KiB cards run (sm_86/89: A10, RTX 3090/4090,
L4, L40S), at head dim 256, where their registers are tightest: no spills, dense and packed
batches, with dropout's code and without (issue 16's compact configurations; every compact file at
sm_80, sm_86 and sm_89: `python benchmarks/kernel_report.py --arch 80 86 89 --filter 99kib`); and
of the wide backward at head dim 64 (padded tiles, traits.h) and the dense kernels of the one at
128 (lse and D loaded per lane, bwd_kernel.h) at sm_80 and sm_90, and of the large one at 128
(227 KiB, padded tiles) at sm_90.
Needs nvcc, not a GPU; skipped without nvcc."""
import os
import re
import subprocess

import pytest

from conftest import find_nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The files and how many kernels each holds: the band variant's forward (dense and packed, each
# with and without dropout's code) and backward (its main kernels, the dQ pass, pre- and
# postprocess), and the KV cache's forward with its split combine (one configuration for every
# budget since 2026-12-04: traits.h KvCacheConfigFor fits 99 KiB). Until 2026-12-01 their
# packed-batch kernels spilled 4 to 68 bytes here.
FILES = {"fwd_hdim256_bf16_band_99kib.cu": 4, "bwd_hdim256_bf16_band_99kib.cu": 12,
         "fwd_kvcache_hdim256_bf16.cu": 2}


def spilling_kernels(name, arch, n_kernels, tmp_path):
    """{kernel: (stack, spill stores, spill loads)} of the kernels of csrc/cuda/name that spill,
    compiled as the build compiles them (setup.py's gencode_flags: SASS from compute_80)."""
    cmd = [find_nvcc(), "-std=c++17", "-O3", "--use_fast_math", f"-gencode=arch=compute_80,code=sm_{arch}", "-cubin",
           "-Xptxas=-v", "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda", name),
           "-o", str(tmp_path / "k.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    entry = re.compile(rf"Compiling entry function '(\w+)' for 'sm_{arch}'\s*\n.*?(\d+) bytes stack frame, "
                       r"(\d+) bytes spill stores, (\d+) bytes spill loads", re.S)
    kernels = entry.findall(res.stderr)
    assert len(kernels) == n_kernels, res.stderr
    return {k: (int(stack), int(st), int(ld)) for k, stack, st, ld in kernels if int(stack) or int(st) or int(ld)}


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
@pytest.mark.parametrize("name", sorted(FILES))
def test_compact_kernels_at_256_do_not_spill(name, tmp_path):
    spilling = spilling_kernels(name, "86", FILES[name], tmp_path)
    assert not spilling, f"stack, spill stores, spill loads (bytes): {spilling}"


# The wide backward at head dim 64 with padded shared tiles and volatile boundary loads
# (traits.h kPaddedTiles, kVolatileBoundaries): its 8 kernels (main kernels with atomic dQ and
# deterministic, dense and packed; the dQ pass, dense and packed; pre- and postprocess). With
# padded tiles and plain loads its packed atomic-dQ kernel spilled 16 bytes at sm_80.
@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_wide_backward_at_64_does_not_spill(arch, tmp_path):
    spilling = spilling_kernels("bwd_hdim64_bf16.cu", arch, 8, tmp_path)
    assert not spilling, f"stack, spill stores, spill loads (bytes): {spilling}"


# The wide backward at head dim 128, whose dense main kernels load lse and D per lane from
# global memory (bwd_kernel.h kStatsFromGlobal) at 255 registers: its dense kernels (main with
# atomic dQ and deterministic, the dQ pass, pre- and postprocess) spill nothing. (Its packed
# atomic-dQ kernel spills 20 bytes at sm_90, as it did before those loads: README, "The CUDA
# kernels, as compiled"; packed kernels end in kVarlen = true, the last template flag.)
@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_wide_backward_at_128_dense_kernels_do_not_spill(arch, tmp_path):
    spilling = spilling_kernels("bwd_hdim128_bf16.cu", arch, 8, tmp_path)
    dense = {k: v for k, v in spilling.items() if not k.endswith("Lb1EEEvNS_9BwdParamsE")}
    assert not dense, f"stack, spill stores, spill loads (bytes): {dense}"


# The large backward at head dim 128 (227 KiB: sm_90 and sm_100 run it; padded tiles, traits.h
# kBwdLargeConfig) at sm_90: no kernel of the dense variant spills, packed batches' included (the
# wide one's packed atomic-dQ kernel spills, above), nor any dense-batch kernel of the band variant
# (12 kernels: its main kernels with dropout's code too); its packed atomic-dQ kernel with dropout
# spills 24 + 20 bytes (README, "The CUDA kernels, as compiled").
@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
@pytest.mark.parametrize("name", [f"bwd_hdim128_{t}{v}_227kib.cu" for t in ("fp16", "bf16") for v in ("", "_band")])
def test_large_backward_at_128_does_not_spill(name, tmp_path):
    spilling = spilling_kernels(name, "90", 12 if "_band" in name else 8, tmp_path)
    if "_band" in name:
        spilling = {k: v for k, v in spilling.items() if not k.endswith("Lb1EEEvNS_9BwdParamsE")}
    assert not spilling, f"stack, spill stores, spill loads (bytes): {spilling}"
