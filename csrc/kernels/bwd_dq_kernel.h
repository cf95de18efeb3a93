/* The deterministic dQ pass (deterministic=True): dQ without atomics.
 *
 * The forward's shape: grid (query tile, query head, batch), kWarps warps of 16 query rows (4;
 * 2 for fp32 and sm_75 above head dim 128: BwdDqTraits), a loop over the key tiles the rows
 * see. Per key tile, in registers:
 *   S = Q K_j^T,  P = exp2(S scale log2e - lse2),  dP = dO V_j^T,  dS = P (dP - D),
 *   dQ += dS K_j  (dS straight from the accumulators into A registers, K by ldmatrix.trans).
 * Each dQ row is owned by one warp and summed in a fixed order, so the result is bitwise
 * repeatable. kBand visits only the key tiles that intersect the band; kMod applies the score
 * modifiers and the softcap's derivative (the bias gradient comes from the main kernel); kBand
 * and kMod apply dropout: dS = P (Z dP / (1 - p) - D), the keep mask Z regenerated here
 * (dropout.h).
 * fp32 inputs (tf32.h; their only dQ path): the products on tf32 mma (p.tf32x3: 3xTF32), dS fed
 * from the fp32 accumulators with K's fragments by 32-bit loads, as the forward's P V.
 * Cost: S and dP are recomputed (3 products per tile here instead of 1 in the
 * main kernel), so deterministic=True does 7/5 of the mma work of the atomic path.
 */
#pragma once
#include "copy.h"
#include "dropout.h"
#include "params.h"
#include "seqlen.h"
#include "traits.h"

namespace flash_cuda {

template <class Kt, bool kBand, bool kMod, bool kVarlen>
__global__ void __launch_bounds__(Kt::kThreads) flash_bwd_dq_kernel(const BwdParams params) {
  if (!kernel_arch_matches<Kt::kSm75>()) {  // (ptx.h)
    __trap();
    return;
  }
  using T = typename Kt::T;
  using U = typename Kt::Unit;  // shared tiles and the tile copies count 16-bit units (fp32: 2 per value)
  constexpr int kUnits = Kt::kUnits;
  using QLayout = typename Kt::QLayout;
  using KVLayout = typename Kt::KVLayout;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles, kThreads = Kt::kThreads;

  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const BwdParams& p = for_sequence<kVarlen>(params, batch);  // packed batches: this block's sequence
  const int m0 = m_block * kBlockM;
  if (kVarlen && m0 >= p.nq) return;  // past a packed sequence's end
  const int kv_head = head / (p.hq / p.hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warp_row0 = warp * 16;

  U* sQ = dynamic_smem<U>();       // [kBlockM][kHeadDim]; reused to stage dQ
  U* sdO = sQ + QLayout::kElems;   // [kBlockM][kHeadDim]
  U* sK = sdO + QLayout::kElems;   // [kBlockN][kHeadDim]
  U* sV = sK + KVLayout::kElems;   // [kBlockN][kHeadDim]
  float* sBias = reinterpret_cast<float*>(sV + KVLayout::kElems);  // kMod: [kBlockM][kBlockN] of the bias
  using Bias = typename Kt::Bias;
  static_assert(Kt::kMod == kMod, "traits of this variant");
  const U* gK = units<U>(head_ptr<const T>(p.k, batch, kv_head, k_row0<kVarlen>(p)));
  const U* gV = units<U>(head_ptr<const T>(p.v, batch, kv_head, k_row0<kVarlen>(p)));
  // (p.d * kUnits written out at each use: held in a register, it cost the 16-bit kMod kernel at
  // head dim 128 60 bytes of spills at sm_80)

  load_tile<QLayout, kThreads>(sQ, units<U>(head_ptr<const T>(p.q, batch, head, q_row0<kVarlen>(p))),
                               p.q.row_stride * kUnits, m0, p.nq, p.d * kUnits);
  load_tile<QLayout, kThreads>(sdO, units<U>(head_ptr<const T>(p.dout, batch, head, q_row0<kVarlen>(p))),
                               p.dout.row_stride * kUnits, m0, p.nq, p.d * kUnits);
  cp_async_commit();

  // lse2 and D of this thread's rows g and g + 8 (padded row stats: rows that must not
  // contribute have lse2 = +inf, probabilities exactly 0; kMod: the lse itself, not base 2).
  const float* g_stats = p.row_stats + p.template stats_offset<kVarlen>(batch, head);
  float lse2[2], di[2];
  for (int half = 0; half < 2; ++half) {
    const int row = m0 + warp_row0 + lane / 4 + 8 * half;
    lse2[half] = ld_global(&g_stats[row]);
    di[half] = ld_global(&g_stats[p.template scratch_slice_rows<kVarlen>() + row]);
  }

  const int m_end = min(m0 + kBlockM, p.nq);
  const int j_begin = kBand ? int(p.mask.key_begin(m0, p.nk)) / kBlockN : 0;
  const int j_end = ((kBand ? int(p.mask.key_end(m_end, p.nk)) : p.nk) + kBlockN - 1) / kBlockN;
  const float slope = kMod ? p.mod.slope(batch, head) : 0.0f;
  const float* gBias = kMod ? p.mod.bias_head(batch, head) : nullptr;
  const bool bias_row_broadcast = p.mod.bias_stride[2] == 0;
  float rdQ[kDTiles][4] = {};  // 16 x kHeadDim of dQ for this warp's rows, fp32

  // kX3: fp32 products in 3xTF32
  auto key_tiles = [&](auto x3_tag) {
    constexpr bool kX3 = decltype(x3_tag)::value;
    for (int j = j_begin; j < j_end; ++j) {
      const int n0 = j * kBlockN;
      __syncthreads();  // every warp is done with K_{j-1}, V_{j-1}
      load_tile<KVLayout, kThreads>(sK, gK, p.k.row_stride * kUnits, n0, p.nk, p.d * kUnits);
      load_tile<KVLayout, kThreads>(sV, gV, p.v.row_stride * kUnits, n0, p.nk, p.d * kUnits);
      if (kMod && gBias) Bias::template load<kThreads>(sBias, gBias, p.mod.bias_stride[2], m0, n0, p.nq, p.nk);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();  // K_j, V_j, the bias (and Q, dO) visible

      float rS[kNTiles][4] = {}, rdP[kNTiles][4] = {};  // 16 x kBlockN each, fp32
      for (int k0 = 0; k0 < kHeadDim * kUnits; k0 += 16) {  // 16 units: 16 values, or 8 fp32 ones
        uint32_t raw_q[4], raw_do[4];  // A: 16 rows x 16 head-dim units
        load_a_frag<QLayout>(raw_q, sQ, warp_row0, k0, lane);
        load_a_frag<QLayout>(raw_do, sdO, warp_row0, k0, lane);
        const Operand<T, 4> rQ = operand<T, kX3>(raw_q), rdO = operand<T, kX3>(raw_do);
        for (int nt = 0; nt < kNTiles; nt += 2) {
          uint32_t rK[4], rV[4];  // B: head-dim k0.. x 16 keys, from [key][d] storage
          load_b_frags_nk<KVLayout>(rK, sK, nt * 8, k0, lane);
          load_b_frags_nk<KVLayout>(rV, sV, nt * 8, k0, lane);
          mma<T, kX3>(rS[nt], rQ, operand<T, kX3>({rK[0], rK[1]}), rS[nt]);
          mma<T, kX3>(rS[nt + 1], rQ, operand<T, kX3>({rK[2], rK[3]}), rS[nt + 1]);
          mma<T, kX3>(rdP[nt], rdO, operand<T, kX3>({rV[0], rV[1]}), rdP[nt]);
          mma<T, kX3>(rdP[nt + 1], rdO, operand<T, kX3>({rV[2], rV[3]}), rdP[nt + 1]);
        }
      }

      const bool needs_mask = n0 + kBlockN > p.nk || (kBand && p.mask.tile_needs_mask(m0, m_end, n0, n0 + kBlockN));
      // Dropout: dP of the dropped elements -> 0, the kept ones / (1 - p) (dropout.h)
      const bool drop = kBand && p.drop.enabled;
      if (drop) {
        const PhiloxStream stream = dropout_stream(p.drop, batch, p.hq, head);
  #pragma unroll
        for (int k = 0; k < kNTiles / 2; ++k) drop_block(stream, m0 + warp_row0, n0 + 16 * k, lane, rdP[2 * k], rdP[2 * k + 1]);
      }
  #pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
  #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp_row0 + lane / 4 + 8 * (e / 2), c = nt * 8 + 2 * (lane % 4) + e % 2;
          const int row = m0 + r, col = n0 + c;
          float dcap = 1.0f, pe;
          if (kMod) {  // natural units, the difference first (the row stats hold the lse itself)
            const float bias = gBias ? Bias::at(sBias, bias_row_broadcast, r, c) : 0.0f;
            const float sm = modify_score<float, Kt::kTf32>(rS[nt][e] * p.scale, p.mod.softcap, slope,
                                                 col - (row + int(p.mask.offset)), bias, &dcap);
            pe = ex2_approx((sm - lse2[e / 2]) * 1.4426950408889634f);
          } else {
            pe = ex2_approx(rS[nt][e] * p.scale_log2 - lse2[e / 2]);  // base-2 score and lse
          }
          if (needs_mask && (col >= p.nk || (kBand && !p.mask.visible(row, col)))) pe = 0.0f;
          rdP[nt][e] = pe * ((kBand ? rdP[nt][e] * p.drop.scale : rdP[nt][e]) - di[e / 2]) * dcap;  // dS
        }

      if constexpr (Kt::kTf32) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {  // 8 keys per k-step (tf32.h: the accumulators' key order)
          const Operand<float, 4> rdS = p_operand_tf32<kX3>(rdP[nt]);  // A: dS for keys 8 nt..
#pragma unroll
          for (int dt = 0; dt < kDTiles; ++dt) {
            uint32_t raw[2];  // B: 8 keys x 8 head-dim columns of K, [key][d]
            load_b_frag_kn_tf32<KVLayout>(raw, sK, 8 * nt, 8 * dt, lane);
            mma<float, kX3>(rdQ[dt], rdS, operand<float, kX3>(raw), rdQ[dt]);
          }
        }
      } else {
        for (int k0 = 0; k0 < kBlockN; k0 += 16) {
          const float(&s0)[4] = rdP[k0 / 8];
          const float(&s1)[4] = rdP[k0 / 8 + 1];
          const uint32_t rdS[4] = {pack2<T>(s0[0], s0[1]), pack2<T>(s0[2], s0[3]), pack2<T>(s1[0], s1[1]),
                                   pack2<T>(s1[2], s1[3])};  // A: dS for keys k0.., from the accumulators
          for (int dt = 0; dt < kDTiles; dt += 2) {
            uint32_t rK[4];  // B: 16 keys x 16 head-dim columns of K, [key][d] (.trans)
            load_b_frags_kn<KVLayout>(rK, sK, k0, dt * 8, lane);
            mma_m16n8k16<T>(rdQ[dt], rdS, {rK[0], rK[1]}, rdQ[dt]);
            mma_m16n8k16<T>(rdQ[dt + 1], rdS, {rK[2], rK[3]}, rdQ[dt + 1]);
          }
        }
      }
    }
  };
  if constexpr (Kt::kTf32) {  // the precision: one branch around the loop (tf32.h)
    if (p.tf32x3) key_tiles(std::true_type{});
    else key_tiles(std::false_type{});
  } else {
    key_tiles(std::false_type{});
  }

  cp_async_wait<0>();
  __syncthreads();  // (blocks with no key tile: Q copies by other threads may still be landing)
  stage_accumulators<QLayout, T>(sQ, rdQ, warp_row0, 0, p.scale, lane);  // dQ = scale * dS K
  __syncwarp();
  store_warp_rows<QLayout>(units<U>(head_ptr<T>(p.dq, batch, head, q_row0<kVarlen>(p))), p.dq.row_stride * kUnits, sQ,
                           warp_row0, m0 + warp_row0, p.nq, p.d * kUnits, lane);
}

}  // namespace flash_cuda
