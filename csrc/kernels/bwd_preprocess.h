/* Backward pre- and post-processing (FlashAttention-2 Algorithm 2, lines 4 and 22).
 *   preprocess:  Di = rowsum(dO * O) - dlse and lse2 = lse log2(e) (fp32) into the padded
 *                row stats (params.h), and zeroing of the fp32 dQ accumulator. The modifier
 *                variant (Kt::kMod) keeps the lse itself there: its kernels take the
 *                difference s - lse first, as the forward's softmax did (softmax.h), since
 *                fl(lse log2(e)) at a finite mask's -1e30 is off by up to 2^76;
 *   postprocess: dQ = scale * accumulator, rounded to the input dtype, 128-bit stores.
 * Grid (query tile of 64 rows, query head, batch), 4 warps of 16 rows each.
 */
#pragma once
#include "copy.h"
#include "params.h"
#include "seqlen.h"
#include "traits.h"

namespace flash_cuda {

template <class Kt>
__global__ void __launch_bounds__(128) flash_bwd_preprocess_kernel(const BwdParams params) {
  using T = typename Kt::T;
  constexpr int kUnits = Elem<T>::kUnits;
  constexpr int kChunks = Kt::kHeadDim * kUnits / 8;  // 16-byte chunks per row
  // Lanes per row: a power of two >= kChunks, so a row's lanes are an aligned xor group.
  constexpr int kLanesPerRow = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  constexpr int kRowsPerPass = 32 / kLanesPerRow;
  constexpr bool kVarlen = true;  // registers to spare: one instantiation for dense and packed batches
  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const BwdParams& p = for_sequence<kVarlen>(params, batch);  // packed batches: this block's sequence
  if (m_block * Kt::kPrepRows >= p.nq) return;      // past a packed sequence's end
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // (strides count values of T: the head's start as T, then its 16-bit units)
  const uint16_t* gO = units<uint16_t>(head_ptr<const T>(p.o, batch, head, q_row0<kVarlen>(p)));
  const uint16_t* gdO = units<uint16_t>(head_ptr<const T>(p.dout, batch, head, q_row0<kVarlen>(p)));
  const int64_t row_base = batch * p.lse_batch_stride + head * p.lse_head_stride + q_row0<kVarlen>(p);
  float* g_stats = p.row_stats + p.template stats_offset<kVarlen>(batch, head);  // lse2 row, then D row
  const int chunk = lane % kLanesPerRow;

  for (int r0 = 0; r0 < 16; r0 += kRowsPerPass) {
    const int row = m_block * Kt::kPrepRows + warp * 16 + r0 + lane / kLanesPerRow;
    float dot = 0.0f;
    for (int c = chunk; c < kChunks; c += kLanesPerRow) {  // (fp32 at 256: two chunks per lane)
      const int col = c * 8;  // in 16-bit units
      if (row >= p.nq || col >= p.d * kUnits) break;
      const uint16_t* src_o = gO + row * p.o.row_stride * kUnits + col;
      const uint16_t* src_do = gdO + row * p.dout.row_stride * kUnits + col;
      const uint4 vo = ld_global(reinterpret_cast<const uint4*>(src_o));
      const uint4 vdo = ld_global(reinterpret_cast<const uint4*>(src_do));
      if constexpr (Elem<T>::kTf32) {
        float o[4], d_o[4];
        memcpy(o, &vo, 16);
        memcpy(d_o, &vdo, 16);
        for (int e = 0; e < 4; ++e) dot += o[e] * d_o[e];
      } else {
        T o[8], d_o[8];
        memcpy(o, &vo, 16);
        memcpy(d_o, &vdo, 16);
        for (int e = 0; e < 8; ++e) dot += to_float(o[e]) * to_float(d_o[e]);
      }
    }
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    if (chunk == 0) {  // every row of the padded tile: past nq, lse2 = +inf and D = 0
      float lse2 = INFINITY;
      if (row < p.nq) {
        const float lse = ld_global(&p.lse[row_base + row]);
        if (lse != -INFINITY) lse2 = Kt::kMod ? lse : lse * 1.4426950408889634f;
        if (p.dlse) dot -= ld_global(&p.dlse[row_base + row]);
      }
      st_global(&g_stats[row], lse2);
      st_global(&g_stats[p.template scratch_slice_rows<kVarlen>() + row], dot);
    }
  }

  if (p.dq_accum) {  // this block's 64 rows of the accumulator: 4 x 16 x kHeadDim floats
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + Kt::template accum_offset<kVarlen>(p, batch, head, m_block * 4));
    for (int i = threadIdx.x; i < 4 * Kt::kAccumTileFloats / 4; i += 128) st_global(&acc[i], make_float4(0.f, 0.f, 0.f, 0.f));
  }
}

template <class Kt>
__global__ void __launch_bounds__(128) flash_bwd_postprocess_kernel(const BwdParams params) {
  using T = typename Kt::T;
  using Layout = SmemLayout<Kt::kPrepRows, Kt::kHeadDim>;
  constexpr int kDTiles = Kt::kHeadDim / 8;
  constexpr bool kVarlen = true;  // as in the preprocess
  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const BwdParams& p = for_sequence<kVarlen>(params, batch);
  if (m_block * Kt::kPrepRows >= p.nq) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* sdQ = dynamic_smem<T>();  // [64][kHeadDim] staging, each warp its own 16 rows
  const float* acc = p.dq_accum + Kt::template accum_offset<kVarlen>(p, batch, head, m_block * 4 + warp);
  for (int nt = 0; nt < kDTiles; ++nt)
    for (int half = 0; half < 2; ++half) {
      // element i = 2 half + e of this lane: row g + 8 half, column 8 nt + 2 t + e
      const float lo = ld_global(&acc[(nt * 4 + 2 * half) * 32 + lane]) * p.scale;
      const float hi = ld_global(&acc[(nt * 4 + 2 * half + 1) * 32 + lane]) * p.scale;
      const int row = warp * 16 + lane / 4 + 8 * half, col = nt * 8 + 2 * (lane % 4);
      st_shared(reinterpret_cast<uint32_t*>(sdQ + Layout::offset(row, col)), pack2<T>(lo, hi));
    }
  __syncwarp();
  const int m0 = m_block * Kt::kPrepRows + warp * 16;
  store_warp_rows<Layout>(head_ptr<T>(p.dq, batch, head, q_row0<kVarlen>(p)), p.dq.row_stride, sdQ, warp * 16, m0, p.nq, p.d, lane);
}

}  // namespace flash_cuda
