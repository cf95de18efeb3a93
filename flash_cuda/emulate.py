"""flash_cuda.emulate: run the CUDA kernels on the CPU in the SIMT emulator.

    with flash_cuda.emulate(order="forward", check=True) as emu:
        out = flash_cuda.attention(q, k, v, causal=True)   # CPU tensors run the CUDA kernels
    emu.launches   # one dict per kernel launch: kernel, grid, block, dynamic_smem, counters, errors

Inside the context, CPU tensors go through the launch code the CUDA build uses (same tile
choices, same grid) and the kernel source compiled by the host compiler; see csrc/emu/. A
launch whose checks fail (race, out-of-bounds access, missing cp.async wait, collective or
barrier not reached by every thread) raises RuntimeError after it completes.

device: the GPU emulated, a name of DEVICES or a DeviceProfile. The dispatcher picks tile
configurations and KV-cache splits from its limits exactly as it does from a real GPU's, and a
launch past them (shared memory, threads or registers per block) fails before it runs, as the
driver would refuse it; a GPU older than the kernels' compute capability is refused by the
launcher (NotImplementedError).
"""
import dataclasses
import json

import torch

ORDERS = ("forward", "reverse", "random")


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
        return device
    if isinstance(device, str):
        if device not in DEVICES:
            raise ValueError(f"emulate: device must be one of {sorted(DEVICES)} or a DeviceProfile, got {device!r}")
        return DEVICES[device]
    raise TypeError(f"emulate: device must be a str or a DeviceProfile, got {type(device).__name__}")


def _configure(active, order, seed, check, workers, device):
    major, minor = device.compute_capability
    torch.ops.flash_cuda._emu_configure(active, order, seed, check, workers, device.name, 10 * major + minor,
                                        device.sm_count, device.smem_per_block, device.threads_per_block,
                                        device.regs_per_block)


class emulate:
    """Context manager; see the module docstring.

    order: the order in which a block's threads (and the grid's blocks) are run between
        synchronisation points: "forward", "reverse" or "random" (seeded by ``seed``).
    check: race checking and poisoning of uninitialised and in-flight shared memory.
        Bounds checks and collective/barrier checks are always on.
    workers: OS threads running blocks in parallel (default: torch.get_num_threads()).
    device: the GPU emulated (see the module docstring); default "a100".
    """

    _active = False

    def __init__(self, order="forward", check=True, seed=0, workers=None, device="a100"):
        if order not in ORDERS:
            raise ValueError(f"emulate: order must be one of {ORDERS}, got {order!r}")
        if not isinstance(check, bool):
            raise TypeError(f"emulate: check must be a bool, got {type(check).__name__}")
        workers = torch.get_num_threads() if workers is None else workers
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"emulate: workers must be a positive int, got {workers!r}")
        self.order, self.check, self.seed, self.workers = order, check, int(seed), workers
        self.device = _device_profile(device)
        self._launches = []

    def __enter__(self):
        if emulate._active:
            raise RuntimeError("emulate: contexts do not nest")
        torch.ops.flash_cuda._emu_records()  # drop records of earlier launches
        _configure(True, self.order, self.seed, self.check, self.workers, self.device)
        emulate._active = True
        return self

    def __exit__(self, *exc):
        _configure(False, "forward", 0, True, 1, DEVICES["a100"])
        emulate._active = False
        self._collect()
        return False

    def _collect(self):
        self._launches += json.loads(torch.ops.flash_cuda._emu_records())

    @property
    def launches(self):
        """One dict per kernel launch so far, in launch order."""
        if emulate._active:
            self._collect()
        return list(self._launches)
