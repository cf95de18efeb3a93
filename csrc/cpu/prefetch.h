// Software prefetch of whole cache lines, for rows the decoding kernels read once from memory
// (kvcache_cpu.cpp and its AVX2/AVX-512 kernels): plain inline functions, no target attribute,
// so both ISA files and the portable code share them. A prefetch never faults; on a CPU other
// than x86 __builtin_prefetch may do nothing.
#pragma once
#include <stdint.h>

namespace flash_cuda::cpu {

constexpr int64_t kCacheLine = 64;  // bytes

// The lines of [p, p + bytes) fetched into L1 (prefetcht0 on x86).
inline void prefetch_l1(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += kCacheLine) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3);
}
// The lines of [p, p + bytes) fetched into L2 (prefetcht1 on x86): rows used after more than L1
// holds has been read.
inline void prefetch_l2(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += kCacheLine) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 2);
}

// Rows fetched into L2 alongside a pass over other rows (decoding: a tile's value rows while its
// key rows are multiplied, the next tile's key rows while the value rows are): `rows` rows of
// `bytes`, `stride` bytes apart; fetch(r) fetches row r, if there is one.
struct RowsAhead {
  const char* base = nullptr;
  int64_t stride = 0, rows = 0, bytes = 0;
  void fetch(int64_t r) const {
    if (r < rows) prefetch_l2(base + r * stride, bytes);
  }
};

// Rows fetched far ahead into L2, besides the fetches just ahead, where a call reads at least as
// much of the cache as the last-level cache holds: row i + ahead while row i is in use (none when
// ahead is 0), below row `end`, counted from the operand's first row. end may pass the call's own
// rows where the rows go on in memory (a contiguous cache's next tile), so that the next call
// finds its first rows fetched too.
struct FarRows {
  int64_t ahead = 0, end = 0;
};

}  // namespace flash_cuda::cpu
