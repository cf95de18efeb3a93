/* Tile copies between global and shared memory (whole block cooperating), and the
 * shared-to-register fragment loads that feed the mma (one warp).
 *
 * Global rows are predicated: rows past the sequence end and columns past the real head dim
 * are zero-filled, so partial tiles and padded head dims need no special path in the math.
 */
#pragma once
#include "layout.h"
#include "ptx.h"
#include "tf32.h"

namespace flash_cuda {

// The 16-byte chunks of rows [row0, row0 + kRows) of a [n_rows, d] matrix (row stride in
// elements) that this thread copies into a swizzled shared tile: f(i, shared chunk, global
// chunk, whether it lies inside the matrix) for each of its Plan::kIters chunks. The launcher
// guarantees 16-byte aligned row starts and d a multiple of 8 (zero-padded), so every chunk is
// whole. Unrolled over the thread's chunks (Layout::CopyPlan): each chunk's shared offset, row
// and column are the thread's own plus compile-time steps, so a chunk costs an address, a
// predicate and one copy instruction, and the tile no loop control.
template <class Layout, int kThreads, class T, class F>
FC_DEVICE void for_each_chunk(T* s_tile, const T* g_m, int64_t row_stride, int row0, int n_rows, int d, F&& f) {
  using Plan = typename Layout::template CopyPlan<kThreads>;
  const int row_t = threadIdx.x / Layout::kChunks, col_t = 8 * (threadIdx.x % Layout::kChunks);
  const int64_t pass_stride = Plan::kRowsPerPass * row_stride;  // elements from a pass to the next
  const T* g_t = g_m + int64_t(row0 + row_t) * row_stride + col_t;
  T* s_t = s_tile + Layout::offset(row_t, col_t);
  const int rows_left = n_rows - row0 - row_t;
  const T* src = g_t;
#pragma unroll
  for (int i = 0; i < Plan::kIters; ++i) {
    if (i > 0) src = Plan::col_step(i) != Plan::col_step(i - 1) ? g_t + Plan::col_step(i) : src + pass_stride;
    f(i, s_t + Plan::offset_step(i), src, Plan::row_step(i) < rows_left && col_t + Plan::col_step(i) < d);
  }
}

// A tile into shared memory, one 16-byte cp.async per chunk (asynchronous: the caller commits
// and waits); rows past n_rows and columns past d are zero-filled.
template <class Layout, int kThreads, class T>
FC_DEVICE void load_tile(T* s_tile, const T* g_m, int64_t row_stride, int row0, int n_rows, int d) {
  for_each_chunk<Layout, kThreads>(s_tile, g_m, row_stride, row0, n_rows, d, [&](int, T* s_chunk, const T* g_chunk, bool fill) {
    // A zero-filled chunk reads nothing, so its (possibly out-of-range) address is harmless.
    cp_async_cg16_zfill(s_chunk, g_chunk, fill);
  });
}

// A main loop's tile on its way into shared memory, one at a time: load() where the kernel
// starts the copy, land() after its cp_async_wait, before the barrier that publishes it.
// sm_80+ (kRegs false): load() is load_tile's cp.async, land() nothing. sm_75 (kRegs), which
// has no cp.async: load() issues the thread's 16-byte global loads into registers and land()
// stores them, so the loads are in flight while the math between the two runs, as the cp.async
// are (the register double buffering of FlashAttention-1's pre-Ampere kernels); a copy through
// registers at load() (ptx.h's stand-in for cp.async) would wait for them there.
template <class Layout, int kThreads, class T, bool kRegs>
struct TileStage {
  FC_DEVICE void load(T* s_tile, const T* g_m, int64_t row_stride, int row0, int n_rows, int d) {
    load_tile<Layout, kThreads>(s_tile, g_m, row_stride, row0, n_rows, d);
  }
  FC_DEVICE void land() {}
};

template <class Layout, int kThreads, class T>
struct TileStage<Layout, kThreads, T, true> {
  using Plan = typename Layout::template CopyPlan<kThreads>;
  static_assert(Plan::offset_step(0) == 0, "chunk 0 is the thread's first shared chunk");
  uint4 r[Plan::kIters];  // 16 bytes per chunk in flight (4 registers)
  T* s_first;             // the thread's chunk 0 in the shared tile

  FC_DEVICE void load(T* s_tile, const T* g_m, int64_t row_stride, int row0, int n_rows, int d) {
    for_each_chunk<Layout, kThreads>(s_tile, g_m, row_stride, row0, n_rows, d, [&](int i, T* s_chunk, const T* g_chunk, bool fill) {
      if (i == 0) s_first = s_chunk;
      r[i] = fill ? ld_global(reinterpret_cast<const uint4*>(g_chunk)) : make_uint4(0u, 0u, 0u, 0u);
    });
  }
  FC_DEVICE void land() {
#pragma unroll
    for (int i = 0; i < Plan::kIters; ++i) st_shared(reinterpret_cast<uint4*>(s_first + Plan::offset_step(i)), r[i]);
  }
};

// Rows [0, 16) of a warp's slice of a shared tile (starting at tile row row0) to global rows
// [g_row0, g_row0 + 16) of a [n_rows, d] matrix, 16 bytes per lane per step (128-bit stores,
// 4 or 8 lanes per row: coalesced; d a multiple of 8, as for load_tile); only columns
// [col_begin, col_end) (multiples of 8).
template <class Layout, class T>
FC_DEVICE void store_warp_rows(T* g_m, int64_t row_stride, const T* s_tile, int row0, int g_row0, int n_rows, int d,
                               int lane, int col_begin = 0, int col_end = Layout::kCols) {
  using Rows16 = SmemLayout<16, Layout::kCols>;  // the copy order of a 16-row tile
  uint16_t* g_raw = reinterpret_cast<uint16_t*>(g_m);
  const uint16_t* s_raw = reinterpret_cast<const uint16_t*>(s_tile);
  static_assert(Rows16::kTotalChunks % 32 == 0, "every lane stores the same number of chunks");
#pragma unroll
  for (int i = 0; i < Rows16::kTotalChunks / 32; ++i) {
    int row, col;
    Rows16::chunk_coord(lane + 32 * i, row, col);
    const int g_row = g_row0 + row;
    if (g_row >= n_rows || col >= d || col < col_begin || col >= col_end) continue;
    const uint4 chunk = ld_shared(reinterpret_cast<const uint4*>(s_raw + Layout::offset(row0 + row, col)));
    st_global(reinterpret_cast<uint4*>(g_raw + g_row * row_stride + col), chunk);
  }
}

// A warp's fp32 accumulator tiles (16 rows x 8 kTiles columns, mma C layout: rows g and g + 8,
// columns 2t, 2t + 1 of each n-tile) times `scale`, as T, into rows row0.. and columns col0.. of
// a swizzled shared tile of T's units (tf32.h): 32-bit stores of 16-bit pairs, conflict-free (8
// rows hit 8 chunks); fp32 pairs as 64-bit stores (a pair's 8 bytes lie in one chunk).
template <class Layout, class T, int kTiles>
FC_DEVICE void stage_accumulators(typename Elem<T>::Unit* s_tile, const float (&rAcc)[kTiles][4], int row0, int col0,
                                  float scale, int lane) {
  for (int nt = 0; nt < kTiles; ++nt)
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + lane / 4 + 8 * half, col = col0 + nt * 8 + 2 * (lane % 4);
      const float lo = rAcc[nt][2 * half] * scale, hi = rAcc[nt][2 * half + 1] * scale;
      if constexpr (Elem<T>::kTf32)
        st_shared(reinterpret_cast<float2*>(s_tile + Layout::offset(row, 2 * col)), make_float2(lo, hi));
      else
        st_shared(reinterpret_cast<uint32_t*>(s_tile + Layout::offset(row, col)), pack2<T>(lo, hi));
    }
}

// ---- fragments (ptx-oracle "compositions_for_mma_m16n8k16") ----
// Tile origins (row0, col0 below) are multiples of 8 rows and 16 columns (SmemLayout::offset_from).

// A operand 16x16 at (row0, col0) of a [m][k] tile: ldmatrix.x4, lane L addresses row
// row0 + L % 16, column col0 + 8 * (L / 16).
template <class Layout, class T>
FC_DEVICE void load_a_frag(uint32_t (&rA)[4], const T* s_tile, int row0, int col0, int lane) {
  ldmatrix<4>(rA, s_tile + Layout::offset_from(Layout::offset(lane % 16, 8 * (lane / 16)), row0, col0));
}

// A operand 16x16 (m0.., k0..) from a tile stored transposed, [k][m] (dS^T for dQ = dS K):
// ldmatrix.x4.trans; matrix r = L / 8 of lane L covers stored rows k0 + 8 (r / 2).. and
// columns m0 + 8 (r % 2).., which .trans turns into a0a1, a2a3, a4a5, a6a7.
template <class Layout, class T>
FC_DEVICE void load_a_frag_trans(uint32_t (&rA)[4], const T* s_tile, int m0, int k0, int lane) {
  const int r = lane / 8;
  ldmatrix<4, true>(rA, s_tile + Layout::offset_from(Layout::offset(lane % 8 + 8 * (r / 2), 8 * (r % 2)), k0, m0));
}

// B operands of two n-tiles (n0..n0+16) for k0..k0+16 from a tile stored [n][k] (K for
// S = Q K^T): ldmatrix.x4 without .trans. rB[0..1]: n-tile n0, rB[2..3]: n-tile n0 + 8.
template <class Layout, class T>
FC_DEVICE void load_b_frags_nk(uint32_t (&rB)[4], const T* s_tile, int n0, int k0, int lane) {
  ldmatrix<4>(rB, s_tile + Layout::offset_from(Layout::offset(lane % 8 + 8 * (lane / 16), 8 * ((lane / 8) % 2)), n0, k0));
}

// B operands of two n-tiles (n0..n0+16) for k0..k0+16 from a tile stored [k][n] (V for
// O = P V): ldmatrix.x4.trans. rB[0..1]: n-tile n0, rB[2..3]: n-tile n0 + 8.
template <class Layout, class T>
FC_DEVICE void load_b_frags_kn(uint32_t (&rB)[4], const T* s_tile, int k0, int n0, int lane) {
  ldmatrix<4, true>(rB, s_tile + Layout::offset_from(Layout::offset(lane % 16, 8 * (lane / 16)), k0, n0));
}

}  // namespace flash_cuda
