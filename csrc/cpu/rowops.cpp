// Vectorisable implementations of rowops.h. No torch headers: this file is compiled with
// -O3 and each float function is cloned per ISA level (see FC_MULTIVERSION).
#include "rowops.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FC_AVX512_BF16 1
#endif

#include "avx2_rows.h"    // avx2_rows_supported: the CPU runs AVX2, FMA and F16C
#include "avx512_gemm.h"  // f32_gemm_supported: the CPU runs x86-64-v4 code
#include "env_choice.h"
#include "multiversion.h"


namespace flash_cuda::cpu {
namespace {

// Every helper is inlined into the per-ISA clones that call it: a helper compiled on its own
// would get the baseline ISA (SSE2, no FMA) whatever the caller's clone.
#define FC_INLINE inline __attribute__((always_inline))

// Independent partial results per reduction. Without -ffast-math the compiler may not
// reorder a floating-point reduction; spelling out kLanes accumulators fixes the order
// explicitly, so the loop vectorises and gives the same bits run after run.
constexpr int kLanes = 16;

// 16 floats as one value (GCC vector extension): the exp below on a whole chunk, lowered to
// one zmm on AVX-512, two ymm on AVX2, four xmm on the baseline clone. Written this way rather
// than left to the auto-vectoriser, which picked 256-bit vectors and masked every operation.
using v16f = float __attribute__((vector_size(64)));
using v16i = int32_t __attribute__((vector_size(64)));
using v16u = uint32_t __attribute__((vector_size(64)));
using v16h = uint16_t __attribute__((vector_size(32)));

template <typename T> FC_INLINE T splat(float c) { return T{} + c; }
template <> FC_INLINE float splat<float>(float c) { return c; }
// max / min that keep a NaN in `a` (a NaN score must give a NaN probability, not 0)
FC_INLINE float max_of(float a, float b) { return a < b ? b : a; }
FC_INLINE v16f max_of(v16f a, v16f b) { return a < b ? b : a; }
FC_INLINE float min_of(float a, float b) { return a > b ? b : a; }
FC_INLINE v16f min_of(v16f a, v16f b) { return a > b ? b : a; }
FC_INLINE float pow2i(float n) {  // 2^n for an integral n in [-127, 128]
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float r;
  __builtin_memcpy(&r, &bits, sizeof(r));
  return r;
}
FC_INLINE v16f pow2i(v16f n) { return reinterpret_cast<v16f>((__builtin_convertvector(n, v16i) + 127) << 23); }

// 2^t for float (T = float or v16f): t = n + f with n = round(t), |f| <= 1/2; 2^f = e^(f ln2) by
// its degree-6 Taylor polynomial (truncation error < 1.3e-7 relative), 2^n by the exponent bits.
// t is clamped to [-127, 127]: n = -127 writes a zero exponent field, so -inf (a masked score)
// and anything below the float range give exactly +0. The exponent passes take exp(a x - m) as
// 2^(a log2(e) x - m log2(e)): one FMA, no Cody-Waite reduction (the forward and the backward
// alike, so both see the same probabilities).
// 2^f on [-0.5, 0.5] by its Taylor polynomial, Horner order: ln2^k / k!, k = 6 down to 0. One
// table for every ISA's version, which must give the same bits.
constexpr float kExp2Poly[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};
template <typename T>
FC_INLINE T exp2_poly(T t) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  t = min_of(max_of(t, splat<T>(-127.0f)), splat<T>(127.0f));
  const T n = (t + kRound) - kRound;
  const T f = t - n;
  T p = splat<T>(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = p * f + kExp2Poly[i];
  return p * pow2i(n);
}
constexpr float kLog2e = 1.4426950408889634f;
// The base-2 argument of exp(a x - m): the difference first, then log2(e) (one FMA and a multiply).
// Where m is a row's max score times a (m = a x_max, as the online softmax and lse give it), the
// argument is 0 at that score up to the rounding of a x_max itself (exactly 0 for a = 1, the
// prescaled scores), at any magnitude. log2(e) folded into a and m (a2 x - m2) left the rounding
// of m2 = m log2(e) in every argument: at a fully masked row's m = -3.4e38 (finite masks of
// finfo.min: torch's mask value) m2 overflowed to -inf and the row came out NaN, and at |m| above
// ~2^31 the rows over- or underflowed. Vector (v16f, with a and m broadcast) or scalar.
template <typename T>
FC_INLINE T exp2_arg(T x, float a, float m) {
  return (a * x - m) * kLog2e;
}
struct Exp2Poly {
  FC_INLINE v16f operator()(v16f t) const { return exp2_poly(t); }
};

#ifdef FC_AVX512_BF16
#define FC_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
// exp2_poly on AVX-512 in 11 vector instructions instead of 17, with the same bits: the upper
// clamp as vminps (which returns its second operand, t, when it is a NaN: a NaN stays a NaN),
// n = round(t) by vrndscaleps (nearest even, as adding and subtracting 1.5 * 2^23 does), the same
// polynomial in the same FMA order, and p * 2^n by vscalefps. Every n <= -127 (where exp2_poly
// clamps t to -127 and writes a zero exponent field: exactly +0, also for -inf, a masked score)
// is zeroed by the mask instead of a lower clamp (NaN passes); that n = -inf makes p a NaN does
// not matter there. tests/test_cpu_backend.py checks the bits against exp2_poly (a dense grid, the
// rounding edges, +-inf, NaN). Without the lower clamp: 11% faster a vector, measured on a Xeon.
struct Exp2Avx512 {
  FC_TARGET_V4 v16f operator()(v16f tv) const {
    __m512 t = reinterpret_cast<__m512>(tv);
    t = _mm512_min_ps(_mm512_set1_ps(127.0f), t);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
    const __mmask16 normal = _mm512_cmp_ps_mask(n, _mm512_set1_ps(-127.0f), _CMP_NLE_UQ);
    return reinterpret_cast<v16f>(_mm512_maskz_scalef_ps(normal, p, n));
  }
};
#endif

FC_INLINE v16f load16(const float* x) {
  v16f v;
  __builtin_memcpy(&v, x, sizeof(v));
  return v;
}
FC_INLINE void store16(float* y, v16f v) { __builtin_memcpy(y, &v, sizeof(v)); }

template <typename T>
FC_INLINE T row_max_impl(const T* x, int64_t n) {
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
  T m = -std::numeric_limits<T>::infinity();
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  for (int l = 0; l < kLanes; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// Rounds to nearest even on the bits (the carry of the rounding increment propagates into the
// exponent, which also rounds to infinity correctly); NaN stays a quiet NaN.
FC_INLINE uint16_t bf16_bits(float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u) : r);
}
FC_INLINE v16h bf16_bits(v16f v) {
  const v16u u = reinterpret_cast<v16u>(v);
  const v16u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u) : r, v16h);
}
FC_INLINE float bf16_value(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float v;
  __builtin_memcpy(&v, &u, sizeof(v));
  return v;
}
FC_INLINE v16f bf16_value(v16h h) { return reinterpret_cast<v16f>(__builtin_convertvector(h, v16u) << 16); }
FC_INLINE float fp16_value(uint16_t h) {
  _Float16 v;
  __builtin_memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
}
FC_INLINE uint16_t fp16_bits(float v) {
  const _Float16 h = static_cast<_Float16>(v);  // IEEE round to nearest even (F16C where present)
  uint16_t y;
  __builtin_memcpy(&y, &h, sizeof(y));
  return y;
}

// sum_j e_j with e_j = exp(a x[j] - m), each handed to store(j, e_j), which returns the value
// stored (e_j, or e_j rounded); their sum goes to *stored_sum and max_j x[j] to *x_max. For float,
// 16 at a time as a v16f (store16(j, e, acc_stored) adds what it stored into acc_stored) with 16
// partial sums and maxima (a fixed order: the same bits run after run). Each x[j] is read before
// e_j is stored (y may be x).
template <typename Store, typename Store16, typename Exp16 = Exp2Poly>
FC_INLINE float exp_affine_sum_impl(const float* x, int64_t n, float a, float m, float* x_max, float* stored_sum,
                                    Store store, Store16 store16, Exp16 exp16 = Exp2Poly{}) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  v16f acc = {}, acc_stored = {}, mx = splat<v16f>(kNegInf);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16f v = load16(x + j);
    mx = mx < v ? v : mx;
    const v16f e = exp16(exp2_arg(v, a, m));
    store16(j, e, acc_stored);
    acc += e;
  }
  float s = 0, ss = 0, mj = kNegInf;
  for (; j < n; ++j) {
    const float v = x[j];
    mj = mj < v ? v : mj;
    const float e = exp2_poly(exp2_arg(v, a, m));
    ss += store(j, e);
    s += e;
  }
  for (int l = 0; l < 16; ++l) s += acc[l], ss += acc_stored[l], mj = mj < mx[l] ? mx[l] : mj;
  *x_max = mj;
  *stored_sum = ss;
  return s;
}

}  // namespace

// The float row max 16 at a time as a v16f (the scalar accumulators of row_max_impl were not
// vectorised: 16 vmaxss per 16 scores), with the exponent passes' comparison.
FC_MULTIVERSION float row_max(const float* x, int64_t n) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  v16f mx = splat<v16f>(kNegInf);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16f v = load16(x + j);
    mx = mx < v ? v : mx;
  }
  float m = kNegInf;
  for (; j < n; ++j) m = m < x[j] ? x[j] : m;
  for (int l = 0; l < 16; ++l) m = m < mx[l] ? mx[l] : m;
  return m;
}
double row_max(const double* x, int64_t n) { return row_max_impl(x, n); }

namespace {
template <typename Exp16>
FC_INLINE float exp_affine_sum_f32(const float* x, int64_t n, float a, float m, float* y, float* x_max, Exp16 exp16) {
  float unused;
  return exp_affine_sum_impl(
      x, n, a, m, x_max, &unused, [y](int64_t j, float e) { return y[j] = e; },
      [y](int64_t j, v16f e, v16f& stored) {
        store16(y + j, e);
        stored += e;
      },
      exp16);
}
FC_MULTIVERSION float exp_affine_sum_generic(const float* x, int64_t n, float a, float m, float* y, float* x_max) {
  return exp_affine_sum_f32(x, n, a, m, y, x_max, Exp2Poly{});
}
template <typename Exp16>
FC_INLINE void exp_affine_f32(float* x, int64_t n, float a, float m, Exp16 exp16) {
  int64_t j = 0;  // the forward's exponent (exp2_poly)
  for (; j + 16 <= n; j += 16) store16(x + j, exp16(exp2_arg(load16(x + j), a, m)));
  for (; j < n; ++j) x[j] = exp2_poly(exp2_arg(x[j], a, m));
}
FC_MULTIVERSION void exp_affine_generic(float* x, int64_t n, float a, float m) {
  exp_affine_f32(x, n, a, m, Exp2Poly{});
}
#ifdef FC_AVX512_BF16
// exp2_poly on 8 floats in AVX2, the same operations in the same order (so the same bits as the
// portable version's AVX2 clone, whose v16f code GCC lowered through xmm pieces and scalars on the
// stack: the float exponent pass was 36% of an fp32 forward on a Zen 3, ahead of MKL's sgemm).
// Both clamps as vmaxps/vminps with the score second: a NaN stays a NaN.
#define FC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
struct Exp2Avx2 {
  FC_TARGET_AVX2 FC_INLINE static __m256 half(__m256 t) {
    t = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), t));
    const __m256 round = _mm256_set1_ps(12582912.0f);
    const __m256 n = _mm256_sub_ps(_mm256_add_ps(t, round), round);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
// exp_affine_sum_f32 and exp_affine_f32 on two ymm per 16 scores, each lane's max, sum and
// exponent as in the portable version (the same bits): its v16f selects and stores went through
// the stack on AVX2 too.
FC_TARGET_AVX2 float exp_affine_sum_avx2(const float* x, int64_t n, float a, float m, float* y, float* x_max) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(m), vlog2e = _mm256_set1_ps(kLog2e);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 mx[2] = {_mm256_set1_ps(kNegInf), _mm256_set1_ps(kNegInf)};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(x + j + 8 * h);
      mx[h] = _mm256_blendv_ps(mx[h], v, _mm256_cmp_ps(mx[h], v, _CMP_LT_OQ));  // mx < v ? v : mx
      const __m256 e = Exp2Avx2::half(_mm256_mul_ps(_mm256_fmsub_ps(va, v, vm), vlog2e));  // exp2_arg
      _mm256_storeu_ps(y + j + 8 * h, e);
      acc[h] = _mm256_add_ps(acc[h], e);
    }
  float s = 0, mj = kNegInf;
  for (; j < n; ++j) {
    const float v = x[j];
    mj = mj < v ? v : mj;
    s += (y[j] = exp2_poly(exp2_arg(v, a, m)));
  }
  alignas(32) float lanes[16], maxes[16];
  for (int h = 0; h < 2; ++h) _mm256_store_ps(lanes + 8 * h, acc[h]), _mm256_store_ps(maxes + 8 * h, mx[h]);
  for (int l = 0; l < 16; ++l) s += lanes[l], mj = mj < maxes[l] ? maxes[l] : mj;
  *x_max = mj;
  return s;
}
FC_TARGET_AVX2 void exp_affine_avx2(float* x, int64_t n, float a, float m) {
  const __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(m), vlog2e = _mm256_set1_ps(kLog2e);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(x + j, Exp2Avx2::half(_mm256_mul_ps(_mm256_fmsub_ps(va, _mm256_loadu_ps(x + j), vm), vlog2e)));
  for (; j < n; ++j) x[j] = exp2_poly(exp2_arg(x[j], a, m));
}

FC_TARGET_V4 float exp_affine_sum_avx512(const float* x, int64_t n, float a, float m, float* y, float* x_max) {
  return exp_affine_sum_f32(x, n, a, m, y, x_max, Exp2Avx512{});
}
FC_TARGET_V4 void exp_affine_avx512(float* x, int64_t n, float a, float m) {
  exp_affine_f32(x, n, a, m, Exp2Avx512{});
}
#endif
}  // namespace

float exp_affine_sum(const float* x, int64_t n, float a, float m, float* y, float* x_max) {
#ifdef FC_AVX512_BF16
  if (f32_gemm_supported()) return exp_affine_sum_avx512(x, n, a, m, y, x_max);
  if (avx2_rows_supported()) return exp_affine_sum_avx2(x, n, a, m, y, x_max);
#endif
  return exp_affine_sum_generic(x, n, a, m, y, x_max);
}
double exp_affine_sum(const double* x, int64_t n, double a, double m, double* y, double* x_max) {
  double s = 0, mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    mx = mx < x[j] ? x[j] : mx;
    s += (y[j] = std::exp(a * x[j] - m));
  }
  *x_max = mx;
  return s;
}
namespace {
// The scalar tail's store of the rounded exponent passes: y[j] = e rounded to bf16 or fp16 bits,
// returning the rounded value.
template <bool kBf16>
struct StoreRounded {
  uint16_t* y;
  FC_INLINE float operator()(int64_t j, float e) const {
    y[j] = kBf16 ? bf16_bits(e) : fp16_bits(e);
    return kBf16 ? bf16_value(y[j]) : fp16_value(y[j]);
  }
};
using StoreBf16 = StoreRounded<true>;
using StoreFp16 = StoreRounded<false>;

FC_MULTIVERSION float exp_affine_sum_bf16_generic(const float* x, int64_t n, float a, float m, uint16_t* y,
                                                  float* x_max, float* rounded_sum) {
  return exp_affine_sum_impl(
      x, n, a, m, x_max, rounded_sum,
      StoreBf16{y},
      [y](int64_t j, v16f e, v16f& stored) {
        const v16h h = bf16_bits(e);
        __builtin_memcpy(y + j, &h, sizeof(h));
        stored += bf16_value(h);
      });
}
#ifdef FC_AVX512_BF16
// AVX512-BF16's vcvtneps2bf16 rounds 16 floats to nearest even in one instruction (inputs that
// are subnormal count as zero), a third of the exponent pass's work in the generic version.
#define FC_TARGET_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
FC_TARGET_BF16 float exp_affine_sum_bf16_avx512(const float* x, int64_t n, float a, float m, uint16_t* y,
                                                float* x_max, float* rounded_sum) {
  return exp_affine_sum_impl(
      x, n, a, m, x_max, rounded_sum,
      StoreBf16{y},
      [y](int64_t j, v16f e, v16f& stored) FC_TARGET_BF16 {
        const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(e));
        __builtin_memcpy(y + j, &h, sizeof(h));
        // The stored values widened back (their bits shifted up: exact) and added lane by lane, as
        // the portable version adds them (the same bits for the rounded sum). A bf16 dot product
        // with ones was one instruction for these three, but a dependent chain of vdpbf16ps, slow
        // on a Xeon with AMX: the widening is 2% faster over a whole forward, measured there.
        stored += reinterpret_cast<v16f>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
      },
      Exp2Avx512{});
}
#endif
}  // namespace

float exp_affine_sum_bf16(const float* x, int64_t n, float a, float m, uint16_t* y, float* x_max,
                          float* rounded_sum, bool generic) {
  // FLASH_CUDA_CPU_GENERIC_BF16=1 (read once; 0 or unset: not) takes the generic version here too:
  // how the tests check it on machines that have AVX512-BF16.
  static const bool forced_generic = env_choice(kGenericBf16Choice) == kGenericBf16Choice.a;
#ifdef FC_AVX512_BF16
  static const bool avx512_bf16 = dpbf16_supported() && !forced_generic;
  if (avx512_bf16 && !generic) return exp_affine_sum_bf16_avx512(x, n, a, m, y, x_max, rounded_sum);
#endif
  return exp_affine_sum_bf16_generic(x, n, a, m, y, x_max, rounded_sum);
}
namespace {
FC_MULTIVERSION float exp_affine_sum_fp16_generic(const float* x, int64_t n, float a, float m, uint16_t* y,
                                                  float* x_max, float* rounded_sum) {
  return exp_affine_sum_impl(
      x, n, a, m, x_max, rounded_sum,
      StoreFp16{y},
      [y](int64_t j, v16f e, v16f& stored) {
        for (int l = 0; l < 16; ++l) y[j + l] = fp16_bits(e[l]), stored[l] += fp16_value(y[j + l]);
      });
}
#ifdef FC_AVX512_BF16
// vcvtps2ph rounds 16 floats to halves in the current rounding mode (nearest even unless a caller
// changed it), as the portable conversion does, and vcvtph2ps widens them back, exactly: the
// generic version converts one lane at a time.
FC_TARGET_V4 float exp_affine_sum_fp16_avx512(const float* x, int64_t n, float a, float m, uint16_t* y, float* x_max,
                                              float* rounded_sum) {
  return exp_affine_sum_impl(
      x, n, a, m, x_max, rounded_sum,
      StoreFp16{y},
      [y](int64_t j, v16f e, v16f& stored) FC_TARGET_V4 {
        const __m256i h = _mm512_cvtps_ph(reinterpret_cast<__m512>(e), _MM_FROUND_CUR_DIRECTION);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), h);
        stored += reinterpret_cast<v16f>(_mm512_cvtph_ps(h));
      },
      Exp2Avx512{});
}
#endif
}  // namespace

float exp_affine_sum_fp16(const float* x, int64_t n, float a, float m, uint16_t* y, float* x_max,
                          float* rounded_sum, bool generic) {
#ifdef FC_AVX512_BF16
  if (f32_gemm_supported() && !generic) return exp_affine_sum_fp16_avx512(x, n, a, m, y, x_max, rounded_sum);
#endif
  return exp_affine_sum_fp16_generic(x, n, a, m, y, x_max, rounded_sum);
}

void exp_affine(float* x, int64_t n, float a, float m) {
#ifdef FC_AVX512_BF16
  if (f32_gemm_supported()) return exp_affine_avx512(x, n, a, m);
  if (avx2_rows_supported()) return exp_affine_avx2(x, n, a, m);
#endif
  exp_affine_generic(x, n, a, m);
}
void exp_affine(double* x, int64_t n, double a, double m) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(a * x[j] - m);
}


namespace {
template <typename Exp16>
FC_INLINE void exp2_row_impl(const float* x, int64_t n, float* y, Exp16 exp16) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store16(y + j, exp16(load16(x + j)));
  for (; j < n; ++j) y[j] = exp2_poly(x[j]);
}
FC_MULTIVERSION void exp2_row_generic(const float* x, int64_t n, float* y) { exp2_row_impl(x, n, y, Exp2Poly{}); }
#ifdef FC_AVX512_BF16
FC_TARGET_V4 void exp2_row_avx512(const float* x, int64_t n, float* y) { exp2_row_impl(x, n, y, Exp2Avx512{}); }
#endif
}  // namespace

void exp2_row(const float* x, int64_t n, float* y, bool generic) {
#ifdef FC_AVX512_BF16
  if (!generic && f32_gemm_supported()) return exp2_row_avx512(x, n, y);
#endif
  exp2_row_generic(x, n, y);
}

FC_MULTIVERSION void round_bf16(const float* x, int64_t n, uint16_t* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = bf16_bits(x[j]);
}
namespace {
FC_MULTIVERSION void round_fp16_generic(const float* x, int64_t n, uint16_t* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = fp16_bits(x[j]);
}
#ifdef FC_AVX512_BF16
FC_TARGET_V4 void round_fp16_avx512(const float* x, int64_t n, uint16_t* y) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j),
                        _mm512_cvtps_ph(_mm512_loadu_ps(x + j), _MM_FROUND_CUR_DIRECTION));
  for (; j < n; ++j) y[j] = fp16_bits(x[j]);
}
#endif
}  // namespace
void round_fp16(const float* x, int64_t n, uint16_t* y, bool generic) {
#ifdef FC_AVX512_BF16
  if (f32_gemm_supported() && !generic) return round_fp16_avx512(x, n, y);
#endif
  round_fp16_generic(x, n, y);
}

FC_MULTIVERSION void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// As a v8d of partial sums: the scalar loop's one double accumulator was a chain of dependent
// adds, 4.8% of an fp32 backward at N = 32, D = 32 (B 32, H 12) on a Zen 4. The widening loads
// are exact, and the sums' order is fixed by the code, not by the ISA level's vector width.
FC_MULTIVERSION double dot_f64(const float* x, const float* y, int64_t n) {
  using v8d = double __attribute__((vector_size(64)));
  using v8f = float __attribute__((vector_size(32)));
  v8d acc = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f a, b;
    std::memcpy(&a, x + j, sizeof(a));
    std::memcpy(&b, y + j, sizeof(b));
    acc += __builtin_convertvector(a, v8d) * __builtin_convertvector(b, v8d);
  }
  double sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (; j < n; ++j) sum += double(x[j]) * double(y[j]);
  return sum;
}

namespace {
template <typename T>
inline int64_t single_nonzero_impl(const T* x, int64_t n) {
  // Out at the second nonzero: the backward asks this of every row of every key tile, where a
  // row of a softmax that is not one-hot answers within its first few entries (a vectorised
  // count over the whole row cost the bf16 backward about 5% on a Zen 4).
  int64_t found = -1;
  for (int64_t j = 0; j < n; ++j)
    if (x[j] != T(0)) {
      if (found >= 0) return -1;
      found = j;
    }
  return found;
}
FC_MULTIVERSION int64_t single_nonzero_generic(const float* x, int64_t n) { return single_nonzero_impl(x, n); }
#ifdef FC_AVX512_BF16
// The same, 16 entries a compare: a row whose probabilities underflow to 0 over most of its keys
// (ALiBi's far keys, a causal diagonal's) is mostly skipped a vector at a time, where the loop
// above tested each entry: 4.9% of a bf16 causal ALiBi forward + backward's samples (B 1, H 8,
// N 2048, D 128; perf, Zen 5), 0.5% now; in-process A/B 1.02x-1.03x faster (fp32, bf16), within
// the runs' drift.
// NaN counts as nonzero (unordered not-equal), -0 as zero, as in the loop.
FC_TARGET_V4 int64_t single_nonzero_avx512(const float* x, int64_t n) {
  int64_t found = -1;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const uint32_t nonzero = _mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, x + j), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    if (!nonzero) continue;
    if (found >= 0 || (nonzero & (nonzero - 1))) return -1;
    found = j + __builtin_ctz(nonzero);
  }
  return found;
}
#endif
}  // namespace
int64_t single_nonzero(const float* x, int64_t n) {
#ifdef FC_AVX512_BF16
  if (f32_gemm_supported()) return single_nonzero_avx512(x, n);
#endif
  return single_nonzero_generic(x, n);
}
int64_t single_nonzero(const double* x, int64_t n) { return single_nonzero_impl(x, n); }

FC_MULTIVERSION void softmax_grad_row(float* dp, const float* p, int64_t n, float d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}
void softmax_grad_row(double* dp, const double* p, int64_t n, double d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}

namespace {
// tanh(y) (T = float or v16f): |y| < 0.625 as y + y^3 Q(y^2), Q of degree 4 (a weighted least-squares
// fit of (tanh(y) - y) / y^3 in y^2, iterated toward minimax: 4.4e-9 relative in float64, 0.77 ulp in
// this float arithmetic on a grid of 2e6 points); else 1 - 2 / (e^(2|y|) + 1) by exp2_poly, the sign
// restored. +-inf give +-1, NaN stays NaN. libm's tanhf (and its expm1f), called per element, had
// made a softcapped forward 3.8x to 10x slower than one without (a Zen 5).
constexpr float kTanhPoly[5] = {-5.704992058612872e-3f, 2.0639092314699684e-2f, -5.3739716861307255e-2f,
                                1.3331442223235293e-1f, -3.3333281943152265e-1f};  // Q's, degree 4 down to 0
FC_INLINE float abs_of(float y) { return __builtin_fabsf(y); }
FC_INLINE v16f abs_of(v16f y) { return reinterpret_cast<v16f>(reinterpret_cast<v16u>(y) & 0x7fffffffu); }
FC_INLINE float sign_of(float y, float a) { return __builtin_copysignf(a, y); }  // a >= 0 with y's sign
FC_INLINE v16f sign_of(v16f y, v16f a) {
  return reinterpret_cast<v16f>((reinterpret_cast<v16u>(y) & 0x80000000u) | reinterpret_cast<v16u>(a));
}
template <typename T>
FC_INLINE T tanh_poly(T y) {
  const T a = abs_of(y), z = y * y;
  T q = splat<T>(kTanhPoly[0]);
  for (int i = 1; i < 5; ++i) q = q * z + kTanhPoly[i];
  const T near0 = y + y * z * q;
  const T far = sign_of(y, 1.0f - 2.0f / (exp2_poly(a * (2.0f * kLog2e)) + 1.0f));
  return a < 0.625f ? near0 : far;
}
FC_INLINE void softcap_row_impl(float* x, float* dcap, int64_t n, float c) {
  const float inv = 1.0f / c;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16f t = tanh_poly(load16(x + j) * inv);
    store16(x + j, c * t);
    if (dcap) store16(dcap + j, 1.0f - t * t);
  }
  for (; j < n; ++j) {
    const float t = tanh_poly(x[j] * inv);
    x[j] = c * t;
    if (dcap) dcap[j] = 1.0f - t * t;
  }
}
inline void softcap_row_impl(double* x, double* dcap, int64_t n, double c) {
  const double inv = 1.0 / c;
  for (int64_t j = 0; j < n; ++j) {
    const double t = std::tanh(x[j] * inv);
    x[j] = c * t;
    if (dcap) dcap[j] = 1.0 - t * t;
  }
}
template <typename T>
inline void alibi_row_impl(T* x, int64_t n, T slope, int64_t d0) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t d = d0 + j;
    x[j] -= slope * static_cast<T>(d < 0 ? -d : d);
  }
}
template <typename T>
inline void add_row_impl(T* x, const T* b, int64_t stride, int64_t n) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) x[j] += b[j];
  } else if (stride == 0) {
    const T v = b[0];
    for (int64_t j = 0; j < n; ++j) x[j] += v;
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] += b[j * stride];
  }
}
}  // namespace

FC_MULTIVERSION void softcap_row(float* x, float* dcap, int64_t n, float c) { softcap_row_impl(x, dcap, n, c); }
void softcap_row(double* x, double* dcap, int64_t n, double c) { softcap_row_impl(x, dcap, n, c); }
FC_MULTIVERSION void alibi_row(float* x, int64_t n, float slope, int64_t d0) { alibi_row_impl(x, n, slope, d0); }
void alibi_row(double* x, int64_t n, double slope, int64_t d0) { alibi_row_impl(x, n, slope, d0); }
FC_MULTIVERSION void add_row(float* x, const float* b, int64_t stride, int64_t n) { add_row_impl(x, b, stride, n); }
void add_row(double* x, const double* b, int64_t stride, int64_t n) { add_row_impl(x, b, stride, n); }

}  // namespace flash_cuda::cpu
