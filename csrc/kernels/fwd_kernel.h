/* FlashAttention-2 forward kernel (Dao, 2023, Algorithm 1 with the FA2 work split).
 *
 * Grid (query tile of 128 rows, query head, batch); each warp owns kMTiles 16-row m-tiles
 * (FwdTraits). Per block:
 *   Q tile -> shared memory once; for each key tile j (causal: only up to the diagonal):
 *     S = Q K_j^T        (mma.m16n8k16, K by ldmatrix: one fragment feeds every m-tile)
 *     scale, mask, online softmax: S becomes P, O rescaled by exp2(m_old - m_new)
 *     O += P V_j          (P straight from the S accumulators into A registers, V by
 *                          ldmatrix.trans, again one fragment for every m-tile)
 *   O /= rowsum, lse; O staged through shared memory for 128-bit coalesced stores.
 * K and V tiles alternate in flight: V_j loads while S = Q K_j^T computes, K_{j+1} while
 * O += P V_j computes (cp.async), two barriers per key tile.
 * The key tiles that need no mask (inside the sequence, and for causal entirely below the
 * diagonal: all but the last one or two of a long row) run in a loop of their own with no
 * per-element predicate; the rest run the same body with it.
 */
#pragma once
#include <type_traits>

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
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kMTiles = Kt::kMTiles;
  constexpr int kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles, kThreads = Kt::kThreads;

  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / (p.hq / p.hkv);  // GQA: query heads share kv heads in groups
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = m_block * kBlockM;
  const int warp_row0 = warp * Kt::kWarpRows;  // this warp's rows within the tile: m-tile mt at + 16 mt

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
  const int n_unmasked = min(n_tiles, int(p.mask.unmasked_key_tiles(m0, kBlockN, p.nk)));

  float rO[kMTiles][kDTiles][4] = {};  // per m-tile: 16 x kHeadDim output rows of this warp, fp32
  OnlineSoftmax softmax[kMTiles];

  load_tile<QLayout, kThreads>(sQ, gQ, p.q.row_stride, m0, p.nq, p.d);
  if (n_tiles > 0) load_tile<KVLayout, kThreads>(sK, gK, p.k.row_stride, 0, p.nk, p.d);
  cp_async_commit();

  // One key tile; kMask: scores past the sequence end or above the diagonal become -inf.
  auto key_tile = [&](const int j, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int n0 = j * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_j (and Q) visible to all; every warp is done reading V_{j-1}
    load_tile<KVLayout, kThreads>(sV, gV, p.v.row_stride, n0, p.nk, p.d);
    cp_async_commit();  // V_j lands while S = Q K_j^T computes

    float rS[kMTiles][kNTiles][4] = {};  // per m-tile: 16 x kBlockN scores of this warp, fp32
#pragma unroll(Kt::kQKUnroll)
    for (int k0 = 0; k0 < kHeadDim; k0 += 16) {
      uint32_t rQ[kMTiles][4];  // A: 16 x 16 of Q per m-tile
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) load_a_frag<QLayout>(rQ[mt], sQ, warp_row0 + 16 * mt, k0, lane);
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        uint32_t rK[4];  // B: 16 x 16 of K^T as two n-tiles
        load_b_frags_nk<KVLayout>(rK, sK, nt * 8, k0, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16<T>(rS[mt][nt], rQ[mt], {rK[0], rK[1]}, rS[mt][nt]);
          mma_m16n8k16<T>(rS[mt][nt + 1], rQ[mt], {rK[2], rK[3]}, rS[mt][nt + 1]);
        }
      }
    }

    // Masked tiles: -inf where a key is past the end or above the diagonal. Element e of n-tile
    // nt in m-tile mt is key n0 + 2 (lane % 4) + c, c = 8 nt + e % 2, of row
    // m0 + warp_row0 + 16 mt + lane / 4 + 8 (e / 2): both tests compare c with one number.
    const int key_lim = p.nk - n0 - 2 * (lane % 4);  // c >= key_lim: past the sequence end
    const int diag = kCausal ? int(p.mask.last_key(m0 + warp_row0 + lane / 4) - n0 - 2 * (lane % 4)) : 0;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      if (kMask) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = 8 * nt + e % 2;
            if (c >= key_lim || (kCausal && c > diag + 16 * mt + 8 * (e / 2))) rS[mt][nt][e] = -INFINITY;
          }
      }
      softmax[mt].update(rS[mt], rO[mt], p.scale_log2);
    }
    // P rounded to 16 bit, in mma A-operand order: keys 16 k..16 k + 16 of m-tile mt are the S
    // accumulators of n-tiles 2 k and 2 k + 1 (ptx-oracle accumulator_to_A_reuse), so P goes
    // to the next mma without a shared-memory round trip and S's fp32 registers die here.
    uint32_t rP[kMTiles][kBlockN / 16][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int k = 0; k < kBlockN / 16; ++k) {
        const float(&s0)[4] = rS[mt][2 * k];
        const float(&s1)[4] = rS[mt][2 * k + 1];
        rP[mt][k][0] = pack2<T>(s0[0], s0[1]);
        rP[mt][k][1] = pack2<T>(s0[2], s0[3]);
        rP[mt][k][2] = pack2<T>(s1[0], s1[1]);
        rP[mt][k][3] = pack2<T>(s1[2], s1[3]);
      }

    cp_async_wait<0>();
    __syncthreads();  // V_j visible to all; every warp is done reading K_j
    if (j + 1 < n_tiles) load_tile<KVLayout, kThreads>(sK, gK, p.k.row_stride, n0 + kBlockN, p.nk, p.d);
    cp_async_commit();  // K_{j+1} lands while O += P V_j computes

#pragma unroll
    for (int k0 = 0; k0 < kBlockN; k0 += 16) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        uint32_t rV[4];  // B: 16 keys x 16 head-dim columns of V, two n-tiles
        load_b_frags_kn<KVLayout>(rV, sV, k0, dt * 8, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16<T>(rO[mt][dt], rP[mt][k0 / 16], {rV[0], rV[1]}, rO[mt][dt]);
          mma_m16n8k16<T>(rO[mt][dt + 1], rP[mt][k0 / 16], {rV[2], rV[3]}, rO[mt][dt + 1]);
        }
      }
    }
  };

  int j = 0;
  for (; j < n_unmasked; ++j) key_tile(j, std::false_type{});
  for (; j < n_tiles; ++j) key_tile(j, std::true_type{});

  // Stage this warp's rows of O in its own rows of sQ (only this warp ever read them), then
  // write them out 16 bytes per lane. The barrier covers blocks that ran no key tile, whose Q
  // copies by other threads may still be landing in these rows.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int r0 = warp_row0 + 16 * mt;
    float lse[2];  // rows g and g + 8
    softmax[mt].finalize(rO[mt], lse);
    const int row_g = m0 + r0 + lane / 4;
    if (lane % 4 == 0) {
      if (row_g < p.nq) st_global(&gLse[row_g], lse[0]);
      if (row_g + 8 < p.nq) st_global(&gLse[row_g + 8], lse[1]);
    }
    stage_accumulators<QLayout>(sQ, rO[mt], r0, 0, 1.0f, lane);
    __syncwarp();
    store_warp_rows<QLayout>(gO, p.o.row_stride, sQ, r0, m0 + r0, p.nq, p.d, lane);
  }
}

}  // namespace flash_cuda
