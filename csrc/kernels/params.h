/* Plain parameter structs of the attention kernels: pointers, sizes, strides. Built on the
 * host (csrc/kernel_launch.cpp) and passed by value to the kernels; no torch, no CUDA. */
#pragma once
#include <stdint.h>

#include "mask.h"
#include "score_mod.h"

namespace flash_cuda {

// A [B, H, N, D] tensor of 16-bit values with unit stride in D; strides in elements. Every
// (b, h, n) row starts 16-byte aligned (the launcher copies a tensor whose rows do not).
struct TensorRef {
  void* ptr;
  int64_t batch_stride, head_stride, row_stride;
};

// Fields both kernels read.
struct AttnShape {
  int b, hq, hkv, nq, nk;
  int d;              // the head dim rounded up to a multiple of 8 (the launcher zero-pads to
                      // it); the kernel's instantiation may be wider still (zero filled)
  float scale;        // softmax scale
  float scale_log2;   // scale * log2(e): scores go to the base-2 domain in one multiply
  BandMask mask;      // causal / sliding window (read by the kBand instantiations)
  ScoreMod mod;       // softcap, ALiBi, bias (read by the kMod instantiations)
};

struct FwdParams : AttnShape {
  TensorRef q, k, v, o;
  float* lse;  // [B, Hq, Nq] contiguous, natural log, softmax scale included
};

struct BwdParams : AttnShape {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse;   // [B, Hq, Nq] from the forward
  const float* dlse;  // [B, Hq, Nq] gradient flowing into lse, or nullptr
  float* row_stats;   // scratch written by the preprocess, per (batch, query head) 2 rows of
                      // stats_rows(nq) floats (row_stats_offset): lse2, the lse in base 2
                      // (+inf where the row sees no key and past nq: probabilities exactly 0),
                      // then D = rowsum(dO * O) - dlse (0 past nq). Padded so that the kernels
                      // copy whole 16-byte chunks of either without a bounds check.
  float* dq_accum;    // fp32 dQ in mma fragment order (see bwd_kernel.h), or nullptr when
                      // dQ is computed by the deterministic pass instead of atomics
};

// Rows of each row_stats row: nq rounded up to the 64-row tiles of the preprocess.
constexpr int kStatsRowTile = 64;
FC_HOST_DEVICE int64_t stats_rows(int nq) { return int64_t(nq + kStatsRowTile - 1) / kStatsRowTile * kStatsRowTile; }
// Offset of the lse2 row of (batch, head) in row_stats (D follows at + stats_rows(nq));
// (b, 0) gives the size of the whole buffer.
FC_HOST_DEVICE int64_t row_stats_offset(int nq, int hq, int batch, int head) {
  return (int64_t(batch) * hq + head) * 2 * stats_rows(nq);
}

// The (batch, head) slice of t, as T*.
template <class T>
FC_HOST_DEVICE T* head_ptr(const TensorRef& t, int batch, int head) {
  return static_cast<T*>(t.ptr) + batch * t.batch_stride + head * t.head_stride;
}

}  // namespace flash_cuda
