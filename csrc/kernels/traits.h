/* Compile-time configuration of the kernels per head dim: tile sizes, warp grids, shared
 * memory. Every number a kernel or launcher needs comes from here. */
#pragma once
#include <type_traits>

#include "bias_tile.h"
#include "device.h"
#include "host_device.h"
#include "layout.h"
#include "params.h"
#include "tf32.h"

namespace flash_cuda {

// Forward: a block owns a 128-row query tile and walks the key tiles. Head dims up to 128:
// 4 warps x two 16-row m-tiles each, so every K and V fragment a warp loads from shared memory
// feeds two mma (half the ldmatrix traffic of one m-tile per warp; FlashAttention-2's 128-row
// tiles do the same). Above 128 the O accumulator alone is kHeadDim / 2 registers per m-tile:
// 8 warps x one m-tile. kMod (the score-modifier variant) holds a few more live values per score
// (the modifiers' operands) and stages the bias tile in shared memory.
// Forward configurations: (16-row m-tiles per warp, warps, keys per tile).
template <int kMTiles_, int kWarps_, int kBlockN_>
struct FwdConfig {
  static constexpr int kMTiles = kMTiles_, kWarps = kWarps_, kBlockN = kBlockN_;
};

// Wide (sm_80's 163 KiB). Head dims up to 128: 4 warps x two 16-row m-tiles each, so every K
// and V fragment a warp loads from shared memory feeds two mma (half the ldmatrix traffic of
// one m-tile per warp; FlashAttention-2's 128-row tiles do the same). Above 128 the O
// accumulator alone is kHeadDim / 2 registers per m-tile: 8 warps x one m-tile. kMod (the
// score-modifier variant) holds a few more live values per score (the modifiers' operands) and
// stages the bias tile in shared memory: one m-tile above 64 (two spill even with 32-key
// tiles), and 32-key tiles with two m-tiles per warp (head dims up to 64), where the modifiers'
// operands (the bias pairs, tanh) for 2 x 64 scores per thread do not fit beside O and S
// without spilling (measured with ptxas -v), and at 256, where the bias tile of 64 keys would
// take the shared memory past 163 KiB.
template <int kHeadDim, bool kMod>
using FwdWideConfigFor =
    std::conditional_t<(kHeadDim <= 64 || (kHeadDim <= 128 && !kMod)), FwdConfig<2, 4, kMod ? 32 : 64>,
                       FwdConfig<1, 8, kMod && kHeadDim == 256 ? 32 : 64>>;
// Compact (99 KiB), where the wide one needs more: 32-key tiles (the 128-row query tile keeps
// every Q fragment's reuse; K, V and the bias tile halve), and at 256 with modifiers 4 warps
// of one m-tile (64 query rows: the Q tile alone is 64 KiB at 128 rows). FlashAttention-2's
// sm_86/89 forward likewise keeps 128-row tiles where they fit and drops to 64 at head dim 256.
template <int kHeadDim, bool kMod>
using FwdCompactConfigFor = std::conditional_t<(kMod && kHeadDim == 256), FwdConfig<1, 4, 32>,
                                               FwdConfig<FwdWideConfigFor<kHeadDim, kMod>::kMTiles,
                                                         FwdWideConfigFor<kHeadDim, kMod>::kWarps, 32>>;

// fp32 inputs (TF32 / 3xTF32, tf32.h): the tiles take twice the bytes, and one configuration
// per head dim fits 99 KiB, so every tensor-core GPU from sm_80 runs it: 4 warps of one m-tile
// (64 query rows) with 64 keys up to head dim 96 (a 64 x 128 block of K or V is 32 KiB), fewer
// keys above; at 256 with modifiers 2 warps (32 rows), where the bias tile would take a 64-row
// block past 99 KiB.
template <int kHeadDim, bool kMod>
using FwdTf32ConfigFor =
    std::conditional_t<(kHeadDim <= 96), FwdConfig<1, 4, 64>,
    std::conditional_t<(kHeadDim == 128), FwdConfig<1, 4, kMod ? 32 : 64>,
    std::conditional_t<(kHeadDim == 192), FwdConfig<1, 4, kMod ? 16 : 32>,
                       FwdConfig<1, kMod ? 2 : 4, 16>>>>;

// sm_75 (fp16, 64 KiB; device.h): the compact configuration where it fits (two m-tiles per
// warp), and 4 warps of one m-tile (64 query rows) with 32 keys with modifiers above 64 and at
// 192, 16 keys at 256 (a 64 x 256 Q tile is 32 KiB). The K and V tiles also pass through
// registers on their way to shared memory (copy.h's TileStage; FwdTraits::kKvInRegs): 32-key
// tiles keep that to 4 registers per 32 columns.
template <int kHeadDim, bool kMod>
using FwdSm75ConfigFor =
    std::conditional_t<(kHeadDim <= 64 || (kHeadDim <= 128 && !kMod)), FwdCompactConfigFor<kHeadDim, kMod>,
                       FwdConfig<1, 4, kHeadDim == 256 ? 16 : 32>>;

// Forward: a block owns a query tile and walks the key tiles; each warp owns 16 kMTiles query
// rows: no communication between warps in the main loop, and the 4-lane row reductions of the
// softmax stay inside a quad. Config_: a configuration of its own (the KV cache's, below) in
// place of the budget's.
template <class T_, int kHeadDim_, bool kMod_ = false, int kSmemKiB_ = kSmemKiBWide, class Config_ = void>
struct FwdTraits {
  using T = T_;  // __half, __nv_bfloat16 or float (tf32.h)
  using Unit = typename Elem<T>::Unit;  // the shared tiles' 16-bit units
  static constexpr bool kTf32 = Elem<T>::kTf32;
  static constexpr int kUnits = Elem<T>::kUnits;  // units per value
  static constexpr int kHeadDim = kHeadDim_;  // instantiated head dim (real d <= kHeadDim)
  static constexpr bool kMod = kMod_;
  static constexpr int kSmemKiB = kSmemKiB_;  // the shared-memory budget (device.h)
  static constexpr bool kSm75 = kSmemKiB == kSmemKiBSm75;  // sm_75's configuration and code
  using Config = std::conditional_t<!std::is_void<Config_>::value, Config_,
                 std::conditional_t<kTf32, FwdTf32ConfigFor<kHeadDim, kMod>,
                 std::conditional_t<kSm75, FwdSm75ConfigFor<kHeadDim, kMod>,
                 std::conditional_t<kSmemKiB == kSmemKiBWide, FwdWideConfigFor<kHeadDim, kMod>,
                                    FwdCompactConfigFor<kHeadDim, kMod>>>>>;
  static constexpr int kMTiles = Config::kMTiles, kWarps = Config::kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;
  static constexpr int kBlockN = Config::kBlockN;
  static constexpr int kNTiles = kBlockN / 8;   // S accumulator n-tiles per m-tile (16 x 8 each)
  static constexpr int kDTiles = kHeadDim / 8;  // O accumulator n-tiles per m-tile
  // Unroll of S = Q K^T's k loop: whole, except with two m-tiles at head dims 96 and 128 (160
  // and 192 accumulator registers), where whole unrolling makes ptxas hold every step's
  // ldmatrix addresses and spill; by 4 it needs none (measured: benchmarks/sass_compare.py).
  static constexpr int kQKUnroll = kMTiles == 2 && kHeadDim >= 96 ? 4 : kHeadDim / 16;
  // In the masked tiles (the band's edges, the sequence end) the mask's operands are live too: by 2.
  static constexpr int kQKUnrollMasked = kMTiles == 2 && kHeadDim >= 96 ? 2 : kQKUnroll;
  // The packed-batch kernels' masked tiles (the narrowed sequence's scalars live too): by 4 at
  // 256 (unrolled whole, the band kernels spilled 52 to 108 bytes at sm_80, sm_86 and sm_90, wide
  // and compact configurations; ptxas -v).
  static constexpr int kQKUnrollMaskedPacked = kHeadDim == 256 ? 4 : kQKUnrollMasked;

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims are instantiated in multiples of 32 up to 256");
  static_assert(kBlockN % 16 == 0, "S = Q K^T loads keys 16 at a time (two n-tiles per ldmatrix)");
  static_assert(kBlockM == 128 || kBlockM == 64 || (kTf32 && kBlockM == 32),
                "query tiles of 128 rows (64 where 99 KiB allow no more; 32 for fp32 at 256 with modifiers)");
  static_assert(kSmemKiB == kSmemKiBWide || kSmemKiB == kSmemKiBCompact || kSmemKiB == kSmemKiBSm75,
                "one of the budgets of device.h");
  static_assert(!kSm75 || std::is_same<T, __half>::value, "sm_75's tensor cores take fp16 (no bf16, no tf32)");
  // sm_75: the K and V tiles pass through registers while the math runs (copy.h's TileStage),
  // except at 256, where O's 128 accumulator registers leave no room (ptxas: 32 bytes of spills
  // with them, 0 without; without, a tile is copied at once where the cp.async would start).
  static constexpr bool kKvInRegs = kSm75 && kHeadDim < 256;
  // Registers per thread: O is kMTiles x 16 x kHeadDim fp32 over 32 lanes, S kMTiles x 16 x kBlockN.
  static_assert(kMTiles * (kHeadDim / 2 + kBlockN / 2) <= 192, "accumulators must leave room in 255 registers");

  // Blocks per SM the register allocation must allow (__launch_bounds__): 2 lets ptxas use up
  // to 255 registers per thread (4 warps) or 128 (8 warps x 2 would not fit: 1).
  static constexpr int kMinBlocksPerSm = kWarps == 4 ? 2 : 1;

  // Tiles in units (fp32: two per value, twice the columns)
  using QLayout = SmemLayout<kBlockM, kHeadDim * kUnits>;   // Q tile; reused to stage O
  using KVLayout = SmemLayout<kBlockN, kHeadDim * kUnits>;  // one K and one V tile
  using Bias = BiasTile<kBlockM, kBlockN, kBlockN + 8>;  // kMod: the bias of one key tile
  static constexpr size_t kSmemBytes =
      (QLayout::kElems + 2 * KVLayout::kElems) * sizeof(Unit) + (kMod ? Bias::kBytes : 0);
  static_assert(kSmemBytes <= kSmemKiB * 1024, "fits the budget's shared memory per block");
  static_assert(!kTf32 || kSmemBytes <= kSmemKiBCompact * 1024, "the fp32 configuration fits every sm_80+ GPU");
};

}  // namespace flash_cuda

namespace flash_cuda {

// Backward (FlashAttention-2 Algorithm 2): a block owns kBlockN keys of K and V (and their dK,
// dV accumulators) and walks the kBlockM-row query tiles of every query head of its kv group.
// Each of the three product families has its own warp grid, chosen per head dim so that every
// ldmatrix feeds as many mma as the registers allow (benchmarks/sass_compare.py measures it):
//   S^T = K Q^T, dP^T = V dO^T   kSdpWarpsN warps along keys x the rest along queries
//   dV += P^T dO, dK += dS^T Q   kKvWarpsN along keys x the rest along the head dim
//   dQ_i += dS K                 kDqWarpsM along queries x the rest along the head dim
// A warp's tile of each is (block extent / warps along it) in both directions, 16-row m-tiles
// by 8-column n-tiles. With kPInRegs (one warp spans all the step's queries in S^T and the whole
// head dim in dV/dK, over the same keys) P^T and dS^T are the A operands of dV and dK straight
// from the S^T and dP^T accumulators (the register layout of an mma C tile is that of an A
// fragment: FlashAttention-2's P V in the forward), and only dS^T goes through shared memory,
// for dQ. Otherwise both go through shared memory, as in FlashAttention-2's backward.
template <int kWarps_, int kBlockN_, int kBlockM_, int kSdpWarpsN_, int kKvWarpsN_, int kDqWarpsM_>
struct BwdConfig {
  static constexpr int kWarps = kWarps_, kBlockN = kBlockN_, kBlockM = kBlockM_;
  static constexpr int kSdpWarpsN = kSdpWarpsN_, kKvWarpsN = kKvWarpsN_, kDqWarpsM = kDqWarpsM_;
};

// Per head dim (mma per ldmatrix.x4 in parentheses, S/dP, dV/dK, dQ; torch's FlashAttention-2
// gets 2.7, 2, 2 at head dim 64, 2, 2.7, 2 at 128 and 1.3, 2.7, 2.7 at 256):
//   <= 64: 4 warps, 128 keys x 32 queries, each warp 32 keys: P^T in registers (2, 4, 1.3);
//          4 warps of up to 255 registers leave 2 blocks per SM (8 warps, as torch's 1 x 8)
//   96: 8 warps, 64 x 64, 16 x 32 S^T tiles, 16 keys x D/2 of dV/dK, 16 queries x D/2 of dQ
//          (1.3, 1.5, 1.5): 89 KiB of shared memory, inside the 99 KiB per block of sm_86/89
//          (128 keys, as at 128, would take 129 KiB)
//   128: 8 warps, 128 keys x 64 queries, 32 x 32 S^T tiles, 32 keys x D/2 of dV/dK (2, 2.7, 2)
//   192, 256: 8 warps, 64 x 64: 16 x 32 S^T tiles, 32 keys x D/4 of dV/dK and 32 queries x D/4
//          of dQ (1.3, 2.7, 2.7); the dK, dV accumulators (D/2 registers) leave no room for more
template <int kHeadDim>
using BwdConfigFor = std::conditional_t<(kHeadDim <= 64), BwdConfig<4, 128, 32, 4, 4, 2>,
                     std::conditional_t<(kHeadDim == 96), BwdConfig<8, 64, 64, 4, 4, 4>,
                     std::conditional_t<(kHeadDim == 128), BwdConfig<8, 128, 64, 4, 4, 2>,
                                        BwdConfig<8, 64, 64, 4, 2, 2>>>>;

// The score-modifier variant (kMod) computes P^T, dS^T' and dS^T of an element together, with
// S^T and dP^T both in fp32 and the modifiers' operands live (the bias, the bias gradient's
// address, tanh): it needs smaller accumulators than the dense configuration (measured with
// ptxas -v at sm_80 and sm_90: 0 spills):
//   32: head dim 96's shape, 8 warps, 64 x 64, 16 x 32 S^T tiles: 48 accumulator registers
//   64: 8 warps of 16 keys x 32 queries (P^T still in registers): 96
//   128: 64 keys x 64 queries, 16 x 32 S^T tiles and 16 keys x D/2 of dV/dK: 96
//   256: 32 keys x 64 queries, 16 x 16 S^T tiles and 16 keys x D/4 of dV/dK: 80
//   96, 192: the dense configuration (0 spills with kMod too)
template <int kHeadDim>
using BwdModConfigFor = std::conditional_t<(kHeadDim == 32), BwdConfig<8, 64, 64, 4, 4, 4>,
                        std::conditional_t<(kHeadDim == 64), BwdConfig<8, 128, 32, 8, 8, 2>,
                        std::conditional_t<(kHeadDim == 128), BwdConfig<8, 64, 64, 4, 4, 2>,
                        std::conditional_t<(kHeadDim == 256), BwdConfig<8, 32, 64, 2, 2, 2>, BwdConfigFor<kHeadDim>>>>>;

// Compact (99 KiB), where the wide configuration needs more (measured with ptxas -v at sm_86:
// 0 spills). One buffer of Q_i and dO_i in each (the next query tile's loads start after this
// one's last use), and:
//   96 with modifiers: the wide configuration
//   128: 64 keys x 64 queries, the modifier variant's shape (80.5 KiB; with modifiers 97.5)
//   192: 64 keys x 32 queries (a step's Q_i and dO_i are 24 KiB): 16 x 16 S^T tiles, 32 keys x
//        D/4 of dV/dK, 16 queries x D/4 of dQ (80.25 KiB; with modifiers 88.75)
//   256: 4 warps, 32 keys x 32 queries: 16 x 16 S^T tiles, 16 keys x D/2 of dV/dK and 16 queries
//        x D/2 of dQ (68.25 KiB; with modifiers 72.75); at 64 keys, or 64 queries, the K, V or
//        Q, dO tiles alone take 64 KiB
// (FlashAttention-2's sm_86/89 backward keeps V in registers to fit 64 x 64 at 192 and 64 x 32
// at 256; here the tiles shrink instead, which costs more Q and dO traffic per key.)
template <int kHeadDim, bool kMod>
using BwdCompactConfigFor =
    std::conditional_t<(kHeadDim == 128), BwdConfig<8, 64, 64, 4, 4, 2>,
    std::conditional_t<(kHeadDim == 192), BwdConfig<8, 64, 32, 4, 2, 2>,
    std::conditional_t<(kHeadDim == 256), BwdConfig<4, 32, 32, 2, 2, 2>,
                       std::conditional_t<kMod, BwdModConfigFor<kHeadDim>, BwdConfigFor<kHeadDim>>>>>;

// fp32 inputs (tf32.h): dV and dK in the main kernel with P^T and dS^T straight from the
// accumulators (kPInRegs: the warps split the keys only), dQ always from the deterministic pass
// (the transposed dS a dQ product in the main kernel needs cannot be loaded with ldmatrix.trans
// in fp32), one configuration per head dim within 99 KiB. Above 128 a warp cannot hold dK and dV
// for 16 keys x the whole head dim (2 x D / 2 registers): kDSplit blocks per key tile each
// accumulate half of the head dim (S^T and dP^T computed by both).
//   <= 64: 4 warps, 64 keys x 32 queries; 96, 128: 4 warps, 64 x 16; 192, 256: 2 warps, 32 x 16,
//   two blocks per key tile
template <int kHeadDim>
using BwdTf32ConfigFor = std::conditional_t<(kHeadDim <= 64), BwdConfig<4, 64, 32, 4, 4, 1>,
                         std::conditional_t<(kHeadDim <= 128), BwdConfig<4, 64, 16, 4, 4, 1>,
                                            BwdConfig<2, 32, 16, 2, 2, 1>>>;

// sm_75 (fp16, 64 KiB; measured with ptxas -v at sm_75: 0 spills in the dense-batch kernels):
//   32: the configurations above (they fit)
//   64: 4 warps, 64 keys x 32 queries, P^T in registers, 16 x 32 S^T tiles (36.5 KiB)
//   96, 128, 192: 4 warps, 32 x 32, 16 x 16 S^T tiles (40.5, 52.5, 52.25 KiB; the 64 x 32 of
//       64 spills 68 to 88 bytes at 96)
// At 256 the K, V, Q_i and dO_i tiles of 32 x 32 alone take 64 KiB: no configuration.
template <int kHeadDim, bool kMod>
using BwdSm75ConfigFor =
    std::conditional_t<(kHeadDim == 32), std::conditional_t<kMod, BwdModConfigFor<32>, BwdConfigFor<32>>,
    std::conditional_t<(kHeadDim == 64), BwdConfig<4, 64, 32, 4, 4, 2>, BwdConfig<4, 32, 32, 2, 2, 2>>>;

// The large budget (227 KiB: sm_90, sm_100) has a backward configuration of its own where the
// wide one leaves out what the extra 64 KiB pay for: at head dim 128 (16-bit, no score
// modifiers) the padded tiles (kPaddedTiles below), which the wide budget has no room for
// beside two Q_i/dO_i stages. Everywhere else the large budget runs the wide configuration.
template <class T, int kHeadDim, bool kMod>
constexpr bool kBwdLargeConfig = !Elem<T>::kTf32 && kHeadDim == 128 && !kMod;

template <class T_, int kHeadDim_, bool kMod_ = false, int kSmemKiB_ = kSmemKiBWide>
struct BwdTraits {
  using T = T_;
  using Unit = typename Elem<T>::Unit;  // the shared tiles' 16-bit units
  static constexpr bool kTf32 = Elem<T>::kTf32;
  static constexpr int kUnits = Elem<T>::kUnits;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kMod = kMod_;  // the score-modifier variant: a bias tile per step
  static constexpr int kSmemKiB = kSmemKiB_;  // the shared-memory budget (device.h)
  // fp32: one configuration within every sm_80+ GPU's shared memory
  static constexpr int kBudgetKiB = kTf32 ? kSmemKiBCompact : kSmemKiB;
  static constexpr bool kSm75 = kSmemKiB == kSmemKiBSm75;  // sm_75's configuration and code
  static_assert(!kSm75 || std::is_same<T, __half>::value, "sm_75's tensor cores take fp16 (no bf16, no tf32)");
  using Config = std::conditional_t<kTf32, BwdTf32ConfigFor<kHeadDim>,
                 std::conditional_t<kSm75, BwdSm75ConfigFor<kHeadDim, kMod>,
                 std::conditional_t<(kSmemKiB < kSmemKiBWide), BwdCompactConfigFor<kHeadDim, kMod>,
                                    std::conditional_t<kMod_, BwdModConfigFor<kHeadDim>, BwdConfigFor<kHeadDim>>>>>;
  static constexpr int kDSplit = kTf32 && kHeadDim > 128 ? 2 : 1;  // blocks per key tile, each kHeadDim / kDSplit of dV, dK
  static constexpr int kWarps = Config::kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;  // query rows per step, keys
  // Warp tiles: S^T/dP^T kSdpRows keys x kSdpCols queries; dV/dK kKvRows keys x kKvCols head-dim
  // columns; dQ kDqRows queries x kDqCols columns.
  static constexpr int kSdpWarpsN = Config::kSdpWarpsN, kKvWarpsN = Config::kKvWarpsN, kDqWarpsM = Config::kDqWarpsM;
  static constexpr int kSdpRows = kBlockN / kSdpWarpsN, kSdpCols = kBlockM / (kWarps / kSdpWarpsN);
  static constexpr int kKvRows = kBlockN / kKvWarpsN, kKvCols = kHeadDim / kDSplit / (kWarps / kKvWarpsN);
  static constexpr int kDqRows = kBlockM / kDqWarpsM, kDqCols = kHeadDim / (kWarps / kDqWarpsM);
  static constexpr bool kPInRegs = kSdpCols == kBlockM && kKvCols * kDSplit == kHeadDim && kKvWarpsN == kSdpWarpsN;
  static_assert(!kTf32 || kPInRegs, "fp32: P^T and dS^T reach dV and dK from registers");
  static_assert(kWarps % kSdpWarpsN == 0 && kWarps % kKvWarpsN == 0 && kWarps % kDqWarpsM == 0,
                "each warp grid uses every warp");
  static_assert(kSdpRows % 16 == 0 && kKvRows % 16 == 0 && (kTf32 || kDqRows % 16 == 0),
                "warp tiles are whole 16-row m-tiles (fp32: no dQ product in this kernel)");
  static_assert(kSdpCols % 16 == 0 && kKvCols % 16 == 0 && (kTf32 || kDqCols % 16 == 0),
                "warp tiles are whole 16-column ldmatrix.x4 pairs of n-tiles");
  static_assert(64 % kBlockM == 0, "query tiles nest in the 64-row tiles of the pre/postprocess and the dQ accumulator");
  // Accumulator registers per thread (fp32): dV and dK for the whole walk, S^T and dP^T per step.
  static constexpr int kAccRegs = 2 * kKvRows * kKvCols / 32 + 2 * kSdpRows * kSdpCols / 32;
  static_assert(kAccRegs <= 192, "accumulators must leave room in 255 registers");
  // Unroll of the k loops of S^T/dP^T (over the head dim) and of dQ (over the keys): whole in
  // the steady state; by 2 and 4 in the steps with the mask and in the deterministic kernel's
  // (more live values there). Whole unrolling lets ptxas hoist every ldmatrix and hold its
  // addresses, which spills where the accumulators leave least room unless P^T is rounded
  // early (below) (measured: benchmarks/kernel_report.py).
  // The compact configuration at 256 (4 warps: dK and dV alone take 128 registers, dQ_i's warp
  // tile 64 more) unrolls S^T/dP^T by 2 and rounds P^T first (below): with either alone its
  // atomic-dQ kernel spills 4 to 24 bytes (ptxas, sm_80), with both none.
  static constexpr bool kTightest = kSmemKiB == kSmemKiBCompact && kHeadDim == 256;
  static constexpr int kSdpUnroll = kTightest ? 2 : kHeadDim / 16, kDqUnroll = kBlockN / 16;
  // At 256 without modifiers the masked steps unroll S^T/dP^T by 4: by 2, the band variant's
  // atomic-dQ kernels without dropout's code (dropout.h) spilled 8 to 24 bytes at sm_80 (wide and
  // compact), with 4 none (ptxas -v, measured when the dropout kernels were split off).
  static constexpr int kSdpUnrollMasked = kHeadDim == 256 && !kMod ? 4 : 2, kDqUnrollMasked = 4;
  // Round P^T to 16 bits before dP^T is computed and take dS^T = P^T (dP^T - D) from the rounded
  // P^T (as dV sees it, widened to fp32 for the product, dS^T rounded once): the pairs hold half
  // the registers of fp32 P^T through the dP^T product. Where S^T, dP^T, dV and dK take 192
  // accumulator registers (head dims 64 and 128), that is what lets the loops unroll whole without
  // spills.
  // (Not with kMod: it computes P^T and dS^T of an element together, bwd_kernel.h.)
  static constexpr bool kRoundPFirst = (kAccRegs == 192 || kTightest) && !kMod && !kTf32;
  // Blocks per SM the register allocation must allow (__launch_bounds__): 4 warps x 255
  // registers fit twice in an SM's 64K registers; 8 warps once.
  static constexpr int kMinBlocksPerSm = kWarps == 4 ? 2 : 1;
  // Tiles in units (fp32: two per value, twice the columns). Padded rows (layout.h) for the
  // 16-bit tiles of the wide configuration at head dim 64: its atomic-dQ kernel holds 255
  // registers and rebuilt the swizzled fragment offsets inside the loop; padded, an ldmatrix
  // address is the lane's offset plus a constant (benchmarks/sass_compare.py, 2026-12-01, bf16
  // at sm_90: 840 -> 756 ALU instructions per unit of work; shared memory 56.5 -> 64.5 KiB).
  // At 128 only in the large budget (kBwdLargeConfig): its 12 KiB do not fit beside two Q_i/dO_i
  // stages in 163 KiB (161 -> 173 KiB); in 227 they do (2026-12-07, bf16 at sm_90: 3880 -> 3628
  // instructions per unit, ALU 564 -> 396, uniform 196 -> 156).
  static constexpr bool kPaddedTiles =
      !kTf32 && ((kSmemKiB >= kSmemKiBWide && kHeadDim == 64) ||
                 (kSmemKiB == kSmemKiBLarge && kBwdLargeConfig<T, kHeadDim, kMod>));
  template <int kRows, int kCols>
  using TileLayout = std::conditional_t<kPaddedTiles, PaddedLayout<kRows, kCols>, SmemLayout<kRows, kCols>>;
  using QLayout = TileLayout<kBlockM, kHeadDim * kUnits>;   // Q_i and dO_i
  using KVLayout = TileLayout<kBlockN, kHeadDim * kUnits>;  // K_j and V_j
  // P^T and dS^T, [key][query] (16-bit inputs; fp32 has none: a placeholder)
  using PLayout = std::conditional_t<kTf32, SmemLayout<16, 32>, TileLayout<kBlockN, kBlockM>>;
  static_assert(kTf32 || PLayout::kBlockCols % kSdpCols == 0, "a warp's S^T columns stay inside one swizzle block");
  // The packed-batch narrowing's loads volatile (seqlen.h) in the compact configuration at 256
  // and the wide one at 64: with plain ones their atomic-dQ kernels spilled 4 bytes (the compact
  // band kernel at 256, sm_80/86/89) and 8 to 16 (at 64 with padded tiles, sm_80 and sm_90),
  // while the wide configurations' atomic-dQ kernels at 128 and 256 spill 4 to 12 bytes more at
  // sm_80 with volatile ones (ptxas -v). The large configuration at 128 (padded) takes them too:
  // with plain ones its band kernels' packed atomic-dQ kernel spilled 8 + 4 bytes at sm_90 (bf16;
  // with dropout's code 24 + 20 either way). (The forward takes them everywhere: fwd_kernel.h.)
  static constexpr bool kVolatileBoundaries = kTightest || kPaddedTiles;
  static constexpr size_t kTileBytes = QLayout::kElems * sizeof(Unit);
  // fp32: no dS^T tile (dQ comes from the deterministic pass)
  static constexpr int kPTiles = kTf32 ? 0 : (kPInRegs ? 1 : 2);
  static constexpr size_t kFixedBytes = (2 * KVLayout::kElems + kPTiles * PLayout::kElems) * sizeof(Unit);
  // Q_i, dO_i (+ lse, Di rows) double-buffered where it fits the budget: the next query tile
  // loads while this one computes. Otherwise one buffer, refilled after this tile's last use.
  // kMod: the step's bias tile ([query][key] fp32) is part of the stage.
  using Bias = BiasTile<kBlockM, kBlockN, kBlockN + 4>;
  static constexpr size_t kStageBytes = 2 * kTileBytes + 2 * kBlockM * sizeof(float) + (kMod ? Bias::kBytes : 0);
  static constexpr int kStages = kFixedBytes + 2 * kStageBytes <= kBudgetKiB * 1024 ? 2 : 1;
  static constexpr size_t kSmemBytes = kFixedBytes + kStages * kStageBytes;
  // sm_75: the next step's Q_i and dO_i pass through registers while this step computes (copy.h's
  // TileStage) where they are double-buffered and take at most 32 registers per thread (head
  // dims up to 128); at 192 (one buffer, 48 registers) they are copied when the cp.async would
  // be issued (ptx.h).
  static constexpr bool kQdoInRegs = kSm75 && kStages == 2 && 2 * kTileBytes / kThreads <= 128;
  // (sm_75 at 256 does not fit: the dispatcher reports it, run_bwd asserts kFits)
  static constexpr bool kFits = kSmemBytes <= kBudgetKiB * 1024;
  static_assert(kFits || (kSm75 && kHeadDim == 256), "fits the budget's shared memory per block");
  // The pre/postprocess kernels (and the dQ accumulator's padding) work in 64-row tiles.
  static constexpr int kPrepRows = 64;
  // dQ accumulator: [B, Hq, row blocks of 16, kHeadDim / 8 n-tiles, 4 elements, 32 lanes] fp32,
  // the mma accumulator order, so a warp's atomics for one element index are 128 contiguous
  // bytes (coalesced). Rows are padded to a multiple of kPrepRows.
  static constexpr int kAccumTileFloats = 16 * kHeadDim;  // one 16-row block
  // Offset of 16-row block rb of (batch, head): the accumulator has kHeadDim floats per row of
  // the padded scratch (params.h), a 16-row block in mma fragment order.
  static_assert(kPrepRows == kStatsRowTile, "the preprocess covers the scratch's padded row tiles");
  template <bool kVarlen, class P>
  FC_HOST_DEVICE static int64_t accum_offset(const P& p, int batch, int head, int64_t rb) {
    if (!kVarlen || p.cu_seqlens_q == nullptr) {  // dense: (batch, head) slices of whole 16-row blocks
      const int64_t row_blocks = int64_t((p.nq + kPrepRows - 1) / kPrepRows) * (kPrepRows / 16);
      return ((int64_t(batch) * p.hq + head) * row_blocks + rb) * kAccumTileFloats;
    }
    return p.packed_scratch_row(batch, head) * kHeadDim + rb * kAccumTileFloats;
  }
};

// The deterministic dQ pass: the forward's shape (4 warps x 16 query rows, loop over key
// tiles) computing S, P, dP, dS and dQ += dS K in registers, no atomics.
// Keys per tile: 64, 32 above head dim 128 (dQ takes D/2 registers, S and dP kBlockN/2 each),
// 16 in the compact budget at 256 with modifiers (Q_i and dO_i take 64 KiB, the bias 6 KiB),
// 32 in the compact budget at 96 with modifiers (with 64, ptxas spills 4 bytes at sm_80, 92 in
// the packed-batch kernel; with 32, none at sm_80 and sm_86).
// fp32 (tf32.h; every fp32 backward takes this pass), within 99 KiB: keys per tile 64 up to head
// dim 64, 32 at 96, 16 above, and 2 warps (32 query rows) above 128. sm_75 (64 KiB): 64 keys up
// to 64, 32 up to 192, 16 at 256, and 2 warps above 128.
template <class T_, int kHeadDim_, bool kMod_ = false, int kSmemKiB_ = kSmemKiBWide>
struct BwdDqTraits {
  using T = T_;
  using Unit = typename Elem<T>::Unit;
  static constexpr bool kTf32 = Elem<T>::kTf32;
  static constexpr int kUnits = Elem<T>::kUnits;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kMod = kMod_;
  static constexpr int kSmemKiB = kSmemKiB_;
  static constexpr int kBudgetKiB = kTf32 ? kSmemKiBCompact : kSmemKiB;
  static constexpr bool kSm75 = kSmemKiB == kSmemKiBSm75;
  static constexpr int kWarps = (kTf32 || kSm75) && kHeadDim > 128 ? 2 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN =
      kTf32 ? (kHeadDim <= 64 ? 64 : kHeadDim == 96 ? 32 : 16)
      : kSm75 ? (kHeadDim <= 64 ? 64 : kHeadDim <= 192 ? 32 : 16)
            : kSmemKiB == kSmemKiBCompact && kMod && kHeadDim == 96 ? 32
            : kHeadDim <= 128 ? 64 : (kSmemKiB == kSmemKiBCompact && kMod && kHeadDim == 256 ? 16 : 32);
  static constexpr int kNTiles = kBlockN / 8, kDTiles = kHeadDim / 8;
  static_assert(kHeadDim / 2 + kBlockN <= 160, "accumulators must leave room in 255 registers");
  using QLayout = SmemLayout<kBlockM, kHeadDim * kUnits>;
  using KVLayout = SmemLayout<kBlockN, kHeadDim * kUnits>;
  using Bias = BiasTile<kBlockM, kBlockN, kBlockN + 8>;  // kMod: the bias of one key tile
  static constexpr size_t kSmemBytes =
      (2 * QLayout::kElems + 2 * KVLayout::kElems) * sizeof(Unit) + (kMod ? Bias::kBytes : 0);
  static_assert(kSmemBytes <= kBudgetKiB * 1024, "fits the budget's shared memory per block");
};

// The KV-cache forward (fwd_kvcache_launch.h) is the modifier variant's kernel in a configuration
// of its own: 4 warps of one m-tile (64 query rows), 64 keys a tile up to head dim 192, the
// modifier variant's 32 at 256; sm_75 keeps its own. Decoding's query tile holds a kv group's few
// rows (4 at one token and 4 query heads a kv head), which the prefill configuration's 128-row
// tiles of 8 warps at head dims 128 to 256 held with one block of 255-register threads per SM, little
// of the cache in flight per SM (the GPU run of 2026-12-04 read 21% to 29% of the H200's bandwidth
// at B = 64). 4 warps of up to 255 registers leave 2 blocks per SM (kMinBlocksPerSm), and every
// head dim fits 99 KiB (no compact instantiation). FlashAttention-2's split-KV kernel also takes
// 64-row tiles of 4 warps for every head dim.
template <int kHeadDim>
using KvCacheConfigFor = FwdConfig<1, 4, kHeadDim == 256 ? 32 : 64>;
template <class T, int kHeadDim, int kSmemKiB>
using KvCacheTraits = FwdTraits<T, kHeadDim, true, kSmemKiB,
                                std::conditional_t<kSmemKiB == kSmemKiBSm75, void, KvCacheConfigFor<kHeadDim>>>;

// Shared memory per block of each kernel family at a budget: what the dispatcher compares with
// the device's limit (the backward: the most of its kernels; the postprocess stages 64 rows).
template <class T, int kHeadDim, bool kMod, int kSmemKiB>
constexpr size_t fwd_smem_bytes() {
  return FwdTraits<T, kHeadDim, kMod, kSmemKiB>::kSmemBytes;
}
template <class T, int kHeadDim, int kSmemKiB>
constexpr size_t kvcache_smem_bytes() {
  return KvCacheTraits<T, kHeadDim, kSmemKiB>::kSmemBytes;
}
template <class T, int kHeadDim, bool kMod, int kSmemKiB>
constexpr size_t bwd_smem_bytes() {
  using Kt = BwdTraits<T, kHeadDim, kMod, kSmemKiB>;
  using Dq = BwdDqTraits<T, kHeadDim, kMod, kSmemKiB>;
  const size_t post = Kt::kTf32 ? 0 : size_t(Kt::kPrepRows) * kHeadDim * sizeof(T);  // (fp32: no postprocess)
  return Kt::kSmemBytes > Dq::kSmemBytes ? (Kt::kSmemBytes > post ? Kt::kSmemBytes : post)
                                          : (Dq::kSmemBytes > post ? Dq::kSmemBytes : post);
}
// The large budget's bytes where the backward has a configuration there (kBwdLargeConfig), else 0
// (none; the traits of a large budget that has none are never instantiated).
template <class T, int kHeadDim, bool kMod>
constexpr size_t bwd_large_smem_bytes() {
  if constexpr (kBwdLargeConfig<T, kHeadDim, kMod>) return bwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBLarge>();
  else return 0;
}

}  // namespace flash_cuda
