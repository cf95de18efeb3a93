/* FlashAttention-2 backward kernel (Dao, 2023, Algorithm 2), with recomputation.
 *
 * Grid (key tile j, kv head, batch); warp grids per head dim in BwdTraits. K_j and V_j stay in
 * shared memory; dK_j and dV_j accumulate in fp32 registers over every query tile i of every
 * query head of the kv group (GQA: summed in registers, K/V never repeated). Per (head, i):
 *   S^T  = K_j Q_i^T                P^T = exp2(S^T scale log2e - lse2_i)   (recomputed)
 *   dP^T = V_j dO_i^T               dS^T = P^T * (dP^T - D_i)
 *   dV  += P^T dO_i                 dK  += dS^T Q_i
 *   dQ_i += dS K_j                  atomically into the fp32 accumulator (kAtomicDq), or not
 *                                   at all: the deterministic dQ pass computes it instead.
 * All five products run on mma.m16n8k16. P^T and dS^T reach dV and dK from registers
 * (kPInRegs) or through shared memory; dS^T reaches dQ through shared memory. Q_i and dO_i are
 * double-buffered (cp.async) where shared memory allows; each lane loads the lse_i and D_i of
 * its own S^T columns from global memory (kStatsFromGlobal; packed batches, dropout, fp32 and
 * head dim 256 copy them into the stage with Q_i). kBand (causal, sliding
 * window): only the query tiles whose rows see some key of tile j are visited. kMod (softcap,
 * ALiBi, bias): P^T is computed from the modified scores, dS^T' = P^T (dP^T - D) is the bias
 * gradient (stored when asked for) and dS^T = dS^T' times the softcap's derivative. Dropout
 * (the kDropout kernels, dropout.h; keep mask Z, regenerated in registers): dV += (Z P)^T dO (times
 * 1 / (1 - p) at the end) and dS^T' = P^T (Z dP^T / (1 - p) - D).
 * dK = scale * accumulator (the softmax scale of S).
 * fp32 inputs (tf32.h): the products on tf32 mma (p.tf32x3: 3xTF32), P^T and dS^T kept in fp32
 * and fed to dV and dK from the accumulators, dQ from the deterministic pass (never atomics:
 * traits.h); above head dim 128, kDSplit blocks per key tile share dV and dK's columns.
 * sm_75 (fp16; device.h): each m16n8k16 is two m16n8k8 (ptx.h); Q_i and dO_i reach shared
 * memory through registers (copy.h's TileStage: loaded at the step's start, stored after the
 * next step's wait) where they fit, else copied at once where the cp.async would be issued.
 */
#pragma once
#include <type_traits>

#include "copy.h"
#include "dropout.h"
#include "params.h"
#include "seqlen.h"
#include "traits.h"

namespace flash_cuda {

// The A fragment (16 rows x 16 k-columns, k-step kk) from the 16-bit pairs of mma C tiles of
// the same 16 rows: n-tiles 2 kk and 2 kk + 1 hold exactly the pairs a0..a3 need (rows g and
// g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9).
template <int kNTiles>
FC_DEVICE void a_frag_from_pairs(uint32_t (&rA)[4], const uint32_t (&rPairs)[kNTiles][2], int kk) {
  rA[0] = rPairs[2 * kk][0];
  rA[1] = rPairs[2 * kk][1];
  rA[2] = rPairs[2 * kk + 1][0];
  rA[3] = rPairs[2 * kk + 1][1];
}

template <class Kt, bool kBand, bool kMod, bool kAtomicDq, bool kDropout, bool kVarlen>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm) flash_bwd_kernel(const BwdParams params) {
  if (!kernel_arch_matches<Kt::kSm75>()) {  // (ptx.h)
    __trap();
    return;
  }
  using T = typename Kt::T;
  using U = typename Kt::Unit;  // shared tiles and the tile copies count 16-bit units (fp32: 2 per value)
  constexpr int kUnits = Kt::kUnits;
  constexpr bool kF32 = Kt::kTf32;
  static_assert(!kF32 || !kAtomicDq, "fp32: dQ from the deterministic pass");
  using QLayout = typename Kt::QLayout;
  using KVLayout = typename Kt::KVLayout;
  using PLayout = typename Kt::PLayout;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kThreads = Kt::kThreads, kStages = Kt::kStages, kWarps = Kt::kWarps;
  constexpr bool kPInRegs = Kt::kPInRegs;
  // kMod computes P^T, dS^T' and dS^T of an element together (it needs the cap's derivative):
  // both products first, then one elementwise pass.
  constexpr bool kRoundPFirst = Kt::kRoundPFirst;
  // lse2 and D of a step's query tile: each lane loads its S^T columns' from global memory (L2),
  // as FlashAttention-2 does, rather than from a cp.async copy in the stage, which the 8 row
  // groups of a warp re-read (8 times the shared-memory bytes, on the pipe that bounds this
  // kernel in the static model). Not in the packed-batch, dropout or fp32 kernels nor at head
  // dim 256, where the loads' registers made ptxas spill, or spill more (ptxas -v, bytes of
  // spill stores + loads: packed at 128, sm_80, 20; band with dropout at 128, sm_90, 8; dense at
  // 256, sm_80, 44; the compact 256's packed ones, sm_86, 8; fp32 at 128, sm_80, 356 -> 404);
  // the stage keeps room for the copy either way. The emulator's source executor runs the
  // packed-batch kernel for dense batches too (launch.h with_varlen); its packed kernel takes
  // the dense kernels' way, so that both ways run emulated: the loads in every launch without
  // dropout below 256 (fp16/bf16), the copy in the dropout, fp32 and head dim 256 kernels.
  constexpr bool kStatsFromGlobal = (!kVarlen || FC_HOST_BUILD) && !kDropout && !Kt::kTf32 && kHeadDim != 256;
  static_assert(Kt::kMod == kMod, "traits of this variant");
  using Bias = typename Kt::Bias;
  constexpr int kSMT = Kt::kSdpRows / 16, kSNT = Kt::kSdpCols / 8;  // S^T, dP^T warp tile in mma tiles
  constexpr int kKvMT = Kt::kKvRows / 16, kKvNT = Kt::kKvCols / 8;  // dV, dK warp tile
  constexpr int kQMT = Kt::kDqRows / 16, kQNT = Kt::kDqCols / 8;    // dQ warp tile

  // kDSplit blocks per key tile: this one accumulates dV, dK columns [d_begin, d_begin + kHeadDim / kDSplit)
  const int n_block = blockIdx.x / Kt::kDSplit, kv_head = blockIdx.y, batch = blockIdx.z;
  const int d_begin = (blockIdx.x % Kt::kDSplit) * (kHeadDim / Kt::kDSplit);
  const BwdParams& p = for_sequence<kVarlen, Kt::kVolatileBoundaries>(params, batch);  // packed batches: this block's sequence
  const int n0 = n_block * kBlockN;
  if (kVarlen && n0 >= p.nk) return;  // past a packed sequence's end
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma accumulator row group and column pair
  // This warp's origin in each grid: keys x queries, keys x head dim, queries x head dim.
  const int sdp_key0 = (warp % Kt::kSdpWarpsN) * Kt::kSdpRows, sdp_q0 = (warp / Kt::kSdpWarpsN) * Kt::kSdpCols;
  const int kv_key0 = (warp % Kt::kKvWarpsN) * Kt::kKvRows, kv_d0 = d_begin + (warp / Kt::kKvWarpsN) * Kt::kKvCols;
  const int dq_q0 = (warp % Kt::kDqWarpsM) * Kt::kDqRows, dq_d0 = (warp / Kt::kDqWarpsM) * Kt::kDqCols;

  U* sK = dynamic_smem<U>();                             // [kBlockN][kHeadDim]
  U* sV = sK + KVLayout::kElems;                         // [kBlockN][kHeadDim]
  U* sdS = sV + KVLayout::kElems;                        // [kBlockN][kBlockM]: dS^T, 16-bit (fp32: none)
  U* sP = kPInRegs ? nullptr : sdS + PLayout::kElems;    // [kBlockN][kBlockM]: P^T, 16-bit
  char* stage_base = reinterpret_cast<char*>(sdS + Kt::kPTiles * PLayout::kElems);
  auto sQ = [&](int s) { return reinterpret_cast<U*>(stage_base + s * Kt::kStageBytes); };  // [kBlockM][kHeadDim]
  auto sdO = [&](int s) { return sQ(s) + QLayout::kElems; };                                 // [kBlockM][kHeadDim]
  auto sLse2 = [&](int s) { return reinterpret_cast<float*>(sdO(s) + QLayout::kElems); };   // [kBlockM]
  auto sDi = [&](int s) { return sLse2(s) + kBlockM; };                                     // [kBlockM]
  auto sBias = [&](int s) { return sDi(s) + kBlockM; };  // kMod: [kBlockM][kBlockN], queries x keys

  const int group = p.hq / p.hkv;
  // + stats_offset: this lane's first S^T column's lse2 (kStatsFromGlobal)
  const float* g_stats_lane = kStatsFromGlobal ? p.row_stats + sdp_q0 + 2 * t : nullptr;
  const int m_tiles = (p.nq + kBlockM - 1) / kBlockM;
  // Query tiles [i0, i_end) have rows that see some key of this tile (kBand); of those, [u0, u1)
  // see all of its keys, which lie inside the sequence: they need no mask.
  const int key_end = min(n0 + kBlockN, p.nk);
  // (Without a band: all tiles masked when this key tile crosses the sequence end, else none.)
  int i0 = 0, i_end = m_tiles, u0 = n0 + kBlockN > p.nk ? m_tiles : 0, u1 = m_tiles;
  if (kBand) {
    i0 = int(p.mask.row_begin(n0, p.nq)) / kBlockM;
    i_end = max(i0, (int(p.mask.row_end(key_end, p.nq)) + kBlockM - 1) / kBlockM);
    int64_t b0, b1;
    p.mask.unmasked_row_tiles(n0, n0 + kBlockN, kBlockM, m_tiles, &b0, &b1);
    if (n0 + kBlockN > p.nk) b0 = b1 = i0;
    u0 = min(max(int(b0), i0), i_end), u1 = min(max(int(b1), u0), i_end);
  }
  const int total = group * (i_end - i0);

  // Q, dO, lse2 and D of query tile m0 of query head `head` into stage s. The walk (below) visits
  // the query tiles i0.. of every query head of the kv group; step it prefetches step it + 1's.
  // (sm_75: Q and dO landed by q_stage / do_stage after the step's wait, traits.h kQdoInRegs)
  TileStage<QLayout, kThreads, U, Kt::kQdoInRegs> q_stage, do_stage;
  auto load_query_tile = [&](int head, int m0, int s) {
    const int64_t stats = p.template stats_offset<kVarlen>(batch, head);
    q_stage.load(sQ(s), units<U>(head_ptr<const T>(p.q, batch, head, q_row0<kVarlen>(p))), p.q.row_stride * kUnits, m0,
                 p.nq, p.d * kUnits);
    do_stage.load(sdO(s), units<U>(head_ptr<const T>(p.dout, batch, head, q_row0<kVarlen>(p))),
                  p.dout.row_stride * kUnits, m0, p.nq, p.d * kUnits);
    // lse2 and D rows [m0, m0 + kBlockM) (sDi follows sLse2): kBlockM / 4 chunks each, in
    // bounds (padded stats)
    constexpr int kStatChunks = kBlockM / 4;
    if (!kStatsFromGlobal && threadIdx.x < 2 * kStatChunks) {
      const int row = threadIdx.x / kStatChunks, chunk = threadIdx.x % kStatChunks;
      cp_async_cg16(sLse2(s) + 4 * threadIdx.x, p.row_stats + stats + row * p.template scratch_slice_rows<kVarlen>() + m0 + 4 * chunk,
                    16);
    }
    if (kMod && p.mod.bias)
      Bias::template load<kThreads>(sBias(s), p.mod.bias_head(batch, head), p.mod.bias_stride[2], m0, n0, p.nq, p.nk);
  };

  load_tile<KVLayout, kThreads>(sK, units<U>(head_ptr<const T>(p.k, batch, kv_head, k_row0<kVarlen>(p))),
                                p.k.row_stride * kUnits, n0, p.nk, p.d * kUnits);
  load_tile<KVLayout, kThreads>(sV, units<U>(head_ptr<const T>(p.v, batch, kv_head, k_row0<kVarlen>(p))),
                                p.v.row_stride * kUnits, n0, p.nk, p.d * kUnits);
  const int first_masked = i0 < u0 ? i0 : u1;  // the walk's first tile (masked ones first)
  if (total > 0) load_query_tile(kv_head * group, (first_masked < i_end ? first_masked : u0) * kBlockM, 0);
  cp_async_commit();

  float rdK[kKvMT][kKvNT][4] = {};  // keys kv_key0.. x columns kv_d0.. of dK_j, fp32
  float rdV[kKvMT][kKvNT][4] = {};  // the same of dV_j

  // One step of the walk: query tile m0 of query head `head`, step number it, prefetching the
  // next step's tile (next_head, next_m0); kMask: some key of this tile is past the sequence
  // end or above the diagonal for some of its rows.
  // kX3: fp32 products in 3xTF32.
  auto step = [&](const int it, const int head, const int m0, const int next_head, const int next_m0, auto mask_tag,
                  auto x3_tag) {
    constexpr bool kMask = decltype(mask_tag)::value, kX3 = decltype(x3_tag)::value;
    const int s = kStages == 2 ? it % 2 : 0;
    cp_async_wait<0>();
    q_stage.land();
    do_stage.land();
    __syncthreads();  // tile it visible to all; every warp is done with tile it - 1 (its stage, sP, sdS)
    if (kStages == 2) {
      if (it + 1 < total) load_query_tile(next_head, next_m0, 1 - s);  // lands while this tile computes
      cp_async_commit();
    }
    const U* sQs = sQ(s);
    const U* sdOs = sdO(s);
    [[maybe_unused]] const float* sLse2Stage = sLse2(s);  // [kBlockM] (!kStatsFromGlobal)
    [[maybe_unused]] const float* sDiStage = sDi(s);      // [kBlockM]

    // S^T = K Q^T, then dP^T = V dO^T: keys sdp_key0.. x queries sdp_q0.. of this warp.
    auto kv_times_q = [&](float(&rC)[kSMT][kSNT][4], const U* sA, const U* sB) {  // C += A B^T, A [key][d], B [query][d]
#pragma unroll(kMask || kMod || !kAtomicDq ? Kt::kSdpUnrollMasked : Kt::kSdpUnroll)
      for (int k0 = 0; k0 < kHeadDim * kUnits; k0 += 16) {  // 16 units: 16 values, or 8 fp32 ones
        uint32_t rA[kSMT][4];  // 16 keys x 16 head-dim units per m-tile
#pragma unroll
        for (int mt = 0; mt < kSMT; ++mt) load_a_frag<KVLayout>(rA[mt], sA, sdp_key0 + 16 * mt, k0, lane);
#pragma unroll
        for (int nt = 0; nt < kSNT; nt += 2) {
          uint32_t rB[4];  // head-dim k0.. x 16 queries, from [query][d] storage
          load_b_frags_nk<QLayout>(rB, sB, sdp_q0 + nt * 8, k0, lane);
#pragma unroll
          for (int mt = 0; mt < kSMT; ++mt) {  // (fp32: the roundings of B are common subexpressions)
            mma<T, kX3>(rC[mt][nt], operand<T, kX3>(rA[mt]), operand<T, kX3>({rB[0], rB[1]}), rC[mt][nt]);
            mma<T, kX3>(rC[mt][nt + 1], operand<T, kX3>(rA[mt]), operand<T, kX3>({rB[2], rB[3]}), rC[mt][nt + 1]);
          }
        }
      }
    };
    // P^T = exp2(S^T scale log2e - lse2), 0 where masked; dS^T = P^T (dP^T - D) in fp32; both
    // rounded to 16-bit pairs (rP, rdS), the A operands of dV = P^T dO and dK = dS^T Q.
    // kRoundPFirst: P^T is rounded before dP^T is computed, and dS^T uses the rounded P^T that
    // dV sees (widened to fp32 for the product); holding the pairs (half the registers of fp32
    // values) through the dP^T product is what lets it unroll without spilling where the
    // accumulators leave least room.
    // key n0 + key_local is hidden from row m0 + q_local iff it is past the end or
    // key_local - q_local is outside [lo, hi] (the band, relative to this tile): 32-bit compares
    const int key_lim = p.nk - n0;
    const int hi = kBand ? p.mask.hi_diag(m0, n0) : 0, lo = kBand ? p.mask.lo_diag(m0, n0) : 0;
    auto key_of = [&](int mt, int i) { return sdp_key0 + 16 * mt + g + 8 * (i / 2); };  // element i of C tile (mt, nt)
    auto query_of = [&](int nt, int i) { return sdp_q0 + nt * 8 + 2 * t + i % 2; };
    auto hidden = [&](int mt, int nt, int i) {
      const int key_local = key_of(mt, i), d = key_local - query_of(nt, i);
      return key_local >= key_lim || (kBand && ((p.mask.has_hi() && d > hi) || (p.mask.has_lo() && d < lo)));
    };
    auto probability = [&](float s_acc, float lse2_q, int mt, int nt, int i) {
      const float pe = ex2_approx(s_acc * p.scale_log2 - lse2_q);
      return kMask && hidden(mt, nt, i) ? 0.0f : pe;
    };
    // lse2 and D of this lane's S^T columns (queries m0 + query_of(nt, 0..1)): from the
    // preprocess's scratch (padded to whole row tiles: in bounds past nq), or the stage's copy
    [[maybe_unused]] const float* gLse2 =
        kStatsFromGlobal ? g_stats_lane + p.template stats_offset<kVarlen>(batch, head) + m0 : nullptr;
    [[maybe_unused]] const float* gDi = kStatsFromGlobal ? gLse2 + p.template scratch_slice_rows<kVarlen>() : nullptr;
    auto lse2_of = [&](int nt) {
      if constexpr (kStatsFromGlobal) return ld_global(reinterpret_cast<const float2*>(gLse2 + nt * 8));
      else return ld_shared(reinterpret_cast<const float2*>(sLse2Stage + sdp_q0 + nt * 8 + 2 * t));
    };
    auto di_of = [&](int nt) {
      if constexpr (kStatsFromGlobal) return ld_global(reinterpret_cast<const float2*>(gDi + nt * 8));
      else return ld_shared(reinterpret_cast<const float2*>(sDiStage + sdp_q0 + nt * 8 + 2 * t));
    };
    // 16-bit inputs: the pairs of each C tile, (row g: elements 0, 1), (row g + 8: 2, 3)
    [[maybe_unused]] uint32_t rP[kSMT][kSNT][2], rdS[kSMT][kSNT][2];
    float rS[kSMT][kSNT][4] = {}, rdP[kSMT][kSNT][4] = {};  // fp32; rS becomes P^T in place
    kv_times_q(rS, sK, sQs);
    if constexpr (!kRoundPFirst) kv_times_q(rdP, sV, sdOs);
    if constexpr (kMod) {
      // Per element: s = modified(scale S^T), P^T = exp2((s - lse) log2(e)) (the difference first,
      // as the forward; the row stats hold the lse itself here), dS^T' = P^T (dP^T - D) (the
      // bias gradient), dS^T = dS^T' d(capped)/ds. The bias comes from the stage's tile; the
      // gradient goes to the kernels' transposed dbias ([key][query], ScoreMod::dbias): a C
      // tile's element pair is two adjacent queries of one key, one 8-byte store, and every
      // element of (b, h) is computed by one key tile's block (where kDSplit = 2, both of its
      // head-dim halves' blocks compute it and the first stores it): plain stores, written only
      // inside [0, nk) x [0, nq) (the pair's second query may be padding: its dS^T' is 0).
      const float slope = p.mod.slope(batch, head);
      const float* sBiasS = sBias(s);
      const bool has_bias = p.mod.bias != nullptr, bias_row_broadcast = p.mod.bias_stride[2] == 0;
      float* gdBias = p.mod.dbias && d_begin == 0
                          ? p.mod.dbias + ((int64_t(batch) * p.hq + head) * p.nk + n0 + key_of(0, 0)) * p.mod.dbias_stride +
                                m0 + query_of(0, 0)
                          : nullptr;  // this lane's (key, query) of C tile (0, 0)
      const int offset_local = n0 - m0 - int(p.mask.offset);  // ALiBi: d = key_local - q_local + this
      KeepBits<kSMT, kSNT> keep;  // dropout's keep mask of this warp's S^T (all kept without)
      if (kDropout && p.drop.enabled) keep.generate_key_rows(dropout_stream(p.drop, batch, p.hq, head), n0 + sdp_key0, m0 + sdp_q0, lane);
      else keep.keep_all();
#pragma unroll
      for (int mt = 0; mt < kSMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key_local = key_of(mt, 2 * h);
          float* gdBiasRow = gdBias ? gdBias + int64_t(16 * mt + 8 * h) * p.mod.dbias_stride : nullptr;
#pragma unroll
          for (int nt = 0; nt < kSNT; ++nt) {
            const float2 l = lse2_of(nt), d = di_of(nt);
            float pe[2], dsp[2], ds[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 2 * h + e, q_local = query_of(nt, i);
              const float bias = has_bias ? Bias::at(sBiasS, bias_row_broadcast, q_local, key_local) : 0.0f;
              float dcap;
              const float sm = modify_score<float, Kt::kTf32>(rS[mt][nt][i] * p.scale, p.mod.softcap, slope,
                                                   key_local - q_local + offset_local, bias, &dcap);
              pe[e] = ex2_approx((sm - (e ? l.y : l.x)) * 1.4426950408889634f);  // (l: the lse itself here)
              if (kMask && hidden(mt, nt, i)) pe[e] = 0.0f;
              const bool kept = keep(mt, nt, i);
              dsp[e] = pe[e] * ((kept ? rdP[mt][nt][i] * p.drop.scale : 0.0f) - (e ? d.y : d.x));
              ds[e] = dsp[e] * dcap;
              if (!kept) pe[e] = 0.0f;  // dV sees the dropped P
            }
            if (gdBiasRow && n0 + key_local < p.nk && m0 + query_of(nt, 2 * h) < p.nq)
              st_global(reinterpret_cast<float2*>(gdBiasRow + nt * 8), make_float2(dsp[0], dsp[1]));
            if constexpr (kF32) {  // P^T and dS^T stay fp32, in the accumulators
              rS[mt][nt][2 * h] = pe[0], rS[mt][nt][2 * h + 1] = pe[1];
              rdP[mt][nt][2 * h] = ds[0], rdP[mt][nt][2 * h + 1] = ds[1];
            } else {
              rP[mt][nt][h] = pack2<T>(pe[0], pe[1]);
              rdS[mt][nt][h] = pack2<T>(ds[0], ds[1]);
            }
          }
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < kSNT; ++nt) {
        const float2 l = lse2_of(nt);
#pragma unroll
        for (int mt = 0; mt < kSMT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) rS[mt][nt][i] = probability(rS[mt][nt][i], i % 2 ? l.y : l.x, mt, nt, i);
        if constexpr (!kF32) {
#pragma unroll
          for (int mt = 0; mt < kSMT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) rP[mt][nt][h] = pack2<T>(rS[mt][nt][2 * h], rS[mt][nt][2 * h + 1]);
        }
      }
      if constexpr (kRoundPFirst) kv_times_q(rdP, sV, sdOs);
      // dropout (kDropout kernels): dS^T = P^T (Z dP^T / (1 - p) - D) from the undropped P^T, then the
      // pairs dV sees are dropped (16-bit halves cleared)
      const bool drop = kDropout && p.drop.enabled;
      KeepBits<kSMT, kSNT> keep;
      if (drop) keep.generate_key_rows(dropout_stream(p.drop, batch, p.hq, head), n0 + sdp_key0, m0 + sdp_q0, lane);
      auto dropped_dp = [&](int mt, int nt, int i) {
        return !drop ? rdP[mt][nt][i] : (keep(mt, nt, i) ? rdP[mt][nt][i] * p.drop.scale : 0.0f);
      };
#pragma unroll
      for (int nt = 0; nt < kSNT; ++nt) {
        const float2 d = di_of(nt);
#pragma unroll
        for (int mt = 0; mt < kSMT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float ds0 = dropped_dp(mt, nt, 2 * h) - d.x, ds1 = dropped_dp(mt, nt, 2 * h + 1) - d.y;  // dP^T - D
            if constexpr (kF32) {  // dS^T in fp32, in place of dP^T
              rdP[mt][nt][2 * h] = rS[mt][nt][2 * h] * ds0, rdP[mt][nt][2 * h + 1] = rS[mt][nt][2 * h + 1] * ds1;
            } else if constexpr (kRoundPFirst) {
              // the rounded P^T (exact in fp32) times dP^T - D in fp32, rounded once: a 16-bit
              // multiply of the pair with dP^T - D rounded first (mul.f16x2, until 2026-12-07) added
              // two roundings, 3.7x plain fp16 torch's dK error on a soak's draw (the rule: 3x)
              float p0, p1;
              unpack2<T>(rP[mt][nt][h], p0, p1);
              rdS[mt][nt][h] = pack2<T>(p0 * ds0, p1 * ds1);
            } else {
              rdS[mt][nt][h] = pack2<T>(rS[mt][nt][2 * h] * ds0, rS[mt][nt][2 * h + 1] * ds1);
            }
          }
      }
      if (drop) {
#pragma unroll
        for (int mt = 0; mt < kSMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < kSNT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if constexpr (kF32) {
                if (!keep(mt, nt, 2 * h)) rS[mt][nt][2 * h] = 0.0f;
                if (!keep(mt, nt, 2 * h + 1)) rS[mt][nt][2 * h + 1] = 0.0f;
              } else {
                rP[mt][nt][h] &= (keep(mt, nt, 2 * h) ? 0xFFFFu : 0u) | (keep(mt, nt, 2 * h + 1) ? 0xFFFF0000u : 0u);
              }
            }
      }
    }

    // dS^T (and P^T unless it stays in registers) to shared memory, in the [key][query] layout
    // the products after the barrier read.
    if constexpr (!kF32) {
      const int p_lane_off = PLayout::offset(sdp_key0 + g, sdp_q0 + 2 * t);
#pragma unroll
      for (int mt = 0; mt < kSMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kSNT; ++nt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int off = PLayout::offset_from(p_lane_off, 16 * mt + 8 * half, 8 * nt);
            if (kAtomicDq || !kPInRegs) st_shared(reinterpret_cast<uint32_t*>(sdS + off), rdS[mt][nt][half]);
            if (!kPInRegs) st_shared(reinterpret_cast<uint32_t*>(sP + off), rP[mt][nt][half]);
          }
    }

    // dV += P^T dO and dK += dS^T Q: keys kv_key0.. x columns kv_d0.. of this warp.
    if constexpr (kF32) {
      // The warp's S^T rows are its dV/dK rows and its S^T columns all the step's queries: the
      // A operands are P^T and dS^T's fp32 accumulators, 8 queries per k-step (tf32.h: the
      // accumulators' key order, matched by the B rows), no barrier needed.
      auto acc_times_b = [&](float(&rC)[kKvMT][kKvNT][4], const float(&rAcc)[kSMT][kSNT][4], const U* sB) {
#pragma unroll
        for (int nt = 0; nt < kSNT; ++nt) {
          Operand<float, 4> rA[kKvMT];  // 16 keys x 8 queries per m-tile
#pragma unroll
          for (int mt = 0; mt < kKvMT; ++mt) rA[mt] = p_operand_tf32<kX3>(rAcc[mt][nt]);
#pragma unroll
          for (int dt = 0; dt < kKvNT; ++dt) {
            uint32_t raw[2];  // B: 8 queries x 8 head-dim columns, from [query][d]
            load_b_frag_kn_tf32<QLayout>(raw, sB, 8 * nt, kv_d0 + 8 * dt, lane);
            const Operand<float, 2> rB = operand<float, kX3>(raw);
#pragma unroll
            for (int mt = 0; mt < kKvMT; ++mt) mma<float, kX3>(rC[mt][dt], rA[mt], rB, rC[mt][dt]);
          }
        }
      };
      acc_times_b(rdV, rS, sdOs);
      acc_times_b(rdK, rdP, sQs);
    } else if constexpr (kPInRegs) {
      // The warp's S^T rows are its dV/dK rows and its S^T columns all the step's queries: the
      // A operands are the accumulators' 16-bit pairs, no barrier needed.
      auto acc_times_b = [&](float(&rC)[kKvMT][kKvNT][4], const uint32_t(&rPairs)[kSMT][kSNT][2], const T* sB) {
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          uint32_t rA[kKvMT][4];  // 16 keys x 16 queries per m-tile
#pragma unroll
          for (int mt = 0; mt < kKvMT; ++mt) a_frag_from_pairs(rA[mt], rPairs[mt], kk);
#pragma unroll
          for (int dt = 0; dt < kKvNT; dt += 2) {
            uint32_t rB[4];  // 16 queries x 16 head-dim columns, from [query][d] (.trans)
            load_b_frags_kn<QLayout>(rB, sB, 16 * kk, kv_d0 + dt * 8, lane);
#pragma unroll
            for (int mt = 0; mt < kKvMT; ++mt) {
              mma_m16n8k16<T>(rC[mt][dt], rA[mt], {rB[0], rB[1]}, rC[mt][dt]);
              mma_m16n8k16<T>(rC[mt][dt + 1], rA[mt], {rB[2], rB[3]}, rC[mt][dt + 1]);
            }
          }
        }
      };
      acc_times_b(rdV, rP, sdOs);
      acc_times_b(rdK, rdS, sQs);
      if (kAtomicDq) __syncthreads();  // dS^T of the whole tile visible to dQ
    } else {
      __syncthreads();  // P^T and dS^T of the whole tile visible
#pragma unroll
      for (int k0 = 0; k0 < kBlockM; k0 += 16) {
        uint32_t rP[kKvMT][4], rdS[kKvMT][4];  // A: 16 keys x 16 queries per m-tile
#pragma unroll
        for (int mt = 0; mt < kKvMT; ++mt) {
          load_a_frag<PLayout>(rP[mt], sP, kv_key0 + 16 * mt, k0, lane);
          load_a_frag<PLayout>(rdS[mt], sdS, kv_key0 + 16 * mt, k0, lane);
        }
#pragma unroll
        for (int dt = 0; dt < kKvNT; dt += 2) {
          uint32_t rdO[4], rQ[4];  // B: 16 queries x 16 head-dim columns, from [query][d] (.trans)
          load_b_frags_kn<QLayout>(rdO, sdOs, k0, kv_d0 + dt * 8, lane);
          load_b_frags_kn<QLayout>(rQ, sQs, k0, kv_d0 + dt * 8, lane);
#pragma unroll
          for (int mt = 0; mt < kKvMT; ++mt) {
            mma_m16n8k16<T>(rdV[mt][dt], rP[mt], {rdO[0], rdO[1]}, rdV[mt][dt]);
            mma_m16n8k16<T>(rdV[mt][dt + 1], rP[mt], {rdO[2], rdO[3]}, rdV[mt][dt + 1]);
            mma_m16n8k16<T>(rdK[mt][dt], rdS[mt], {rQ[0], rQ[1]}, rdK[mt][dt]);
            mma_m16n8k16<T>(rdK[mt][dt + 1], rdS[mt], {rQ[2], rQ[3]}, rdK[mt][dt + 1]);
          }
        }
      }
    }

    if constexpr (kAtomicDq) {
      // dQ_i += dS K_j: queries dq_q0.. x columns dq_d0.., added to the fp32 accumulator in
      // fragment order: element i of every lane is 128 contiguous bytes, one coalesced request.
      float rdQ[kQMT][kQNT][4] = {};
#pragma unroll(kMask || kMod ? Kt::kDqUnrollMasked : Kt::kDqUnroll)
      for (int k0 = 0; k0 < kBlockN; k0 += 16) {
        uint32_t rdS[kQMT][4];  // A: 16 queries x 16 keys per m-tile, from dS^T by ldmatrix.trans
#pragma unroll
        for (int mt = 0; mt < kQMT; ++mt) load_a_frag_trans<PLayout>(rdS[mt], sdS, dq_q0 + 16 * mt, k0, lane);
#pragma unroll
        for (int dt = 0; dt < kQNT; dt += 2) {
          uint32_t rK[4];  // B: 16 keys x 16 head-dim columns, from [key][d] (.trans)
          load_b_frags_kn<KVLayout>(rK, sK, k0, dq_d0 + dt * 8, lane);
#pragma unroll
          for (int mt = 0; mt < kQMT; ++mt) {
            mma_m16n8k16<T>(rdQ[mt][dt], rdS[mt], {rK[0], rK[1]}, rdQ[mt][dt]);
            mma_m16n8k16<T>(rdQ[mt][dt + 1], rdS[mt], {rK[2], rK[3]}, rdQ[mt][dt + 1]);
          }
        }
      }
      float* gAcc = p.dq_accum + Kt::template accum_offset<kVarlen>(p, batch, head, (m0 + dq_q0) / 16) + (dq_d0 / 8) * 128 + lane;
#pragma unroll
      for (int mt = 0; mt < kQMT; ++mt)
#pragma unroll
        for (int dt = 0; dt < kQNT; ++dt)
#pragma unroll
          for (int i = 0; i < 4; ++i)  // element (dt, i) of every lane of 16-row block mt
            red_add_global(gAcc + mt * Kt::kAccumTileFloats + (dt * 4 + i) * 32, rdQ[mt][dt][i]);
    }

    if (kStages == 1) {
      __syncthreads();  // every warp is done with Q_i and dO_i: refill the one buffer
      if (it + 1 < total) load_query_tile(next_head, next_m0, 0);
      cp_async_commit();
    }
  };

  // The walk in two phases: first the tiles that need the mask, [i0, u0) and [u1, i_end) of
  // every query head (at the band's edges; all of them when this key tile crosses the sequence
  // end), then the rest, [u0, u1) of every head: the steady state of a long walk, in a loop of
  // its own without any per-element predicate.
  const int head_begin = kv_head * group, masked_steps = group * ((u0 - i0) + (i_end - u1));
  auto walk = [&](auto x3_tag) {
    for (int it = 0, head = head_begin, i = first_masked; it < masked_steps; ++it) {
      int next_head = head, next_i = i + 1;
      if (kBand && next_i == u0) next_i = u1;  // skip the unmasked middle (none without a band)
      if (next_i >= (kBand ? i_end : u0)) next_i = first_masked, ++next_head;
      if (it + 1 == masked_steps) next_head = head_begin, next_i = u0;  // the unmasked phase's first
      step(it, head, i * kBlockM, next_head, next_i * kBlockM, std::true_type{}, x3_tag);
      head = next_head, i = next_i;
    }
    for (int it = masked_steps, head = head_begin, i = u0; it < total; ++it) {
      int next_head = head, next_i = i + 1;
      if (next_i == u1) next_i = u0, ++next_head;
      step(it, head, i * kBlockM, next_head, next_i * kBlockM, std::false_type{}, x3_tag);
      head = next_head, i = next_i;
    }
  };
  if constexpr (kF32) {  // the precision: one branch around the walk (tf32.h)
    if (p.tf32x3) walk(std::true_type{});
    else walk(std::false_type{});
  } else {
    walk(std::false_type{});
  }

  // dK = scale * accumulator, dV as is: staged through sK / sV (free now), then written 16
  // rows per warp at a time, 16 bytes per lane.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < kKvMT; ++mt) {
    stage_accumulators<KVLayout, T>(sK, rdK[mt], kv_key0 + 16 * mt, kv_d0, p.scale, lane);
    stage_accumulators<KVLayout, T>(sV, rdV[mt], kv_key0 + 16 * mt, kv_d0, kDropout ? p.drop.scale : 1.0f, lane);
  }
  __syncthreads();
  const int k_row0 = first_key_row<kVarlen, Kt::kVolatileBoundaries>(params, batch);  // reloaded: nothing held through the walk
  U* gdK = units<U>(head_ptr<T>(p.dk, batch, kv_head, k_row0));
  U* gdV = units<U>(head_ptr<T>(p.dv, batch, kv_head, k_row0));
  // (kDSplit: this block's columns only)
  const int c_begin = d_begin * kUnits, c_end = (d_begin + kHeadDim / Kt::kDSplit) * kUnits;
  for (int r0 = 16 * warp; r0 < kBlockN; r0 += 16 * kWarps) {
    store_warp_rows<KVLayout>(gdK, p.dk.row_stride * kUnits, sK, r0, n0 + r0, p.nk, p.d * kUnits, lane, c_begin, c_end);
    store_warp_rows<KVLayout>(gdV, p.dv.row_stride * kUnits, sV, r0, n0 + r0, p.nk, p.d * kUnits, lane, c_begin, c_end);
  }
}

}  // namespace flash_cuda
