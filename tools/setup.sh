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
python3 -m pip install -q --no-build-isolation -e .
