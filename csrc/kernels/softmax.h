/* Online softmax in registers (FlashAttention-2): each thread holds two rows of its warp's
 * 16-row score tile (rows g and g + 8 of the mma accumulator layout, g = lane / 4), and the
 * four lanes of a quad together hold a row, so row reductions are two xor-shuffles.
 *
 * Scores arrive raw (Q K^T, masked ones -inf) with the scale in the base-2 domain,
 * c = scale * log2(e), which must be > 0: the launcher makes it so (for scale <= 0 it runs the
 * kernel on -Q or zeros, see kernel_launch.cpp). Then max(c S) = c max(S), so the row max is
 * taken on the raw scores and each probability is one FFMA and one ex2.approx:
 * exp2(S c - max). The running max and the lse are kept in the scaled domain.
 *
 * kNatural (the modifier variant): scores arrive in natural units (scale and modifiers applied,
 * c = log2(e)), and a floating mask can put finite values far below the rest: -1e30 or
 * finfo(float32).min, which models fill padding with. There the row max is kept raw and each
 * probability is exp2((S - max) c), the difference first: exact for scores equal to the max,
 * so a row whose every score is the mask value gets the plain average of V (as torch). The
 * one-FFMA form would subtract fl(max c), whose rounding (up to 2^76 at -1e30) or overflow
 * (finfo.min) makes the row NaN or 0. One FADD more per score, in that variant only.
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

template <bool kNatural = false>
struct OnlineSoftmax {
  float row_max[2];  // running max of rows g and g + 8 (quad-wide): base-2 scores, kNatural raw ones
  float row_sum[2];  // this lane's part of sum(exp2(score - row_max)); quad-summed at the end

  FC_DEVICE OnlineSoftmax() : row_max{-INFINITY, -INFINITY}, row_sum{0.0f, 0.0f} {}

  // rS: raw scores of one key tile (masked ones -inf) -> unnormalised probabilities P; c > 0
  // the base-2 scale (kNatural: log2(e)). rO is rescaled by exp2(old max - new max), the only correction a new
  // tile needs.
  template <int kNTiles, int kDTiles>
  FC_DEVICE void update(float (&rS)[kNTiles][4], float (&rO)[kDTiles][4], const float c) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(rS[nt][2 * i], rS[nt][2 * i + 1]));
      m = kNatural ? fmaxf(row_max[i], quad_max(m)) : fmaxf(row_max[i], quad_max(m) * c);  // c > 0: -inf stays -inf
      // -inf guard: a row that has seen no visible key keeps max -inf; subtracting 0 instead
      // gives exp2(-inf) = 0 for its (masked) scores rather than exp2(-inf - -inf) = NaN.
      const float m_sub = m == -INFINITY ? 0.0f : m;
      const float alpha = ex2_approx(kNatural ? (row_max[i] - m_sub) * c : row_max[i] - m_sub);  // 0 on the first visible tile
      row_max[i] = m;
      row_sum[i] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        rO[dt][2 * i] *= alpha;
        rO[dt][2 * i + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = ex2_approx(kNatural ? (rS[nt][2 * i + e] - m_sub) * c : fmaf(rS[nt][2 * i + e], c, -m_sub));
          rS[nt][2 * i + e] = p;
          row_sum[i] += p;
        }
    }
  }

  // O *= out_scale / rowsum (once, at the end) and lse = ln(sum exp(scores)) = (max +
  // log2(sum)) * ln 2 (kNatural: max + log2(sum) ln 2, the max not rounded through base 2).
  // A row that saw no key has sum 0: its output stays 0 and its lse is -inf. A NaN score (a NaN
  // in the query row or in a key) makes the sum NaN, and the output and lse with it, as torch's
  // logsumexp; the test is sum == 0, not sum > 0, which a NaN fails (its lse was -inf, a row
  // that saw no key, and the split-KV merge then dropped the NaN).
  template <int kDTiles>
  FC_DEVICE void finalize(float (&rO)[kDTiles][4], float (&lse)[2], float out_scale = 1.0f) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sum = quad_sum(row_sum[i]);
      const float inv = sum == 0.0f ? 0.0f : out_scale / sum;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        rO[dt][2 * i] *= inv;
        rO[dt][2 * i + 1] *= inv;
      }
      constexpr float kLn2 = 0.69314718055994531f;
      const float row_lse = kNatural ? row_max[i] + log2f(sum) * kLn2 : (row_max[i] + log2f(sum)) * kLn2;
      lse[i] = sum == 0.0f ? -INFINITY : row_lse;
    }
  }
};

}  // namespace flash_cuda
