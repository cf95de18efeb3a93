/* The additive bias (attn_mask) of one tile step, staged in shared memory: the kMod kernels'
 * view of ScoreMod::bias (score_mod.h).
 *
 * The tile ([query rows][keys] of fp32, as the bias is stored) is copied with 16-byte cp.async
 * chunks along the keys (coalesced; rows past the sequence ends zero-filled, keys past nk
 * zero-filled within their chunk), asynchronously with the step's other tiles, then each thread
 * reads the elements of its mma fragments. A bias broadcast over query rows (row stride 0: a
 * key-padding mask (B, 1, 1, Nk)) is copied as one row and every row reads it; broadcast batch
 * and head dims read the same global rows (no extra DRAM traffic). The launcher guarantees the
 * layout the chunks need: unit key stride and 16-byte aligned rows (kernel_launch.cpp).
 *
 * kPitch (floats per shared row, a multiple of 4) is chosen by the reader's access pattern:
 * kCols + 8 for C fragments read as float2 pairs along the keys (forward: the 4 rows of a
 * half-warp phase land 8 banks apart), kCols + 4 for transposed reads (backward S^T: the 4
 * query rows of a warp's scalar reads land 4 banks apart).
 */
#pragma once
#include "ptx.h"

namespace flash_cuda {

template <int kRows, int kCols, int kPitch>
struct BiasTile {
  static_assert(kCols % 4 == 0 && kPitch % 4 == 0 && kPitch >= kCols, "rows of whole 16-byte chunks");
  static constexpr int kChunksPerRow = kCols / 4;
  static constexpr size_t kBytes = size_t(kRows) * kPitch * sizeof(float);

  // Rows [row0, row0 + kRows) and keys [col0, col0 + kCols) of one (batch, head)'s bias
  // (g_head; row_stride 0: broadcast over rows) into s_tile; n_rows, n_cols: the sequence ends.
  // Asynchronous: the caller commits and waits with its other cp.async copies.
  template <int kThreads>
  FC_DEVICE static void load(float* s_tile, const float* g_head, int64_t row_stride, int row0, int col0, int n_rows,
                             int n_cols) {
    const int rows = row_stride == 0 ? 1 : kRows;
    for (int idx = threadIdx.x; idx < rows * kChunksPerRow; idx += kThreads) {
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 4;
      const int keys_left = n_cols - col0 - c;
      const int valid = row0 + r < n_rows && keys_left > 0 ? (keys_left < 4 ? keys_left : 4) : 0;
      // a chunk with no valid key reads nothing; its source is then the (valid) head pointer
      const float* src = valid ? g_head + (row0 + r) * row_stride + col0 + c : g_head;
      cp_async_cg16(s_tile + r * kPitch + c, src, 4 * valid);
    }
  }

  // Element (row, col) of the tile; row_broadcast: the tile holds one row for all.
  FC_DEVICE static float at(const float* s_tile, bool row_broadcast, int row, int col) {
    return ld_shared(s_tile + (row_broadcast ? 0 : row) * kPitch + col);
  }
  // Elements (row, col) and (row, col + 1), col even.
  FC_DEVICE static float2 pair_at(const float* s_tile, bool row_broadcast, int row, int col) {
    return ld_shared(reinterpret_cast<const float2*>(s_tile + (row_broadcast ? 0 : row) * kPitch + col));
  }
};

}  // namespace flash_cuda
