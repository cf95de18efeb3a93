// The online softmax of one query row across its key tiles (FlashAttention-2, Algorithm 1),
// shared by the CPU backend's forward and KV-cache loops.
//
// The row keeps a reference max m, the sum l = sum_j exp(s_j - m) (for lse = m + log l), the sum
// lp of the probabilities as the P V GEMM used them (rounded to fp16/bf16 there, else lp = l)
// and the unnormalised output O = sum_j p_j v_j; out = O / lp, so the weights of the output sum
// to one exactly and a row saturated on one key returns that key's value unchanged, whatever m.
//
// A tile's probabilities are taken against the current m while its max is found in the same
// pass (exp_affine_sum's x_max); only a tile whose max exceeds m by more than a margin (e^8) is
// redone against its own max, with l, lp and O rescaled. So most tiles cost one pass over the
// scores instead of two. m stays within the margin of the row's running max: the probabilities
// lie below e^8 (no overflow) and the largest above e^-8 (no underflow that matters). Where the
// probabilities are rounded to fp16/bf16 a row's first tile is taken against its max (see
// online_softmax_row).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

#include "rowops.h"

namespace flash_cuda::cpu {

// Scaled scores above this magnitude go through the prescaled path (the scale applied to S, then
// exp(s - m) with m a score itself: exactly 1 at the row's max, at any magnitude; rowops.h
// exp2_arg). With the scale folded into the exponent, exp(scale s - m) at the max is exp of the
// rounding of m = scale s_max, up to half an ulp of m: e^64 and more from 2^31 on, which over- or
// underflows fp32. The loops report such rows and their callers run them again prescaled.
constexpr double kFoldedScaleMax = 1 << 24;

// Whether some finite x_i passes +-limit (an lse of -inf, a row that sees no key, does not): how a
// backward tells that some row's lse is large enough for its rounding to matter.
template <typename acc_t>
inline bool any_beyond(const acc_t* x, int64_t n, acc_t limit) {
  for (int64_t i = 0; i < n; ++i)
    if (std::abs(x[i]) > limit && std::isfinite(x[i])) return true;
  return false;
}

template <typename acc_t>
struct SoftmaxRow {
  acc_t m = -std::numeric_limits<acc_t>::infinity();  // -inf before the row's first visible key
  acc_t l = 0, lp = 0;
};

// exp_row(m_ref, &x_max, &lp_sum) writes the row's probabilities exp(a s_j - m_ref) wherever
// the caller keeps them and returns their sum; x_max gets the row's max input s_j and lp_sum the
// sum of the probabilities as stored. x: the row's scores (n), o: its unnormalised output (D).
// a > 0. rounded: the probabilities are rounded to fp16/bf16 for the P V GEMM; then the first
// tile is taken against its own max, found by a pass of its own (P <= 1, the max exactly 1, as
// on the GPU), not against 0: rounding is coarsest just above a power of two, and probabilities
// spread around a reference they may exceed (near-uniform attention, e^s around 1) measured 1.1x
// to 1.3x the output and dQ error of those below their max, 3x on a BERT's query/key weight
// gradients. Later tiles rarely exceed the first one's max by much, so they keep the margin.
template <typename acc_t, typename ExpRow>
inline void online_softmax_row(SoftmaxRow<acc_t>& row, acc_t* o, int64_t D, acc_t a, const acc_t* x, int64_t n,
                               bool rounded, ExpRow exp_row) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t margin = 8;  // e^8 ~ 3e3: far from the float range
  acc_t x_max, lp;
  // A row whose scores so far are all NaN has no max (NaN never wins a comparison) but is not
  // empty: it becomes NaN (m, l: its lse NaN, as torch's logsumexp gives, so the backward's P of
  // the row is NaN too, not the 0 of a row that sees no key).
  const auto nan_or_empty = [&](acc_t l) {
    if (l != l) row = {l, l, l};
  };
  if (row.m == kNegInf) {
    if (rounded) {  // against the tile's max
      const acc_t m_tile = a * row_max(x, n);
      if (m_tile == kNegInf) {
        nan_or_empty(exp_row(acc_t(0), &x_max, &lp));  // nothing visible yet: P = 0, the row unchanged
        return;
      }
      row.m = m_tile;
      row.l = exp_row(m_tile, &x_max, &row.lp);
      return;
    }
    // The first tile with a visible key: tried against m = 0 (usable when its max is within the
    // margin of 0, the common case of unit-scale scores; a masked score gives exp(-inf) = 0,
    // never NaN), else redone against its max.
    const acc_t l0 = exp_row(acc_t(0), &x_max, &lp);
    const acc_t m_tile = a * x_max;
    if (m_tile == kNegInf) return nan_or_empty(l0);  // nothing visible yet: P = 0, the row unchanged
    if (m_tile >= -margin && m_tile <= margin) {
      row = {acc_t(0), l0, lp};
    } else {
      row.m = m_tile;
      row.l = exp_row(m_tile, &x_max, &row.lp);
    }
    return;
  }
  const acc_t l_tile = exp_row(row.m, &x_max, &lp);
  const acc_t m_tile = a * x_max;
  if (!(m_tile > row.m + margin)) {
    row.l += l_tile;
    row.lp += lp;
    return;
  }
  const acc_t alpha = std::exp(row.m - m_tile);
  row.l = row.l * alpha + exp_row(m_tile, &x_max, &lp);
  row.lp = row.lp * alpha + lp;
  scale_row(o, D, alpha);
  row.m = m_tile;
}

// exp(a x - m) of a row rounded into the fp16/bf16 row y (exp_affine_sum_bf16/fp16).
inline float exp_affine_sum_to(const float* x, int64_t n, float a, float m, c10::BFloat16* y, float* x_max,
                               float* rounded_sum) {
  return exp_affine_sum_bf16(x, n, a, m, reinterpret_cast<uint16_t*>(y), x_max, rounded_sum);
}
inline float exp_affine_sum_to(const float* x, int64_t n, float a, float m, c10::Half* y, float* x_max,
                               float* rounded_sum) {
  return exp_affine_sum_fp16(x, n, a, m, reinterpret_cast<uint16_t*>(y), x_max, rounded_sum);
}

}  // namespace flash_cuda::cpu
