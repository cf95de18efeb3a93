"""flash_cuda.emulate: run the CUDA kernels on the CPU in the SIMT emulator.

    with flash_cuda.emulate(order="forward", check=True) as emu:
        out = flash_cuda.attention(q, k, v, causal=True)   # CPU tensors run the CUDA kernels
    emu.launches   # one dict per kernel launch: kernel, grid, block, dynamic_smem, counters, errors

Inside the context, CPU tensors go through the launch code the CUDA build uses (same tile
choices, same grid) and the kernel source compiled by the host compiler; see csrc/emu/. A
launch whose checks fail (race, out-of-bounds access, missing cp.async wait, collective or
barrier not reached by every thread) raises RuntimeError after it completes.
"""
import json

import torch

ORDERS = ("forward", "reverse", "random")


class emulate:
    """Context manager; see the module docstring.

    order: the order in which a block's threads (and the grid's blocks) are run between
        synchronisation points: "forward", "reverse" or "random" (seeded by ``seed``).
    check: race checking and poisoning of uninitialised and in-flight shared memory.
        Bounds checks and collective/barrier checks are always on.
    workers: OS threads running blocks in parallel (default: torch.get_num_threads()).
    """

    _active = False

    def __init__(self, order="forward", check=True, seed=0, workers=None):
        if order not in ORDERS:
            raise ValueError(f"emulate: order must be one of {ORDERS}, got {order!r}")
        if not isinstance(check, bool):
            raise TypeError(f"emulate: check must be a bool, got {type(check).__name__}")
        workers = torch.get_num_threads() if workers is None else workers
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"emulate: workers must be a positive int, got {workers!r}")
        self.order, self.check, self.seed, self.workers = order, check, int(seed), workers
        self._launches = []

    def __enter__(self):
        if emulate._active:
            raise RuntimeError("emulate: contexts do not nest")
        torch.ops.flash_cuda._emu_records()  # drop records of earlier launches
        torch.ops.flash_cuda._emu_configure(True, self.order, self.seed, self.check, self.workers)
        emulate._active = True
        return self

    def __exit__(self, *exc):
        torch.ops.flash_cuda._emu_configure(False, "forward", 0, True, 1)
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
