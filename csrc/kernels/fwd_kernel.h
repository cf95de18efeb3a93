/* FlashAttention-2 forward kernel (Dao, 2023, Algorithm 1 with the FA2 work split).
 *
 * Grid (query tile, query head, batch); 4 warps, each owning 16 query rows. Per block:
 *   Q tile -> shared memory once; for each key tile j (causal: only up to the diagonal):
 *     S = Q K_j^T        (mma.m16n8k16, K by ldmatrix, fp32 accumulators in registers)
 *     scale, mask, online softmax: S becomes P, O rescaled by exp2(m_old - m_new)
 *     O += P V_j          (P straight from the S accumulators into A registers, V by
 *                          ldmatrix.trans)
 *   O /= rowsum, lse; O staged through shared memory for 128-bit coalesced stores.
 * K and V tiles alternate in flight: V_j loads while S = Q K_j^T computes, K_{j+1} while
 * O += P V_j computes (cp.async), two barriers per key tile.
 */
#pragma once
#include "copy.h"
#include "params.h"
#include "softmax.h"
#include "traits.h"

namespace flash_cuda {

template <class Kt, bool kCausal>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm) flash_fwd_kernel(const FwdParams p) {
  using T = typename Kt::T;
  using QLayout = typename Kt::QLayout;
  using KVLayout = typename Kt::KVLayout;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles, kThreads = Kt::kThreads;

  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / (p.hq / p.hkv);  // GQA: query heads share kv heads in groups
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = m_block * kBlockM;
  const int warp_row0 = warp * 16;  // this warp's rows within the tile

  T* sQ = dynamic_smem<T>();       // [kBlockM][kHeadDim], swizzled; reused to stage O
  T* sK = sQ + QLayout::kElems;    // [kBlockN][kHeadDim]
  T* sV = sK + KVLayout::kElems;   // [kBlockN][kHeadDim]
  const T* gQ = head_ptr<const T>(p.q, batch, head);
  const T* gK = head_ptr<const T>(p.k, batch, kv_head);
  const T* gV = head_ptr<const T>(p.v, batch, kv_head);
  T* gO = head_ptr<T>(p.o, batch, head);
  float* gLse = p.lse + (int64_t(batch) * p.hq + head) * p.nq;

  // Causal: key tiles entirely above the diagonal of this query tile are never visited.
  const int n_end = kCausal ? int(p.mask.key_end(min(m0 + kBlockM, p.nq), p.nk)) : p.nk;
  const int n_tiles = (n_end + kBlockN - 1) / kBlockN;

  float rO[kDTiles][4] = {};  // 16 x kHeadDim output rows of this warp, fp32
  OnlineSoftmax softmax;

  load_tile<QLayout, kThreads>(sQ, gQ, p.q.row_stride, m0, p.nq, p.d, p.vec_aligned);
  if (n_tiles > 0) load_tile<KVLayout, kThreads>(sK, gK, p.k.row_stride, 0, p.nk, p.d, p.vec_aligned);
  cp_async_commit();

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_j (and Q) visible to all; every warp is done reading V_{j-1}
    load_tile<KVLayout, kThreads>(sV, gV, p.v.row_stride, n0, p.nk, p.d, p.vec_aligned);
    cp_async_commit();  // V_j lands while S = Q K_j^T computes

    float rS[kNTiles][4] = {};  // 16 x kBlockN scores of this warp, fp32
    for (int k0 = 0; k0 < kHeadDim; k0 += 16) {
      uint32_t rQ[4];  // A: 16 x 16 of Q
      load_a_frag<QLayout>(rQ, sQ, warp_row0, k0, lane);
      for (int nt = 0; nt < kNTiles; nt += 2) {
        uint32_t rK[4];  // B: 16 x 16 of K^T as two n-tiles
        load_b_frags_nk<KVLayout>(rK, sK, nt * 8, k0, lane);
        mma_m16n8k16<T>(rS[nt], rQ, {rK[0], rK[1]}, rS[nt]);
        mma_m16n8k16<T>(rS[nt + 1], rQ, {rK[2], rK[3]}, rS[nt + 1]);
      }
    }

    // Scale into the base-2 domain; -inf where a key is past the end or above the diagonal.
    // Only tiles that cross the sequence end or the diagonal pay for the predicate.
    const bool needs_mask = n0 + kBlockN > p.nk || (kCausal && p.mask.tile_needs_mask(m0, n0 + kBlockN));
    for (int nt = 0; nt < kNTiles; ++nt)
      for (int e = 0; e < 4; ++e) {
        float x = rS[nt][e] * p.scale_log2;
        if (needs_mask) {
          const int row = m0 + warp_row0 + lane / 4 + 8 * (e / 2), col = n0 + nt * 8 + 2 * (lane % 4) + e % 2;
          if (col >= p.nk || (kCausal && !p.mask.visible(row, col))) x = -INFINITY;
        }
        rS[nt][e] = x;
      }
    softmax.update(rS, rO);

    cp_async_wait<0>();
    __syncthreads();  // V_j visible to all; every warp is done reading K_j
    if (j + 1 < n_tiles) load_tile<KVLayout, kThreads>(sK, gK, p.k.row_stride, n0 + kBlockN, p.nk, p.d, p.vec_aligned);
    cp_async_commit();  // K_{j+1} lands while O += P V_j computes

    for (int k0 = 0; k0 < kBlockN; k0 += 16) {
      // A: P for keys k0..k0+16 = the S accumulators of n-tiles k0/8 and k0/8 + 1, rounded to
      // 16 bit in place of a shared-memory round trip (ptx-oracle accumulator_to_A_reuse).
      const float(&s0)[4] = rS[k0 / 8];
      const float(&s1)[4] = rS[k0 / 8 + 1];
      const uint32_t rP[4] = {pack2<T>(s0[0], s0[1]), pack2<T>(s0[2], s0[3]), pack2<T>(s1[0], s1[1]),
                              pack2<T>(s1[2], s1[3])};
      for (int dt = 0; dt < kDTiles; dt += 2) {
        uint32_t rV[4];  // B: 16 keys x 16 head-dim columns of V, two n-tiles
        load_b_frags_kn<KVLayout>(rV, sV, k0, dt * 8, lane);
        mma_m16n8k16<T>(rO[dt], rP, {rV[0], rV[1]}, rO[dt]);
        mma_m16n8k16<T>(rO[dt + 1], rP, {rV[2], rV[3]}, rO[dt + 1]);
      }
    }
  }

  float lse[2];  // rows g and g + 8
  softmax.finalize(rO, lse);
  const int row_g = m0 + warp_row0 + lane / 4;
  if (lane % 4 == 0) {
    if (row_g < p.nq) st_global(&gLse[row_g], lse[0]);
    if (row_g + 8 < p.nq) st_global(&gLse[row_g + 8], lse[1]);
  }

  // Stage this warp's 16 rows of O in its own 16 rows of sQ (only this warp ever read them),
  // then write them out 16 bytes per lane. The barrier covers blocks that ran no key tile,
  // whose Q copies by other threads may still be landing in these rows.
  cp_async_wait<0>();
  __syncthreads();
  stage_accumulators<QLayout>(sQ, rO, warp_row0, 0, 1.0f, lane);
  __syncwarp();
  store_warp_rows<QLayout>(gO, p.o.row_stride, sQ, warp_row0, m0 + warp_row0, p.nq, p.d, p.vec_aligned, lane);
}

}  // namespace flash_cuda
