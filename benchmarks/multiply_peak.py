"""The ceiling the multiplies put on CPU decoding's speed, measured on this machine.

Decoding at Nq new tokens with G query heads a kv head makes 2 G Nq D multiply-adds per cached
key and kv head (S = Q K^T and O += P V) while reading 2 D elements of K and V: G Nq / (element
size) multiply-adds a byte. However fast the memory, a step cannot read the cache faster than the
cores can multiply what it reads: bytes/s <= (multiply-adds/s) / (multiply-adds a byte). Below
that ceiling the streaming read is the limit, above it the arithmetic.

The multiply-add rate is measured, not taken from a datasheet: `cpu_harness/multiply_peak.cpp`
(built here with g++ into a per-user cache folder, called through ctypes) issues independent
chains of one instruction on register operands on every thread at once, so the figure is the issue
rate alone, an upper bound for any kernel on that instruction. The instruction is the one the CPU
backend multiplies the dtype with on this ISA (kvcache_cpu.cpp): vdpbf16ps for bf16 on
AVX512-BF16 (on AMX machines below 16 query rows a kv group; from 16 it multiplies on AMX tiles,
which this does not measure: no kind), fp32 FMAs for fp16 and fp32. For fp16 that is the
backend's ceiling, not every kernel's: AVX512-FP16's FMAs accumulate in fp16, but AVX10.2's
VDPPHPS sums fp16 pairs into fp32 at vdpbf16ps's rate, and AMX-FP16 tiles faster still (no kind
where the CPU has AMX-FP16).

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
sys.path.insert(0, HERE)
from bench_sdpa import cpu_flags  # noqa: E402  (the flags /proc/cpuinfo lists, read once)

SOURCE = os.path.join(HERE, "cpu_harness", "multiply_peak.cpp")
# kind: (the C function's kind, multiply-adds an instruction, the instruction)
KINDS = {"dpbf16": (0, 32, "vdpbf16ps zmm"), "fma512": (1, 16, "vfmadd231ps zmm"),
         "fma256": (2, 8, "vfmadd231ps ymm")}
ITERS = 8_000_000  # loop iterations of 12 to 16 instructions a call: about 30 ms at 4 G a second
DOT_ROWS = 16  # kvcache_cpu.cpp's kDotRows


def instruction_kind(dtype, rows, flags=None):
    """The kind of KINDS the CPU backend multiplies dtype with here at `rows` query rows a kv
    group (Hq / Hkv x Nq), or None (AMX tiles, or an ISA without AVX2 + FMA)."""
    flags = cpu_flags() if flags is None else flags
    if dtype == torch.bfloat16 and "avx512_bf16" in flags:
        # AMX machines multiply bf16 on AMX tiles from DOT_ROWS rows, vdpbf16ps below
        return None if "amx_bf16" in flags and rows >= DOT_ROWS else "dpbf16"
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        return None
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


_lib = None  # the loaded library, or False once it could not be built or loaded
_lib_kinds = set(KINDS)  # the kinds it was built with


def library():
    """The probe as a ctypes library, built once per source version into a folder of this user's
    (None without g++ or where it cannot be loaded; without vdpbf16ps where the compiler does not
    know avx512bf16)."""
    global _lib, _lib_kinds
    if _lib is None:
        _lib = False
        with open(SOURCE, "rb") as f:
            tag = hashlib.sha256(f.read()).hexdigest()[:16]
        folder = os.path.join(tempfile.gettempdir(), f"flash_cuda_probe_{os.getuid()}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if os.stat(folder).st_uid != os.getuid():  # someone else's folder: do not load from it
            return None
        for flags, kinds in (([], set(KINDS)), (["-DFC_NO_DPBF16"], set(KINDS) - {"dpbf16"})):
            path = os.path.join(folder, f"multiply_peak_{tag}{''.join(flags)}.so")
            if not os.path.exists(path):
                tmp = f"{path}.{os.getpid()}"
                try:
                    subprocess.run(["g++", "-O2", "-shared", "-fPIC", *flags, SOURCE, "-o", tmp], check=True,
                                   capture_output=True)
                except (OSError, subprocess.CalledProcessError):
                    if os.path.exists(tmp):
                        os.remove(tmp)
                    continue
                os.replace(tmp, path)  # atomic: processes building at once load whole files
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            lib.fc_multiply_peak.restype = ctypes.c_double
            lib.fc_multiply_peak.argtypes = [ctypes.c_int, ctypes.c_int64]
            _lib, _lib_kinds = lib, kinds
            break
    return _lib or None


def macs_per_second(kind, threads=None, rounds=3):
    """Multiply-adds a second of `kind` on `threads` threads issuing at once (default: torch's
    thread count, the backend's), the best of `rounds`; None where the probe cannot run. The
    threads' rates are summed: where one started late and ran alone the sum is at most each
    core's own peak added up, still an upper bound."""
    lib = library()
    if lib is None or kind not in _lib_kinds or not supported(kind):
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
        if library() is None:
            sys.exit("the probe could not be built or loaded (g++ missing?)")
        rate = macs_per_second(kind)
        if rate is None:
            print(f"{name:18s} not in the probe (built without it: the compiler lacks avx512bf16)")
            continue
        print(f"{name:18s} {rate / macs / 1e9:6.2f} G instructions/s, {rate / 1e9:7.1f} G multiply-adds/s")
