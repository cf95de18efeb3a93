/* Compile-time configuration of the forward kernel per head dim: tile sizes, warps, shared
 * memory. Every number a kernel or launcher needs comes from here. */
#pragma once
#include "layout.h"

namespace flash_cuda {

template <class T_, int kHeadDim_, int kBlockN_>
struct FwdTraits {
  using T = T_;  // __half or __nv_bfloat16
  static constexpr int kHeadDim = kHeadDim_;  // instantiated head dim (real d <= kHeadDim)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Each warp owns 16 query rows (one mma m-tile): no communication between warps in the
  // main loop, and the 4-lane row reductions of the softmax stay inside a quad.
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNTiles = kBlockN / 8;   // S accumulator n-tiles per warp (16 x 8 each)
  static constexpr int kDTiles = kHeadDim / 8;  // O accumulator n-tiles per warp

  static_assert(sizeof(T) == 2, "tensor-core inputs are 16-bit");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims are instantiated in multiples of 32 up to 256");
  static_assert(kBlockN % 16 == 0, "P V consumes keys 16 at a time (one mma k-step)");
  // Registers per thread: O is 16 x kHeadDim fp32 over 32 lanes, S is 16 x kBlockN.
  static_assert(kHeadDim / 2 + kBlockN / 2 <= 160, "accumulators must leave room in 255 registers");

  using QLayout = SmemLayout<kBlockM, kHeadDim>;   // Q tile; reused to stage O
  using KVLayout = SmemLayout<kBlockN, kHeadDim>;  // one K and one V tile
  static constexpr size_t kSmemBytes = (QLayout::kElems + 2 * KVLayout::kElems) * sizeof(T);
  static_assert(kSmemBytes <= 227 * 1024, "fits sm_90's shared memory");
};

// Key tile width per head dim: 128 where S fits beside O in registers, 64 above head dim 64.
template <int kHeadDim>
constexpr int fwd_block_n() { return kHeadDim <= 64 ? 128 : 64; }

}  // namespace flash_cuda
