"""flash_cuda.attention vs torch SDPA, side by side in one process.

For every point of a sweep, this times flash_cuda.attention and
torch.nn.functional.scaled_dot_product_attention with each SDPA backend pinned
explicitly through torch.nn.attention.sdpa_kernel:

    CPU:  FLASH_ATTENTION, MATH
    CUDA: FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH

A backend that cannot run a point ("No available kernel") is marked n/a.

Modes
    fwd      forward only, under torch.no_grad()
    fwdbwd   forward + out.backward(grad) with a fixed random grad; the .grad of q, k, v
             is set to None between repetitions, outside the timed region.

Presets (--preset)
    fa          FlashAttention's benchmark sweep (default on CUDA): 16k tokens per point,
                (B, N) in (32,512) (16,1024) (8,2048) (4,4096) (2,8192) (1,16384),
                hidden size 2048 so H = 2048 // D, D in {64, 128}, causal and not, bfloat16.
    quick       CPU-friendly subset of that sweep (default on CPU): (B, N) in (4,512) and
                (1,2048), H = 2048 // D, D in {64, 128}, causal and not, bfloat16, fwd and
                fwdbwd: 16 measurements per implementation, about 2-3 minutes on 2 CPU cores.
    cpu-accept  the CPU acceptance grid: B=1, H=8, N in {1024, 4096}, D in {64, 128},
                causal and not, float32 and bfloat16.
    cpu-full    issue 15's CPU grid: B=1, H=8, N in {1024, 2048, 4096}, D in {64, 128}, causal
                and not, float32, float16 and bfloat16 (SDPA's flash backend only: with
                --sdpa default, about 15 minutes on 2 cores).
    cpu-short   short self-attention as encoders and short prompts run it on a CPU: (B, N, H,
                D) in (32,32,12,32) (32,128,12,32) (16,64,12,64) (8,128,12,64) (8,256,12,64)
                (8,256,16,128), causal and not, float32, float16 and bfloat16 (SDPA's flash
                backend only; about 3 minutes on 2 cores).

Measurements
    time      --warmup calls, then the median of --reps calls (time.perf_counter; on CUDA,
              CUDA events). The timed calls of the implementations at a point are
              interleaved round robin, so drifts of a busy machine hit all of them alike.
              By default the number of reps adapts to the cost of one call: CPU 3-10 reps
              (about 2 s per measurement), 50-200 when one call takes less than 20 ms
              (about 1 s), 1-2 when it takes more than 1 s;
              CUDA 10-100 reps.
    TFLOP/s   FlashAttention's convention: forward 4*B*H*Nq*Nk*D FLOPs, halved when causal;
              backward 2.5x forward, so forward+backward 3.5x forward.
    memory    peak memory of one extra call, as an increase over what was allocated before
              it (q, k, v, grad). CUDA: torch.cuda.max_memory_allocated after
              reset_peak_memory_stats. CPU: resident set size read from /proc/self/statm by a
              background thread every ~1 ms, so a peak shorter than that can be missed; freed
              heap memory is returned to the OS (gc + malloc_trim, and the blocks flash_cuda's
              CPU backend keeps for its next calls: flash_cuda.empty_cpu_cache) before the call
              so that reused pages are counted.
    error     max |out - ref| where ref is computed here in float64 with plain torch
              (softmax(q k^T * scale + mask) v) on batch 0, head 0, the first min(Nq, 256)
              query rows against all keys, causal mask aligned bottom-right.

The MATH backend materialises B*H*Nq*Nk scores; it is skipped ("skipped: needs X GiB")
when its estimated need exceeds a budget: 25% of total RAM on CPU, 80% of free GPU memory
on CUDA.

Output: one progress line per measured point, a final table, a summary per mode (min and
geometric-mean speed ratio vs each SDPA backend), <out>/bench_<device>_<preset>.json with
all raw numbers (rewritten after every point, with meta.complete false until the sweep ends,
so a run stopped by a time limit keeps its points), and <out>/bench_<device>_<preset>.png
(needs matplotlib; skipped with a note if it is missing).

Examples
    python benchmarks/bench_sdpa.py                        # quick on CPU, fa on CUDA
    python benchmarks/bench_sdpa.py --preset cpu-accept --dtype float32
    python benchmarks/bench_sdpa.py --preset fa --dtype bfloat16,float16 --modes fwd
"""
import argparse
import contextlib
import ctypes
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_cuda

FLASH_CUDA = "flash_cuda"
SDPA_BACKENDS = {
    "cpu": {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH},
    "cuda": {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MODES = ("fwd", "fwdbwd")
FA_BATCH_SEQLEN = [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
PRESETS = {
    "fa": {"shapes": [(b, n, 2048 // d, d) for d in (64, 128) for b, n in FA_BATCH_SEQLEN],
           "dtypes": ["bfloat16"]},
    "quick": {"shapes": [(b, n, 2048 // d, d) for d in (64, 128) for b, n in ((4, 512), (1, 2048))],
              "dtypes": ["bfloat16"]},
    "cpu-accept": {"shapes": [(1, n, 8, d) for d in (64, 128) for n in (1024, 4096)],
                   "dtypes": ["float32", "bfloat16"]},
    "cpu-full": {"shapes": [(1, n, 8, d) for d in (64, 128) for n in (1024, 2048, 4096)],
                 "dtypes": ["float32", "float16", "bfloat16"], "sdpa": ["flash"]},
    "cpu-short": {"shapes": [(32, 32, 12, 32), (32, 128, 12, 32), (16, 64, 12, 64), (8, 128, 12, 64),
                             (8, 256, 12, 64), (8, 256, 16, 128)],
                  "dtypes": ["float32", "float16", "bfloat16"], "sdpa": ["flash"]},
}
# The CPU features that decide which kernels torch and flash_cuda pick (printed with every run).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_fp16")
ERR_ROWS = 256
NO_KERNEL_MESSAGES = ("No available kernel", "No viable backend")  # CUDA, CPU wording
MATH_BUDGET_FRACTION = {"cpu": 0.25, "cuda": 0.80}
MIB = 2 ** 20
GIB = 2 ** 30
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if torch.cuda.is_available() and "
                        "flash_cuda.has_cuda_kernels(), else cpu)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sweep to run (default: fa on cuda, quick on cpu)")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32, bfloat16, float16 (default: the preset's)")
    p.add_argument("--modes", default="fwd,fwdbwd",
                   help="comma list of fwd, fwdbwd (default: %(default)s)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per measurement (default: adaptive, see below)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing, at least 1 (default: 1 on cpu, 3 on cuda)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="directory for the JSON and PNG (default: benchmarks/results next to "
                        "this script)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--sdpa", default=None,
                   help="comma list of the SDPA backends to time (default: the preset's, else all: "
                        "flash,math on cpu; flash,efficient,cudnn,math on cuda)")
    args = p.parse_args(argv)

    args.device = pick_device(p, args.device)
    if args.preset is None:
        args.preset = "fa" if args.device == "cuda" else "quick"
    known = list(SDPA_BACKENDS[args.device])
    args.sdpa = args.sdpa.split(",") if args.sdpa else PRESETS[args.preset].get("sdpa", known)
    if any(b not in known for b in args.sdpa):
        p.error(f"--sdpa: expected a comma list of {', '.join(known)}, got {','.join(args.sdpa)}")
    names = args.dtype.split(",") if args.dtype else PRESETS[args.preset]["dtypes"]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        p.error(f"--dtype: unknown {unknown}; use float32, bfloat16 or float16")
    args.dtypes = [DTYPES[n] for n in names]
    args.modes = args.modes.split(",")
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: expected a comma list of {', '.join(MODES)}, got {','.join(args.modes)}")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    args.warmup = max(1, args.warmup)
    return args


# ----------------------------------------------------------------------------- implementations

def flash_cuda_fn(q, k, v, causal):
    return flash_cuda.attention(q, k, v, causal=causal)


def sdpa_fn(backend):
    def fn(q, k, v, causal):
        # Nq == Nk in every sweep, so SDPA's top-left causal mask equals the bottom-right one.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # Step runs fn inside it; time_call enters it before its timer starts (about 6 us a call on a
    # Zen 5, which the timed calls included until a benchmark review: 1% of the shortest CPU points)
    fn.context = lambda: sdpa_kernel(backend)
    return fn


def implementations(device, sdpa_backends):
    impls = {FLASH_CUDA: flash_cuda_fn}
    for name in sdpa_backends:
        impls[f"sdpa-{name}"] = sdpa_fn(SDPA_BACKENDS[device][name])
    return impls


class Step:
    """One call of an implementation in a mode, with the between-reps reset kept apart."""

    def __init__(self, fn, q, k, v, causal, mode, grad):
        self.fn, self.causal, self.mode, self.grad = fn, causal, mode, grad
        self.context = getattr(fn, "context", contextlib.nullcontext)  # (SDPA's backend choice)
        if mode == "fwdbwd":
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        self.q, self.k, self.v = q, k, v

    def reset(self):
        for x in (self.q, self.k, self.v):
            x.grad = None

    def run(self):
        """The call, inside self.context() already."""
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(self.q, self.k, self.v, self.causal)
        out = self.fn(self.q, self.k, self.v, self.causal)
        out.backward(self.grad)
        return out.detach()

    def __call__(self):
        with self.context():
            return self.run()


# ----------------------------------------------------------------------------- timing

def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(step, device):
    """Seconds taken by one call; resetting the grads before and after, and entering a Step's
    context (SDPA's backend choice), are not timed."""
    step.reset()
    context, run = (step.context, step.run) if isinstance(step, Step) else (contextlib.nullcontext, step)
    with context():
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
    step.reset()
    return seconds


def cuda_usable():
    return torch.cuda.is_available() and flash_cuda.has_cuda_kernels()


def pick_device(parser, device):
    """The benchmarks' --device: cuda where a GPU and kernels for it are there, else cpu; an
    explicit cuda without them is a usage error (not a driver traceback half-way)."""
    if device is None:
        return "cuda" if cuda_usable() else "cpu"
    if device == "cuda" and not cuda_usable():
        parser.error("--device cuda needs a CUDA GPU and a flash_cuda build with CUDA kernels")
    return device


def auto_reps(seconds, device):
    """Repetitions for a call that took `seconds` once: cheap calls many times, slow ones few."""
    if device == "cuda":
        return max(10, min(100, int(1.0 / max(seconds, 1e-6))))
    if seconds > 1.0:
        return max(1, min(3, int(3.0 / seconds)))
    if seconds < 0.02:  # short calls: enough of them for a stable median (about 1 s)
        return max(10, min(200, int(1.0 / seconds)))
    return max(3, min(10, int(2.0 / seconds)))


# ----------------------------------------------------------------------------- memory

class RssSampler:
    """Peak resident set size above the level at entry, sampled every `interval` seconds."""

    def __init__(self, interval=0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.stop = threading.Event()

    def rss(self):
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def _loop(self):
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.base = self.peak = self.rss()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        os.close(self.fd)

    @property
    def increase(self):
        return self.peak - self.base


def release_free_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        return
    # the blocks flash_cuda's CPU backend keeps between calls too, so that a call's peak counts them
    getattr(flash_cuda, "empty_cpu_cache", lambda: 0)()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(step, device):
    """(output, peak increase in bytes) of one call."""
    step.reset()
    release_free_memory(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    with RssSampler() as sampler:
        out = step()
    return out, sampler.increase


def total_memory(device):
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def math_budget(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return MATH_BUDGET_FRACTION["cuda"] * free
    return MATH_BUDGET_FRACTION["cpu"] * total_memory("cpu")


def math_need(point, mode):
    """Estimated bytes the MATH backend needs: B*H*Nq*Nk scores in fp32 (CPU upcasts bf16),
    ~3 such buffers alive in the forward, ~4 in forward+backward (measured on CPU)."""
    scores = point["B"] * point["H"] * point["N"] * point["N"] * 4
    return scores * (3 if mode == "fwd" else 4)


# ----------------------------------------------------------------------------- accuracy

def reference_rows(q, k, v, causal, grad, rows=ERR_ROWS):
    """float64 attention on two slices, batch 0 head 0's first min(Nq, rows) queries and the last
    batch and head's last ones (bottom-right causal), and their dQ for the output gradient `grad`
    (a row's dQ needs that row alone): [(b, h, first row, out, dq)]. (The first slice alone let a
    benchmark review's planted output, wrong in every other batch and head and past row 255, pass.)"""
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    m = min(nq, rows)
    slices = []
    for b, h, r0 in ((0, 0, 0), (q.shape[0] - 1, q.shape[1] - 1, nq - m)):
        hk = h * k.shape[1] // q.shape[1]  # (GQA: the kv head of query head h)
        ks, vs = (x[b, hk].detach().cpu().double() for x in (k, v))
        qs = q[b, h, r0:r0 + m].detach().cpu().double().requires_grad_()
        scores = qs @ ks.T * (1.0 / math.sqrt(d))
        if causal:
            i = torch.arange(r0, r0 + m).unsqueeze(1)
            j = torch.arange(nk).unsqueeze(0)
            scores = scores.masked_fill(j > i + (nk - nq), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key give 0
        out = probs @ vs
        (dq,) = torch.autograd.grad(out, qs, grad[b, h, r0:r0 + m].detach().cpu().double())
        slices.append((b, h, r0, out.detach(), dq))
    return slices


def max_error(x, ref, which):
    """The largest |x - reference| over ref's slices (reference_rows); which: "out" or "dq"."""
    errs = []
    for b, h, r0, out, dq in ref:
        want = out if which == "out" else dq
        errs.append((x[b, h, r0:r0 + want.shape[0]].detach().cpu().double() - want).abs().max().item())
    return max(errs)


# flash_cuda's error beyond this many times the best SDPA backend's (+ 1e-5) marks the point wrong:
# it is reported, not timed (a result that is wrong is no speed; an audit planted a wrong scale and
# the run printed ratios for it)
WRONG_FACTOR = 4


def wrong_status(err, bounds, key="err", whose="SDPA's"):
    """"ok", or "wrong: ..." where err passes WRONG_FACTOR x the smallest of bounds + 1e-5 (a NaN
    err is wrong; a NaN bound is no bound; no bound, no verdict): the rule every harness applies."""
    bounds = [b for b in bounds if b == b]
    if not bounds or err <= WRONG_FACTOR * min(bounds) + 1e-5:
        return "ok"
    return f"wrong: {key} {err:.2e} > {WRONG_FACTOR}x {whose} {min(bounds):.2e} + 1e-5"


def validate(results):
    """Mark flash_cuda's result "wrong" where its output (or, forward+backward, dQ) error passes
    WRONG_FACTOR x the most accurate SDPA backend's that ran; returns whether it did."""
    fc = results.get(FLASH_CUDA, {})
    others = [r for name, r in results.items() if name != FLASH_CUDA and r.get("status") == "ok"]
    if fc.get("status") != "ok" or not others:
        return False
    for key in ("max_err", "max_err_dq"):
        if key not in fc:
            continue
        status = wrong_status(fc[key], [r[key] for r in others if key in r], key)
        if status != "ok":
            fc["status"] = status
            return True
    return False


# ----------------------------------------------------------------------------- one measurement

def flops(point, mode):
    fwd = 4 * point["B"] * point["H"] * point["N"] * point["N"] * point["D"]
    if point["causal"]:
        fwd /= 2
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


def first_call(step, device):
    """Run the first warmup call; return (seconds, None) or (None, reason it cannot run)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step.reset()
            t0 = time.perf_counter()
            step()
            synchronize(device)
            return time.perf_counter() - t0, None
        except torch.OutOfMemoryError:
            return None, "oom"
        except RuntimeError as e:
            if not any(m in str(e) for m in NO_KERNEL_MESSAGES):
                return None, f"error: {str(e).splitlines()[0][:200]}"
            why = [str(w.message).splitlines()[0] for w in caught if "kernel" in str(w.message).lower()
                   or "requires" in str(w.message).lower()]
            return None, "n/a: no available kernel" + (f" ({why[0][:200]})" if why else "")
        finally:
            step.reset()


def prepare(fn, q, k, v, point, mode, grad, args, ref):
    """Warm up one implementation, measure its memory and error.

    Returns (result dict, step, reps); step is None when the implementation cannot run.
    """
    device = args.device
    step = Step(fn, q, k, v, point["causal"], mode, grad)
    seconds, reason = first_call(step, device)
    if reason:
        return {"status": reason}, None, 0
    for _ in range(args.warmup - 1):
        seconds = min(seconds, time_call(step, device))
    t0 = time.perf_counter()
    out, mem = measure_memory(step, device)
    seconds = min(seconds, time.perf_counter() - t0)
    result = {"status": "ok", "peak_mem_mib": mem / MIB, "max_err": max_error(out, ref, "out")}
    if mode == "fwdbwd":
        result["max_err_dq"] = max_error(step.q.grad, ref, "dq")
    del out
    step.reset()
    reps = args.reps or auto_reps(seconds, device)
    result["reps"] = reps
    return result, step, reps


def measure_point(impl_fns, q, k, v, point, mode, grad, args, ref, budget):
    """Results of every implementation at one point and mode.

    Warmup, memory and error are taken one implementation after the other, and flash_cuda's
    error is validated against SDPA's (validate: a wrong result is not timed); after one more
    untimed round of calls, the timed repetitions are then interleaved (round robin), every
    implementation as many times (the fewest any needs), so that slow drifts of the machine
    affect all of them alike (with counts of their own, the faster one ran its last repetitions
    back to back; audit).
    """
    results, steps = {}, {}
    for name, fn in impl_fns.items():
        need = math_need(point, mode)
        if name == "sdpa-math" and need > budget:
            results[name] = {"status": f"skipped: needs {need / GIB:.2f} GiB "
                                       f"> budget {budget / GIB:.2f} GiB"}
            continue
        results[name], step, reps = prepare(fn, q, k, v, point, mode, grad, args, ref)
        if step is not None:
            steps[name] = (step, reps)
    # One untimed round first: each implementation's memory step above released the free memory
    # and caches (release_free_memory) the ones before it had warmed up, so the first in line
    # entered its timed calls cold (1.6x its median on the first call, the reported ratio 0.29x
    # instead of 1.16x at --reps 1; an audit)
    if validate(results):
        steps.pop(FLASH_CUDA, None)
    for step, _ in steps.values():
        time_call(step, args.device)
    times = {name: [] for name in steps}
    reps = min((reps for _, reps in steps.values()), default=0)
    for _ in range(reps):
        for name, (step, _) in steps.items():
            times[name].append(time_call(step, args.device))
    for name in steps:
        results[name]["reps"] = reps
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        results[name].update(ms=ms, times_ms=[t * 1e3 for t in ts],
                             tflops=flops(point, mode) / (ms * 1e-3) / 1e12)
    return results


# ----------------------------------------------------------------------------- sweep

def sweep_points(args):
    """(B, N, H, D, dtype) input groups, each with its causal flags and modes."""
    for dtype in args.dtypes:
        for b, n, h, d in PRESETS[args.preset]["shapes"]:
            yield {"B": b, "N": n, "H": h, "D": d, "dtype": dtype}


def make_inputs(group, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (group["B"], group["H"], group["N"], group["D"])
    q, k, v, grad = (torch.randn(shape, generator=g, device=device, dtype=group["dtype"])
                     for _ in range(4))
    return q, k, v, grad


def label(point, mode):
    dtype = SHORT_DTYPE.get(point["dtype"], point["dtype"])
    return (f"B={point['B']} N={point['N']} H={point['H']} D={point['D']} "
            f"causal={point['causal']} {dtype} {mode}")


def progress_line(i, total, point, mode, impls, seconds):
    parts = [f"[{i}/{total}] {label(point, mode)}"]
    fc = impls[FLASH_CUDA]
    for name, r in impls.items():
        if r["status"] != "ok":
            parts.append(f"{name} {r['status'].split(':')[0]}")
        elif name == FLASH_CUDA:
            parts.append(f"{name} {r['ms']:.2f} ms {r['tflops']:.3f} TF/s")
        else:
            ratio = f" ({r['ms'] / fc['ms']:.2f}x)" if fc["status"] == "ok" else ""
            parts.append(f"{name} {r['ms']:.2f} ms{ratio}")
    return " | ".join(parts) + f"  [{seconds:.1f} s]"


def run_sweep(args, on_point=lambda results: None):
    """Every point of the sweep; on_point(results so far) after each one."""
    impl_fns = implementations(args.device, args.sdpa)
    groups = list(sweep_points(args))
    total = len(groups) * 2 * len(args.modes)
    budget = math_budget(args.device)
    results, i = [], 0
    for group in groups:
        q, k, v, grad = make_inputs(group, args.device)
        for causal in (False, True):
            point = dict(group, causal=causal)
            ref = reference_rows(q, k, v, causal, grad)
            for mode in args.modes:
                i += 1
                t0 = time.perf_counter()
                impls = measure_point(impl_fns, q, k, v, point, mode, grad, args, ref, budget)
                release_free_memory(args.device)
                print(progress_line(i, total, point, mode, impls, time.perf_counter() - t0),
                      flush=True)
                results.append({**point, "dtype": SHORT_DTYPE[group["dtype"]], "mode": mode,
                                "flops": flops(point, mode), "impls": impls})
                on_point(results)
        del q, k, v, grad
    return results


# ----------------------------------------------------------------------------- report

def ratio(result, name):
    fc, other = result["impls"][FLASH_CUDA], result["impls"][name]
    if fc["status"] == "ok" and other["status"] == "ok":
        return other["ms"] / fc["ms"]
    return None


def cell(r, key, fmt):
    if r["status"] != "ok":
        return {"n/a": "n/a", "skipped": "skip", "oom": "oom", "wrong": "WRONG"}.get(r["status"].split(":")[0], "err")
    return format(r[key], fmt)


def format_table(results, sdpa_names):
    short = [n.replace("sdpa-", "") for n in sdpa_names]
    header = (["B", "N", "H", "D", "causal", "dtype", "mode", "fc ms", "fc TF/s"]
              + [f"{s} ms" for s in short] + [f"r:{s}" for s in short]
              + ["MiB fc"] + [f"MiB {s}" for s in short]
              + ["err fc"] + [f"err {s}" for s in short])
    rows = []
    for res in results:
        im = res["impls"]
        fc = im[FLASH_CUDA]
        row = [str(res[c]) for c in ("B", "N", "H", "D")]
        row += ["yes" if res["causal"] else "no", res["dtype"], res["mode"],
                cell(fc, "ms", ".2f"), cell(fc, "tflops", ".3f")]
        row += [cell(im[n], "ms", ".2f") for n in sdpa_names]
        row += [f"{ratio(res, n):.2f}" if ratio(res, n) is not None else "-" for n in sdpa_names]
        row += [cell(im[n], "peak_mem_mib", ".1f") for n in [FLASH_CUDA] + sdpa_names]
        row += [cell(im[n], "max_err", ".1e") for n in [FLASH_CUDA] + sdpa_names]
        rows.append(row)
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def table_notes(results):
    notes = {}
    for res in results:
        for name, r in res["impls"].items():
            if r["status"] != "ok":
                notes.setdefault(f"{name}: {r['status']}", []).append(label(res, res["mode"]))
    return [f"  {msg}  ({len(pts)} point(s), e.g. {pts[0]})" for msg, pts in notes.items()]


def summary_lines(results, modes, sdpa_names):
    lines = []
    for mode in modes:
        parts = []
        for name in sdpa_names:
            rs = [r for r in (ratio(res, name) for res in results if res["mode"] == mode) if r]
            if rs:
                gmean = math.exp(sum(math.log(r) for r in rs) / len(rs))
                parts.append(f"vs {name}: min {min(rs):.2f}x, geomean {gmean:.2f}x ({len(rs)} pts)")
            else:
                parts.append(f"vs {name}: no comparable points")
        lines.append(f"{mode}: " + "; ".join(parts))
    return lines


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """Every x86 ISA flag /proc/cpuinfo lists (empty where it cannot be read, or off x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa():
    """The ISA_FLAGS /proc/cpuinfo lists (empty where it cannot be read)."""
    return [f for f in ISA_FLAGS if f in cpu_flags()]


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(args):
    return {
        "device": args.device, "device_name": device_name(args.device),
        "isa": cpu_isa() if args.device == "cpu" else None, "sdpa_backends": args.sdpa,
        "torch_version": torch.__version__, "flash_cuda_version": flash_cuda.__version__,
        "cuda_version": torch.version.cuda if args.device == "cuda" else None,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "preset": args.preset, "dtypes": [SHORT_DTYPE[d] for d in args.dtypes],
        "modes": args.modes, "reps": args.reps or "auto", "warmup": args.warmup,
        "total_memory_gib": total_memory(args.device) / GIB,
        "math_budget_gib": math_budget(args.device) / GIB,
        "memory_method": ("torch.cuda.max_memory_allocated increase" if args.device == "cuda"
                          else "RSS increase sampled every ~1 ms from /proc/self/statm"),
        "flops_convention": "fwd 4*B*H*Nq*Nk*D (/2 causal); bwd 2.5x fwd; fwdbwd 3.5x fwd",
        "error_reference": f"float64 plain torch, batch 0 head 0's first min(Nq,{ERR_ROWS}) rows and the last "
                           "batch and head's last ones",
        "python": sys.version.split()[0], "platform": platform.platform(),
    }


def n_tick_labels(results):
    """N values for the x axis, with the batch size under each when B changes with N."""
    ns = sorted({r["N"] for r in results})
    batches = [sorted({r["B"] for r in results if r["N"] == n}) for n in ns]
    if len({tuple(b) for b in batches}) == 1:
        return ns, [str(n) for n in ns]
    return ns, [f"{n}\nB={','.join(map(str, b))}" for n, b in zip(ns, batches)]


def write_plot(results, path, impl_names, meta):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    panels = sorted({(r["mode"], r["causal"]) for r in results},
                    key=lambda mc: (MODES.index(mc[0]), mc[1]))
    dims = sorted({r["D"] for r in results})
    dtypes = sorted({r["dtype"] for r in results})
    styles = ["-", "--", ":", "-."]
    ticks, tick_labels = n_tick_labels(results)
    fig, axes = plt.subplots(len(panels), len(dims), squeeze=False, constrained_layout=True,
                             figsize=(5.5 * len(dims), 3.8 * len(panels)))
    for row, (mode, causal) in enumerate(panels):
        for col, d in enumerate(dims):
            ax = axes[row][col]
            for ci, name in enumerate(impl_names):
                for si, dt in enumerate(dtypes):
                    pts = sorted((r["N"], r["impls"][name]["tflops"]) for r in results
                                 if (r["mode"], r["causal"], r["D"], r["dtype"]) == (mode, causal, d, dt)
                                 and r["impls"][name]["status"] == "ok")
                    if pts:
                        ns, tf = zip(*pts)
                        ax.plot(ns, tf, styles[si % len(styles)], marker="o", color=f"C{ci}",
                                label=name + (f" {dt}" if len(dtypes) > 1 else ""))
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, tick_labels)
            ax.minorticks_off()
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}, D={d}")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"flash_cuda vs torch SDPA: {meta['device_name']} ({meta['device']}"
                 + (f", {' '.join(meta['isa'])}" if meta.get("isa") else "") + ", "
                 f"{meta['threads']} threads), preset {meta['preset']}, "
                 f"{','.join(meta['dtypes'])}, torch {meta['torch_version']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    sdpa_names = [f"sdpa-{n}" for n in args.sdpa]
    meta = metadata(args)
    isa = f", ISA {' '.join(meta['isa'])}" if meta["isa"] is not None else ""
    print(f"device {args.device} ({meta['device_name']}{isa}), torch {meta['torch_version']}, "
          f"{meta['threads']} threads, preset {args.preset}, dtypes {','.join(meta['dtypes'])}, "
          f"modes {','.join(args.modes)}, reps {meta['reps']}, warmup {args.warmup}", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{args.device}_{args.preset}"

    def save(results, complete):
        # after every point too, so a run stopped by a time limit keeps what it measured
        tmp = Path(f"{stem}.json.tmp")
        tmp.write_text(json.dumps({"meta": dict(meta, complete=complete), "results": results}, indent=1))
        tmp.replace(f"{stem}.json")

    t0 = time.perf_counter()
    results = run_sweep(args, on_point=lambda results: save(results, False))
    meta["elapsed_s"] = time.perf_counter() - t0

    print()
    print("fc = flash_cuda; r:X = sdpa-X ms / flash_cuda ms (>1: flash_cuda faster); "
          f"MiB = peak memory increase ({meta['memory_method']}); "
          f"err = max |out - fp64 ref| ({meta['error_reference']})")
    print(format_table(results, sdpa_names))
    notes = table_notes(results)
    if notes:
        print("not measured:")
        print("\n".join(notes))
    print()
    for line in summary_lines(results, args.modes, sdpa_names):
        print(line)

    save(results, True)
    print(f"\nwrote {stem}.json")
    if not args.no_plot:
        png = write_plot(results, f"{stem}.png", [FLASH_CUDA] + sdpa_names, meta)
        if png:
            print(f"wrote {png}")
    print(f"total {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
