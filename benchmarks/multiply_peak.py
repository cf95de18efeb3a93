"""The ceiling the multiplies put on CPU decoding's speed, measured on this machine.

Decoding at Nq new tokens with G query heads a kv head makes 2 G Nq D multiply-adds per cached
key and kv head (S = Q K^T and O += P V) while reading 2 D elements of K and V: G Nq / (element
size) multiply-adds a byte. However fast the memory, a step cannot read the cache faster than the
cores can multiply what it reads: bytes/s <= (multiply-adds/s) / (multiply-adds a byte). Below
that ceiling the streaming read is the limit, above it the arithmetic.

The multiply-add rate is measured, not taken from a datasheet: `cpu_harness/multiply_peak.cpp`
(built here with g++ into a cache folder, called through ctypes) issues 12 independent chains of
one instruction on register operands on every thread at once, so the figure is the issue rate
alone, an upper bound for any kernel on that instruction. The instruction is the one the CPU
backend multiplies the dtype with on this ISA (vdpbf16ps for bf16 on AVX512-BF16, fp32 FMAs for
fp16 and fp32, whose products with fp32 accumulation have no faster instruction on AVX-512
without AMX-FP16); none where the backend multiplies on AMX tiles (bf16 on AMX machines, fp16
with AMX-FP16), which this does not measure.

    python benchmarks/multiply_peak.py      # prints each kind's rate on all threads
"""
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cpu_harness", "multiply_peak.cpp")
# kind: (the C function's kind, multiply-adds an instruction, the instruction)
KINDS = {"dpbf16": (0, 32, "vdpbf16ps zmm"), "fma512": (1, 16, "vfmadd231ps zmm"),
         "fma256": (2, 8, "vfmadd231ps ymm")}
ITERS = 10_000_000  # loop iterations of 12 instructions a call: about 30 ms at 4 G a second


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_kind(dtype, flags=None):
    """The kind of KINDS the CPU backend multiplies dtype with here, or None (AMX tiles, or an
    ISA without AVX2 + FMA)."""
    flags = cpu_flags() if flags is None else flags
    if dtype == torch.bfloat16:
        if "amx_bf16" in flags:
            return None
        if "avx512_bf16" in flags:
            return "dpbf16"
    if dtype == torch.float16 and "amx_fp16" in flags:
        return None
    if "avx512f" in flags:
        return "fma512"
    if "avx2" in flags and "fma" in flags:
        return "fma256"
    return None


def supported(kind, flags=None):
    """Whether this CPU has kind's ISA (the probe would fault on one that does not)."""
    flags = cpu_flags() if flags is None else flags
    need = {"dpbf16": ("avx512f", "avx512_bf16"), "fma512": ("avx512f",), "fma256": ("avx2", "fma")}[kind]
    return all(f in flags for f in need)


_lib = None


def library():
    """The probe as a ctypes library, built once per source version (None without g++)."""
    global _lib
    if _lib is None:
        with open(SOURCE, "rb") as f:
            tag = hashlib.sha256(f.read()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), f"flash_cuda_multiply_peak_{tag}.so")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}"
            try:
                subprocess.run(["g++", "-O2", "-shared", "-fPIC", SOURCE, "-o", tmp], check=True,
                               capture_output=True)
            except (OSError, subprocess.CalledProcessError):
                return None
            os.replace(tmp, path)
        lib = ctypes.CDLL(path)
        lib.fc_multiply_peak.restype = ctypes.c_double
        lib.fc_multiply_peak.argtypes = [ctypes.c_int, ctypes.c_int64]
        _lib = lib
    return _lib


def macs_per_second(kind, threads=None, rounds=3):
    """Multiply-adds a second of `kind` on `threads` threads issuing at once (default: torch's
    thread count, the backend's), the best of `rounds`; None where the probe cannot be built."""
    lib = library()
    if lib is None or not supported(kind):
        return None
    threads = threads or torch.get_num_threads()
    code, macs, _ = KINDS[kind]
    best = 0.0
    for _ in range(rounds):
        rates = [0.0] * threads
        start = threading.Barrier(threads)

        def work(i):
            start.wait()
            rates[i] = lib.fc_multiply_peak(code, ITERS)  # ctypes releases the GIL

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, sum(rates))
    return best * macs


def decode_ceiling(dtype, group, nq, macs):
    """Bytes a second of cache the multiplies allow at `macs` multiply-adds a second: a key's
    2 D elements of K and V take 2 group nq D multiply-adds."""
    element = torch.finfo(dtype).bits // 8
    return macs * element / (group * nq)


if __name__ == "__main__":
    threads = torch.get_num_threads()
    print(f"{threads} threads; flags: {' '.join(sorted(f for f in cpu_flags() if f.startswith(('avx', 'amx', 'fma'))))}")
    for kind, (_, macs, name) in KINDS.items():
        if not supported(kind):
            print(f"{name:18s} not on this CPU")
            continue
        rate = macs_per_second(kind)
        if rate is None:
            sys.exit("the probe could not be built (g++ missing?)")
        print(f"{name:18s} {rate / macs / 1e9:6.2f} G instructions/s, {rate / 1e9:7.1f} G multiply-adds/s")
