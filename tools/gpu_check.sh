#!/usr/bin/env bash
# One prepared run on a machine with a GPU and no network: build for that GPU's arch alone,
# the GPU tests, compute-sanitizer (memcheck, racecheck), the benchmarks against SDPA, and an
# Nsight Compute profile of flash_cuda's and FA2's kernels at one shape (tools/gpu_profile.py).
# Each stage gets min(its cap, the time left of BUDGET_S), so the run ends inside the budget
# and the stages that matter most (build, tests) come first. Everything goes to one log and
# the benchmarks' JSON and plot to OUTDIR.
#
#   tools/gpu_check.sh OUTDIR [BUDGET_S]
#
# BENCH_REPS (default 20): timed calls per point of the FlashAttention sweep; BENCH_SDPA_FLAGS:
# more arguments for that sweep (e.g. --no-plot).
# Uses the machine's python3, torch, pytest (pytest-xdist if present) and compute-sanitizer
# as they are: it installs nothing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR=${1:?usage: tools/gpu_check.sh OUTDIR [BUDGET_S]}
BUDGET=${2:-540}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
DEADLINE=$(( $(date +%s) + BUDGET ))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    elif command -v nvcc > /dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
fi
if [ -z "${CUDA_HOME:-}" ]; then
    echo "gpu_check.sh: no CUDA toolkit (no /usr/local/cuda/bin/nvcc, no nvcc on PATH; set CUDA_HOME)" | tee -a "$LOG"
    exit 2
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
# a run without a usable GPU would build without an arch and pass every stage by skipping its tests
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1; then
    echo "gpu_check.sh: torch sees no usable CUDA GPU here (torch.cuda.is_available() is False): nothing to check" \
        | tee -a "$LOG"
    exit 2
fi

stage() {  # stage NAME CAP_S CMD...: CMD under min(CAP_S, time left); its output into the log
    local name=$1 cap=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( left < cap )) && cap=$left
    if (( cap < 15 )); then echo "== $name: not run (budget spent)" | tee -a "$LOG"; return; fi
    echo "== $name (cap ${cap} s): $*" >> "$LOG"
    local t0=$(date +%s)
    timeout -k 5 "$cap" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s (cap ${cap} s)" | tee -a "$LOG"
}

{
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    nvcc --version | tail -n 2; lscpu | grep -m1 'Model name'; nproc
} >> "$LOG" 2>&1
ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4" || echo "")

stage build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" python3 setup.py -q build_ext --inplace
python3 -c "import flash_cuda; assert flash_cuda.has_cuda_kernels(), 'no CUDA kernels in this build'" >> "$LOG" 2>&1 \
    || { echo "== the build has no CUDA kernels: stopping" | tee -a "$LOG"; exit 1; }
stage test_kernel_gpu 150 python3 -m pytest -q -ra -p no:cacheprovider $XDIST tests/test_kernel_gpu.py
# the tests with a cuda device parameter or a GPU of their own, not those that emulate the kernels
GPU_TESTS="(cuda or gpu) and not emulated and not on_the_cuda_kernels and not gpu_paths_fake and not cuda_arch_list"
GPU_TESTS="$GPU_TESTS and not older_than_the_kernels"  # (an emulated V100)
stage tests_cuda 90 python3 -m pytest -q -ra -p no:cacheprovider $XDIST tests -k "$GPU_TESTS" --ignore=tests/test_kernel_gpu.py
stage memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --print-limit 20 python3 tools/gpu_sanitize.py
stage bench_kvcache 45 python3 benchmarks/bench_kvcache.py --device cuda --json "$OUTDIR/bench_kvcache_cuda.json"
stage bench_kvcache_grid 30 python3 benchmarks/bench_kvcache.py --device cuda --grid decode \
    --json "$OUTDIR/bench_kvcache_cuda_grid.json"
stage host_overhead 20 python3 benchmarks/host_overhead.py --device cuda --calls 500 --rounds 5 \
    --json "$OUTDIR/host_overhead_cuda.json"
stage racecheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 9 \
    --print-limit 20 python3 tools/gpu_sanitize.py --quick
stage bench_sdpa 150 python3 benchmarks/bench_sdpa.py --device cuda --preset fa --reps "${BENCH_REPS:-20}" --out "$OUTDIR" \
    ${BENCH_SDPA_FLAGS:-}
# where the time goes at the sweep's worst point, flash_cuda's kernels beside FA2's (if Nsight Compute is here)
NCU=$(command -v ncu || ls "$CUDA_HOME"/bin/ncu "$CUDA_HOME"/nsight-compute*/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [ -n "$NCU" ]; then
    stage ncu 60 "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --log-file "$OUTDIR/ncu.txt" python3 tools/gpu_profile.py
else
    echo "== ncu: not run (no Nsight Compute on this machine)" | tee -a "$LOG"
fi
stage bench_dropout 60 python3 benchmarks/bench_dropout.py --device cuda --json "$OUTDIR/bench_dropout_cuda.json"
stage bench_varlen 60 python3 benchmarks/bench_varlen.py --device cuda --json "$OUTDIR/bench_varlen_cuda.json"
stage bench_masks 60 python3 benchmarks/bench_masks.py --device cuda --json "$OUTDIR/bench_masks_cuda.json"
grep "^== " "$LOG"
