// Tile GEMMs of the CPU backend (tile_gemm.h).
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "avx2_rows.h"
#include "avx512_gemm.h"
#include "multiversion.h"
#include "scratch.h"

// MKL's (the BLAS's) Fortran sgemm, exported by torch's CPU library when it is built on MKL; weak,
// so the extension still loads against a torch without it (mkl_sgemm then declines).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace flash_cuda::cpu {
namespace {
// Whether this thread's last packed brgemm call left its AMX tile configuration loaded.
thread_local bool tiles_held = false;
}  // namespace

// The libraries' thread-count setters, weak: a torch built without OpenMP or MKL lacks them.
// (MKL's C entry point is MKL_Set_Num_Threads_Local, which mkl_service.h names
// mkl_set_num_threads_local by a macro; the lower-case symbol is its Fortran one, by pointer.)
extern "C" {
int omp_get_max_threads() __attribute__((weak));
void omp_set_num_threads(int) __attribute__((weak));
int omp_in_parallel() __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

SequentialGemms::SequentialGemms() {
  if (omp_in_parallel && omp_in_parallel()) return;
  if (omp_get_max_threads && omp_set_num_threads) {
    omp_before_ = omp_get_max_threads();
    omp_set_num_threads(1);
  }
  if (MKL_Set_Num_Threads_Local) mkl_before_ = MKL_Set_Num_Threads_Local(1);  // 0: none was set
}

SequentialGemms::~SequentialGemms() {
  if (omp_before_ > 0) omp_set_num_threads(omp_before_);
  if (mkl_before_ >= 0) MKL_Set_Num_Threads_Local(mkl_before_);
}

void release_tiles() {
  if (!tiles_held) return;
  at::native::cpublas::brgemm_release(true);
  tiles_held = false;
}

namespace {

// is_vnni = false: B is plain row-major, no packing; brgemm then runs oneDNN's GEMM for these
// types (C += A B with the C++ types' own precision, accumulated in float), which configures the
// AMX tiles itself.
template <typename T>
void brgemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C, int64_t ldc,
            bool accumulate) {
  if (M == 0 || N == 0) return;
  release_tiles();
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

bool cpu_has(const char* flag) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(flag);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Row-major C (M x N) (+)= A B by MKL's Fortran sgemm_ called directly, where torch runs on MKL:
// at::mm on views of the tiles made three tensors and ran the dispatcher for every tile GEMM,
// 1.02x-1.04x of a whole fp32 forward or backward (in-process A/B on a Xeon with AMX; the same
// sgemm, the same bits). Column-major, that is C^T = B^T A^T: B^T is B as stored (transposed_b:
// B holds K x N column-major, element (k, n) at B[k + n ldb]). False, and nothing done, where the
// symbol is absent or a size does not fit the BLAS's int or leading-dimension rules.
bool mkl_sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
               bool transposed_b, float* C, int64_t ldc, bool accumulate) {
  static const bool available = sgemm_ != nullptr && at::hasMKL();
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (!available || std::max({M, N, K, lda, ldb, ldc}) > kMax || ldc < N || lda < K ||
      ldb < (transposed_b ? K : N))
    return false;
  const char ta = transposed_b ? 'T' : 'N', tb = 'N';
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const float alpha = 1, beta = accumulate ? 1 : 0;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  return true;
}

// float and double: MKL's sgemm directly (mkl_sgemm) where it can, else ATen's mm (the BLAS
// sgemm/dgemm) on views of the tiles. b_col: B's column stride (1, or ldb's role swapped for a
// transposed B: element (k, n) at B[k + n b_col], ldb = 1), which the BLAS takes as a transpose
// flag, no copy.
template <typename T>
void blas_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
               bool accumulate, int64_t b_col = 1) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (K > kF32SumChain) {  // partial products of kF32SumChain rows of B, each added into C
      for (int64_t k0 = 0; k0 < K; k0 += kF32SumChain)
        blas_gemm(M, N, std::min(kF32SumChain, K - k0), A + k0, lda, B + k0 * ldb, ldb, C, ldc, accumulate || k0 > 0,
                  b_col);
      return;
    }
    if (mkl_sgemm(M, N, K, A, lda, B, b_col == 1 ? ldb : b_col, b_col != 1, C, ldc, accumulate)) return;
  }
  release_tiles();  // at::mm may run oneDNN, which configures the AMX tiles itself
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, b_col}, opts);
  if (accumulate)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

// The micro-kernels multiply products of at least one vector of columns. Narrower ones (the last
// key tile of an odd length, one key) go to oneDNN or the BLAS: the kernel would leave most lanes
// idle, and its sequential fp32 sums along K (64 terms for dP = dO V^T at D = 64) measured a
// larger error than MKL's there, enough to fail the FA rule on a one-key gradient (Nk = 1, where
// dS = dP - D_i cancels exactly in plain torch).
constexpr int64_t kMicroMinCols = 16;

// The micro-kernels (avx512_gemm.h) by operand type: whether the CPU takes them, the size of a
// packed K x N operand (of one panel with N = kPanelCols; of rows 0..k0 at an even k0), its packing
// and its GEMM.
template <typename T>
bool use_micro_kernel() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return use_dpbf16();
  if constexpr (std::is_same_v<T, float>) return use_avx512_f32();
  return false;
}
template <typename T>
int64_t micro_size(int64_t K, int64_t N) {
  return std::is_same_v<T, c10::BFloat16> ? pairs_size(K, N) : panels_f32_size(K, N);
}
void micro_pack(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, c10::BFloat16* Bp) {
  pack_pairs_bf16(K, N, reinterpret_cast<const uint16_t*>(B), ldb, reinterpret_cast<uint16_t*>(Bp));
}
void micro_pack(int64_t K, int64_t N, const float* B, int64_t ldb, float* Bp) { pack_panels_f32(K, N, B, ldb, Bp); }
template <typename T>
void micro_pack(int64_t, int64_t, const T*, int64_t, T*) {}
// The same from B's transpose, given as its N rows Bt of K elements (row stride ldbt): a head's
// key rows as K^T. A word transpose per panel (transpose(): 16 x 16 blocks on AVX-512): a row of
// an fp32 panel is one word of every row of Bt; a row pair of the bf16 pairs layout is the word
// (Bt[n][2kk], Bt[n][2kk + 1]) of every row, so an even K on 4-byte aligned rows (below). Before,
// the key rows were first copied into a dense K^T by ATen (a transposing copy on one thread:
// 1.5 ms of a 24 ms fp32 forward at N = 1024, D = 128 on a Zen 4).
void micro_pack_transposed(int64_t K, int64_t N, const float* Bt, int64_t ldbt, float* Bp) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanelCols)
    transpose(std::min(kPanelCols, N - n0), K, Bt + n0 * ldbt, ldbt, Bp + n0 / kPanelCols * panels_f32_panel_size(K),
              kPanelCols);
}
void micro_pack_transposed(int64_t K, int64_t N, const c10::BFloat16* Bt, int64_t ldbt, c10::BFloat16* Bp) {
  for (int64_t n0 = 0; n0 < N; n0 += kPairsPanel)
    transpose(std::min(kPairsPanel, N - n0), K / 2, reinterpret_cast<const float*>(Bt + n0 * ldbt), ldbt / 2,
              reinterpret_cast<float*>(Bp + n0 / kPairsPanel * pairs_panel_size(K)), kPairsPanel);
}
template <typename T>
void micro_pack_transposed(int64_t, int64_t, const T*, int64_t, T*) {}
// Whether x (B, H, K, N), the transpose of rows (unit stride along K), packs from its rows: bf16
// pairs must be whole 4-byte words in every head's rows, so the batch, head and row strides even
// and the first element aligned.
template <typename T>
bool transposed_pack_ok(const at::Tensor& x) {
  if (x.stride(2) != 1 || x.stride(3) == 1) return false;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return x.size(2) % 2 == 0 && x.stride(0) % 2 == 0 && x.stride(1) % 2 == 0 && x.stride(3) % 2 == 0 &&
           reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0;
  return std::is_same_v<T, float>;
}
void micro_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* Bp,
                int64_t panel, float* C, int64_t ldc, bool accumulate) {
  dpbf16_gemm(M, N, K, reinterpret_cast<const uint16_t*>(A), lda, reinterpret_cast<const uint16_t*>(Bp), panel, C, ldc,
              accumulate);
}
void micro_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t panel, float* C,
                int64_t ldc, bool accumulate) {
  f32_gemm(M, N, K, A, lda, Bp, panel, C, ldc, accumulate);
}
template <typename T, typename C>
void micro_gemm(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, C*, int64_t, bool) {}

// C (+)= A B through the micro-kernel with B (K x N, row stride ldb) packed here, into a per-thread
// buffer (O(K N), against O(M K N) for the product): for the operands of one GEMM (P, dS).
template <typename T>
void micro_gemm_packing(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C,
                        int64_t ldc, bool accumulate) {
  thread_local std::vector<T> packed;
  packed.resize(micro_size<T>(K, N));
  micro_pack(K, N, B, ldb, packed.data());
  micro_gemm(M, N, K, A, lda, packed.data(), micro_size<T>(K, kPanelCols), C, ldc, accumulate);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FC_WORD_TRANSPOSE_AVX512 1
// dst[j * w + i] = word j of row i (at b + i cs, in 16-bit units) for a 16 x 16 block of 32-bit
// words: two rounds of unpacks within 128-bit lanes, two of lane shuffles (vshufi32x4 0x88 takes
// lanes 0 and 2 of each source, 0xdd lanes 1 and 3).
__attribute__((target("arch=x86-64-v4"))) void transpose_words16(const uint16_t* b, int64_t cs, uint32_t* dst,
                                                                  int64_t w) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(b + i * cs);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + m]: lane L holds word 4L + m of rows i .. i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)  // t[h + m]: words m, m + 8 (t[h + 4 + m]: m + 4, m + 12) of rows h .. h + 7
    for (int m = 0; m < 4; ++m) {
      t[h + m] = _mm512_shuffle_i32x4(r[h + m], r[h + 4 + m], 0x88);
      t[h + 4 + m] = _mm512_shuffle_i32x4(r[h + m], r[h + 4 + m], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_si512(dst + j * w, _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88));
    _mm512_storeu_si512(dst + (j + 8) * w, _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd));
  }
}
#endif

FC_MULTIVERSION void pack_vnni_scalar(const uint16_t* b, int64_t ks, int64_t cs, int64_t K, int64_t n, int64_t width,
                                      int64_t w, uint32_t* dst);

// One block of w columns of B (K x n columns with data, element (k, c) at b[k ks + c cs], 16-bit)
// in the VNNI layout of brgemm's packed operands, [K/2][w][2] as 32-bit words: word (p, c) holds
// (B[2p][c], B[2p + 1][c]); columns n.. w and an odd K's last row are zero. A transposed view
// (ks = 1: the pair is one word of the rows, as for K^T from K) is a transpose of 32-bit words
// (16 x 16 blocks by AVX-512 where the CPU has it); rows (cs = 1) interleave two rows.
void pack_vnni(const uint16_t* b, int64_t ks, int64_t cs, int64_t K, int64_t n, int64_t w, uint32_t* dst) {
#ifdef FC_WORD_TRANSPOSE_AVX512
  if (ks == 1 && K % 2 == 0 && f32_gemm_supported()) {  // whole 16 x 16 blocks of words by AVX-512
    const int64_t pairs = K / 2, n16 = n / 16 * 16, p16 = pairs / 16 * 16;
    for (int64_t c0 = 0; c0 < n16; c0 += 16)
      for (int64_t p0 = 0; p0 < p16; p0 += 16) transpose_words16(b + c0 * cs + 2 * p0, cs, dst + p0 * w + c0, w);
    if (p16 < pairs)  // the last pairs of every column
      for (int64_t c = 0; c < n16; ++c)
        for (int64_t p = p16; p < pairs; ++p) std::memcpy(&dst[p * w + c], b + c * cs + 2 * p, 4);
    pack_vnni_scalar(b + n16 * cs, ks, cs, K, n - n16, w - n16, w, dst + n16);  // the last columns, the padding
    return;
  }
#endif
  pack_vnni_scalar(b, ks, cs, K, n, w, w, dst);
}

// pack_vnni on any CPU, into columns 0 .. width of rows of w words.
FC_MULTIVERSION void pack_vnni_scalar(const uint16_t* b, int64_t ks, int64_t cs, int64_t K, int64_t n, int64_t width,
                                      int64_t w, uint32_t* dst) {
  const int64_t pairs = (K + 1) / 2;
  if (ks == 1 && K % 2 == 0) {  // a transpose of words, 16 columns at a time: 16 row streams in, whole lines out
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
      const int64_t c1 = std::min(c0 + 16, n);
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t c = c0; c < c1; ++c) std::memcpy(&dst[p * w + c], b + c * cs + 2 * p, 4);
    }
  } else {
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* lo = b + 2 * p * ks;
      const uint16_t* hi = 2 * p + 1 < K ? b + (2 * p + 1) * ks : nullptr;
      uint32_t* row = dst + p * w;
      if (hi)
        for (int64_t c = 0; c < n; ++c) row[c] = uint32_t(lo[c * cs]) | uint32_t(hi[c * cs]) << 16;
      else
        for (int64_t c = 0; c < n; ++c) row[c] = lo[c * cs];
    }
  }
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t c = n; c < width; ++c) dst[p * w + c] = 0;
}
}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  if (!use_avx512_f32() || N < kMicroMinCols) return blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  micro_gemm_packing(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  if (!use_dpbf16() || N < kMicroMinCols) return brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  micro_gemm_packing(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const c10::Half* A, int64_t lda, const c10::Half* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void transpose(int64_t n, int64_t m, const float* src, int64_t lds, float* dst, int64_t ldd) {
  int64_t n16 = 0, m16 = 0;
#ifdef FC_WORD_TRANSPOSE_AVX512
  if (f32_gemm_supported()) {  // whole 16 x 16 blocks of 32-bit words
    n16 = n / 16 * 16, m16 = m / 16 * 16;
    for (int64_t i0 = 0; i0 < n16; i0 += 16)
      for (int64_t j0 = 0; j0 < m16; j0 += 16)
        transpose_words16(reinterpret_cast<const uint16_t*>(src + i0 * lds + j0), 2 * lds,
                          reinterpret_cast<uint32_t*>(dst + j0 * ldd + i0), ldd);
  }
#endif
  for (int64_t j = 0; j < m; ++j)  // the rest: the columns past the blocks, then the rows past them
    for (int64_t i = j < m16 ? n16 : 0; i < n; ++i) dst[j * ldd + i] = src[i * lds + j];
}

const char* env_choice(const KernelChoice& c) {
  const char* env = std::getenv(c.var);
  if (env == nullptr || *env == '\0') return nullptr;
  if (std::strcmp(env, c.a) == 0) return c.a;
  if (std::strcmp(env, c.b) == 0) return c.b;
  TORCH_CHECK_VALUE(false, "flash_cuda: ", c.var, " must be ", c.a, " or ", c.b, " (or unset: the choice made from the "
                    "CPU's flags), got '", env, "'");
  return nullptr;
}

void check_kernel_choices() {
  for (const KernelChoice& c : {kGemmChoice, kBf16GemmChoice, kF32GemmChoice, kRowsChoice, kGenericBf16Choice})
    env_choice(c);
}

bool native_lowp_gemm(at::ScalarType dtype) {
  if (const char* env = env_choice(kGemmChoice)) return env == kGemmChoice.a;
  static const bool bf16 = cpu_has("amx_bf16") || cpu_has("avx512_bf16");
  static const bool fp16 = cpu_has("amx_fp16");
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : false;
}

namespace {
// A micro-kernel where the CPU supports it: the choice's variable set to its a (on) or b (off)
// decides, else the CPU's flags (no AMX: the class of CPU the kernels were measured to win on).
bool choose_micro_kernel(bool supported, const KernelChoice& c) {
  if (!supported) return false;
  if (const char* env = env_choice(c)) return env == c.a;
  static const bool amx = cpu_has("amx_bf16");
  return !amx;
}
}  // namespace

bool use_dpbf16() { return choose_micro_kernel(dpbf16_supported(), kBf16GemmChoice); }
bool use_avx512_f32() { return choose_micro_kernel(f32_gemm_supported(), kF32GemmChoice); }

bool rows_kernels_allowed(at::ScalarType dtype) {
  if (!f32_gemm_supported()) return false;
  const bool bf16 = dtype == at::kBFloat16;
  const KernelChoice& c = bf16 ? kBf16GemmChoice : kF32GemmChoice;
  return env_choice(c) != c.b;  // (b: the library GEMMs)
}

RowsKernels float_rows_kernels(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return RowsKernels::kNone;
  const char* rows_env = env_choice(kRowsChoice);
  const bool avx2 = avx2_rows_supported();
  if (rows_env == kRowsChoice.a) return avx2 ? RowsKernels::kAvx2 : RowsKernels::kNone;
  if (rows_env == kRowsChoice.b || env_choice(kF32GemmChoice) == kF32GemmChoice.b) return RowsKernels::kNone;
  if (dtype != at::kBFloat16 && f32_gemm_supported()) return RowsKernels::kAvx512;
  return avx2 ? RowsKernels::kAvx2 : RowsKernels::kNone;
}

template <typename T>
RightOperand<T>::RightOperand(const at::Tensor& x, bool pack, int64_t block)
    : K_(x.size(2)), N_(x.size(3)), block_((std::max<int64_t>(block, 16) + 15) / 16 * 16) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  if (use_micro_kernel<T>() && N_ >= kMicroMinCols) {  // any K: the bf16 kernel handles an odd one itself
    const int64_t B = x.size(0), H = x.size(1), size = micro_size<T>(K_, N_);
    // a transpose of rows (K^T of the key rows): packed from the rows themselves where it can be
    const bool from_rows = transposed_pack_ok<T>(x);
    const at::Tensor src = x.stride(3) == 1 || from_rows ? x : x.contiguous();
    micro_data_ = scratch_empty({B, H, std::max<int64_t>(size, 1)}, dtype);
    data_ = src;  // for the GEMMs of fewer columns than a vector
    micro_ = true;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* in = src.data_ptr<T>() + i / H * src.stride(0) + i % H * src.stride(1);
        T* out = micro_data_.data_ptr<T>() + i * micro_data_.size(2);
        if (from_rows)
          micro_pack_transposed(K_, N_, in, src.stride(3), out);
        else
          micro_pack(K_, N_, in, src.stride(2), out);
      }
    });
    return;
  }
  packed_ = pack && !std::is_same_v<T, at::opmath_type<T>> && x.numel() > 0 && at::native::cpublas::could_pack(dtype);
  if (!packed_) {
    // float/double with unit stride along K (K^T of K's rows): the BLAS reads the transpose as it is
    transposed_ = std::is_same_v<T, at::opmath_type<T>> && x.stride(3) != 1 && x.stride(2) == 1;
    data_ = x.stride(3) == 1 || transposed_ ? x : x.contiguous();
    return;
  }
  // Zero padding: rows to an even count (the VNNI layout interleaves row pairs), columns to a
  // multiple of 16 (the widths brgemm's VNNI operands come in; the GEMMs compute the real columns).
  K_even_ = K_ + K_ % 2;
  N16_ = (N_ + 15) / 16 * 16;
  const int64_t B = x.size(0), H = x.size(1), blocks = (N_ + block_ - 1) / block_;
  data_ = scratch_empty({B, H, blocks, K_even_, block_}, dtype);
  if constexpr (sizeof(T) == 2) {  // packed_ holds for fp16/bf16 only
    T* out = data_.data_ptr<T>();
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / blocks, blk = i % blocks, n0 = blk * block_, w = std::min(block_, N16_ - n0);
        const T* src = x.data_ptr<T>() + bh / H * x.stride(0) + bh % H * x.stride(1) + n0 * x.stride(3);
        pack_vnni(reinterpret_cast<const uint16_t*>(src), x.stride(2), x.stride(3), K_, std::min(w, N_ - n0), w,
                  reinterpret_cast<uint32_t*>(out + i * K_even_ * block_));
      }
    });
  }
}

template <typename T>
void RightOperand<T>::gemm(int64_t b, int64_t h, int64_t M, const T* A, int64_t lda, int64_t k0, int64_t kn,
                           int64_t n0, int64_t nn, at::opmath_type<T>* C, int64_t ldc, bool accumulate) const {
  if (micro_ && nn >= kMicroMinCols) {
    static_assert(kBlock == kPanelCols, "a key tile starts at a panel of the micro-kernel's layout");
    TORCH_INTERNAL_ASSERT(k0 % 2 == 0 && n0 % kPanelCols == 0, "RightOperand: from an even row, a whole panel");
    const int64_t panel = micro_size<T>(K_, kPanelCols);
    const T* B = micro_data_.data_ptr<T>() + (b * micro_data_.size(1) + h) * micro_data_.size(2) +
                 n0 / kPanelCols * panel + micro_size<T>(k0, kPanelCols);
    return micro_gemm(M, nn, kn, A, lda, B, panel, C, ldc, accumulate);
  }
  if (!packed_) {
    const T* B = data_.data_ptr<T>() + b * data_.stride(0) + h * data_.stride(1) + k0 * data_.stride(2) +
                 n0 * data_.stride(3);
    if (micro_ && data_.stride(3) != 1) {  // packed from rows: these few columns (a band's edge, a last tile) gathered
      thread_local std::vector<T> narrow;
      narrow.resize(kn * nn);
      for (int64_t k = 0; k < kn; ++k)
        for (int64_t c = 0; c < nn; ++c) narrow[k * nn + c] = B[k * data_.stride(2) + c * data_.stride(3)];
      return flash_cuda::cpu::gemm(M, nn, kn, A, lda, narrow.data(), nn, C, ldc, accumulate);
    }
    if constexpr (std::is_same_v<T, at::opmath_type<T>>)
      if (transposed_) return blas_gemm(M, nn, kn, A, lda, B, int64_t(1), C, ldc, accumulate, data_.stride(3));
    flash_cuda::cpu::gemm(M, nn, kn, A, lda, B, data_.stride(2), C, ldc, accumulate);
    return;
  }
  if constexpr (!std::is_same_v<T, at::opmath_type<T>>) {
    const int64_t kk = kn + kn % 2, blocks = data_.size(2);
    const T* base = data_.data_ptr<T>() + (b * data_.size(1) + h) * blocks * K_even_ * block_;
    for (int64_t n = n0; n < n0 + nn;) {  // the columns of each block the range covers
      const int64_t blk = n / block_, start = blk * block_, w = std::min(block_, N16_ - start);  // packed width
      const int64_t cols = std::min(start + block_, n0 + nn) - n;
      // VNNI: [k/2][w][2], so row k0 (even) starts at k0 w and column c at 2 c within it.
      const T* B = base + blk * K_even_ * block_ + k0 * w + 2 * (n - start);
      at::native::cpublas::brgemm(M, cols, kk, lda, w, ldc, accumulate, A, B, C + (n - n0), /*is_vnni=*/true);
      n += cols;
    }
    tiles_held = true;
  }
}

template <typename T>
bool RowsTransposed<T>::supported(int64_t K) {
  // asked each call: could_pack follows torch.backends.mkldnn's switch, as brgemm's own check does
  return K % 2 == 0 && at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
}

template <typename T>
void RowsTransposed<T>::pack(int64_t N, int64_t K, const T* B, int64_t ldb) {
  N_ = N, K_ = K, w_ = (N + 15) / 16 * 16;
  data_.resize(K / 2 * w_);
  // B^T as a transposed view (unit stride along K): word (p, c) is word p of B's row c
  pack_vnni(reinterpret_cast<const uint16_t*>(B), 1, ldb, K, N, w_, data_.data());
}

template <typename T>
void RowsTransposed<T>::gemm(int64_t M, const T* A, int64_t lda, float* C, int64_t ldc) const {
  if (M == 0) return;
  at::native::cpublas::brgemm(M, N_, K_, lda, w_, ldc, false, A, reinterpret_cast<const T*>(data_.data()), C,
                              /*is_vnni=*/true);
  tiles_held = true;
}

template <typename T>
void amx_gemm_pairs(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp, int64_t panel_stride,
                    float* C, int64_t ldc, bool accumulate) {
  if (M == 0) return;
  for (int64_t n0 = 0; n0 < N; n0 += kPairsPanel)
    at::native::cpublas::brgemm(M, std::min(kPairsPanel, N - n0), K, lda, kPairsPanel, ldc, accumulate, A,
                                Bp + n0 / kPairsPanel * panel_stride, C + n0, /*is_vnni=*/true);
  tiles_held = true;
}
template void amx_gemm_pairs<c10::BFloat16>(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t,
                                            const c10::BFloat16*, int64_t, float*, int64_t, bool);
template void amx_gemm_pairs<c10::Half>(int64_t, int64_t, int64_t, const c10::Half*, int64_t, const c10::Half*,
                                        int64_t, float*, int64_t, bool);

template class RowsTransposed<c10::BFloat16>;
template class RowsTransposed<c10::Half>;

template class RightOperand<float>;
template class RightOperand<double>;
template class RightOperand<c10::BFloat16>;
template class RightOperand<c10::Half>;

}  // namespace flash_cuda::cpu
