// The AVX2 decoding kernels (avx2_rows.h). Compiled for the whole file's baseline; each function
// that uses AVX2 carries its own target attribute and runs only after avx2_rows_supported() said
// yes.
#include "avx2_rows.h"

#include "avx512_gemm.h"  // the panels layout (kPanelCols)
#include "prefetch.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FC_HAVE_AVX2_ROWS 1
// Only what avx2_rows_supported() checks: "arch=x86-64-v3" would also let GCC use BMI2 and MOVBE.
#define FC_TARGET __attribute__((target("avx2,fma,f16c")))
#define FC_INLINE inline __attribute__((always_inline))
#define FC_UNROLL _Pragma("GCC unroll 8")
#endif

namespace flash_cuda::cpu {

#ifdef FC_HAVE_AVX2_ROWS
bool avx2_rows_supported() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}

namespace {

// A cache row's elements widened to fp32, exactly: 8 at a time (load8) or one (load1).
struct F32Row {
  using E = float;
  static FC_TARGET FC_INLINE __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
  static FC_TARGET FC_INLINE float load1(const float* x) { return *x; }
};
struct F16Row {  // IEEE half: F16C's vcvtph2ps
  using E = uint16_t;
  static FC_TARGET FC_INLINE __m256 load8(const uint16_t* x) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  }
  static FC_TARGET FC_INLINE float load1(const uint16_t* x) { return _cvtsh_ss(*x); }
};
struct Bf16Row {  // bf16: the upper half of an fp32
  using E = uint16_t;
  static FC_TARGET FC_INLINE __m256 load8(const uint16_t* x) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static FC_TARGET FC_INLINE float load1(const uint16_t* x) {
    const uint32_t bits = uint32_t(*x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};

// One vector whose lane i is the sum of the lanes of v[i]: two rounds of pairwise adds within
// 128-bit halves (hadd), then the two halves of each sum added.
FC_TARGET FC_INLINE __m256 sum_lanes_8(const __m256 (&v)[8]) {
  const __m256 v01 = _mm256_hadd_ps(v[0], v[1]), v23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 v45 = _mm256_hadd_ps(v[4], v[5]), v67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 lo = _mm256_hadd_ps(v01, v23), hi = _mm256_hadd_ps(v45, v67);  // v0..3 (v4..7): lanes 0-3 | 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// Rows are fetched into L1 ahead of their use (prefetch.h). Measured on a Zen 3: without them the
// loads of the next rows of V stalled the P V loop, 70% of its cycles on the one load instruction
// of a row's columns (its blocks of rows step through memory a row stride at a time, which the
// hardware prefetchers did not follow). The callers may also name rows to fetch into L2 as they go
// (RowsAhead): decoding's value rows while their key rows are multiplied, the next tile's key rows
// while the value rows are (2026-12-04, Zen 3, bf16, GQA 32/8, D 128, Nq 1, 32k keys: 13.1 to
// 13.7 ms against 14.2 to 16.3 without, one thread).
constexpr int64_t kAheadKeys = 16;  // rows_dot_block prefetches the key rows this far ahead

// S (R x n) = Q Kr^T for R <= 4 query rows: per pair of keys and chunk of 8 elements, the two key
// chunks are loaded (and widened) once for the R rows, into 2 R accumulators reduced together
// (the lanes of missing rows are zeros). The K % 8 last elements are added after the reduction.
template <int R, typename Row>
FC_TARGET void rows_dot_block(int64_t n, int64_t K, const float* Q, int64_t ldq, const typename Row::E* Kr,
                              int64_t ldk, float* S, int64_t lds, const RowsAhead& also) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t j0 = 0; j0 < n; j0 += 2) {
    const int64_t nb = std::min<int64_t>(2, n - j0);
    for (int64_t j = j0 + kAheadKeys; j < std::min(j0 + kAheadKeys + 2, n); ++j)
      prefetch_l1(Kr + j * ldk, K * sizeof(typename Row::E));
    also.fetch(j0), also.fetch(j0 + 1);
    const typename Row::E* key[2] = {Kr + j0 * ldk, Kr + (j0 + nb - 1) * ldk};  // one key: its row twice, once stored
    __m256 acc[8];
    FC_UNROLL for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K8; c += 8) {
      const __m256 k0 = Row::load8(key[0] + c), k1 = Row::load8(key[1] + c);
      FC_UNROLL for (int r = 0; r < R; ++r) {
        const __m256 q = _mm256_loadu_ps(Q + r * ldq + c);
        acc[2 * r] = _mm256_fmadd_ps(q, k0, acc[2 * r]);
        acc[2 * r + 1] = _mm256_fmadd_ps(q, k1, acc[2 * r + 1]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum_lanes_8(acc));  // lane 2 r + i: row r, key j0 + i
    for (int r = 0; r < R; ++r)
      for (int64_t i = 0; i < nb; ++i) {
        float s = sums[2 * r + i];
        for (int64_t c = K8; c < K; ++c) s += Q[r * ldq + c] * Row::load1(key[i] + c);
        S[r * lds + j0 + i] = s;
      }
  }
}
template <typename Row>
FC_TARGET void rows_dot(int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const typename Row::E* Kr,
                        int64_t ldk, float* S, int64_t lds, const RowsAhead& also) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* q = Q + r0 * ldq;
    float* s = S + r0 * lds;
    const RowsAhead& a = r0 == 0 ? also : RowsAhead{};  // fetched by the first pass over the keys
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: rows_dot_block<1, Row>(n, K, q, ldq, Kr, ldk, s, lds, a); break;
      case 2: rows_dot_block<2, Row>(n, K, q, ldq, Kr, ldk, s, lds, a); break;
      case 3: rows_dot_block<3, Row>(n, K, q, ldq, Kr, ldk, s, lds, a); break;
      default: rows_dot_block<4, Row>(n, K, q, ldq, Kr, ldk, s, lds, a); break;
    }
  }
}

// 8 floats, or (masked) the lanes of `mask` and zeros; `masked` is a constant once the tile's loops
// are unrolled.
FC_TARGET FC_INLINE __m256 load_cols(const float* x, bool masked, __m256i mask) {
  return masked ? _mm256_maskload_ps(x, mask) : _mm256_loadu_ps(x);
}

// The register tile of both GEMMs below: C (R x n) (+)= A (R x K) B (K x n) for R <= 6 rows and
// n <= 8 V columns, B's rows ldb elements apart, in R V <= 12 accumulators; each B row loaded
// (widened) once for the R rows, each A element broadcast once for the V vectors. kTail (fp32 B):
// the last vector holds n - 8 (V - 1) < 8 columns, loaded and stored masked (a masked load reads
// no memory past them).
template <int R, int V, bool kTail, typename Row>
FC_TARGET FC_INLINE void gemm_tile(int64_t K, int64_t n, const float* A, int64_t lda, const typename Row::E* B,
                                   int64_t ldb, float* C, int64_t ldc, bool accumulate,
                                   const typename Row::E* ahead = nullptr, int64_t ahead_rows = 0) {
  static_assert(!kTail || std::is_same_v<Row, F32Row>, "masked columns of fp32 rows only");
  const __m256i tail =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - 8 * (V - 1))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 acc[R][V];
  FC_UNROLL for (int r = 0; r < R; ++r)
    FC_UNROLL for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? load_cols(C + r * ldc + 8 * v, kTail && v == V - 1, tail) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k < ahead_rows) prefetch_l1(ahead + k * ldb, 8 * V * sizeof(typename Row::E));
    __m256 b[V];
    FC_UNROLL for (int v = 0; v < V; ++v) {
      if constexpr (kTail)
        b[v] = load_cols(B + k * ldb + 8 * v, v == V - 1, tail);
      else
        b[v] = Row::load8(B + k * ldb + 8 * v);
    }
    FC_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      FC_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  FC_UNROLL for (int r = 0; r < R; ++r)
    FC_UNROLL for (int v = 0; v < V; ++v) {
      if (kTail && v == V - 1)
        _mm256_maskstore_ps(C + r * ldc + 8 * v, tail, acc[r][v]);
      else
        _mm256_storeu_ps(C + r * ldc + 8 * v, acc[r][v]);
    }
}
// ahead: the same columns of ahead_rows rows to fetch as the first row block passes.
template <int V, typename Row>
FC_TARGET void gemm_tiles(int64_t M, int64_t K, const float* A, int64_t lda, const typename Row::E* B, int64_t ldb,
                          float* C, int64_t ldc, const typename Row::E* ahead, int64_t ahead_rows) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* a = A + m0 * lda;
    float* c = C + m0 * ldc;
    const int64_t f = m0 == 0 ? ahead_rows : 0;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: gemm_tile<1, V, false, Row>(K, 8 * V, a, lda, B, ldb, c, ldc, true, ahead, f); break;
      case 2: gemm_tile<2, V, false, Row>(K, 8 * V, a, lda, B, ldb, c, ldc, true, ahead, f); break;
      case 3: gemm_tile<3, V, false, Row>(K, 8 * V, a, lda, B, ldb, c, ldc, true, ahead, f); break;
      default: gemm_tile<4, V, false, Row>(K, 8 * V, a, lda, B, ldb, c, ldc, true, ahead, f); break;
    }
  }
}

constexpr int64_t kKBlock = 32;  // rows of B per block, held in L1 (8 KiB of bf16 rows of 128) with the next

template <typename Row>
FC_TARGET void gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const typename Row::E* B,
                         int64_t ldb, float* C, int64_t ldc, bool accumulate, const RowsAhead& also) {
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t kn = std::min(kKBlock, K - k0);
    for (int64_t k = k0; k < k0 + kn; ++k) also.fetch(k);
    const float* a = A + k0;
    const typename Row::E* b = B + k0 * ldb;
    // The next block's rows, each column tile fetching its own columns row by row as it goes.
    // (Fetched all at once at the start of each block, 128 to 256 lines, the prefetches stalled
    // on the full miss buffers and the first loads of V still waited on memory.)
    const int64_t ahead = std::clamp<int64_t>(K - k0 - kKBlock, 0, kn);
    const typename Row::E* next = ahead ? b + kKBlock * ldb : b;
    int64_t n0 = 0;
    for (; n0 + 16 <= N; n0 += 16) gemm_tiles<2, Row>(M, kn, a, lda, b + n0, ldb, C + n0, ldc, next + n0, ahead);
    for (; n0 + 8 <= N; n0 += 8) gemm_tiles<1, Row>(M, kn, a, lda, b + n0, ldb, C + n0, ldc, next + n0, ahead);
    for (int64_t k = 0; n0 < N && k < ahead; ++k)  // the columns past the tiles
      prefetch_l1(next + k * ldb + n0, (N - n0) * sizeof(typename Row::E));
    for (; n0 < N; ++n0)  // the N % 8 last columns
      for (int64_t m = 0; m < M; ++m) {
        float s = C[m * ldc + n0];
        for (int64_t k = 0; k < kn; ++k) s += a[m * lda + k] * Row::load1(b + k * ldb + n0);
        C[m * ldc + n0] = s;
      }
  }
}

// gemm_tile on fp32 B for R rows and n <= 16 columns: whole or partial vectors.
template <int R>
FC_TARGET void panel_tile_cols(int64_t K, int64_t n, const float* A, int64_t lda, const float* B, int64_t ldb,
                               float* C, int64_t ldc, bool accumulate) {
  if (n == 16) return gemm_tile<R, 2, false, F32Row>(K, n, A, lda, B, ldb, C, ldc, accumulate);
  if (n > 8) return gemm_tile<R, 2, true, F32Row>(K, n, A, lda, B, ldb, C, ldc, accumulate);
  if (n == 8) return gemm_tile<R, 1, false, F32Row>(K, n, A, lda, B, ldb, C, ldc, accumulate);
  gemm_tile<R, 1, true, F32Row>(K, n, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace

FC_TARGET void avx2_panel_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
                               int64_t panel_stride, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t kTileRows = 6, kTileCols = 16;
  for (int64_t n0 = 0; n0 < N; n0 += kPanelCols) {
    const float* panel = Bp + n0 / kPanelCols * panel_stride;
    // Row blocks outside: each block's rows of A (6 x K) stay in L1 while the panel's columns
    // pass over them, and A (the key rows of decoding, read from memory) is read once.
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const float* a = A + m0 * lda;
      for (int64_t c0 = n0; c0 < std::min(N, n0 + kPanelCols); c0 += kTileCols) {
        const int64_t n = std::min(kTileCols, N - c0);
        const float* b = panel + (c0 - n0);
        float* c = C + m0 * ldc + c0;
        switch (std::min(kTileRows, M - m0)) {
          case 1: panel_tile_cols<1>(K, n, a, lda, b, kPanelCols, c, ldc, accumulate); break;
          case 2: panel_tile_cols<2>(K, n, a, lda, b, kPanelCols, c, ldc, accumulate); break;
          case 3: panel_tile_cols<3>(K, n, a, lda, b, kPanelCols, c, ldc, accumulate); break;
          case 4: panel_tile_cols<4>(K, n, a, lda, b, kPanelCols, c, ldc, accumulate); break;
          case 5: panel_tile_cols<5>(K, n, a, lda, b, kPanelCols, c, ldc, accumulate); break;
          default: panel_tile_cols<6>(K, n, a, lda, b, kPanelCols, c, ldc, accumulate); break;
        }
      }
    }
  }
}

// dst (n x K, row stride ldd) = the rows of src widened to fp32, the rows kAheadKeys ahead fetched
// as it goes (on a Xeon, fp16 decoding at 16 and 32 rows: 1.06x to 1.10x faster than without).
template <typename Row>
FC_TARGET void stage_rows(int64_t n, int64_t K, const typename Row::E* src, int64_t lds, float* dst, int64_t ldd) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t i = 0; i < n; ++i) {
    const typename Row::E* x = src + i * lds;
    float* y = dst + i * ldd;
    if (i + kAheadKeys < n) prefetch_l1(src + (i + kAheadKeys) * lds, K * sizeof(typename Row::E));
    for (int64_t c = 0; c < K8; c += 8) _mm256_storeu_ps(y + c, Row::load8(x + c));
    for (int64_t c = K8; c < K; ++c) y[c] = Row::load1(x + c);
  }
}

void avx2_stage_rows(RowType t, int64_t n, int64_t K, const void* src, int64_t lds, float* dst, int64_t ldd) {
  const auto* s16 = static_cast<const uint16_t*>(src);
  switch (t) {
    case RowType::kF32: return stage_rows<F32Row>(n, K, static_cast<const float*>(src), lds, dst, ldd);
    case RowType::kF16: return stage_rows<F16Row>(n, K, s16, lds, dst, ldd);
    case RowType::kBF16: return stage_rows<Bf16Row>(n, K, s16, lds, dst, ldd);
  }
}

void avx2_rows_dot(RowType t, int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const void* Kr,
                   int64_t ldk, float* S, int64_t lds, const RowsAhead& also) {
  const auto* k16 = static_cast<const uint16_t*>(Kr);
  switch (t) {
    case RowType::kF32: return rows_dot<F32Row>(rows, n, K, Q, ldq, static_cast<const float*>(Kr), ldk, S, lds, also);
    case RowType::kF16: return rows_dot<F16Row>(rows, n, K, Q, ldq, k16, ldk, S, lds, also);
    case RowType::kBF16: return rows_dot<Bf16Row>(rows, n, K, Q, ldq, k16, ldk, S, lds, also);
  }
}

void avx2_gemm_rows(RowType t, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate,
                    const RowsAhead& also) {
  const auto* b16 = static_cast<const uint16_t*>(B);
  switch (t) {
    case RowType::kF32:
      return gemm_rows<F32Row>(M, N, K, A, lda, static_cast<const float*>(B), ldb, C, ldc, accumulate, also);
    case RowType::kF16: return gemm_rows<F16Row>(M, N, K, A, lda, b16, ldb, C, ldc, accumulate, also);
    case RowType::kBF16: return gemm_rows<Bf16Row>(M, N, K, A, lda, b16, ldb, C, ldc, accumulate, also);
  }
}

#else  // no AVX2 code on this compiler or architecture
bool avx2_rows_supported() { return false; }
void avx2_rows_dot(RowType, int64_t, int64_t, int64_t, const float*, int64_t, const void*, int64_t, float*, int64_t,
                   const RowsAhead&) {}
void avx2_gemm_rows(RowType, int64_t, int64_t, int64_t, const float*, int64_t, const void*, int64_t, float*, int64_t,
                    bool, const RowsAhead&) {}
void avx2_panel_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {}
#endif

}  // namespace flash_cuda::cpu
