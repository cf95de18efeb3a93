/* The merge of split-KV partial results (kv_cache.h): for each query row,
 *   lse = log sum_s exp(lse_s),   O = sum_s exp(lse_s - lse) O_s,
 * O_s each split's output normalised by its own softmax sum. Splits without keys have
 * lse_s = -inf and weigh nothing; a row no split saw gets O = 0 and lse = -inf, as the
 * unsplit kernel gives it; a split with a NaN lse makes the row's O and lse NaN, as unsplit.
 * One warp per row: the lanes share the splits' lse (a max and a sum over the splits, strided
 * by 32, then across the warp) and own column pairs of O.
 */
#pragma once
#include "kv_cache.h"

namespace flash_cuda {

constexpr int kCombineWarps = 4;  // rows per block

FC_DEVICE float warp_max(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
FC_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Grid: ceil(B Hq Nq / kCombineWarps) blocks of 32 kCombineWarps threads; p's o and lse are the
// final outputs, p.cache the partials.
template <class T>
__global__ void __launch_bounds__(32 * kCombineWarps) splitkv_combine_kernel(const FwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row_id = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (row_id >= int64_t(p.b) * p.hq * p.nq) return;  // whole warps exit together
  const int row = int(row_id % p.nq), head = int(row_id / p.nq % p.hq), batch = int(row_id / (int64_t(p.nq) * p.hq));
  const int splits = p.cache.num_splits;
  auto lse_of = [&](int s) { return ld_global(partial_lse(p, s, batch, head, row)); };

  float m = -INFINITY, nan = 0.0f;
  for (int s = lane; s < splits; s += 32) {
    const float l = lse_of(s);
    m = fmaxf(m, l);
    if (l != l) nan = 1.0f;
  }
  m = warp_max(m);
  // a split with a NaN score has lse NaN (softmax.h), which fmaxf drops: the row is NaN, as unsplit
  if (warp_max(nan) > 0.0f) m = NAN;
  float sum = 0.0f;
  if (m != -INFINITY)
    for (int s = lane; s < splits; s += 32) sum += __expf(lse_of(s) - m);
  sum = warp_sum(sum);
  const float lse = m == -INFINITY ? -INFINITY : m + __logf(sum);
  if (lane == 0) st_global(&p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + row], lse);

  T* gO = head_ptr<T>(p.o, batch, head, row);
  for (int col = 2 * lane; col < p.d; col += 64) {  // d is a multiple of 8
    float2 acc = make_float2(0.0f, 0.0f);
    if (lse != -INFINITY)
      for (int s = 0; s < splits; ++s) {
        const float w = __expf(lse_of(s) - lse);  // 0 for an empty split
        const float2 o = ld_global(reinterpret_cast<const float2*>(partial_out_row(p, s, batch, head, row) + col));
        acc.x = fmaf(w, o.x, acc.x);
        acc.y = fmaf(w, o.y, acc.y);
      }
    st_global(reinterpret_cast<uint32_t*>(gO + col), pack2<T>(acc.x, acc.y));
  }
}

}  // namespace flash_cuda
