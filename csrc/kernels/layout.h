/* Shared-memory tile layout: a [kRows][kCols] tile of 16-bit values, kCols a multiple of 32,
 * stored in column blocks of 64 (or 32) values with an XOR swizzle on 16-byte chunks.
 *
 * Why: ldmatrix reads 8 rows at the same column chunk in one phase, and cp.async writes 8
 * consecutive chunks of a row in one phase (ptx-oracle bank model: 16-byte accesses are served
 * 8 lanes at a time). Unswizzled 128-byte rows put all 8 rows of an ldmatrix phase in the same
 * banks (8-way conflict). Swizzling chunk c of row r to c ^ (r % 8) (CuTe Swizzle<3,3,3>, as in
 * FlashAttention-2) gives every row of the phase its own 16 bytes of the 128-byte bank cycle.
 * With 64-byte block rows (head dims 32 and 96) two rows share a bank cycle, so the swizzle is
 * c ^ ((r / 2) % 4) (Swizzle<2,3,3>): rows r and r+1 differ in bank half, pairs in chunk.
 * Column blocks keep every row of a block 128 (or 64) bytes, whatever kCols is.
 *
 * PaddedLayout (the backward's tiles in its wide configuration at head dim 64, traits.h, and the
 * preprocess's 16 x 16 staging, bwd_preprocess.h): rows
 * of kCols + 8 values instead, unswizzled. Why: a fragment's column enters a swizzled address by
 * an XOR with the lane's row bits, one instruction per ldmatrix of each k step unless its
 * offset is held in a register per k step, which the backward's tightest kernels cannot spare
 * (ptxas rebuilt the offsets inside the loop); with padded rows every fragment of a tile is
 * the lane's offset plus a compile-time constant. Conflict-free as well: the pitch is an odd
 * number of 16-byte chunks, so 8 rows at one column (an ldmatrix phase) start in 8 different
 * chunks of the 128-byte bank cycle, and a phase of 8 consecutive chunks of one row (cp.async,
 * 128-bit loads) is 128 contiguous bytes. Costs one chunk per row of shared memory.
 */
#pragma once
#include "platform.h"

namespace flash_cuda {

template <int kRows_, int kCols_>
struct SmemLayout {
  static constexpr int kRows = kRows_, kCols = kCols_;
  static_assert(kCols % 32 == 0, "tile columns come in 16-byte chunks within 32- or 64-wide blocks");
  static constexpr int kBlockCols = kCols % 64 == 0 ? 64 : 32;
  static constexpr int kChunks = kBlockCols / 8;  // 16-byte chunks per block row
  static constexpr int kElems = kRows * kCols;
  static constexpr int kTotalChunks = kElems / 8;

  // Element offset of (row, col).
  FC_DEVICE static int offset(int row, int col) {
    const int chunk = (col % kBlockCols) / 8;
    const int swizzled = kBlockCols == 64 ? chunk ^ (row % 8) : chunk ^ ((row / 2) % 4);
    return (col / kBlockCols) * (kRows * kBlockCols) + row * kBlockCols + swizzled * 8 + col % 8;
  }
  // offset(row0 + lr, col0 + lc) from lane_off = offset(lr, lc), for row0 a multiple of 8, lc
  // inside one column block, and col0 a multiple of 8 whose 16-byte chunk bits within a block
  // do not meet lc's (fragment loads: col0 a multiple of 16, lc in {0, 8}): the swizzle of
  // row0 + lr is lr's, and col0 enters by one XOR, the rest by adds. With lane_off computed once
  // (it is loop-invariant), an access costs one LOP3 instead of the whole swizzle arithmetic.
  FC_DEVICE static int offset_from(int lane_off, int row0, int col0) {
    return (lane_off ^ (col0 % kBlockCols)) + (col0 / kBlockCols) * (kRows * kBlockCols) + row0 * kBlockCols;
  }

  // How kThreads threads copy the tile, chunk by chunk in copy order (chunk_coord): thread t's
  // i-th chunk is chunk t + i kThreads, at row (t / kChunks) + row_step(i), column
  // 8 (t % kChunks) + col_step(i), and shared offset offset(t's first chunk) + offset_step(i).
  // The steps are compile-time constants: a pass of kThreads covers kRowsPerPass whole block
  // rows, a multiple of 8, so a chunk keeps the swizzle of the thread's first chunk.
  template <int kThreads>
  struct CopyPlan {
    static constexpr int kRowsPerPass = kThreads / kChunks;
    static constexpr int kIters = kTotalChunks / kThreads;
    static_assert(kThreads % kChunks == 0 && kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0,
                  "a pass of the threads covers whole block rows, 8 at a time, and tiles the block");
    static_assert(kTotalChunks % kThreads == 0, "every thread copies the same number of chunks");
    FC_DEVICE static constexpr int row_step(int i) { return (i * kRowsPerPass) % kRows; }
    FC_DEVICE static constexpr int col_step(int i) { return (i * kRowsPerPass) / kRows * kBlockCols; }
    FC_DEVICE static constexpr int offset_step(int i) {
      return (i * kRowsPerPass) / kRows * (kRows * kBlockCols) + row_step(i) * kBlockCols;
    }
  };

  // The id-th 16-byte chunk in copy order (block, then row, then chunk): 8 consecutive ids
  // are 128 contiguous bytes of one block row (or of two 64-byte rows), the conflict-free
  // order for cp.async and 128-bit shared loads.
  FC_DEVICE static void chunk_coord(int id, int& row, int& col) {
    const int block = id / (kRows * kChunks), rem = id % (kRows * kChunks);
    row = rem / kChunks;
    col = block * kBlockCols + (rem % kChunks) * 8;
  }
};

// Rows of kCols + 8 values, unswizzled (the docblock above); the interface of SmemLayout.
template <int kRows_, int kCols_>
struct PaddedLayout {
  static constexpr int kRows = kRows_, kCols = kCols_;
  static_assert(kCols % 16 == 0, "an even number of chunks per row: the pitch is odd");
  // Tiles copied chunk by chunk (CopyPlan, chunk_coord) need whole 128-byte row segments, so
  // every copy phase stays inside one row: with 4-chunk rows a phase covers two rows, whose
  // chunks no odd pitch keeps apart. (32-column tiles written by 32-bit stores and read by
  // ldmatrix, as P^T and dS^T, are fine, and so are 16-column ones written a row per lane.)
  static constexpr bool kCopyable = kCols % 64 == 0;
  static constexpr int kBlockCols = kCols;  // one block: the whole row
  static constexpr int kPitch = kCols + 8;  // an odd number of 16-byte chunks
  static constexpr int kChunks = kCols / 8;
  static constexpr int kElems = kRows * kPitch;
  static constexpr int kTotalChunks = kRows * kCols / 8;

  FC_DEVICE static int offset(int row, int col) { return row * kPitch + col; }
  // offset(row0 + lr, col0 + lc) from lane_off = offset(lr, lc): adds only.
  FC_DEVICE static int offset_from(int lane_off, int row0, int col0) { return lane_off + row0 * kPitch + col0; }

  // As SmemLayout::CopyPlan: thread t's i-th chunk is chunk t + i kThreads, kRowsPerPass whole
  // rows a pass.
  template <int kThreads>
  struct CopyPlan {
    static constexpr int kRowsPerPass = kThreads / kChunks;
    static constexpr int kIters = kTotalChunks / kThreads;
    static_assert(kCopyable, "copied tiles have whole 128-byte row segments");
    static_assert(kThreads % kChunks == 0 && kRows % kRowsPerPass == 0,
                  "a pass of the threads covers whole rows and tiles the tile");
    static_assert(kTotalChunks % kThreads == 0, "every thread copies the same number of chunks");
    FC_DEVICE static constexpr int row_step(int i) { return i * kRowsPerPass; }
    FC_DEVICE static constexpr int col_step(int) { return 0; }
    FC_DEVICE static constexpr int offset_step(int i) { return row_step(i) * kPitch; }
  };

  // The id-th 16-byte chunk in copy order (row, then chunk).
  FC_DEVICE static void chunk_coord(int id, int& row, int& col) {
    static_assert(kCopyable, "copied tiles have whole 128-byte row segments");
    row = id / kChunks;
    col = (id % kChunks) * 8;
  }
};

}  // namespace flash_cuda
