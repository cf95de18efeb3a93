// Per-call temporaries of the CPU backend (GEMM operands prepared once per call, partial sums)
// from a small cache of freed blocks instead of the C heap.
//
// Why: a call of short sequences (e.g. B 32, H 12, N 32, D 32) prepares several MiB of operands
// and frees them at its end. glibc returns that memory to the system (mmap'd blocks, or trimming
// the top of the heap) and the next call faults every page in again: measured on a Zen 4 VM at
// ~2 us a 4 KiB page, 3.5-4 ms of a 7 ms fp32 backward whose GEMMs take ~2 ms. Blocks of the same
// size come back on the next call of the same shape (a training loop), already mapped.
//
// Only blocks from kScratchMinBlock to kScratchMaxBlock are kept, at most kScratchCacheBytes of
// them while idle (least recently freed evicted first): the calls whose operands are larger do
// O(N^2) work for their O(N) pages, where the faults do not show, and smaller ones glibc keeps in
// its heap anyway. Nothing from here may be returned to the caller: these tensors live for one
// call. The blocks come from c10::alloc_cpu directly: torch's memory profiler does not see them.
#pragma once
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace flash_cuda::cpu {

constexpr size_t kScratchMinBlock = size_t(64) << 10;    // smaller and larger temporaries go to
constexpr size_t kScratchMaxBlock = size_t(8) << 20;     // torch's CPU allocator as before
constexpr size_t kScratchCacheBytes = size_t(32) << 20;  // idle blocks kept at most

// An uninitialised CPU tensor of `sizes` (contiguous), on 64-byte boundaries like at::empty.
at::Tensor scratch_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// x converted to `dtype` with contiguous rows (unit stride in the last dimension): x itself where
// it already is, else a scratch copy.
at::Tensor scratch_rows(const at::Tensor& x, at::ScalarType dtype);

// What the cache did since the process started (the tests read it through
// torch.ops.flash_cuda._cpu_scratch_stats): requests served from it and requests it allocated
// a block for (those of kScratchMinBlock to kScratchMaxBlock bytes), bytes idle now.
struct ScratchStats {
  int64_t hits = 0, misses = 0, idle_bytes = 0;
};
ScratchStats scratch_stats();
// Frees the idle blocks (flash_cuda.empty_cpu_cache); returns their bytes.
int64_t scratch_release();
// Tests: fill every block handed out from now on with 0xff bytes (NaN in every float dtype).
void scratch_poison(bool on);

}  // namespace flash_cuda::cpu
