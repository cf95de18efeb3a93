#!/usr/bin/env bash
# Set up a fresh machine for flash_cuda: torch, build tools, then build and install the
# package in editable mode. Sourced by tools/test.sh and tools/bench.sh; safe to re-run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.14.1
python3 -m pip install -q "setuptools>=70.1" wheel ninja pytest "$@"
# The CUDA toolkit, when there is one: torch's guess from the nvcc on PATH can be wrong.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# On a machine with a GPU, its arch alone (the default list builds sm_80 and sm_90 for every kernel).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    arch=$(python3 -c "import torch; c = torch.cuda.is_available() and torch.cuda.get_device_capability(0)
print('%d.%d' % c if c else '')" 2>/dev/null || true)
    if [ -n "$arch" ]; then export TORCH_CUDA_ARCH_LIST="$arch"; fi
fi
python3 -m pip install -q --no-build-isolation -e .
