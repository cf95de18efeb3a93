/* Backward pre- and post-processing (FlashAttention-2 Algorithm 2, lines 4 and 22).
 *   preprocess:  Di = rowsum(dO * O) - dlse (16-bit inputs: summed as the dP product sums,
 *                row_dots below) and lse2 = lse log2(e) (fp32) into the padded row stats
 *                (params.h), and zeroing of the fp32 dQ accumulator. The modifier
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

// 16-bit inputs: D_i = dot(O_i, dO_i) of a warp's 16 rows, summed exactly as the backward
// kernels sum dP_ij = dot(V_j, dO_i): one mma per k-step of 16 over the padded head dim, in
// order, from a zero accumulator, O in V's place as the A operand and dO the B operand, their
// fragments by copy.h's loaders. So where O_i = V_j bitwise, in a row that sees one key
// (P = 1, O = V_j exactly), D_i = dP_ij bitwise and dS_ij = P (dP_ij - D_i) = 0, plain torch's
// exact gradient there. Summed in another order, the two fp32 roundings differ, and dK sums
// the difference over the rows and dQ scales it (4.1e-5 in dK at head dim 64), past the FA rule's
// 1e-5 where plain torch is exact (test_devices.py test_one_key_rows). An mma's element (m, n)
// depends on A's row m and B's column n alone and its 16-bit products are exact in fp32, so
// the dQ pass's dO V^T (roles swapped) sums the same.
// Each k-step's 16 x 16 tiles of O and dO pass through the warp's shared staging (s_o, s_do:
// PrepStage): lane L loads 16 bytes of row L % 16, so a load covers 32 bytes of each of 16 rows
// (whole sectors where rows start 32-byte aligned), zero past nrows and d as the kernels'
// shared tiles hold them; the next step's loads are in flight during this step's ldmatrix and
// mma. Returns, in the lanes with t == g / 2, D of rows g (x) and g + 8 (y): the diagonals of
// n-tile 0 (dO rows 0..7) and n-tile 1 (dO rows 8..15).
using PrepStage = PaddedLayout<16, 16>;  // 48-byte rows: a phase's 8 rows start in 8 chunks
template <class T, int kHeadDim>
FC_DEVICE float2 row_dots(const T* gO, int64_t o_stride, const T* gdO, int64_t do_stride, int nrows, int d, T* s_o,
                          T* s_do, int lane) {
  static_assert(!Elem<T>::kTf32, "fp32's O is not V bitwise where P = 1 (tf32.h): D in fp32 FMAs instead");
  const int row = lane % 16, half = lane / 16, g = lane / 4;
  const int s_off = PrepStage::offset(row, 8 * half);
  auto load = [&](int k0, uint4& o, uint4& d_o) {
    const int col = k0 + 8 * half;
    const bool in = row < nrows && col < d;
    o = d_o = make_uint4(0u, 0u, 0u, 0u);
    if (in) {
      o = ld_global(reinterpret_cast<const uint4*>(gO + row * o_stride + col));
      d_o = ld_global(reinterpret_cast<const uint4*>(gdO + row * do_stride + col));
    }
  };
  uint4 o, d_o;
  load(0, o, d_o);
  float rC0[4] = {}, rC1[4] = {};  // O rows 0..15 x dO rows 0..7, and x dO rows 8..15
  // (not unrolled: fully unrolled at head dim 256, ptxas spilled 28 bytes on sm_86)
#pragma unroll 1
  for (int k0 = 0; k0 < kHeadDim; k0 += 16) {
    __syncwarp();  // the previous step's fragments are read
    st_shared_v4(reinterpret_cast<uint4*>(s_o + s_off), o);  // (128-bit: see st_shared_v4)
    st_shared_v4(reinterpret_cast<uint4*>(s_do + s_off), d_o);
    __syncwarp();
    if (k0 + 16 < kHeadDim) load(k0 + 16, o, d_o);
    uint32_t rA[4], rB[4];
    load_a_frag<PrepStage>(rA, s_o, 0, 0, lane);      // O: 16 rows x 16 units, as V in kv_times_q
    load_b_frags_nk<PrepStage>(rB, s_do, 0, 0, lane);  // dO: two n-tiles of 8 rows, as there
    mma_m16n8k16<T>(rC0, rA, {rB[0], rB[1]}, rC0);
    mma_m16n8k16<T>(rC1, rA, {rB[2], rB[3]}, rC1);
  }
  return g % 2 ? make_float2(rC0[1], rC1[3]) : make_float2(rC0[0], rC1[2]);
}

// Dynamic shared memory of the preprocess: each warp's staging of O and dO (16-bit inputs).
template <class Kt>
constexpr size_t preprocess_smem_bytes() {
  using T = typename Kt::T;
  return Elem<T>::kTf32 ? 0 : Kt::kPrepRows / 16 * 2 * PrepStage::kElems * sizeof(T);
}

template <class Kt>
__global__ void __launch_bounds__(128) flash_bwd_preprocess_kernel(const BwdParams params) {
  using T = typename Kt::T;
  constexpr int kUnits = Elem<T>::kUnits;
  constexpr bool kVarlen = true;  // registers to spare: one instantiation for dense and packed batches
  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const BwdParams& p = for_sequence<kVarlen>(params, batch);  // packed batches: this block's sequence
  if (m_block * Kt::kPrepRows >= p.nq) return;      // past a packed sequence's end
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = m_block * Kt::kPrepRows + warp * 16;  // this warp's 16 rows
  const T* gO = head_ptr<const T>(p.o, batch, head, q_row0<kVarlen>(p));
  const T* gdO = head_ptr<const T>(p.dout, batch, head, q_row0<kVarlen>(p));
  const int64_t row_base = batch * p.lse_batch_stride + head * p.lse_head_stride + q_row0<kVarlen>(p);
  float* g_stats = p.row_stats + p.template stats_offset<kVarlen>(batch, head);  // lse2 row, then D row
  // every row of the padded tile: past nq, lse2 = +inf and D = 0
  auto store_row = [&](int row, float dot) {
    float lse2 = INFINITY;
    if (row < p.nq) {
      const float lse = ld_global(&p.lse[row_base + row]);
      if (lse != -INFINITY) lse2 = Kt::kMod ? lse : lse * 1.4426950408889634f;
      if (p.dlse) dot -= ld_global(&p.dlse[row_base + row]);
    }
    st_global(&g_stats[row], lse2);
    st_global(&g_stats[p.template scratch_slice_rows<kVarlen>() + row], dot);
  };

  if constexpr (!Elem<T>::kTf32) {
    T* s_o = dynamic_smem<T>() + 2 * warp * PrepStage::kElems;
    const float2 dots = row_dots<T, Kt::kHeadDim>(gO + row0 * p.o.row_stride, p.o.row_stride,
                                                  gdO + row0 * p.dout.row_stride, p.dout.row_stride, p.nq - row0,
                                                  p.d, s_o, s_o + PrepStage::kElems, lane);
    const int g = lane / 4;
    if (lane % 4 == g / 2) store_row(row0 + g, dots.x), store_row(row0 + g + 8, dots.y);
  } else {
    // fp32: 16-byte loads, a row's lanes an aligned xor group (a power of two >= the row's chunks)
    constexpr int kChunks = Kt::kHeadDim * kUnits / 8;  // 16-byte chunks per row
    constexpr int kLanesPerRow = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
    constexpr int kRowsPerPass = 32 / kLanesPerRow;
    const int chunk = lane % kLanesPerRow;
    for (int r0 = 0; r0 < 16; r0 += kRowsPerPass) {
      const int row = row0 + r0 + lane / kLanesPerRow;
      float dot = 0.0f;
      for (int c = chunk; c < kChunks; c += kLanesPerRow) {  // (at 256: two chunks per lane)
        const int col = c * 4;
        if (row >= p.nq || col >= p.d) break;
        const uint4 vo = ld_global(reinterpret_cast<const uint4*>(gO + row * p.o.row_stride + col));
        const uint4 vdo = ld_global(reinterpret_cast<const uint4*>(gdO + row * p.dout.row_stride + col));
        float o[4], d_o[4];
        memcpy(o, &vo, 16);
        memcpy(d_o, &vdo, 16);
        for (int e = 0; e < 4; ++e) dot += o[e] * d_o[e];
      }
      for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      if (chunk == 0) store_row(row, dot);
    }
  }

  if (p.dq_accum) {  // this block's 64 rows of the accumulator: 4 x 16 x kHeadDim floats
    float4* gAcc = reinterpret_cast<float4*>(p.dq_accum + Kt::template accum_offset<kVarlen>(p, batch, head, m_block * 4));
    for (int i = threadIdx.x; i < 4 * Kt::kAccumTileFloats / 4; i += 128) st_global(&gAcc[i], make_float4(0.f, 0.f, 0.f, 0.f));
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
  const float* gAcc = p.dq_accum + Kt::template accum_offset<kVarlen>(p, batch, head, m_block * 4 + warp);
  for (int nt = 0; nt < kDTiles; ++nt)
    for (int half = 0; half < 2; ++half) {
      // element i = 2 half + e of this lane: row g + 8 half, column 8 nt + 2 t + e
      const float lo = ld_global(&gAcc[(nt * 4 + 2 * half) * 32 + lane]) * p.scale;
      const float hi = ld_global(&gAcc[(nt * 4 + 2 * half + 1) * 32 + lane]) * p.scale;
      const int row = warp * 16 + lane / 4 + 8 * half, col = nt * 8 + 2 * (lane % 4);
      st_shared(reinterpret_cast<uint32_t*>(sdQ + Layout::offset(row, col)), pack2<T>(lo, hi));
    }
  __syncwarp();
  const int m0 = m_block * Kt::kPrepRows + warp * 16;
  store_warp_rows<Layout>(head_ptr<T>(p.dq, batch, head, q_row0<kVarlen>(p)), p.dq.row_stride, sdQ, warp * 16, m0, p.nq, p.d, lane);
}

}  // namespace flash_cuda
