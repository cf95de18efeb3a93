/* Compile-time configuration of the forward kernel per head dim: tile sizes, warps, shared
 * memory. Every number a kernel or launcher needs comes from here. */
#pragma once
#include "layout.h"
#include "mask.h"

namespace flash_cuda {

// Forward: a block owns a 128-row query tile and walks the key tiles. Head dims up to 128:
// 4 warps x two 16-row m-tiles each, so every K and V fragment a warp loads from shared memory
// feeds two mma (half the ldmatrix traffic of one m-tile per warp; FlashAttention-2's 128-row
// tiles do the same). Above 128 the O accumulator alone is kHeadDim / 2 registers per m-tile:
// 8 warps x one m-tile.
template <class T_, int kHeadDim_>
struct FwdTraits {
  using T = T_;  // __half or __nv_bfloat16
  static constexpr int kHeadDim = kHeadDim_;  // instantiated head dim (real d <= kHeadDim)
  static constexpr int kMTiles = kHeadDim <= 128 ? 2 : 1;  // 16-row m-tiles per warp
  static constexpr int kWarps = kHeadDim <= 128 ? 4 : 8;
  static constexpr int kThreads = 32 * kWarps;
  // Each warp owns 16 kMTiles query rows: no communication between warps in the main loop, and
  // the 4-lane row reductions of the softmax stay inside a quad.
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;
  static constexpr int kBlockN = 64;
  static constexpr int kNTiles = kBlockN / 8;   // S accumulator n-tiles per m-tile (16 x 8 each)
  static constexpr int kDTiles = kHeadDim / 8;  // O accumulator n-tiles per m-tile
  // Unroll of S = Q K^T's k loop: whole, except with two m-tiles at head dims 96 and 128 (160
  // and 192 accumulator registers), where whole unrolling makes ptxas hold every step's
  // ldmatrix addresses and spill; by 4 it needs none (measured: benchmarks/sass_compare.py).
  static constexpr int kQKUnroll = kMTiles == 2 && kHeadDim >= 96 ? 4 : kHeadDim / 16;

  static_assert(sizeof(T) == 2, "tensor-core inputs are 16-bit");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims are instantiated in multiples of 32 up to 256");
  static_assert(kBlockN % 16 == 0, "P V consumes keys 16 at a time (one mma k-step)");
  static_assert(kBlockM == 128, "one query tile size for every head dim");
  // Registers per thread: O is kMTiles x 16 x kHeadDim fp32 over 32 lanes, S kMTiles x 16 x kBlockN.
  static_assert(kMTiles * (kHeadDim / 2 + kBlockN / 2) <= 192, "accumulators must leave room in 255 registers");

  // Blocks per SM the register allocation must allow (__launch_bounds__): 2 lets ptxas use up
  // to 255 registers per thread (4 warps) or 128 (8 warps x 2 would not fit: 1).
  static constexpr int kMinBlocksPerSm = kWarps == 4 ? 2 : 1;

  using QLayout = SmemLayout<kBlockM, kHeadDim>;   // Q tile; reused to stage O
  using KVLayout = SmemLayout<kBlockN, kHeadDim>;  // one K and one V tile
  static constexpr size_t kSmemBytes = (QLayout::kElems + 2 * KVLayout::kElems) * sizeof(T);
  static_assert(kSmemBytes <= 163 * 1024, "fits sm_80's shared memory per block");
};

}  // namespace flash_cuda

namespace flash_cuda {

// Backward (FlashAttention-2 Algorithm 2): a block owns one 64-key tile of K and V and walks
// the 64-row query tiles of every query head of its kv group. 8 warps:
//   S^T = K Q^T and dP^T = V dO^T: warp (wk, wq) = (warp % 4, warp / 4) computes keys
//     16 wk.. x queries 32 wq.. (16 x 32, 16 fp32 registers each);
//   P^T and dS^T go through shared memory (16-bit), because the next products need them in
//     other warps' shapes;
//   dV += P^T dO and dK += dS^T Q: warp owns keys 16 wk.. x head-dim columns (D/2) wq..,
//     so each thread keeps D/4 + D/4 fp32 accumulators for the whole walk;
//   dQ_i = dS K: warp owns queries 16 wk.. x columns (D/2) wq.., added atomically.
template <class T_, int kHeadDim_>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 64, kBlockN = 64;  // query rows, keys
  // Blocks per SM the register allocation must allow (__launch_bounds__): 2 (at most 128
  // registers) where the accumulators leave room, else 1; without it ptxas settles at 128
  // registers at head dim 96 on sm_90 and spills.
  static constexpr int kMinBlocksPerSm = kHeadDim <= 64 ? 2 : 1;
  static constexpr int kHalfD = kHeadDim / 2;       // head-dim columns per warp in dV/dK/dQ
  static_assert(kHalfD % 16 == 0, "each warp's half of the head dim is whole 16-column ldmatrix.x4 pairs");
  static_assert(kBlockN == 16 * (kWarps / 2) && kBlockM == 32 * 2, "the 4 x 2 warp grid covers the 64 x 64 tile");
  using QLayout = SmemLayout<kBlockM, kHeadDim>;    // Q_i and dO_i
  using KVLayout = SmemLayout<kBlockN, kHeadDim>;   // K_j and V_j
  using PLayout = SmemLayout<kBlockN, kBlockM>;     // P^T and dS^T, [key][query]
  static constexpr size_t kTileBytes = QLayout::kElems * sizeof(T);
  static constexpr size_t kFixedBytes = 2 * KVLayout::kElems * sizeof(T) + 2 * PLayout::kElems * sizeof(T);
  // Q_i, dO_i (+ lse, Di rows) double-buffered where it fits sm_80's 163 KiB per block: the
  // next query tile loads while this one computes. Head dim 256 has one buffer, refilled
  // after this tile's last use of it.
  static constexpr int kStages = kFixedBytes + 2 * (2 * kTileBytes + 2 * kBlockM * 4) <= 163 * 1024 ? 2 : 1;
  static constexpr size_t kStageBytes = 2 * kTileBytes + 2 * kBlockM * sizeof(float);
  static constexpr size_t kSmemBytes = kFixedBytes + kStages * kStageBytes;
  static_assert(kSmemBytes <= 163 * 1024, "fits sm_80's shared memory per block");
  // dQ accumulator: [B, Hq, row blocks of 16, kHeadDim / 8 n-tiles, 4 elements, 32 lanes] fp32,
  // the mma accumulator order, so a warp's atomics for one element index are 128 contiguous
  // bytes (coalesced). Rows are padded to a multiple of kBlockM.
  static constexpr int kAccumTileFloats = 16 * kHeadDim;  // one 16-row block
  // Offset of 16-row block rb of (batch, head); (b, 0, 0) gives the size of the whole buffer.
  FC_HOST_DEVICE static int64_t accum_offset(int nq, int hq, int batch, int head, int64_t rb) {
    const int64_t row_blocks = int64_t((nq + kBlockM - 1) / kBlockM) * 4;
    return ((int64_t(batch) * hq + head) * row_blocks + rb) * kAccumTileFloats;
  }
};

// The deterministic dQ pass: the forward's shape (4 warps x 16 query rows, loop over key
// tiles) computing S, P, dP, dS and dQ += dS K in registers, no atomics.
template <class T_, int kHeadDim_>
struct BwdDqTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // dQ (D/2) + S and dP (kBlockN/2 each)
  static constexpr int kNTiles = kBlockN / 8, kDTiles = kHeadDim / 8;
  static_assert(kHeadDim / 2 + kBlockN <= 160, "accumulators must leave room in 255 registers");
  using QLayout = SmemLayout<kBlockM, kHeadDim>;
  using KVLayout = SmemLayout<kBlockN, kHeadDim>;
  static constexpr size_t kSmemBytes = (2 * QLayout::kElems + 2 * KVLayout::kElems) * sizeof(T);
};

}  // namespace flash_cuda
