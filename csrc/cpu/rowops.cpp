// Vectorisable implementations of rowops.h. No torch headers: this file is compiled with
// -O3 and each float function is cloned per ISA level (see FC_MULTIVERSION).
#include "rowops.h"

#include <cmath>
#include <limits>

#include "multiversion.h"


namespace flash_cuda::cpu {
namespace {

// Independent partial results per reduction. Without -ffast-math the compiler may not
// reorder a floating-point reduction; spelling out kLanes accumulators fixes the order
// explicitly, so the loop vectorises and gives the same bits run after run.
constexpr int kLanes = 16;

// exp(x) for float, vectorisable. x = n*ln2 + r with n = round(x*log2(e)) and
// |r| <= ln2/2; r is formed with ln2 split in a high part exact in float and a low part
// (Cody-Waite), so large |x| loses no accuracy. e^r by its degree-7 Taylor polynomial
// (truncation error < 1e-8 relative), 2^n by writing the exponent bits. x is clamped to
// [-88.5, 88.5]: below, n = -127 writes a zero exponent field with |r| small, so inputs
// past the float range and -inf (a masked score) give exactly +0.
inline float exp_poly(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2Hi = 0.693145751953125f;  // 12 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -88.5f ? -88.5f : x;
  x = x > 88.5f ? 88.5f : x;
  float t = x * kLog2e;
  t = t < -127.0f ? -127.0f : t;
  const float n = (t + kRound) - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9841269841269841e-4f;  // 1/7!
  p = p * r + 1.3888888888888889e-3f;
  p = p * r + 8.3333333333333333e-3f;
  p = p * r + 4.1666666666666667e-2f;
  p = p * r + 1.6666666666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline T row_max_impl(const T* x, int64_t n) {
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

template <typename T, typename Exp>
inline T exp_sub_sum_impl(T* x, int64_t n, T m, Exp exp_fn) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_fn(x[j + l] - m);
      x[j + l] = e;
      acc[l] += e;
    }
  T s = 0;
  for (; j < n; ++j) {
    x[j] = exp_fn(x[j] - m);
    s += x[j];
  }
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

}  // namespace

FC_MULTIVERSION float row_max(const float* x, int64_t n) { return row_max_impl(x, n); }
double row_max(const double* x, int64_t n) { return row_max_impl(x, n); }

FC_MULTIVERSION float exp_sub_sum(float* x, int64_t n, float m) {
  return exp_sub_sum_impl(x, n, m, exp_poly);
}
double exp_sub_sum(double* x, int64_t n, double m) {
  return exp_sub_sum_impl(x, n, m, [](double v) { return std::exp(v); });
}

FC_MULTIVERSION void exp_affine(float* x, int64_t n, float a, float m) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_poly(a * x[j] - m);
}
void exp_affine(double* x, int64_t n, double a, double m) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(a * x[j] - m);
}

namespace {
template <typename T>
inline T scale_row_max_impl(T* x, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
  return row_max_impl(x, n);
}
}  // namespace
FC_MULTIVERSION float scale_row_max(float* x, int64_t n, float a) { return scale_row_max_impl(x, n, a); }
double scale_row_max(double* x, int64_t n, double a) { return scale_row_max_impl(x, n, a); }

// Round to nearest even on the bits (the carry of the rounding increment propagates into the
// exponent, which also rounds to infinity correctly); NaN stays a quiet NaN.
FC_MULTIVERSION void round_bf16(const float* x, int64_t n, uint16_t* y) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    __builtin_memcpy(&u, x + j, sizeof(u));
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    y[j] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u) : r);
  }
}
FC_MULTIVERSION void round_fp16(const float* x, int64_t n, uint16_t* y) {
  for (int64_t j = 0; j < n; ++j) {
    const _Float16 h = static_cast<_Float16>(x[j]);  // IEEE round to nearest even (F16C where present)
    __builtin_memcpy(y + j, &h, sizeof(h));
  }
}

FC_MULTIVERSION void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

FC_MULTIVERSION void softmax_grad_row(float* dp, const float* p, int64_t n, float d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}
void softmax_grad_row(double* dp, const double* p, int64_t n, double d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}

namespace {
template <typename T>
inline void softcap_row_impl(T* x, T* dcap, int64_t n, T c) {
  const T inv = T(1) / c;
  for (int64_t j = 0; j < n; ++j) {
    const T t = std::tanh(x[j] * inv);
    x[j] = c * t;
    if (dcap) dcap[j] = T(1) - t * t;
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
