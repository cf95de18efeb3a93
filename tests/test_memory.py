"""Memory is O(N), not O(N^2): forward + backward at B=1, H=1, N=32768, D=64 in float32,
where the score matrix alone would take 4 GiB, stays under 1 GiB of peak resident memory, with
the machine's threads and with 64 (the backward's dQ partials, one per key split, were once
counted by threads alone: 1.3 GiB from 16 threads on, 1.8 GiB at 64).

Runs in a child process so the peak resident set measured is this computation's alone: the
child reads its own high-water mark, VmHWM of /proc/self/status, which belongs to the address
space it runs in. (getrusage's ru_maxrss would not do: Linux carries the parent's high-water
mark across fork and exec, so a child of a large pytest process reports the parent's size.)
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import cpu_has

CHILD = r"""
import json, resource, sys, torch, flash_cuda
if int(sys.argv[1]):
    torch.set_num_threads(int(sys.argv[1]))
n = 32768
q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
out = flash_cuda.attention(q, k, v)
out.backward(torch.randn_like(out))
ok = all(torch.isfinite(x).all().item() for x in (out, q.grad, k.grad, v.grad))
try:
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except OSError:  # not Linux: the rusage figure (an upper bound there too)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak_kib, "finite": ok}))
"""


@pytest.mark.parametrize("threads", [0, 64], ids=["default_threads", "64_threads"])
def test_long_sequence_peak_memory_under_1gib(threads):
    result = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"]
    peak_mib = report["peak_kib"] / 1024
    assert peak_mib < 1024, f"peak resident memory {peak_mib:.0f} MiB >= 1 GiB"


CHUNK_CHILD = r"""
import json, torch, flash_cuda
torch.set_num_threads(2)  # (the chunks follow the thread count: from 9 threads on, one chunk here)
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
q, k, v = (torch.randn(1, 8, 4096, 128, generator=torch.Generator().manual_seed(i)) for i in range(3))
peaks = {}
for name, pairs in (("one_chunk", 8), ("automatic", 0)):
    torch.ops.flash_cuda._cpu_force_chunk_pairs(pairs)
    flash_cuda.empty_cpu_cache()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    out = flash_cuda.attention(q, k, v)
    peaks[name] = (status_kib("VmHWM") - before) / 1024
    del out
print(json.dumps(peaks))
"""


def _packs_fp32_operands():
    """Whether the CPU forward packs fp32 K^T and V (the AVX-512 micro-kernel's panels: an AVX-512
    CPU without AMX, csrc/cpu/tile_gemm.h use_avx512_f32); elsewhere the BLAS reads them in place."""
    choice = os.environ.get("FLASH_CUDA_CPU_F32_GEMM")
    return (cpu_has("avx512f", "avx512bw", "avx512dq", "avx512vl")
            and (choice == "avx512" if choice else not cpu_has("amx_bf16")))


def test_forward_operands_take_a_chunk_at_a_time():
    """The CPU forward prepares K^T and V per chunk of (batch, kv head) pairs (csrc/cpu/
    attention_cpu.cpp operand_chunk): fp32, B=1, H=8, N=4096, D=128, the packed operands of the
    whole call are 32 MiB, those of an automatic chunk at 2 threads (2 MiB an operand: 4 pairs)
    16 MiB; the call's peak, its 16 MiB output included, drops by about the difference. Where the
    fp32 operands are not packed (the BLAS reads K and V in place: an AVX2 CPU, or one with AMX)
    there is nothing to chunk; measured there (an AMD Zen 3, AVX2) the call's peak was its output
    and 4 MiB, and the test is skipped."""
    if not _packs_fp32_operands():
        pytest.skip("fp32 K^T and V are packed only by the AVX-512 micro-kernel (AVX-512 without AMX)")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs a writable /proc/self/clear_refs (Linux) to reset the peak")
    result = subprocess.run([sys.executable, "-c", CHUNK_CHILD], capture_output=True, text=True, check=True)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    assert peaks["one_chunk"] >= 16 + 32 - 2, peaks  # output and the whole call's K^T and V
    assert peaks["automatic"] <= peaks["one_chunk"] - 10, peaks
