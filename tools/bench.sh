#!/usr/bin/env bash
# Everything needed to benchmark on a fresh machine: set-up, build, then flash_cuda vs
# torch SDPA (quick preset on CPU, the FlashAttention sweep on CUDA) and the long-sequence
# memory check. Extra arguments go to benchmarks/bench_sdpa.py (e.g. --preset cpu-accept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup.sh matplotlib
python3 benchmarks/bench_sdpa.py "$@"
python3 benchmarks/memory_long.py
