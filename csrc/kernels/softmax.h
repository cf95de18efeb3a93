/* Online softmax in registers (FlashAttention-2): each thread holds two rows of its warp's
 * 16-row score tile (rows g and g + 8 of the mma accumulator layout, g = lane / 4), and the
 * four lanes of a quad together hold a row, so row reductions are two xor-shuffles.
 *
 * Scores arrive already in the base-2 domain (S * scale * log2(e)), so every exponential is
 * one ex2.approx. The scale is applied before the max, not folded into the exponent's FMA
 * as in FlashAttention-2, because that folding assumes scale > 0: torch accepts any scale,
 * and for scale < 0 the max of S is not the max of S * scale.
 */
#pragma once
#include "ptx.h"

namespace flash_cuda {

FC_DEVICE float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

FC_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

struct OnlineSoftmax {
  float row_max[2];  // running max of the base-2 scores of rows g and g + 8 (quad-wide)
  float row_sum[2];  // this lane's part of sum(exp2(score - row_max)); quad-summed at the end

  FC_DEVICE OnlineSoftmax() : row_max{-INFINITY, -INFINITY}, row_sum{0.0f, 0.0f} {}

  // rS: base-2 scores of one key tile (masked ones -inf) -> unnormalised probabilities P.
  // rO is rescaled by exp2(old max - new max), the only correction a new tile needs.
  template <int kNTiles, int kDTiles>
  FC_DEVICE void update(float (&rS)[kNTiles][4], float (&rO)[kDTiles][4]) {
    for (int i = 0; i < 2; ++i) {
      float m = row_max[i];
      for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(rS[nt][2 * i], rS[nt][2 * i + 1]));
      m = quad_max(m);
      // -inf guard: a row that has seen no visible key keeps max -inf; subtracting 0 instead
      // gives exp2(-inf) = 0 for its (masked) scores rather than exp2(-inf - -inf) = NaN.
      const float m_sub = m == -INFINITY ? 0.0f : m;
      const float alpha = ex2_approx(row_max[i] - m_sub);  // 0 on the first visible tile
      row_max[i] = m;
      row_sum[i] *= alpha;
      for (int dt = 0; dt < kDTiles; ++dt) {
        rO[dt][2 * i] *= alpha;
        rO[dt][2 * i + 1] *= alpha;
      }
      for (int nt = 0; nt < kNTiles; ++nt)
        for (int e = 0; e < 2; ++e) {
          const float p = ex2_approx(rS[nt][2 * i + e] - m_sub);
          rS[nt][2 * i + e] = p;
          row_sum[i] += p;
        }
    }
  }

  // O /= rowsum (once, at the end) and lse = ln(sum exp(scores)) = (max + log2(sum)) * ln 2.
  // A row that saw no key has sum 0: its output stays 0 and its lse is -inf.
  template <int kDTiles>
  FC_DEVICE void finalize(float (&rO)[kDTiles][4], float (&lse)[2]) {
    for (int i = 0; i < 2; ++i) {
      const float sum = quad_sum(row_sum[i]);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (int dt = 0; dt < kDTiles; ++dt) {
        rO[dt][2 * i] *= inv;
        rO[dt][2 * i + 1] *= inv;
      }
      lse[i] = sum > 0.0f ? (row_max[i] + log2f(sum)) * 0.69314718055994531f : -INFINITY;
    }
  }
};

}  // namespace flash_cuda
