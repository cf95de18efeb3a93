#!/usr/bin/env bash
# Everything needed to benchmark on a fresh machine: set-up, build, then flash_cuda vs
# torch SDPA (quick preset on CPU, the FlashAttention sweep on CUDA) and the long-sequence
# memory check. Extra arguments go to benchmarks/bench_sdpa.py (e.g. --preset cpu-accept).
# A checkout already built for this machine (setup.py build_ext --inplace, or tools/gpu_check.sh;
# with kernels for its GPU) is used as it is: an editable install would rebuild every kernel in
# a temporary folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import sys, torch, flash_cuda
if torch.cuda.is_available():  # kernels for this GPU
    major, minor = torch.cuda.get_device_capability(0)
    archs = flash_cuda.cuda_arch_list()
    sys.exit(0 if archs and torch.ops.flash_cuda._arch_list_covers(archs, 10 * major + minor) else 1)" 2>/dev/null; then
    source tools/setup.sh matplotlib
fi
python3 benchmarks/bench_sdpa.py "$@"
python3 benchmarks/memory_long.py
