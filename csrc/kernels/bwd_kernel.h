/* FlashAttention-2 backward kernel (Dao, 2023, Algorithm 2), with recomputation.
 *
 * Grid (key tile j, kv head, batch); 8 warps (see BwdTraits). K_j and V_j stay in shared
 * memory; dK_j and dV_j accumulate in fp32 registers over every query tile i of every query
 * head of the kv group (GQA: summed in registers, K/V never repeated). Per (head, i):
 *   S^T  = K_j Q_i^T                P^T = exp2(S^T scale log2e - lse2_i)   (recomputed)
 *   dP^T = V_j dO_i^T               dS^T = P^T * (dP^T - D_i)
 *   dV  += P^T dO_i                 dK  += dS^T Q_i
 *   dQ_i += dS K_j                  atomically into the fp32 accumulator (kAtomicDq), or not
 *                                   at all: the deterministic dQ pass computes it instead.
 * All five products run on mma.m16n8k16. Q_i, dO_i, lse_i, D_i are double-buffered (cp.async)
 * where shared memory allows. Causal: query tiles entirely before the first row that sees
 * key tile j are skipped. dK = scale * accumulator (the softmax scale of S).
 */
#pragma once
#include <type_traits>

#include "copy.h"
#include "params.h"
#include "traits.h"

namespace flash_cuda {

// lse (in base 2) and D of query rows [m0, m0 + kRows) into shared memory. Rows that must not
// contribute (past the end, or without any visible key: lse = -inf) get lse2 = +inf, so their
// recomputed probabilities are exactly 0.
template <int kRows>
FC_DEVICE void load_row_stats(float* s_lse2, float* s_di, const float* g_lse, const float* g_di, int m0, int nq) {
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
    const int row = m0 + r;
    const float lse = row < nq ? ld_global(&g_lse[row]) : -INFINITY;
    st_shared(&s_lse2[r], lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f);
    st_shared(&s_di[r], row < nq ? ld_global(&g_di[row]) : 0.0f);
  }
}

template <class Kt, bool kCausal, bool kAtomicDq>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm) flash_bwd_kernel(const BwdParams p) {
  using T = typename Kt::T;
  using QLayout = typename Kt::QLayout;
  using KVLayout = typename Kt::KVLayout;
  using PLayout = typename Kt::PLayout;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kHalfD = Kt::kHalfD;
  constexpr int kThreads = Kt::kThreads, kStages = Kt::kStages;
  constexpr int kHalfDTiles = kHalfD / 8;

  const int n_block = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wk = warp % 4, wq = warp / 4;  // 16-row group (keys, or queries for dQ), and half
  const int g = lane / 4, t = lane % 4;  // mma accumulator row group and column pair
  const int n0 = n_block * kBlockN;
  const int dcol0 = wq * kHalfD;  // this warp's head-dim columns in dV, dK, dQ

  T* sK = dynamic_smem<T>();                    // [kBlockN][kHeadDim]
  T* sV = sK + KVLayout::kElems;                // [kBlockN][kHeadDim]
  T* sP = sV + KVLayout::kElems;                // [kBlockN][kBlockM]: P^T, 16-bit
  T* sdS = sP + PLayout::kElems;                // [kBlockN][kBlockM]: dS^T, 16-bit
  char* stage_base = reinterpret_cast<char*>(sdS + PLayout::kElems);
  auto sQ = [&](int s) { return reinterpret_cast<T*>(stage_base + s * Kt::kStageBytes); };  // [kBlockM][kHeadDim]
  auto sdO = [&](int s) { return sQ(s) + QLayout::kElems; };                                 // [kBlockM][kHeadDim]
  auto sLse2 = [&](int s) { return reinterpret_cast<float*>(sdO(s) + QLayout::kElems); };   // [kBlockM]
  auto sDi = [&](int s) { return sLse2(s) + kBlockM; };                                     // [kBlockM]

  const int group = p.hq / p.hkv;
  const int m_tiles = (p.nq + kBlockM - 1) / kBlockM;
  const int i0 = kCausal ? int(p.mask.row_begin(n0, p.nq)) / kBlockM : 0;  // first tile that sees key n0
  const int tiles_per_head = max(0, m_tiles - i0);
  const int total = group * tiles_per_head;

  // The walk: the query tiles i0.. of every query head of the kv group, head by head; step it
  // prefetches step it + 1's tiles.
  auto load_query_tile = [&](int head, int m0, int s) {
    const int64_t rows = (int64_t(batch) * p.hq + head) * p.nq;
    load_tile<QLayout, kThreads>(sQ(s), head_ptr<const T>(p.q, batch, head), p.q.row_stride, m0, p.nq, p.d);
    load_tile<QLayout, kThreads>(sdO(s), head_ptr<const T>(p.dout, batch, head), p.dout.row_stride, m0, p.nq, p.d);
    load_row_stats<kBlockM>(sLse2(s), sDi(s), p.lse + rows, p.di + rows, m0, p.nq);
  };

  load_tile<KVLayout, kThreads>(sK, head_ptr<const T>(p.k, batch, kv_head), p.k.row_stride, n0, p.nk, p.d);
  load_tile<KVLayout, kThreads>(sV, head_ptr<const T>(p.v, batch, kv_head), p.v.row_stride, n0, p.nk, p.d);
  if (total > 0) load_query_tile(kv_head * group, i0 * kBlockM, 0);
  cp_async_commit();

  float rdK[kHalfDTiles][4] = {};  // keys 16 wk.. x columns dcol0.. of dK_j, fp32
  float rdV[kHalfDTiles][4] = {};  // the same of dV_j

  // One step of the walk: query tile m0 of query head `head`, step number it; kMask: some
  // key of this tile is past the sequence end or above the diagonal for some of its rows.
  auto step = [&](const int it, const int head, const int m0, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int s = kStages == 2 ? it % 2 : 0;
    const bool last_tile = m0 + kBlockM >= m_tiles * kBlockM;  // of this head: the next step starts the next
    const int next_head = last_tile ? head + 1 : head, next_m0 = last_tile ? i0 * kBlockM : m0 + kBlockM;
    cp_async_wait<0>();
    __syncthreads();  // tile it visible to all; every warp is done with tile it - 1 (its stage, sP, sdS)
    if (kStages == 2) {
      if (it + 1 < total) load_query_tile(next_head, next_m0, 1 - s);  // lands while this tile computes
      cp_async_commit();
    }
    const T* sQs = sQ(s);
    const T* sdOs = sdO(s);
    const float* lse2 = sLse2(s);
    const float* di = sDi(s);

    // S^T = K Q^T and dP^T = V dO^T: keys 16 wk.. x queries 32 wq.. of this warp.
    float rS[4][4] = {}, rdP[4][4] = {};  // 4 n-tiles of 8 queries, fp32
#pragma unroll
    for (int k0 = 0; k0 < kHeadDim; k0 += 16) {
      uint32_t rK[4], rV[4];  // A: 16 keys x 16 head-dim columns
      load_a_frag<KVLayout>(rK, sK, 16 * wk, k0, lane);
      load_a_frag<KVLayout>(rV, sV, 16 * wk, k0, lane);
      for (int nt = 0; nt < 4; nt += 2) {
        uint32_t rQ[4], rdO[4];  // B: head-dim k0.. x 16 queries, from [query][d] storage
        load_b_frags_nk<QLayout>(rQ, sQs, 32 * wq + nt * 8, k0, lane);
        load_b_frags_nk<QLayout>(rdO, sdOs, 32 * wq + nt * 8, k0, lane);
        mma_m16n8k16<T>(rS[nt], rK, {rQ[0], rQ[1]}, rS[nt]);
        mma_m16n8k16<T>(rS[nt + 1], rK, {rQ[2], rQ[3]}, rS[nt + 1]);
        mma_m16n8k16<T>(rdP[nt], rV, {rdO[0], rdO[1]}, rdP[nt]);
        mma_m16n8k16<T>(rdP[nt + 1], rV, {rdO[2], rdO[3]}, rdP[nt + 1]);
      }
    }

    // P^T = exp2(S^T scale log2e - lse2) (0 where masked), dS^T = P^T (dP^T - D); both to
    // shared memory as 16-bit pairs, in the [key][query] layout the next products read.
    const int key_lim = p.nk - n0;
    const int diag = kCausal ? int(p.mask.last_key(m0) - n0) : 0;
    float rLse2[4][2], rDi[4][2];  // of this thread's 8 queries 32 wq + 8 nt + 2 t + e
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const float2 l = ld_shared(reinterpret_cast<const float2*>(lse2 + 32 * wq + nt * 8 + 2 * t));
      const float2 d = ld_shared(reinterpret_cast<const float2*>(di + 32 * wq + nt * 8 + 2 * t));
      rLse2[nt][0] = l.x;
      rLse2[nt][1] = l.y;
      rDi[nt][0] = d.x;
      rDi[nt][1] = d.y;
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      for (int half = 0; half < 2; ++half) {
        const int key_local = 16 * wk + g + 8 * half;
        float pv[2], dsv[2];
        for (int e = 0; e < 2; ++e) {
          const int q_local = 32 * wq + nt * 8 + 2 * t + e;
          float pe = ex2_approx(rS[nt][2 * half + e] * p.scale_log2 - rLse2[nt][e]);
          // key n0 + key_local is hidden from row m0 + q_local iff it is past the end or
          // key_local - q_local > last_key(m0) - n0: one compare each, in 32 bits
          if (kMask && (key_local >= key_lim || (kCausal && key_local - q_local > diag))) pe = 0.0f;
          pv[e] = pe;
          dsv[e] = pe * (rdP[nt][2 * half + e] - rDi[nt][e]);
        }
        const int off = PLayout::offset_from(PLayout::offset(16 * wk + g, 32 * wq + 2 * t), 8 * half, 8 * nt);
        st_shared(reinterpret_cast<uint32_t*>(sP + off), pack2<T>(pv[0], pv[1]));
        st_shared(reinterpret_cast<uint32_t*>(sdS + off), pack2<T>(dsv[0], dsv[1]));
      }
    __syncthreads();  // P^T and dS^T of the whole tile visible

    // dV += P^T dO and dK += dS^T Q: keys 16 wk.. x columns dcol0.. of this warp.
#pragma unroll
    for (int k0 = 0; k0 < kBlockM; k0 += 16) {
      uint32_t rP[4], rdS[4];  // A: 16 keys x 16 queries
      load_a_frag<PLayout>(rP, sP, 16 * wk, k0, lane);
      load_a_frag<PLayout>(rdS, sdS, 16 * wk, k0, lane);
      for (int dt = 0; dt < kHalfDTiles; dt += 2) {
        uint32_t rdO[4], rQ[4];  // B: 16 queries x 16 head-dim columns, from [query][d] (.trans)
        load_b_frags_kn<QLayout>(rdO, sdOs, k0, dcol0 + dt * 8, lane);
        load_b_frags_kn<QLayout>(rQ, sQs, k0, dcol0 + dt * 8, lane);
        mma_m16n8k16<T>(rdV[dt], rP, {rdO[0], rdO[1]}, rdV[dt]);
        mma_m16n8k16<T>(rdV[dt + 1], rP, {rdO[2], rdO[3]}, rdV[dt + 1]);
        mma_m16n8k16<T>(rdK[dt], rdS, {rQ[0], rQ[1]}, rdK[dt]);
        mma_m16n8k16<T>(rdK[dt + 1], rdS, {rQ[2], rQ[3]}, rdK[dt + 1]);
      }
    }

    if constexpr (kAtomicDq) {
      // dQ_i += dS K_j: queries 16 wk.. x columns dcol0.., added to the fp32 accumulator in
      // fragment order: element i of every lane is 128 contiguous bytes, one coalesced request.
      float rdQ[kHalfDTiles][4] = {};
#pragma unroll
      for (int k0 = 0; k0 < kBlockN; k0 += 16) {
        uint32_t rdS[4];  // A: 16 queries x 16 keys, from dS^T by ldmatrix.trans
        load_a_frag_trans<PLayout>(rdS, sdS, 16 * wk, k0, lane);
        for (int dt = 0; dt < kHalfDTiles; dt += 2) {
          uint32_t rK[4];  // B: 16 keys x 16 head-dim columns, from [key][d] (.trans)
          load_b_frags_kn<KVLayout>(rK, sK, k0, dcol0 + dt * 8, lane);
          mma_m16n8k16<T>(rdQ[dt], rdS, {rK[0], rK[1]}, rdQ[dt]);
          mma_m16n8k16<T>(rdQ[dt + 1], rdS, {rK[2], rK[3]}, rdQ[dt + 1]);
        }
      }
      float* acc = p.dq_accum + Kt::accum_offset(p.nq, p.hq, batch, head, m0 / 16 + wk) + (dcol0 / 8) * 128 + lane;
#pragma unroll
      for (int dt = 0; dt < kHalfDTiles; ++dt)
#pragma unroll
        for (int i = 0; i < 4; ++i) atomicAdd(acc + (dt * 4 + i) * 32, rdQ[dt][i]);  // element (dt, i) of every lane
    }

    if (kStages == 1) {
      __syncthreads();  // every warp is done with Q_i and dO_i: refill the one buffer
      if (it + 1 < total) load_query_tile(next_head, next_m0, 0);
      cp_async_commit();
    }
  };

  // Per query head: the tiles near the diagonal need the mask (all of them when this key tile
  // crosses the sequence end); the rest, the steady state of a long walk, run in a loop of
  // their own without any per-element predicate.
  const int i_unmasked = n0 + kBlockN > p.nk ? m_tiles
                         : kCausal ? max(i0, min(m_tiles, int(p.mask.first_unmasked_row_tile(n0 + kBlockN, kBlockM))))
                                   : i0;
  int it = 0;
  for (int h = 0; h < group; ++h) {
    const int head = kv_head * group + h;
    int i = i0;
    for (; i < i_unmasked; ++i, ++it) step(it, head, i * kBlockM, std::true_type{});
    for (; i < m_tiles; ++i, ++it) step(it, head, i * kBlockM, std::false_type{});
  }

  // dK = scale * accumulator, dV as is: staged through sK / sV (free now), then warps 0-3
  // write 16 rows of dK each and warps 4-7 16 rows of dV, 16 bytes per lane.
  cp_async_wait<0>();
  __syncthreads();
  stage_accumulators<KVLayout>(sK, rdK, 16 * wk, dcol0, p.scale, lane);
  stage_accumulators<KVLayout>(sV, rdV, 16 * wk, dcol0, 1.0f, lane);
  __syncthreads();
  const TensorRef& out = wq == 0 ? p.dk : p.dv;
  store_warp_rows<KVLayout>(head_ptr<T>(out, batch, kv_head), out.row_stride, wq == 0 ? sK : sV, 16 * wk, n0 + 16 * wk,
                            p.nk, p.d, lane);
}

}  // namespace flash_cuda
