/* FlashAttention-2 forward kernel (Dao, 2023, Algorithm 1 with the FA2 work split).
 *
 * Grid (query tile of kBlockM rows, query head, batch); each of kWarps warps owns kMTiles 16-row
 * m-tiles (FwdTraits: 128, 64 or 32 rows a tile per configuration). Per block:
 *   Q tile -> shared memory once; for each key tile j (kBand: those intersecting the band):
 *     S = Q K_j^T        (mma.m16n8k16, K by ldmatrix: one fragment feeds every m-tile)
 *     kMod: scale and modifiers (softcap, ALiBi, the bias tile staged with K_j)
 *     mask, online softmax: S becomes P, O rescaled by exp2(m_old - m_new)
 *     dropout (the kDropout kernels, dropout.h): dropped elements of P zeroed (after the row sums: lse is unaffected)
 *     O += P V_j          (P straight from the S accumulators into A registers, V by
 *                          ldmatrix.trans, again one fragment for every m-tile)
 *   O /= rowsum (times 1 / (1 - p) with dropout), lse; O staged through shared memory for
 *   128-bit coalesced stores.
 * sm_75 (fp16; device.h): each m16n8k16 is two m16n8k8 (ptx.h), the K/V tiles travel
 * through registers (below; at head dim 256 copied at once: traits.h kKvInRegs).
 * fp32 inputs (tf32.h) run the same steps on tf32 mma, k-steps of 8 values, P V from P's fp32
 * accumulators with V's fragments by 32-bit loads; p.tf32x3 selects 3xTF32.
 * K and V tiles alternate in flight: V_j loads while S = Q K_j^T computes, the next key tile's
 * K while O += P V_j computes (cp.async; sm_75: through registers, copy.h's TileStage), two
 * barriers per key tile.
 * kBand (causal, sliding window): only the key tiles that intersect the band of this query
 * tile are visited. The key tiles that need no mask (inside the sequence and entirely inside the
 * band: all but one or two at each edge of a long row) run in a loop of their own with no
 * per-element predicate; the rest run the same body with it.
 * kCache (KV-cache attention, kv_cache.h; the modifier variant only): the keys come from a
 * contiguous or paged cache, each sequence's count from cache_seqlens, and blockIdx.x also
 * selects a split of the key tiles; with several splits the block's rows go out in fp32,
 * normalised by its own sum, with their lse, for splitkv_combine.h to merge.
 */
#pragma once
#include <type_traits>

#include "copy.h"
#include "dropout.h"
#include "kv_cache.h"
#include "params.h"
#include "seqlen.h"
#include "softmax.h"
#include "traits.h"

namespace flash_cuda {

template <class Kt, bool kBand, bool kMod, bool kDropout, bool kVarlen, bool kCache = false>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm) flash_fwd_kernel(const FwdParams params) {
  using T = typename Kt::T;
  using U = typename Kt::Unit;  // shared tiles and the tile copies count 16-bit units (fp32: 2 per value)
  constexpr int kUnits = Kt::kUnits;
  using QLayout = typename Kt::QLayout;
  using KVLayout = typename Kt::KVLayout;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kMTiles = Kt::kMTiles;
  constexpr int kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles, kThreads = Kt::kThreads;

  static_assert(!kCache || kVarlen, "a KV cache narrows each sequence's key count (seqlen.h)");
  if (!kernel_arch_matches<Kt::kSm75>()) {  // (ptx.h)
    __trap();
    return;
  }
  // kCache: blockIdx.x runs over (query tile, key split) pairs, the splits of a tile adjacent
  const int m_block = kCache ? blockIdx.x / params.cache.num_splits : blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const FwdParams& p = for_sequence<kVarlen, true, kCache>(params, batch);  // packed batches: this block's sequence (volatile loads: traits.h)
  const int m0 = m_block * kBlockM;
  if (kVarlen && m0 >= p.nq) return;  // past a packed sequence's end
  const int kv_head = head / (p.hq / p.hkv);  // GQA: query heads share kv heads in groups
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = warp * Kt::kWarpRows;  // this warp's rows within the tile: m-tile mt at + 16 mt

  U* sQ = dynamic_smem<U>();       // [kBlockM][kHeadDim], swizzled; reused to stage O
  U* sK = sQ + QLayout::kElems;    // [kBlockN][kHeadDim]
  U* sV = sK + KVLayout::kElems;   // [kBlockN][kHeadDim]
  float* sBias = reinterpret_cast<float*>(sV + KVLayout::kElems);  // kMod: [kBlockM][kBlockN] of the bias
  using Bias = typename Kt::Bias;
  static_assert(Kt::kMod == kMod, "traits of this variant");
  const U* gQ = units<U>(head_ptr<const T>(p.q, batch, head, q_row0<kVarlen>(p)));
  const U* gK = units<U>(head_ptr<const T>(p.k, batch, kv_head, k_row0<kVarlen>(p)));  // (kCache: unused, see load_kv)
  const U* gV = units<U>(head_ptr<const T>(p.v, batch, kv_head, k_row0<kVarlen>(p)));
  // This (batch, head)'s rows of O and of lse, from the params narrowed to its sequence
  auto o_rows = [&](const FwdParams& q) { return units<U>(head_ptr<T>(q.o, batch, head, q_row0<kVarlen>(q))); };
  auto lse_rows = [&](const FwdParams& q) {
    return q.lse + batch * q.lse_batch_stride + head * q.lse_head_stride + q_row0<kVarlen>(q);
  };
  U* gO = o_rows(p);
  const int d_units = p.d * kUnits;
  float* gLse = lse_rows(p);

  // Key tiles [j_begin, j_end) intersect the band of rows [m0, m_end); of those, [u0, u1) lie
  // entirely inside it (and inside the sequence). They are visited in the order [u0, u1), then
  // the masked ones at the band's edges, [j_begin, u0) and [u1, j_end): two loops, one body each.
  const int m_end = min(m0 + kBlockM, p.nq);
  int j_begin = 0, j_end = (p.nk + kBlockN - 1) / kBlockN, u0 = 0, u1 = p.nk / kBlockN;
  if (kBand) {
    j_begin = int(p.mask.key_begin(m0, p.nk)) / kBlockN;
    j_end = (int(p.mask.key_end(m_end, p.nk)) + kBlockN - 1) / kBlockN;
    int64_t b0, b1;
    p.mask.unmasked_key_tiles(m0, m_end, kBlockN, p.nk, &b0, &b1);
    u0 = min(max(int(b0), j_begin), j_end), u1 = min(max(int(b1), u0), j_end);
  }
  if (kCache) {  // this block's split of the key tiles (kv_cache.h)
    int s0, s1;
    split_key_tiles((p.nk + kBlockN - 1) / kBlockN, blockIdx.x % p.cache.num_splits, p.cache.num_splits, &s0, &s1);
    j_begin = max(j_begin, s0), j_end = max(min(j_end, s1), j_begin);
    u0 = min(max(u0, j_begin), j_end), u1 = min(max(u1, u0), j_end);
  }
  // kMod: scores are modified in natural units, so the softmax's base-2 scale is log2(e) alone,
  // and it subtracts the row max before scaling (softmax.h: finite masks far below the scores).
  const float softmax_scale = kMod ? 1.4426950408889634f : p.scale_log2;
  const float slope = kMod ? p.mod.slope(batch, head) : 0.0f;
  const float* gBias = kMod ? p.mod.bias_head(batch, head) : nullptr;
  const bool bias_row_broadcast = p.mod.bias_stride[2] == 0;
  // Key or value rows [n0, n0 + kBlockN) into a shared tile, landed by kv_stage.land() after
  // the wait: a cache's through kv_cache.h (sm_75: copied at once, ptx.h).
  TileStage<KVLayout, kThreads, U, Kt::kKvInRegs && !kCache> kv_stage;
  auto load_kv = [&](U* s_tile, const TensorRef& t, const U* g_head, int n0) {
    if constexpr (kCache) {
      static_assert(!Kt::kTf32, "KV caches hold 16-bit values");
      const int first = cache_first_row<false>(params, batch);  // (a left pad: key n is cache row first + n)
      load_cache_tile<KVLayout, kThreads>(s_tile, t, p.cache, batch, kv_head, first + n0, first + p.nk, p.d);
    } else {
      kv_stage.load(s_tile, g_head, t.row_stride * kUnits, n0, p.nk, d_units);
    }
  };
  // kMod: the bias of key tile j travels with K_j
  auto load_key_tile = [&](int j) {
    load_kv(sK, p.k, gK, j * kBlockN);
    if (kMod && gBias) Bias::template load<kThreads>(sBias, gBias, p.mod.bias_stride[2], m0, j * kBlockN, p.nq, p.nk);
  };

  float rO[kMTiles][kDTiles][4] = {};  // per m-tile: 16 x kHeadDim output rows of this warp, fp32
  OnlineSoftmax<kMod> softmax[kMTiles];

  load_tile<QLayout, kThreads>(sQ, gQ, p.q.row_stride * kUnits, m0, p.nq, d_units);
  const int first_masked = j_begin < u0 ? j_begin : (u1 < j_end ? u1 : -1);  // -1: none
  if (u0 < u1) load_key_tile(u0);
  else if (first_masked >= 0) load_key_tile(first_masked);
  cp_async_commit();

  // kCache: whether this warp has a row inside the sequence. A decoding step's tile holds a kv
  // group's few rows (4 query heads x 1 token fill one warp of 8), and the warps without any
  // skip the products and the softmax, copying tiles and waiting at the barriers only. Only the
  // KV-cache kernels test it: there ptxas -v at head dim 128 (bf16) went from 255 registers and
  // 12 bytes of spills (sm_90; 8 at sm_80) to 255 and none; in the other forward kernels the
  // branch made the dropout kernels at 128 spill 160 to 172 bytes (sm_90), and a partial last
  // tile is one of many there.
  const bool rows_live = !kCache || m0 + warp_row0 < p.nq;
  // One key tile j, prefetching K (and the bias) of tile next_j (-1: none); kMask: scores past
  // the sequence end or outside the band become -inf; kX3: fp32 products in 3xTF32.
  auto key_tile = [&](const int j, const int next_j, auto mask_tag, auto x3_tag) {
    constexpr bool kMask = decltype(mask_tag)::value, kX3 = decltype(x3_tag)::value;
    const int n0 = j * kBlockN;
    cp_async_wait<0>();
    kv_stage.land();
    __syncthreads();  // K_j (and Q, the bias) visible to all; every warp is done reading V_{j-1}
    load_kv(sV, p.v, gV, n0);
    cp_async_commit();  // V_j lands while S = Q K_j^T computes

    float rS[kMTiles][kNTiles][4] = {};  // per m-tile: 16 x kBlockN scores of this warp, fp32
    constexpr int kPTiles = Kt::kTf32 ? 1 : kBlockN / 16;  // 16-bit P: 16 x 16 A fragments
    [[maybe_unused]] uint32_t rP[kMTiles][kPTiles][4];  // (fp32: unused, P stays in rS)
    if (rows_live) {  // (a warp whose rows all lie past the end only copies tiles and waits)
#pragma unroll(kMask ? (kVarlen ? Kt::kQKUnrollMaskedPacked : Kt::kQKUnrollMasked) : Kt::kQKUnroll)
      for (int k0 = 0; k0 < kHeadDim * kUnits; k0 += 16) {  // 16 units: 16 values, or 8 fp32 ones
        Operand<T, 4> rQ[kMTiles];  // A: 16 x 16 units of Q per m-tile
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          uint32_t raw[4];
          load_a_frag<QLayout>(raw, sQ, warp_row0 + 16 * mt, k0, lane);
          rQ[mt] = operand<T, kX3>(raw);
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; nt += 2) {
          uint32_t rK[4];  // B: 16 x 16 units of K^T as two n-tiles
          load_b_frags_nk<KVLayout>(rK, sK, nt * 8, k0, lane);
          const Operand<T, 2> rK0 = operand<T, kX3>({rK[0], rK[1]}), rK1 = operand<T, kX3>({rK[2], rK[3]});
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma<T, kX3>(rS[mt][nt], rQ[mt], rK0, rS[mt][nt]);
            mma<T, kX3>(rS[mt][nt + 1], rQ[mt], rK1, rS[mt][nt + 1]);
          }
        }
      }

      // Element e of n-tile nt in m-tile mt is key n0 + 2 (lane % 4) + c, c = 8 nt + e % 2, of row
      // m0 + warp_row0 + 16 mt + lane / 4 + 8 (e / 2).
      const int row_t = m0 + warp_row0 + lane / 4, key_t = n0 + 2 * (lane % 4);
      const int key_lim = p.nk - key_t;  // c >= key_lim: past the sequence end
      if constexpr (kMod) {
        // s <- modified(scale s), the bias from the tile (zero past the sequence ends)
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = warp_row0 + 16 * mt + lane / 4 + 8 * h, c = 8 * nt + 2 * (lane % 4);
              const float2 bias = gBias ? Bias::pair_at(sBias, bias_row_broadcast, r, c) : make_float2(0.0f, 0.0f);
              const int dist = n0 + c - (m0 + r + int(p.mask.offset));  // j - (i + offset), element 2 h
              float dcap;
              const float s0 = rS[mt][nt][2 * h] * p.scale, s1 = rS[mt][nt][2 * h + 1] * p.scale;
              rS[mt][nt][2 * h] = modify_score<float, Kt::kTf32>(s0, p.mod.softcap, slope, dist, bias.x, &dcap);
              rS[mt][nt][2 * h + 1] = modify_score<float, Kt::kTf32>(s1, p.mod.softcap, slope, dist + 1, bias.y, &dcap);
            }
      }
      // Masked tiles: -inf where a key is past the end or outside the band [lo, hi] of its row:
      // each test compares c with one number.
      const int hi = kBand ? p.mask.hi_diag(row_t, key_t) : 0, lo = kBand ? p.mask.lo_diag(row_t, key_t) : 0;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if (kMask) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = 8 * nt + e % 2, r = 16 * mt + 8 * (e / 2);
              if (c >= key_lim || (kBand && ((p.mask.has_hi() && c > hi + r) || (p.mask.has_lo() && c < lo + r))))
                rS[mt][nt][e] = -INFINITY;
            }
        }
        softmax[mt].update(rS[mt], rO[mt], softmax_scale);
      }
      // P rounded to 16 bit, in mma A-operand order: keys 16 k..16 k + 16 of m-tile mt are the S
      // accumulators of n-tiles 2 k and 2 k + 1 (ptx-oracle accumulator_to_A_reuse), so P goes
      // to the next mma without a shared-memory round trip and S's fp32 registers die here
      // (fp32: P stays in the S registers, each n-tile one tf32 A operand, tf32.h).
      // Dropout (kDropout): each 16 x 16 block's dropped elements are zeroed just before (after
      // the row sums: lse is unaffected; dropout.h: drawn here, never stored).
      const bool drop = kDropout && p.drop.enabled;
      PhiloxStream drop_stream{};
      if (drop) drop_stream = dropout_stream(p.drop, batch, p.hq, head);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int k = 0; k < kBlockN / 16; ++k) {
          float(&s0)[4] = rS[mt][2 * k];
          float(&s1)[4] = rS[mt][2 * k + 1];
          if (drop) drop_block(drop_stream, m0 + warp_row0 + 16 * mt, n0 + 16 * k, lane, s0, s1);
          if constexpr (!Kt::kTf32) {
            rP[mt][k][0] = pack2<T>(s0[0], s0[1]);
            rP[mt][k][1] = pack2<T>(s0[2], s0[3]);
            rP[mt][k][2] = pack2<T>(s1[0], s1[1]);
            rP[mt][k][3] = pack2<T>(s1[2], s1[3]);
          }
        }
    }

    cp_async_wait<0>();
    kv_stage.land();
    __syncthreads();  // V_j visible to all; every warp is done reading K_j
    if (next_j >= 0) load_key_tile(next_j);  // every warp is done reading the bias of tile j too
    cp_async_commit();  // K_{j+1} lands while O += P V_j computes

    if (!rows_live) return;
    if constexpr (Kt::kTf32) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {  // 8 keys per k-step
        Operand<float, 4> rPt[kMTiles];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) rPt[mt] = p_operand_tf32<kX3>(rS[mt][nt]);
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          uint32_t raw[2];  // B: 8 keys x 8 head-dim columns of V
          load_b_frag_kn_tf32<KVLayout>(raw, sV, 8 * nt, 8 * dt, lane);
          const Operand<float, 2> rV = operand<float, kX3>(raw);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) mma<float, kX3>(rO[mt][dt], rPt[mt], rV, rO[mt][dt]);
        }
      }
    } else {
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
    }
  };

  auto key_tiles = [&](auto x3_tag) {
    for (int j = u0; j < u1; ++j) key_tile(j, j + 1 < u1 ? j + 1 : first_masked, std::false_type{}, x3_tag);
    for (int j = first_masked; j >= 0;) {
      int next_j = j + 1 == u0 ? u1 : j + 1;  // skip the unmasked middle
      if (next_j >= j_end) next_j = -1;
      key_tile(j, next_j, std::true_type{}, x3_tag);
      j = next_j;
    }
  };
  if constexpr (Kt::kTf32) {  // the precision: one branch around the loop (tf32.h)
    if (p.tf32x3) key_tiles(std::true_type{});
    else key_tiles(std::false_type{});
  } else {
    key_tiles(std::false_type{});
  }

  // After the walk the modifier variant's kernels (the KV cache's among them) read the
  // sequence's scalars again (seqlen.h) rather than hold them through it: otherwise their packed
  // kernels spilled 8 bytes at head dims 64 and 128 (sm_80) and the KV cache's 8 to 12 at 256 in
  // the compact configuration (sm_80/86; ptxas -v). The other variants keep theirs (reading
  // again spilled 168 bytes in the packed band forward at head dim 128, sm_80).
  constexpr bool kAgain = kVarlen && (kCache || kMod);
  const auto& pe = narrowed_again<kAgain, kVarlen, kCache>(p, params, batch);
  if constexpr (kAgain) gO = o_rows(pe), gLse = lse_rows(pe);
  if (kCache && pe.cache.num_splits > 1) {  // a split's rows, normalised by its own sum, for the merge
    const int split = blockIdx.x % pe.cache.num_splits;
    cp_async_wait<0>();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      float lse[2];
      softmax[mt].finalize(rO[mt], lse);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + warp_row0 + 16 * mt + lane / 4 + 8 * h;
        if (row >= pe.nq) continue;
        if (lane % 4 == 0) st_global(partial_lse(pe, split, batch, head, row), lse[h]);
        float* gOp = partial_out_row(pe, split, batch, head, row);
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          const int col = 8 * dt + 2 * (lane % 4);
          if (col < pe.d) st_global(reinterpret_cast<float2*>(gOp + col), make_float2(rO[mt][dt][2 * h], rO[mt][dt][2 * h + 1]));
        }
      }
    }
    return;
  }
  // Stage this warp's rows of O in its own rows of sQ (only this warp ever read them), then
  // write them out 16 bytes per lane. The barrier covers blocks that ran no key tile, whose Q
  // copies by other threads may still be landing in these rows.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int r0 = warp_row0 + 16 * mt;
    float lse[2];  // rows g and g + 8
    softmax[mt].finalize(rO[mt], lse, kDropout ? pe.drop.scale : 1.0f);  // kept values / (1 - p)
    const int row_g = m0 + r0 + lane / 4;
    if (lane % 4 == 0) {
      if (row_g < pe.nq) st_global(&gLse[row_g], lse[0]);
      if (row_g + 8 < pe.nq) st_global(&gLse[row_g + 8], lse[1]);
    }
    stage_accumulators<QLayout, T>(sQ, rO[mt], r0, 0, 1.0f, lane);
    __syncwarp();
    store_warp_rows<QLayout>(gO, pe.o.row_stride * kUnits, sQ, r0, m0 + r0, pe.nq, d_units, lane);
  }
}

}  // namespace flash_cuda
