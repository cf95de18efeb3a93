// The AVX-512 GEMM micro-kernels (avx512_gemm.h). Compiled for the whole file's baseline; each
// function that uses AVX-512 carries its own target attribute and runs only after
// dpbf16_supported() or f32_gemm_supported() said yes.
#include "avx512_gemm.h"
#include "prefetch.h"

// GCC's intrinsic headers start unmasked conversions and shifts from _mm512_undefined_*(), which
// -Wmaybe-uninitialized reports once the register-tile loops are fully unrolled: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FC_HAVE_DPBF16 1
#define FC_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
#define FC_INLINE inline __attribute__((always_inline))
#define FC_TARGET_LAMBDA __attribute__((always_inline, target("arch=x86-64-v4,avx512bf16")))
// Every loop over the register tile unrolled: GCC left some rolled, indexed the accumulators and
// kept them in memory, storing all 24 every iteration (85 GFLOP/s a core on a Zen 4, 215 unrolled).
#define FC_UNROLL _Pragma("GCC unroll 16")
#endif

namespace flash_cuda::cpu {

#ifdef FC_HAVE_DPBF16
// Every function here is compiled for x86-64-v4 (AVX512F, BW, DQ, VL: GCC uses BW's mask moves
// even in the fp32 kernels), so all four are required, not AVX512F alone (Xeon Phi has no BW).
bool f32_gemm_supported() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return yes;
}
bool dpbf16_supported() {
  static const bool yes = f32_gemm_supported() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

namespace {

// The register tile: kRows rows of C by kVecs x 16 columns, 24 of the 32 zmm registers as
// accumulators, the rest for the B vectors and the broadcast A pair. Per row pair of B it loads
// kVecs B vectors and kRows A pairs for kRows x kVecs dot products.
constexpr int kRows = 6, kVecs = 4, kCols = 16 * kVecs;

FC_TARGET FC_INLINE __mmask16 column_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// What a micro-tile multiplies, per step along K: a row pair of bf16 (vdpbf16ps on pairs) or
// one row of fp32 (FMA). Both read 256-byte rows of a 64-column panel of B.
struct Bf16Pairs {
  using EA = uint16_t;
  using EB = uint16_t;
  static constexpr int kStep = 2;  // rows of B per step
  static FC_TARGET FC_INLINE __m512 load_b(const EB* b, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, b));
  }
  static FC_TARGET FC_INLINE __m512 broadcast_a(const EA* a) {  // the pair (a[0], a[1])
    uint32_t v;
    std::memcpy(&v, a, sizeof(v));
    return _mm512_castsi512_ps(_mm512_set1_epi32(int(v)));
  }
  static FC_TARGET FC_INLINE __m512 multiply_add(__m512 c, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b);
  }
};
struct F32 {
  using EA = float;
  using EB = float;
  static constexpr int kStep = 1;
  static FC_TARGET FC_INLINE __m512 load_b(const EB* b, __mmask16 m) { return _mm512_maskz_loadu_ps(m, b); }
  static FC_TARGET FC_INLINE __m512 broadcast_a(const EA* a) { return _mm512_set1_ps(*a); }
  static FC_TARGET FC_INLINE __m512 multiply_add(__m512 c, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, c); }
};

// fp32 with A given as its transpose: element (r, k) of A at A[k lda + r] (the backward's P and
// dS tiles, whose transposes are the left operands of dV = P^T dO and dK = dS^T Q). The broadcasts
// of a step read R consecutive floats of one row of the tile.
struct F32TransposedA : F32 {};
template <typename Op>
constexpr bool kTransposedA = std::is_same_v<Op, F32TransposedA>;
// The offset of element (r, k) of A.
template <typename Op>
FC_INLINE int64_t a_offset(int64_t r, int64_t k, int64_t lda) {
  return kTransposedA<Op> ? k * lda + r : r * lda + k;
}

// bf16 operands multiplied one row at a time in fp32 FMAs (the products of two bf16 values are
// exact in fp32): for a row-major bf16 B read in place, each 16 columns widened in registers.
struct Bf16AsF32 {
  using EA = uint16_t;
  using EB = uint16_t;
  static constexpr int kStep = 1;
  static FC_TARGET FC_INLINE __m512 load_b(const EB* b, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b)), 16));
  }
  static FC_TARGET FC_INLINE __m512 broadcast_a(const EA* a) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(int(uint32_t(*a) << 16)));
  }
  static FC_TARGET FC_INLINE __m512 multiply_add(__m512 c, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, c); }
};

// fp32 A against an IEEE half B read in place (decoding's V rows), each 16 columns widened exactly
// in registers (vcvtph2ps), fp32 FMAs.
struct F32ByF16 {
  using EA = float;
  using EB = uint16_t;
  static constexpr int kStep = 1;
  static FC_TARGET FC_INLINE __m512 load_b(const EB* b, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, b));
  }
  static FC_TARGET FC_INLINE __m512 broadcast_a(const EA* a) { return _mm512_set1_ps(*a); }
  static FC_TARGET FC_INLINE __m512 multiply_add(__m512 c, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, c); }
};

// What a micro-tile fetches while it multiplies, for operands read once from memory (decoding's
// cache rows), spread over its steps along K so that the memory's requests overlap the FMAs:
// nothing; the rows of A `ahead` rows below its own into L1, a line per 64 bytes of its steps
// (and, where given, the same lines of the partner rows of its own rows into L2: decoding's value
// rows during S^T); each step, the columns it reads of B's row `ahead` rows below, into L1; or
// (kStream) kStreamLines lines of a contiguous stream into L2 each step (the next key rows during
// P V).
// Measured on a Xeon with AMX (in-process A/B against the same lines fetched in a burst before
// each row block or block of B's rows, GQA 32/8, D 128, outputs bit-identical): 1.13x to 1.18x
// faster at fp32 Nq = 4 (2k to 32k keys), 1.08x to 1.16x at Nq = 1 (fp32, fp16, bf16). In a
// burst, the fetches beyond the core's fill buffers stalled it before the FMAs could start.
// With far > 0 (kRowsOfA, kRowsOfB: caches of at least the last-level cache's size), the same
// lines of the rows `far` below into L2 in the same steps. Fetched in a burst before each row
// block (A) or block of B's rows, they stalled the core likewise (perf on a Zen 4: 7% of a
// decoding call's samples on one prefetcht1 of that loop); in the steps, in-process A/B on that
// Zen 4 (GQA 32/8, D 128, two runs, outputs bit-identical): fp32 1.03x to 1.08x at Nq = 1 and 4
// (8k and 32k keys), fp16 1.07x at Nq = 1 and 32k keys (then, fp16 fetched nothing far at Nq = 4
// or from its 8k caches: both came after, kvcache_cpu.cpp).
enum class Ahead { kNone, kRowsOfA, kRowsOfB, kStream };
// Ahead::kStream: lines fetched per step along K (a micro-tile's step of 6 x 4 vdpbf16ps reads
// 2 lines of B).
constexpr int kStreamLines = 2;

// One step along K of a micro-tile (below): c[R][V] += A[0:R, k : k + kStep) times B's step k.
template <typename Op, int R, int V, Ahead kAhead>
FC_TARGET FC_INLINE void micro_step(int64_t k, const typename Op::EA* A, int64_t lda, const typename Op::EB* B,
                                    int64_t ldb, const __mmask16 (&mask)[V], int64_t ahead, const char* also,
                                    int64_t ld_also, int64_t far, __m512 (&c)[R][V]) {
  const uint64_t uk = uint64_t(k);  // (k >= 0: unsigned divisions and remainders are shifts and masks)
  const typename Op::EB* b = B + int64_t(uk / Op::kStep) * ldb;
  if constexpr (kAhead == Ahead::kRowsOfA) {
    static_assert(!kTransposedA<Op>, "A's rows are fetched where they are rows");
    constexpr uint64_t kLine = 64 / sizeof(typename Op::EA);
    static_assert(kLine % (2 * Op::kStep) == 0,
                  "a line starts only at the first step of a pair (micro_tile: the second fetches nothing)");
    if (uk % kLine < Op::kStep) {
      FC_UNROLL for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(A + (r + ahead) * lda + k), _MM_HINT_T0);
      if (also)  // the partner rows of this block's own rows (ld_also bytes apart), into L2
        FC_UNROLL for (int r = 0; r < R; ++r)
          _mm_prefetch(also + r * ld_also + k * sizeof(typename Op::EA), _MM_HINT_T1);
      if (far)  // the rows far below, into L2
        FC_UNROLL for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(A + (r + far) * lda + k), _MM_HINT_T1);
    }
  }
  if constexpr (kAhead == Ahead::kStream) {  // also: kStreamLines lines per step into L2, ld_also lines
    FC_UNROLL for (int i = 0; i < kStreamLines; ++i)
      if (int64_t(uk / Op::kStep) * kStreamLines + i < ld_also)
        _mm_prefetch(also + (int64_t(uk / Op::kStep) * kStreamLines + i) * 64, _MM_HINT_T1);
  }
  if constexpr (kAhead == Ahead::kRowsOfB) {
    FC_UNROLL for (int v = 0; v < V; ++v)
      _mm_prefetch(reinterpret_cast<const char*>(b + ahead * ldb + 16 * Op::kStep * v), _MM_HINT_T0);
    if (far)  // and the row far below, into L2
      FC_UNROLL for (int v = 0; v < V; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(b + far * ldb + 16 * Op::kStep * v), _MM_HINT_T1);
  }
  __m512 bv[V];
  FC_UNROLL for (int v = 0; v < V; ++v) bv[v] = Op::load_b(b + 16 * Op::kStep * v, mask[v]);
  FC_UNROLL for (int r = 0; r < R; ++r) {
    const __m512 a = Op::broadcast_a(A + a_offset<Op>(r, k, lda));
    FC_UNROLL for (int v = 0; v < V; ++v) c[r][v] = Op::multiply_add(c[r][v], a, bv[v]);
  }
}

// C[0:R, 0:n) (+)= A[0:R, 0:K) B[.., 0:n), n <= 16 V, K a multiple of Op::kStep; B one panel, its
// steps along K ldb elements apart (a packed panel's row: kPairsRow or kPanelCols; a row-major B's
// row stride).
// kLastRow (bf16 pairs only): the product of A's column K and B's row K alone (the last row of
// an odd K), A's pair being (A[i][K], 0) and B's second row masked to 0 (a 0 * inf would be NaN).
// Steps of K summed in registers from zero before the partial sums go into C: accumulating on
// C's value, an output was one chain of FMAs over all of K (and over every call with accumulate),
// and its rounding error grew with that length: the attention forward's O over 4k-32k keys had
// 9x-21x plain torch's fp32 error, the backward's dV and dK over the query rows of a GQA group
// 10x-75x (audit). Partials of kF32SumChain keep each chain short, as a BLAS's K blocking does.
// For fp32 operands only: with fp16/bf16 ones the inputs' rounding dwarfs the chain's (the plain
// torch error the rule compares with is theirs), and the flushes cost their forwards 4%-12% on a
// Zen 4.
template <typename Op>
constexpr int64_t kChainOf = std::is_same_v<typename Op::EA, float> && std::is_same_v<typename Op::EB, float>
                                 ? kF32SumChain : int64_t{1} << 62;  // (no partials)

// C[0:R, 0:n) = c, plus C's value where add
template <int R, int V>
FC_TARGET FC_INLINE void store_tile(__m512 (&c)[R][V], float* C, int64_t ldc, const __mmask16 (&mask)[V], bool add) {
  FC_UNROLL for (int r = 0; r < R; ++r)
    FC_UNROLL for (int v = 0; v < V; ++v) {
      if (add) c[r][v] = _mm512_add_ps(c[r][v], _mm512_maskz_loadu_ps(mask[v], C + r * ldc + 16 * v));
      _mm512_mask_storeu_ps(C + r * ldc + 16 * v, mask[v], c[r][v]);
    }
}

// The bf16 tiles one vector wide (16 columns) take two sets of accumulators (micro_tile). A chain
// of multiply-adds issues one a latency: a Zen 5 issues two vdpbf16ps on zmm a cycle
// (benchmarks/multiply_peak.py) at a latency of about 6 cycles, so it needs about 12 chains in
// flight, and the 6 x 1 tile of decoding's S^T at 16 query rows a kv group had 6 (a Zen 4 issues
// one a cycle: 6 were enough). Measured on a Zen 5 (2 cores): that S^T alone 1.13x-1.18x faster (one
// thread, cache in L2, benchmarks/cpu_harness/decode_bf16_phases.cpp, medians of five runs with its
// buffers aligned; 1.2x-1.3x as first measured, off a cache line); bf16 decoding at Nq = 4
// (GQA 32/8, D 128; with P V's broadcasts read from memory, pairs_in_registers_tile) 1.04x-1.12x at
// 2k to 32k keys (two builds' calls alternated, 5 and 8 rounds, medians). fp32's 6 x 1 tile (FMA
// latency 4) measured no faster with two. By width rather than by accumulator count, so every row
// block of a panel sums in the same order: a row's bits do not depend on the block it falls in.
// That S^T now goes in split steps (split_tile, below: the same sums, so the same bits, with half
// the loads); the two sets serve the other bf16 tiles one vector wide (dpbf16_gemm's last 16
// columns, dpbf16_gemm_stream_a outside split steps' head dims).

template <typename Op, int R, int V, bool kLastRow, Ahead kAhead = Ahead::kNone>
FC_TARGET void micro_tile(int64_t K, int64_t n, const typename Op::EA* A, int64_t lda, const typename Op::EB* B,
                          int64_t ldb, float* C, int64_t ldc, bool accumulate, int64_t ahead,
                          const char* also = nullptr, int64_t ld_also = 0, int64_t far = 0) {
  __mmask16 mask[V];
  FC_UNROLL for (int v = 0; v < V; ++v) mask[v] = column_mask(n - 16 * v);
  __m512 c[R][V];
  // (an odd K's last row alone: one FMA onto C, rounded once as before)
  FC_UNROLL for (int r = 0; r < R; ++r)
    FC_UNROLL for (int v = 0; v < V; ++v)
      c[r][v] = kLastRow && accumulate ? _mm512_maskz_loadu_ps(mask[v], C + r * ldc + 16 * v) : _mm512_setzero_ps();
  if constexpr (kLastRow) {
    static_assert(Op::kStep == 2, "a last row is left over by row pairs only");
    const typename Op::EB* b = B + K / 2 * ldb;
    __m512 bv[V];
    FC_UNROLL for (int v = 0; v < V; ++v)
      bv[v] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(Op::load_b(b + 32 * v, mask[v])),
                                                   _mm512_set1_epi32(0xFFFF)));
    FC_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_castsi512_ps(_mm512_set1_epi32(int(A[r * lda + K])));
      FC_UNROLL for (int v = 0; v < V; ++v) c[r][v] = Op::multiply_add(c[r][v], a, bv[v]);
    }
    store_tile(c, C, ldc, mask, false);
  } else {
    constexpr int64_t chain = kChainOf<Op>;
    static_assert(chain % (2 * Op::kStep) == 0, "a partial sum ends on a pair of steps");
    // bf16 tiles one vector wide alternate their steps between two sets of accumulators, added at
    // the end: with one set, the multiply-adds of a step all wait on the last step's (see above).
    constexpr bool kTwoSets = Op::kStep == 2 && V == 1;
    __m512 c2[R][V];  // kTwoSets: the second set (the odd steps)
    const auto fold = [&]() FC_TARGET_LAMBDA {  // c += c2, which restarts at 0
      if constexpr (kTwoSets)
        FC_UNROLL for (int r = 0; r < R; ++r) FC_UNROLL for (int v = 0; v < V; ++v) {
          c[r][v] = _mm512_add_ps(c[r][v], c2[r][v]);
          c2[r][v] = _mm512_setzero_ps();
        }
    };
    if constexpr (kTwoSets)
      FC_UNROLL for (int r = 0; r < R; ++r) FC_UNROLL for (int v = 0; v < V; ++v) c2[r][v] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += chain) {
      if (k0 > 0) {  // the last partial into C, a new one from zero
        fold();
        store_tile(c, C, ldc, mask, accumulate || k0 > chain);
        FC_UNROLL for (int r = 0; r < R; ++r) FC_UNROLL for (int v = 0; v < V; ++v) c[r][v] = _mm512_setzero_ps();
      }
      const int64_t k1 = std::min(K, k0 + chain);
      int64_t k = k0;
      if constexpr (kTwoSets)
        for (; k + Op::kStep < k1; k += 2 * Op::kStep) {
          micro_step<Op, R, V, kAhead>(k, A, lda, B, ldb, mask, ahead, also, ld_also, far, c);
          // (A's rows: pairs start at multiples of 2 steps, which divide a line, so a line starts
          // only at a pair's first step, which fetches it)
          constexpr Ahead kThen = kAhead == Ahead::kRowsOfA ? Ahead::kNone : kAhead;
          micro_step<Op, R, V, kThen>(k + Op::kStep, A, lda, B, ldb, mask, ahead, also, ld_also, far, c2);
        }
      for (; k < k1; k += Op::kStep)
        micro_step<Op, R, V, kAhead>(k, A, lda, B, ldb, mask, ahead, also, ld_also, far, c);
    }
    fold();
    store_tile(c, C, ldc, mask, accumulate || K > chain);
  }
}

template <typename Op>
using MicroTile = void (*)(int64_t, int64_t, const typename Op::EA*, int64_t, const typename Op::EB*, int64_t, float*,
                           int64_t, bool, int64_t, const char*, int64_t, int64_t);
template <typename Op, bool kLastRow, Ahead kAhead, int R, int... V>
constexpr auto row_of_tiles(std::integer_sequence<int, V...>) {
  return std::array<MicroTile<Op>, sizeof...(V)>{&micro_tile<Op, R, V + 1, kLastRow, kAhead>...};
}
template <typename Op, bool kLastRow, Ahead kAhead, int... R>
constexpr auto tile_table(std::integer_sequence<int, R...>) {
  return std::array<std::array<MicroTile<Op>, kVecs>, sizeof...(R)>{
      row_of_tiles<Op, kLastRow, kAhead, R + 1>(std::make_integer_sequence<int, kVecs>{})...};
}
// kTiles<Op>[last][R - 1][V - 1]: the micro-tile of R rows and V vectors (last: of an odd K's last row).
template <typename Op, Ahead kAhead = Ahead::kNone>
constexpr std::array<std::array<std::array<MicroTile<Op>, kVecs>, kRows>, 2> kTiles = {
    tile_table<Op, false, kAhead>(std::make_integer_sequence<int, kRows>{}),
    tile_table<Op, Op::kStep == 2, Ahead::kNone>(std::make_integer_sequence<int, kRows>{})};

// Rows fetched ahead of their use (prefetch.h): the decoding kernels read each cache row once from
// memory; without these the hardware prefetchers left them waiting on its latency. Measured on a
// Xeon with AMX (in-process A/B, GQA 32/8, D 128, 2k to 32k keys, outputs bit-identical): the key
// rows ahead in rows_dot_block 1.29x to 1.42x faster at Nq = 1 (fp32, fp16), A's rows ahead in
// f32_gemm_stream_a 1.13x to 1.22x at Nq = 4 (fp32), rows_gemm against panel_gemm 1.07x to 1.24x
// at Nq = 1 (those two fetched in a burst then; now inside the micro-tiles, Ahead above).
constexpr int64_t kAheadKeys = 16;   // rows_dot_block: key rows fetched this far ahead
constexpr int64_t kKBlock = 32;      // rows_gemm: rows of B per block (16 KiB of fp32 rows of 128)
constexpr int64_t kAheadBlocks = 2;  // panel_gemm streaming A: row blocks of A fetched this far ahead

// C (+)= A B over K = 0: C = 0, or unchanged when accumulating.
inline void empty_product(int64_t M, int64_t N, float* C, int64_t ldc, bool accumulate) {
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
}

// C (+)= A B over whole panels of B (panel_stride elements apart, steps along K ldb apart), row
// blocks of kRows. kStreamA: A's rows are read once from memory (decoding's cache rows), each row
// block's fetched kAheadBlocks blocks ahead, and the rows of `also` of the same indices into L2
// alongside (decoding's value rows, read after the scores); when far.ahead > 0, the rows far.ahead
// below each block's into L2 as well (below far.end), in the tile's steps where it streams.
template <typename Op, bool kStreamA = false>
FC_TARGET void panel_gemm(int64_t M, int64_t N, int64_t K, const typename Op::EA* A, int64_t lda,
                          const typename Op::EB* B, int64_t panel_stride, int64_t ldb, float* C, int64_t ldc,
                          bool accumulate, const RowsAhead& also = {}, const char* stream = nullptr,
                          int64_t stream_lines = 0, const FarRows& far = {}) {
  static_assert(!kTransposedA<Op>, "A's row blocks are addressed as rows");
  if (M <= 0 || N <= 0) return;
  static_assert(kCols == kPanelCols, "a micro-tile's columns are one panel");
  if (K == 0) return empty_product(M, N, C, ldc, accumulate);
  const int64_t K_even = K - K % Op::kStep;
  // Panels outside, so one panel (K x 64: 16 KiB of bf16 at K = 128) stays in L1 or L2 while
  // every row block of A passes over it.
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    const int64_t n = std::min<int64_t>(kCols, N - n0), vecs = (n + 15) / 16;
    const typename Op::EB* b = B + n0 / kCols * panel_stride;
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, M - m0);
      const typename Op::EA* a = A + m0 * lda;
      float* c = C + m0 * ldc + n0;
      // streaming A: the row block kAheadBlocks below fetched while this one multiplies (the
      // first panel only: the later ones find A's rows in cache)
      constexpr int64_t kAheadRows = kAheadBlocks * kRows;
      // streaming A with far.ahead > 0: the rows far below fetched into L2 in the tile's steps,
      // or at once where the tile does not stream or its far rows reach far.end (they stop there)
      const bool far_in_steps = m0 + far.ahead + rows <= far.end;
      const bool streams = kStreamA && n0 == 0 && m0 + kAheadRows < M && K_even == K;
      if (kStreamA && n0 == 0 && far.ahead > 0 && !(streams && far_in_steps))
        for (int64_t i = m0 + far.ahead; i < std::min(m0 + far.ahead + rows, far.end); ++i)
          prefetch_l2(A + i * lda, K * sizeof(*A));
      if constexpr (kStreamA)
        if (streams) {
          kTiles<Op, Ahead::kRowsOfA>[0][rows - 1][vecs - 1](K, n, a, lda, b, ldb, c, ldc, accumulate, kAheadRows,
                                                               also.base ? also.base + m0 * also.stride : nullptr,
                                                               also.stride, far_in_steps ? far.ahead : 0);
          continue;
        }
      const int64_t steps = K_even / Op::kStep, call = n0 / kCols * ((M + kRows - 1) / kRows) + m0 / kRows;
      if (K_even > 0 && stream && call * steps * kStreamLines < stream_lines)
        kTiles<Op, Ahead::kStream>[0][rows - 1][vecs - 1](K_even, n, a, lda, b, ldb, c, ldc, accumulate, 0,
                                                           stream + call * steps * kStreamLines * 64,
                                                           stream_lines - call * steps * kStreamLines, 0);
      else if (K_even > 0)
        kTiles<Op>[0][rows - 1][vecs - 1](K_even, n, a, lda, b, ldb, c, ldc, accumulate, 0, nullptr, 0, 0);
      if (K_even < K)
        kTiles<Op>[1][rows - 1][vecs - 1](K_even, n, a, lda, b, ldb, c, ldc, accumulate || K_even > 0, 0, nullptr, 0,
                                          0);
    }
  }
}

// C (+)= A B for a row-major B read once from memory (decoding's V tiles), no packing: K in
// blocks of kKBlock rows, each block's rows staying in L1 across every panel and row block of A
// while the next block's rows are fetched (panel_gemm would pass over B once per 64-column panel,
// reading part of each row at a time, nothing ahead).
template <typename Op>
FC_TARGET void rows_gemm(int64_t M, int64_t N, int64_t K, const typename Op::EA* A, int64_t lda,
                         const typename Op::EB* B, int64_t ldb, float* C, int64_t ldc, bool accumulate,
                         const FarRows& far) {
  static_assert(Op::kStep == 1, "B's rows one at a time: a block may end on any row");
  if (M <= 0 || N <= 0) return;
  if (K == 0) return empty_product(M, N, C, ldc, accumulate);
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t kn = std::min(kKBlock, K - k0);
    // the next block's rows fetched by the first row block of A, while it multiplies this block's
    const bool ahead = k0 + 2 * kKBlock <= K;
    // with far.ahead > 0, the rows far below too, into L2: in the same tile's steps, or at once
    // where they would reach far.end (they stop there) or no tile fetches ahead
    const bool far_in_steps = ahead && k0 + kn + far.ahead <= far.end;
    if (far.ahead > 0 && !far_in_steps)
      for (int64_t k = k0 + far.ahead; k < std::min(k0 + kn + far.ahead, far.end); ++k)
        prefetch_l2(B + k * ldb, N * sizeof(typename Op::EB));
    if (!ahead)  // a last, shorter block: its rows at once
      for (int64_t k = k0 + kKBlock; k < K; ++k) prefetch_l1(B + k * ldb, N * sizeof(typename Op::EB));
    for (int64_t n0 = 0; n0 < N; n0 += kCols) {
      const int64_t n = std::min<int64_t>(kCols, N - n0), vecs = (n + 15) / 16;
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, M - m0);
        const auto& tiles = ahead && m0 == 0 ? kTiles<Op, Ahead::kRowsOfB> : kTiles<Op>;
        tiles[0][rows - 1][vecs - 1](kn, n, A + a_offset<Op>(m0, k0, lda), lda, B + k0 * ldb + n0, ldb,
                                     C + m0 * ldc + n0, ldc, accumulate || k0 > 0, kKBlock, nullptr, 0,
                                     far_in_steps && m0 == 0 ? far.ahead : 0);
      }
    }
  }
}

// Row pairs of a row-major bf16 B interleaved in registers, for vdpbf16ps without a packed copy:
// unpacklo/unpackhi_epi16 of 32 columns of rows k and k + 1 give the pairs (B[k][c], B[k+1][c])
// of the columns 8L + 0..3 (lo) and 8L + 4..7 (hi) of each 128-bit lane L. The accumulators keep
// that column order (the pairs order); kFromPairs puts a block's two accumulators back in column
// order (columns 0-15, then 16-31), kToPairs the other way.
alignas(64) constexpr int32_t kFromPairs[2][16] = {{0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23},
                                                   {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31}};
alignas(64) constexpr int32_t kToPairs[2][16] = {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                                                 {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}};
FC_TARGET FC_INLINE __mmask16 lanes16(int64_t n) { return n <= 0 ? __mmask16(0) : column_mask(n); }
FC_TARGET FC_INLINE __mmask32 lanes32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// C[0:R, 0:n) (+)= A[0:R, 0:K) B[0:K, 0:n), n <= 32 V, over the whole K: B's row pairs interleaved
// as above, A's pairs broadcast, R x 2V accumulators; the rows `ahead` below fetched whole into L1
// and those far.ahead below into L2 (up to far.end) as it goes (N elements a row), and one line of
// `stream` a step into L2 (up to stream_lines). An odd K's last row is paired with zeros (and A's
// element with a zero, not with what follows it). kPairsOrder: C's columns are held in the pairs
// order (n a multiple of 32), loaded and stored as they are.
template <int R, int V, bool kPairsOrder>
FC_TARGET void pairs_in_registers_tile(int64_t K, int64_t n, const uint16_t* A, int64_t lda, const uint16_t* B,
                                       int64_t ldb, float* C, int64_t ldc, bool accumulate, int64_t ahead,
                                       const FarRows& far, int64_t N, const char* stream, int64_t stream_lines) {
  const __m512i from0 = _mm512_load_si512(kFromPairs[0]), from1 = _mm512_load_si512(kFromPairs[1]);
  __mmask32 mask[V];
  __m512 acc[R][2 * V];
  FC_UNROLL for (int v = 0; v < V; ++v) mask[v] = lanes32(n - 32 * v);
  FC_UNROLL for (int r = 0; r < R; ++r)
    FC_UNROLL for (int v = 0; v < V; ++v) {
      if (accumulate) {
        const __m512 c0 = _mm512_maskz_loadu_ps(lanes16(n - 32 * v), C + r * ldc + 32 * v);
        const __m512 c1 = _mm512_maskz_loadu_ps(lanes16(n - 32 * v - 16), C + r * ldc + 32 * v + 16);
        acc[r][2 * v] = kPairsOrder ? c0 : _mm512_permutex2var_ps(c0, _mm512_load_si512(kToPairs[0]), c1);
        acc[r][2 * v + 1] = kPairsOrder ? c1 : _mm512_permutex2var_ps(c0, _mm512_load_si512(kToPairs[1]), c1);
      } else {
        acc[r][2 * v] = acc[r][2 * v + 1] = _mm512_setzero_ps();
      }
    }
  // a(r): row r's pair of A for the step, broadcast straight from memory (vpbroadcastd m32, a load
  // alone; read into a general register first, GCC broadcast it from there, a vector-pipe move per
  // row: on a Zen 5 P V in the pairs order 1.06x-1.09x faster in the harness of decode_bf16_phases.cpp,
  // in L2, medians of five runs; 1.13x-1.23x as first measured, with the harness's V off a cache line)
  const auto step = [&](const uint16_t* b0, const uint16_t* b1, auto a) FC_TARGET_LAMBDA {
    __m512i lo[V], hi[V];
    FC_UNROLL for (int v = 0; v < V; ++v) {
      const __m512i x0 = _mm512_maskz_loadu_epi16(mask[v], b0 + 32 * v);
      const __m512i x1 = b1 ? _mm512_maskz_loadu_epi16(mask[v], b1 + 32 * v) : _mm512_setzero_si512();
      lo[v] = _mm512_unpacklo_epi16(x0, x1), hi[v] = _mm512_unpackhi_epi16(x0, x1);
    }
    FC_UNROLL for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)a(r);
      FC_UNROLL for (int v = 0; v < V; ++v) {
        acc[r][2 * v] = _mm512_dpbf16_ps(acc[r][2 * v], x, (__m512bh)lo[v]);
        acc[r][2 * v + 1] = _mm512_dpbf16_ps(acc[r][2 * v + 1], x, (__m512bh)hi[v]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    if (ahead > 0)
      for (int64_t j = k + ahead; j < std::min(k + ahead + 2, K); ++j) prefetch_l1(B + j * ldb, N * sizeof(uint16_t));
    if (far.ahead > 0)
      for (int64_t j = k + far.ahead; j < std::min(k + far.ahead + 2, far.end); ++j)
        prefetch_l2(B + j * ldb, N * sizeof(uint16_t));
    if (k / 2 < stream_lines) prefetch_l2(stream + k / 2 * kCacheLine, 1);
    step(B + k * ldb, B + (k + 1) * ldb, [&](int r) FC_TARGET_LAMBDA {  // (A[r][k], A[r][k+1])
      int32_t x;
      std::memcpy(&x, A + r * lda + k, sizeof(x));
      return _mm512_set1_epi32(x);
    });
  }
  if (k < K)  // (A[r][k], 0)
    step(B + k * ldb, nullptr, [&](int r) FC_TARGET_LAMBDA { return _mm512_set1_epi32(int32_t(A[r * lda + k])); });
  FC_UNROLL for (int r = 0; r < R; ++r)
    FC_UNROLL for (int v = 0; v < V; ++v) {
      _mm512_mask_storeu_ps(C + r * ldc + 32 * v, lanes16(n - 32 * v),
                            kPairsOrder ? acc[r][2 * v]
                                        : _mm512_permutex2var_ps(acc[r][2 * v], from0, acc[r][2 * v + 1]));
      _mm512_mask_storeu_ps(C + r * ldc + 32 * v + 16, lanes16(n - 32 * v - 16),
                            kPairsOrder ? acc[r][2 * v + 1]
                                        : _mm512_permutex2var_ps(acc[r][2 * v], from1, acc[r][2 * v + 1]));
    }
}

using PairsTile = void (*)(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool,
                           int64_t, const FarRows&, int64_t, const char*, int64_t);
constexpr int kPairsTileRows = 4;  // 4 rows x 2 blocks: 16 accumulators, 4 pair vectors
// kPairsTiles<kPairsOrder>[R - 1][V - 1]
template <bool kPairsOrder>
constexpr PairsTile kPairsTiles[kPairsTileRows][2] = {
    {&pairs_in_registers_tile<1, 1, kPairsOrder>, &pairs_in_registers_tile<1, 2, kPairsOrder>},
    {&pairs_in_registers_tile<2, 1, kPairsOrder>, &pairs_in_registers_tile<2, 2, kPairsOrder>},
    {&pairs_in_registers_tile<3, 1, kPairsOrder>, &pairs_in_registers_tile<3, 2, kPairsOrder>},
    {&pairs_in_registers_tile<4, 1, kPairsOrder>, &pairs_in_registers_tile<4, 2, kPairsOrder>}};

// Panels of 64 columns outside, each tile over all of K, 4 rows at a time. Below 16 rows
// (dpbf16_gemm_rows): B's rows (a decoding tile's, at most 512) pass from memory once, fetched
// whole by the first tile, and the later tiles find them in L2. kPairsOrder (from 16 rows, B's rows
// fetched into L2 before but a run's last few): the tiles fetch `stream` into L2 instead, one line
// a step, in the order they run.
template <bool kPairsOrder>
FC_TARGET void pairs_rows_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                               int64_t ldb, float* C, int64_t ldc, bool accumulate, const FarRows& far,
                               const char* stream, int64_t stream_bytes) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
    return;
  }
  const int64_t lines = stream ? (stream_bytes + kCacheLine - 1) / kCacheLine : 0;
  int64_t fetched = 0;  // lines of stream fetched by the tiles so far
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t n = std::min<int64_t>(64, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kPairsTileRows) {
      const int64_t rows = std::min<int64_t>(kPairsTileRows, M - m0);
      const bool first = !kPairsOrder && n0 == 0 && m0 == 0;  // the tile that reads B from memory
      const int64_t tile_lines = std::clamp<int64_t>(lines - fetched, 0, K / 2);
      kPairsTiles<kPairsOrder>[rows - 1][n > 32](K, n, A + m0 * lda, lda, B + n0, ldb, C + m0 * ldc + n0, ldc,
                                                 accumulate, first ? kAheadKeys : 0, first ? far : FarRows{}, N,
                                                 stream + fetched * kCacheLine, tile_lines);
      fetched += tile_lines;
    }
  }
}

// Decoding's S^T = K Q^T at one vector of query rows (N <= 16: 16 rows a kv group), in split steps.
// Why: the one-vector tiles (micro_tile, 6 x 1) broadcast one step of A from memory for each
// multiply-add, 7 loads for 6, and a Zen 5 ran them at the pace of its loads: bf16 6.4-6.8 G
// vdpbf16ps/s a core with A in L1 (7.0-7.3 with the broadcast embedded in the vdpbf16ps) against
// 8.2-8.7 with A in registers. fp32 6.0-6.5 G FMA/s (7.5-7.9 with 12 rows; 6 chains of FMA's
// latency 4 allow 1.5 a cycle, about as much), against about 8.2 at peak (multiply_peak.py's FMA
// over two cores; one thread's clock varies run to run). One 8-byte broadcast of two steps of A for
// two multiply-adds, 8 rows of A a tile (10 loads for 16): bf16 8.1-8.6, fp32 7.8-8.4
// (benchmarks/cpu_harness/broadcast_loads.cpp, one thread, best of runs, five runs: the VM's figures
// vary). Decoding's bf16 S^T alone, one thread, cache in L2 (`decode_bf16_phases 1 2048 1`, five
// runs): 7.4-7.7 G/s against 4.9-5.2. (Both harnesses' buffers 64-byte aligned, as torch's tensors
// are; the figures first given here came from buffers 16 bytes off a cache line, cache_line.h:
// bf16 6.1-6.3, 6.2 embedded, fp32 6.1-6.2, 7.1 with 12 rows, split 8.2-8.4; S^T 7.2-7.3 against 4.6.)
// The split-steps layout of B (N <= 16 columns), in dwords (a step of Op: a bf16 pair or an fp32
// element), both source layouts 64 dwords a step: for each two steps 2j, 2j + 1, two vectors; in
// vector h, lane 2i + s holds column 8h + i's step 2j + s. A's row broadcast 8 bytes at a time
// (its steps 2j and 2j + 1, alternating by lane) times vector h adds step 2j of column 8h + i into
// lane 2i and step 2j + 1 into lane 2i + 1: the even and odd steps summed apart and added at the
// end (even + odd, then C). For bf16 that is what micro_tile's two sets of a one-vector tile do, so
// every output has the bits micro_tile<Bf16Pairs, R, 1> gives it; fp32 sums in two chains of half
// the length where micro_tile summed in one (each within kF32SumChain, as there).
constexpr int kSplitRows = 8;  // rows of A a tile: 16 accumulators (16 chains)
constexpr int64_t kSplitMaxSteps = 128;  // B on the stack: 8 KiB at most
alignas(64) constexpr int32_t kSplitFromRows[2][16] = {{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
                                                       {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}};
alignas(64) constexpr int32_t kEvenOddLanes[2][16] = {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                                                      {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
static_assert(kPairsRow / 2 == kPanelCols, "a step of either source layout is 64 dwords");
// Whether a product of K along A's rows goes in split steps: an even count of steps, within B's
// buffer and within one chain of partial sums (micro_tile: kChainOf).
// (Empty products go to panel_gemm, which leaves C as it is or zeroes it.)
template <typename Op>
bool split_steps_fit(int64_t M, int64_t N, int64_t K) {
  return M > 0 && N > 0 && N <= 16 && K > 0 && K % (2 * Op::kStep) == 0 && K / Op::kStep <= kSplitMaxSteps &&
         K <= kChainOf<Op>;
}

// Bs (split steps, steps / 2 x 32 dwords) = the first N <= 16 columns of one panel of B (pairs or
// panels layout: steps of 64 dwords), the other lanes zero.
FC_TARGET void pack_split_steps(int64_t steps, int64_t N, const void* Bp, int32_t* Bs) {
  const __m512i to0 = _mm512_load_si512(kSplitFromRows[0]), to1 = _mm512_load_si512(kSplitFromRows[1]);
  const __mmask16 m = column_mask(N);
  const int32_t* b = static_cast<const int32_t*>(Bp);
  for (int64_t j = 0; j < steps; j += 2) {
    const __m512i x0 = _mm512_maskz_loadu_epi32(m, b + j * kPanelCols);  // step j of each column
    const __m512i x1 = _mm512_maskz_loadu_epi32(m, b + (j + 1) * kPanelCols);
    _mm512_store_si512(Bs + 16 * j, _mm512_permutex2var_epi32(x0, to0, x1));
    _mm512_store_si512(Bs + 16 * j + 16, _mm512_permutex2var_epi32(x0, to1, x1));
  }
}

// C[0:R, 0:n) (+)= A[0:R, 0:K) B for B in split steps. kStream: as micro_tile's Ahead::kRowsOfA, at
// each line's first step a line of each of the rows `ahead` below into L1, of the rows of `also`
// (ld_also bytes apart) into L2, and, where far > 0, of the rows `far` below into L2.
template <typename Op, int R, bool kStream>
FC_TARGET void split_tile(int64_t K, int64_t n, const typename Op::EA* A, int64_t lda, const int32_t* Bs, float* C,
                          int64_t ldc, bool accumulate, int64_t ahead, const char* also, int64_t ld_also, int64_t far) {
  using EA = typename Op::EA;
  __m512 acc[R][2];
  FC_UNROLL for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2 * Op::kStep) {
    if (kStream && k * sizeof(EA) % kCacheLine == 0) {
      const auto row = [&](int64_t r) { return reinterpret_cast<const char*>(A + r * lda + k); };
      FC_UNROLL for (int r = 0; r < R; ++r) _mm_prefetch(row(r + ahead), _MM_HINT_T0);
      if (also)
        FC_UNROLL for (int r = 0; r < R; ++r) _mm_prefetch(also + r * ld_also + k * sizeof(EA), _MM_HINT_T1);
      if (far)
        FC_UNROLL for (int r = 0; r < R; ++r) _mm_prefetch(row(r + far), _MM_HINT_T1);
    }
    const int32_t* b = Bs + 16 * (k / Op::kStep);
    const __m512 b0 = _mm512_castsi512_ps(_mm512_load_si512(b)), b1 = _mm512_castsi512_ps(_mm512_load_si512(b + 16));
    FC_UNROLL for (int r = 0; r < R; ++r) {
      int64_t two;  // steps 2j and 2j + 1 of row r
      std::memcpy(&two, A + r * lda + k, sizeof(two));
      const __m512 a = _mm512_castsi512_ps(_mm512_set1_epi64(two));
      acc[r][0] = Op::multiply_add(acc[r][0], a, b0);
      acc[r][1] = Op::multiply_add(acc[r][1], a, b1);
    }
  }
  const __m512i even = _mm512_load_si512(kEvenOddLanes[0]), odd = _mm512_load_si512(kEvenOddLanes[1]);
  const __mmask16 m = column_mask(n);
  FC_UNROLL for (int r = 0; r < R; ++r) {
    __m512 c = _mm512_add_ps(_mm512_permutex2var_ps(acc[r][0], even, acc[r][1]),
                             _mm512_permutex2var_ps(acc[r][0], odd, acc[r][1]));
    if (accumulate) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(m, C + r * ldc));
    _mm512_mask_storeu_ps(C + r * ldc, m, c);
  }
}
template <typename Op>
using SplitTile = void (*)(int64_t, int64_t, const typename Op::EA*, int64_t, const int32_t*, float*, int64_t, bool,
                           int64_t, const char*, int64_t, int64_t);
template <typename Op, int... R>
constexpr std::array<SplitTile<Op>, sizeof...(R)> split_tiles(std::integer_sequence<int, R...>) {
  return {&split_tile<Op, R + 1, false>...};
}
template <typename Op>  // [R - 1]: no fetches
constexpr auto kSplitTiles = split_tiles<Op>(std::make_integer_sequence<int, kSplitRows>{});

// The *_gemm_stream_a products where split_steps_fit: blocks of 8 rows of A, each block's rows
// fetched two blocks ahead (the last 16 rows or more of a call are not), the rows of `also` with
// them, and those far.ahead below into L2 as panel_gemm fetches them.
template <typename Op>
FC_TARGET void split_stream_gemm(int64_t M, int64_t N, int64_t K, const typename Op::EA* A, int64_t lda,
                                 const typename Op::EB* Bp, float* C, int64_t ldc, bool accumulate,
                                 const RowsAhead& also, const FarRows& far) {
  alignas(64) int32_t Bs[kSplitMaxSteps * 16];
  pack_split_steps(K / Op::kStep, N, Bp, Bs);
  constexpr int64_t kAheadRows = 2 * kSplitRows;
  for (int64_t m0 = 0; m0 < M; m0 += kSplitRows) {
    const int64_t rows = std::min<int64_t>(kSplitRows, M - m0);
    const bool streams = rows == kSplitRows && m0 + kAheadRows < M;
    const bool far_in_steps = m0 + far.ahead + rows <= far.end;
    if (far.ahead > 0 && !(streams && far_in_steps))
      for (int64_t i = m0 + far.ahead; i < std::min(m0 + far.ahead + rows, far.end); ++i)
        prefetch_l2(A + i * lda, K * sizeof(*A));
    if (streams)
      split_tile<Op, kSplitRows, true>(K, N, A + m0 * lda, lda, Bs, C + m0 * ldc, ldc, accumulate, kAheadRows,
                                       also.base ? also.base + m0 * also.stride : nullptr, also.stride,
                                       far_in_steps ? far.ahead : 0);
    else
      kSplitTiles<Op>[rows - 1](K, N, A + m0 * lda, lda, Bs, C + m0 * ldc, ldc, accumulate, 0, nullptr, 0, 0);
  }
}

}  // namespace

FC_TARGET void pack_pairs_bf16(int64_t K, int64_t N, const uint16_t* B, int64_t ldb, uint16_t* Bp) {
  const int64_t panel = pairs_panel_size(K);
  for (int64_t kk = 0; kk < (K + 1) / 2; ++kk) {
    const uint16_t* r0 = B + 2 * kk * ldb;
    const uint16_t* r1 = 2 * kk + 1 < K ? r0 + ldb : nullptr;  // an odd K's last pair: (row, 0)
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 m = column_mask(N - n);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + n));
      const __m512i hi = r1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + n)), 16)
                            : _mm512_setzero_si512();
      uint16_t* y = Bp + n / kPairsPanel * panel + kk * kPairsRow + 2 * (n % kPairsPanel);
      _mm512_mask_storeu_epi32(y, m, _mm512_or_si512(lo, hi));
    }
  }
}

void pack_pairs_bf16_transposed(int64_t K, int64_t N, const uint16_t* Bt, int64_t ldbt, uint16_t* Bp) {
  const int64_t panel = pairs_panel_size(K);
  const int64_t pairs = K / 2;
  for (int64_t n = 0; n < N; ++n) {
    uint16_t* col = Bp + n / kPairsPanel * panel + 2 * (n % kPairsPanel);  // column n's pair of row pair 0
    const uint16_t* row = Bt + n * ldbt;
    // A pair is two adjacent elements of Bt's row: copied as one 32-bit word. Element by element
    // this loop had 1.6%-2.7% of a bf16 decoding step's samples (GQA 32/8, D 128, Nq = 4, 2k keys:
    // one pack per item of 1024 keys; perf, Zen 5), 0.5% now; the step 1.01x-1.03x faster.
    for (int64_t kk = 0; kk < pairs; ++kk) std::memcpy(col + kk * kPairsRow, row + 2 * kk, 4);
    if (K % 2) col[pairs * kPairsRow] = row[K - 1], col[pairs * kPairsRow + 1] = 0;  // an odd K's last pair: (row, 0)
  }
}

namespace {
// One vector whose lane i is the sum of the lanes of v[i], i < 16 (v is overwritten): four
// butterfly stages, the stage of bit h adding each pair (v[i], v[i + h]) into one vector whose
// lanes with bit h clear fold v[i] and those with it set fold v[i + h]; 15 pairs, 45 operations.
template <int h>
FC_TARGET FC_INLINE void fold_stage(__m512 (&v)[16]) {
  alignas(64) static constexpr auto kIdx = [] {
    std::array<std::array<int32_t, 16>, 2> idx{};
    for (int j = 0; j < 16; ++j) idx[0][j] = (j & h) ? 16 + j - h : j, idx[1][j] = (j & h) ? 16 + j : j + h;
    return idx;
  }();
  const __m512i lo_idx = _mm512_load_si512(kIdx[0].data()), hi_idx = _mm512_load_si512(kIdx[1].data());
  FC_UNROLL for (int i = 0; i < h; ++i)
    v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[i], lo_idx, v[i + h]), _mm512_permutex2var_ps(v[i], hi_idx, v[i + h]));
}
FC_TARGET FC_INLINE __m512 sum_lanes_16(__m512 (&v)[16]) {
  fold_stage<8>(v), fold_stage<4>(v), fold_stage<2>(v), fold_stage<1>(v);  // one stage per bit, no loop:
  return v[0];  // a rolled loop over the stages indexed the array and kept it in memory
}
}  // namespace

// S (rows x n) = Q Kr^T as dot products along the rows (avx512_gemm.h), in blocks of R <= 4 query
// rows by 4 keys: each chunk of a key row is loaded (and widened, for fp16) once for the block's
// rows, into 4 R accumulators whose sums are reduced together (sum_lanes_16, the lanes of missing
// rows fed zeros). Measured on a Xeon against one row at a time with 16 keys' sums reduced
// together (1.0x-2.1x faster from 1 to 15 rows; fp16 most, whose widening is two uops a chunk).
// Op::load(x, left) loads one chunk of a row of Q or of Kr (kChunk elements, zero past its end;
// by the row's element type), Op::dot(acc, q, k) adds the products of two chunks into acc.
template <int R, typename Op, typename EQ, typename EK>
FC_TARGET void rows_dot_block(int64_t n, int64_t K, const EQ* Q, int64_t ldq, const EK* Kr, int64_t ldk, float* S,
                              int64_t lds, const FarRows& far) {
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const int64_t nb = std::min<int64_t>(4, n - j0);
    for (int64_t j = j0 + kAheadKeys; j < std::min(j0 + kAheadKeys + 4, n); ++j)
      prefetch_l1(Kr + j * ldk, K * sizeof(EK));
    if (far.ahead > 0)
      for (int64_t j = j0 + far.ahead; j < std::min(j0 + far.ahead + 4, far.end); ++j)
        prefetch_l2(Kr + j * ldk, K * sizeof(EK));
    __m512 acc[16];
    FC_UNROLL for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += Op::kChunk) {
      decltype(Op::load(Kr, 0)) kv[4];
      // past the last key (nb < 4) the last row again, its sums not stored
      FC_UNROLL for (int i = 0; i < 4; ++i) kv[i] = Op::load(Kr + (j0 + std::min<int64_t>(i, nb - 1)) * ldk + c, K - c);
      FC_UNROLL for (int r = 0; r < R; ++r) {
        const auto q = Op::load(Q + r * ldq + c, K - c);
        FC_UNROLL for (int i = 0; i < 4; ++i) acc[4 * r + i] = Op::dot(acc[4 * r + i], q, kv[i]);
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum_lanes_16(acc));  // lane 4 r + i: row r, key j0 + i
    FC_UNROLL for (int r = 0; r < R; ++r)
      for (int64_t i = 0; i < nb; ++i) S[r * lds + j0 + i] = sums[4 * r + i];
  }
}
template <typename Op, typename EQ, typename EK>
FC_TARGET FC_INLINE void rows_dot(int64_t rows, int64_t n, int64_t K, const EQ* Q, int64_t ldq, const EK* Kr, int64_t ldk,
                                  float* S, int64_t lds, const FarRows& far) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const EQ* q = Q + r0 * ldq;
    float* s = S + r0 * lds;
    const FarRows f = r0 == 0 ? far : FarRows{};  // fetched by the first pass over the keys
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: rows_dot_block<1, Op>(n, K, q, ldq, Kr, ldk, s, lds, f); break;
      case 2: rows_dot_block<2, Op>(n, K, q, ldq, Kr, ldk, s, lds, f); break;
      case 3: rows_dot_block<3, Op>(n, K, q, ldq, Kr, ldk, s, lds, f); break;
      default: rows_dot_block<4, Op>(n, K, q, ldq, Kr, ldk, s, lds, f); break;
    }
  }
}

// bf16: 32 elements (16 pairs) a chunk, vdpbf16ps; fp32: 16, FMA. Loads past a row's end give 0.
struct Bf16Dot {
  static constexpr int64_t kChunk = 32;
  static FC_TARGET FC_INLINE __m512bh load(const uint16_t* x, int64_t left) {
    return (__m512bh)_mm512_maskz_loadu_epi16(lanes32(left), x);
  }
  static FC_TARGET FC_INLINE __m512 dot(__m512 acc, __m512bh q, __m512bh k) { return _mm512_dpbf16_ps(acc, k, q); }
};
struct F32Dot {
  static constexpr int64_t kChunk = 16;
  static FC_TARGET FC_INLINE __m512 load(const float* x, int64_t left) { return _mm512_maskz_loadu_ps(column_mask(left), x); }
  static FC_TARGET FC_INLINE __m512 dot(__m512 acc, __m512 q, __m512 k) { return _mm512_fmadd_ps(k, q, acc); }
};

// fp32 Q against IEEE half key rows, widened exactly as they are loaded (vcvtph2ps).
struct F32ByF16Dot {
  static constexpr int64_t kChunk = 16;
  static FC_TARGET FC_INLINE __m512 load(const float* x, int64_t left) { return _mm512_maskz_loadu_ps(column_mask(left), x); }
  static FC_TARGET FC_INLINE __m512 load(const uint16_t* x, int64_t left) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(column_mask(left), x));
  }
  static FC_TARGET FC_INLINE __m512 dot(__m512 acc, __m512 q, __m512 k) { return _mm512_fmadd_ps(k, q, acc); }
};

FC_TARGET void dpbf16_rows_dot(int64_t rows, int64_t n, int64_t K, const uint16_t* Q, int64_t ldq, const uint16_t* Kr,
                               int64_t ldk, float* S, int64_t lds, const FarRows& far) {
  rows_dot<Bf16Dot>(rows, n, K, Q, ldq, Kr, ldk, S, lds, far);
}
FC_TARGET void f32_rows_dot(int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const float* Kr, int64_t ldk,
                            float* S, int64_t lds, const FarRows& far) {
  rows_dot<F32Dot>(rows, n, K, Q, ldq, Kr, ldk, S, lds, far);
}

FC_TARGET void f32_f16_rows_dot(int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const uint16_t* Kr,
                                int64_t ldk, float* S, int64_t lds, const FarRows& far) {
  rows_dot<F32ByF16Dot>(rows, n, K, Q, ldq, Kr, ldk, S, lds, far);
}

// Rows r0 + i and r0 + i + 1 of a run (r0 + i even): one whole row pair, each 16 columns widened
// from both rows, interleaved and stored in one full vector (no per-row masked 16-bit stores).
FC_TARGET FC_INLINE void stage_pair(int64_t N, const uint16_t* s0, const uint16_t* s1, uint16_t* pair,
                                    int64_t panel_stride) {
  for (int64_t c = 0; c < N; c += 16) {
    uint16_t* y = pair + c / kPairsPanel * panel_stride + 2 * (c % kPairsPanel);
    if (N - c >= 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s0 + c)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s1 + c)));
      _mm512_storeu_si512(y, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    } else {
      const __mmask16 m = column_mask(N - c);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s0 + c));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s1 + c));
      _mm512_mask_storeu_epi32(y, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// Row r's half of its pair alone (a run that starts or ends inside a pair).
FC_TARGET FC_INLINE void stage_half(int64_t N, const uint16_t* s, int64_t r, uint16_t* Bp, int64_t panel_stride) {
  const __mmask32 half = r % 2 ? 0xAAAAAAAAu : 0x55555555u;  // this row's 16-bit half of each pair
  uint16_t* row = Bp + r / 2 * kPairsRow;
  for (int64_t c = 0; c < N; c += 16) {
    const __mmask16 m = column_mask(N - c);
    __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + c));
    if (r % 2) x = _mm512_slli_epi32(x, 16);
    const __mmask32 words = N - c >= 16 ? 0xFFFFFFFFu : (1u << (2 * (N - c))) - 1;  // 2 halves a column
    _mm512_mask_storeu_epi16(row + c / kPairsPanel * panel_stride + 2 * (c % kPairsPanel), half & words, x);
  }
}

// Whole pairs where the run covers both rows, a row alone only at a run's odd start or end.
// Measured on a Zen 4 against every row stored as its half with 16-bit masked stores (in-process
// A/B, GQA 32/8, D 128, bf16, Nq = 4, 2k to 32k keys, outputs bit-identical): 1.00x-1.06x.
FC_TARGET void stage_rows_pairs(int64_t n, int64_t N, const uint16_t* src, int64_t lds, int64_t r0, uint16_t* Bp,
                                int64_t panel_stride, const RowsAhead& also) {
  const auto fetch = [&](int64_t i) {
    also.fetch(r0 + i);  // also's row of the same index, into L2
    if (i + kAheadKeys < n) prefetch_l1(src + (i + kAheadKeys) * lds, N * sizeof(uint16_t));
  };
  int64_t i = 0;
  if (n > 0 && r0 % 2) fetch(0), stage_half(N, src, r0, Bp, panel_stride), i = 1;
  for (; i + 1 < n; i += 2) {
    fetch(i), fetch(i + 1);
    stage_pair(N, src + i * lds, src + (i + 1) * lds, Bp + (r0 + i) / 2 * kPairsRow, panel_stride);
  }
  if (i < n) fetch(i), stage_half(N, src + i * lds, r0 + i, Bp, panel_stride);
}

FC_TARGET void zero_pair_half(int64_t r, int64_t N, uint16_t* Bp, int64_t panel_stride) {
  uint16_t* row = Bp + r / 2 * kPairsRow;
  for (int64_t c = 0; c < N; ++c) row[c / kPairsPanel * panel_stride + 2 * (c % kPairsPanel) + r % 2] = 0;
}

void dpbf16_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp,
                 int64_t panel_stride, float* C, int64_t ldc, bool accumulate, const char* stream,
                 int64_t stream_bytes) {
  panel_gemm<Bf16Pairs>(M, N, K, A, lda, Bp, panel_stride, kPairsRow, C, ldc, accumulate, {}, stream,
                        (stream_bytes + 63) / 64);
}

void dpbf16_gemm_stream_a(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp,
                          int64_t panel_stride, float* C, int64_t ldc, bool accumulate, const RowsAhead& also) {
  if (split_steps_fit<Bf16Pairs>(M, N, K))
    return split_stream_gemm<Bf16Pairs>(M, N, K, A, lda, Bp, C, ldc, accumulate, also, {});
  panel_gemm<Bf16Pairs, true>(M, N, K, A, lda, Bp, panel_stride, kPairsRow, C, ldc, accumulate, also);
}

FC_TARGET void pack_panels_f32(int64_t K, int64_t N, const float* B, int64_t ldb, float* Bp) {
  const int64_t panel = panels_f32_panel_size(K);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; n += 16)
      _mm512_mask_storeu_ps(Bp + n / kPanelCols * panel + k * kPanelCols + n % kPanelCols, column_mask(N - n),
                            _mm512_maskz_loadu_ps(column_mask(N - n), B + k * ldb + n));
}

void f32_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t panel_stride,
              float* C, int64_t ldc, bool accumulate) {
  panel_gemm<F32>(M, N, K, A, lda, Bp, panel_stride, kPanelCols, C, ldc, accumulate);
}

void f32_gemm_stream_a(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
                       int64_t panel_stride, float* C, int64_t ldc, bool accumulate, const RowsAhead& also,
                       const FarRows& far) {
  if (split_steps_fit<F32>(M, N, K)) return split_stream_gemm<F32>(M, N, K, A, lda, Bp, C, ldc, accumulate, also, far);
  panel_gemm<F32, true>(M, N, K, A, lda, Bp, panel_stride, kPanelCols, C, ldc, accumulate, also, nullptr, 0, far);
}

void f32_gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, bool accumulate, const FarRows& far) {
  rows_gemm<F32>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, far);
}

void f32_gemm_at_rows(int64_t M, int64_t N, int64_t K, const float* At, int64_t ldat, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  rows_gemm<F32TransposedA>(M, N, K, At, ldat, B, ldb, C, ldc, accumulate, {});
}

void bf16_gemm_rows(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate, const FarRows& far) {
  rows_gemm<Bf16AsF32>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, far);
}

void dpbf16_gemm_rows(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate, const FarRows& far) {
  pairs_rows_gemm<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, far, nullptr, 0);
}

void dpbf16_gemm_rows_pairs_order(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                                  int64_t ldb, float* C, int64_t ldc, const char* stream, int64_t stream_bytes) {
  pairs_rows_gemm<true>(M, N, K, A, lda, B, ldb, C, ldc, true, {}, stream, stream_bytes);
}

FC_TARGET void pairs_order_to_columns(int64_t N, float* row) {
  const __m512i from0 = _mm512_load_si512(kFromPairs[0]), from1 = _mm512_load_si512(kFromPairs[1]);
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const __m512 c0 = _mm512_loadu_ps(row + n0), c1 = _mm512_loadu_ps(row + n0 + 16);
    _mm512_storeu_ps(row + n0, _mm512_permutex2var_ps(c0, from0, c1));
    _mm512_storeu_ps(row + n0 + 16, _mm512_permutex2var_ps(c0, from1, c1));
  }
}

void f32_f16_gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate, const FarRows& far) {
  rows_gemm<F32ByF16>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, far);
}

#else  // no AVX512-BF16 code on this compiler or architecture
bool dpbf16_supported() { return false; }
void pack_pairs_bf16(int64_t, int64_t, const uint16_t*, int64_t, uint16_t*) {}
void pack_pairs_bf16_transposed(int64_t, int64_t, const uint16_t*, int64_t, uint16_t*) {}
void stage_rows_pairs(int64_t, int64_t, const uint16_t*, int64_t, int64_t, uint16_t*, int64_t, const RowsAhead&) {}
void zero_pair_half(int64_t, int64_t, uint16_t*, int64_t) {}
void dpbf16_rows_dot(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                     const FarRows&) {}
void f32_rows_dot(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                  const FarRows&) {}
void dpbf16_gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool,
                 const char*, int64_t) {}
void dpbf16_gemm_stream_a(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                          bool, const RowsAhead&) {}
bool f32_gemm_supported() { return false; }
void pack_panels_f32(int64_t, int64_t, const float*, int64_t, float*) {}
void f32_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {}
void f32_gemm_stream_a(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool,
                       const RowsAhead&, const FarRows&) {}
void f32_gemm_rows(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool,
                   const FarRows&) {}
void f32_gemm_at_rows(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {}
void bf16_gemm_rows(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                    bool, const FarRows&) {}
void dpbf16_gemm_rows(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                      bool, const FarRows&) {}
void dpbf16_gemm_rows_pairs_order(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*,
                                  int64_t, const char*, int64_t) {}
void pairs_order_to_columns(int64_t, float*) {}
void f32_f16_rows_dot(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                      const FarRows&) {}
void f32_f16_gemm_rows(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                       bool, const FarRows&) {}
#endif

}  // namespace flash_cuda::cpu
