#!/usr/bin/env bash
# Everything needed to benchmark on a fresh machine: set-up, build, then flash_cuda vs
# torch SDPA (quick preset on CPU, the FlashAttention sweep on CUDA) and the long-sequence
# memory check. Extra arguments go to benchmarks/bench_sdpa.py (e.g. --preset cpu-accept).
# A checkout already built for this machine (setup.py build_ext --inplace, or tools/gpu_check.sh)
# is used as it is: an editable install would rebuild every kernel in a temporary folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import sys, torch, flash_cuda
sys.exit(0 if flash_cuda.has_cuda_kernels() or not torch.cuda.is_available() else 1)" 2>/dev/null; then
    source tools/setup.sh matplotlib
fi
python3 benchmarks/bench_sdpa.py "$@"
python3 benchmarks/memory_long.py
