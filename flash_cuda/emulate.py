"""flash_cuda.emulate: run the CUDA kernels on the CPU in the SIMT emulator.

    with flash_cuda.emulate(order="forward", check=True) as emu:
        out = flash_cuda.attention(q, k, v, causal=True)   # CPU tensors run the CUDA kernels
    emu.launches   # one dict per kernel launch (below)

Inside the context, CPU tensors go through the launch code the CUDA build uses (same tile
choices, same grid) and the kernel source compiled by the host compiler; see csrc/emu/. A
launch whose checks fail (race, out-of-bounds access, missing cp.async wait, collective or
barrier not reached by every thread) raises RuntimeError after it completes.

A launch record holds: kernel (a readable name), entry (the mangled kernel function), executor,
device, grid, block, threads_per_block, dynamic_smem; the counters global_bytes_read,
global_bytes_written, global_requests, global_sectors, global_sectors_ideal (32-byte sectors the
accesses touched, and the fewest that could hold the same bytes), mma, barriers, shared (per kind
of shared-memory access: requests, wavefronts and the ideal wavefronts of their bank model) and
instructions (per class; counted by the PTX executor, zeros under the source executor); and
errors (the checks' messages).

executor: what runs each kernel launch. "source" (default): the kernel source compiled by the
host compiler. "ptx": the PTX that nvcc emitted for that kernel in the extension's sm_80 build
(packaged by setup.py from nvcc's intermediate files: the text ptxas compiled into the shipped
SASS), parsed once and interpreted thread by thread, with the same checks and counters; see
csrc/emu/ptx_program.h. ptx={entry: text} replaces a kernel's PTX inside the context (for
experiments and planted-bug tests); ptx_kernels() lists the entries and their text.

device: the GPU emulated, a name of DEVICES or a DeviceProfile. The dispatcher picks tile
configurations and KV-cache splits from its limits exactly as it does from a real GPU's, and a
launch past them (shared memory, threads or registers per block) fails before it runs, as the
driver would refuse it; a GPU older than the kernels' compute capability is refused by the
launcher (NotImplementedError).
"""
import dataclasses
import gzip
import json
import os
import re
import threading

import torch

ORDERS = ("forward", "reverse", "random")
EXECUTORS = ("source", "ptx")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """A GPU's published limits, as the CUDA C++ Programming Guide's "Technical Specifications
    per Compute Capability" gives them per compute capability (shared memory: the opt-in
    maximum per block), with the product's SM count."""
    name: str
    compute_capability: tuple  # (major, minor)
    sm_count: int
    smem_per_block: int  # bytes
    threads_per_block: int = 1024
    regs_per_block: int = 65536


_KIB = 1024
DEVICES = {p.name: p for p in (
    DeviceProfile("t4", (7, 5), 40, 64 * _KIB),
    DeviceProfile("a100", (8, 0), 108, 163 * _KIB),
    DeviceProfile("a10", (8, 6), 72, 99 * _KIB),
    DeviceProfile("rtx3090", (8, 6), 82, 99 * _KIB),
    DeviceProfile("l4", (8, 9), 58, 99 * _KIB),
    DeviceProfile("rtx4090", (8, 9), 128, 99 * _KIB),
    DeviceProfile("l40s", (8, 9), 142, 99 * _KIB),
    DeviceProfile("h100", (9, 0), 132, 227 * _KIB),
    DeviceProfile("h200", (9, 0), 132, 227 * _KIB),
    DeviceProfile("b200", (10, 0), 148, 227 * _KIB),
    DeviceProfile("rtx5090", (12, 0), 170, 99 * _KIB),
)}


def _device_profile(device):
    if isinstance(device, DeviceProfile):
        cc = device.compute_capability
        if (not isinstance(device.name, str) or not isinstance(cc, tuple) or len(cc) != 2
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 100 for c in cc)):
            raise ValueError(f"emulate: a DeviceProfile needs a str name and compute_capability (major, minor) of "
                             f"ints, got name {device.name!r}, compute_capability {cc!r}")
        for field in ("sm_count", "smem_per_block", "threads_per_block", "regs_per_block"):
            v = getattr(device, field)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
                raise ValueError(f"emulate: DeviceProfile.{field} must be an int in [1, 2**31), got {v!r}")
        return device
    if isinstance(device, str):
        if device not in DEVICES:
            raise ValueError(f"emulate: device must be one of {sorted(DEVICES)} or a DeviceProfile, got {device!r}")
        return DEVICES[device]
    raise TypeError(f"emulate: device must be a str or a DeviceProfile, got {type(device).__name__}")


def _configure(active, order, seed, check, workers, device, executor="source"):
    major, minor = device.compute_capability
    torch.ops.flash_cuda._emu_configure(active, order, seed, check, workers, device.name, 10 * major + minor,
                                        device.sm_count, device.smem_per_block, device.threads_per_block,
                                        device.regs_per_block, executor)


# ---- the PTX the build packaged (setup.py: flash_cuda/ptx/<source>.ptx.gz and index.json) ----
_PTX_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ptx")
_ptx_index = None
_ptx_modules = {}
_ptx_replacements = {}  # the active context's ptx={...}


def _index():
    global _ptx_index
    if _ptx_index is None:
        path = os.path.join(_PTX_DIR, "index.json")
        _ptx_index = {}
        if os.path.exists(path):
            with open(path) as f:
                _ptx_index = json.load(f)
    return _ptx_index


_ENTRY_START = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+([A-Za-z0-9_$]+)\s*\(", re.M)


def _entry_texts(module):
    """{entry: the module's preamble (.version, .target, module-level declarations) and this entry
    alone}: modules of one kernel, which is what ptx_kernels() gives and ptx={...} takes."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY_START.finditer(module)]
    if not starts:
        return {}
    preamble = module[: starts[0][0]]
    ends = [pos for pos, _ in starts[1:]] + [len(module)]
    return {name: preamble + module[pos:end] for (pos, name), end in zip(starts, ends)}


def _module(file):
    """A packaged file's entries (a group of instantiations: several kernels each), read once."""
    if file not in _ptx_modules:
        with gzip.open(os.path.join(_PTX_DIR, file), "rt") as f:
            _ptx_modules[file] = _entry_texts(f.read())
    return _ptx_modules[file]


def _ptx_source(entry):
    """The PTX module text for a kernel entry (called by the extension at a launch under the PTX
    executor); "" when there is none."""
    if entry in _ptx_replacements:
        return _ptx_replacements[entry]
    file = _index().get(entry)
    if file is None:
        return ""
    return _module(file).get(entry, "")


def ptx_kernels():
    """{entry: PTX text} for every kernel the PTX executor can run: each a module of one kernel,
    as nvcc emitted it for the sm_80 build. The keys are the kernel functions' mangled names,
    which launch records carry as "entry". Empty when the build has no PTX (built without nvcc,
    or with a TORCH_CUDA_ARCH_LIST without 8.0)."""
    return {entry: _ptx_source(entry) for entry in sorted(_index())}


_enter_lock = threading.Lock()
# a forked child gets a fresh lock: another thread of the parent may have held it at the fork
os.register_at_fork(after_in_child=lambda: globals().update(_enter_lock=threading.Lock()))


class emulate:
    """Context manager; see the module docstring. Process-wide: while one is active, flash_cuda's
    calls on CPU tensors from every thread run the emulated kernels (float64 ones are refused, as
    on a GPU) and are recorded in its launches; contexts do not nest. A call runs all its kernels
    under the device profile, executor, order and checks it started with, even if another thread
    leaves or enters a context meanwhile (ptx= replacements are read at each launch, and
    launches after the context's exit are not in its launches).

    order: the order in which a block's threads (and the grid's blocks) are run between
        synchronisation points: "forward", "reverse" or "random" (seeded by ``seed``).
    check: race checking and poisoning of uninitialised and in-flight shared memory.
        Bounds checks and collective/barrier checks are always on.
    workers: OS threads running blocks in parallel (default: torch.get_num_threads()).
    device: the GPU emulated (see the module docstring); default "a100".
    executor: "source" (default) or "ptx" (see the module docstring).
    ptx: {entry: PTX text} replacing kernels' PTX under executor="ptx".
    """

    _current = None  # the active context (None: none), whose launches the records are

    def __init__(self, order="forward", check=True, seed=0, workers=None, device="a100", executor="source", ptx=None):
        if order not in ORDERS:
            raise ValueError(f"emulate: order must be one of {ORDERS}, got {order!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"emulate: executor must be one of {EXECUTORS}, got {executor!r}")
        if ptx is not None:
            if executor != "ptx":
                raise ValueError("emulate: ptx= replaces kernels' PTX and needs executor=\"ptx\"")
            if not isinstance(ptx, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ptx.items()):
                raise TypeError("emulate: ptx must be a dict {entry name: PTX text}")
            unknown = sorted(set(ptx) - set(_index()))
            if unknown:
                raise ValueError(f"emulate: ptx names kernels this build does not have: {unknown[:3]} "
                                 f"(flash_cuda.ptx_kernels() lists them)")
            for entry, text in ptx.items():
                torch.ops.flash_cuda._emu_ptx_check(text, entry)  # ValueError naming the line
        self.executor, self.ptx = executor, dict(ptx or {})
        if not isinstance(check, bool):
            raise TypeError(f"emulate: check must be a bool, got {type(check).__name__}")
        workers = torch.get_num_threads() if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 4096:
            raise ValueError(f"emulate: workers must be an int in [1, 4096] (OS threads), got {workers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"emulate: seed must be an int in [0, 2**63), got {seed!r}")
        self.order, self.check, self.seed, self.workers = order, check, seed, workers
        self.device = _device_profile(device)
        if executor == "ptx" and tuple(self.device.compute_capability) < (8, 0):
            raise ValueError(f"emulate: executor=\"ptx\" runs the sm_80 pass's PTX (the code path of every GPU from "
                             f"sm_80 on); device {self.device.name!r} is sm_"
                             f"{self.device.compute_capability[0]}{self.device.compute_capability[1]}: use "
                             f"executor=\"source\" for it")
        self._launches = []

    def __enter__(self):
        # One lock around the check and the switch: two threads entering at once both got in, and
        # the first to leave turned emulation off under the other (its calls ran the CPU backend).
        with _enter_lock:
            if emulate._current is not None:
                raise RuntimeError("emulate: contexts do not nest (one is active, in this thread or another)")
            torch.ops.flash_cuda._emu_records()  # drop records of earlier launches
            _ptx_replacements.clear()
            _ptx_replacements.update(self.ptx)
            _configure(True, self.order, self.seed, self.check, self.workers, self.device, self.executor)
            emulate._current = self
        return self

    def __exit__(self, *exc):
        with _enter_lock:
            if emulate._current is not self:  # (a context that failed to enter, or left already)
                return False
            _configure(False, "forward", 0, True, 1, DEVICES["a100"])
            _ptx_replacements.clear()
            emulate._current = None
            self._collect()
        return False

    def _collect(self):
        self._launches += json.loads(torch.ops.flash_cuda._emu_records())

    @property
    def launches(self):
        """One dict per kernel launch so far, in launch order."""
        with _enter_lock:  # (another context may be entering: its records are its own)
            if emulate._current is self:
                self._collect()
            return list(self._launches)


def runs_cuda_kernels(x):
    """Whether flash_cuda runs its CUDA kernels on tensor x: on a GPU, or emulated inside emulate()."""
    return x.device.type == "cuda" or (x.device.type == "cpu" and emulate._current is not None)
