// The most multiply instructions a second one core issues, for the ceiling decoding's arithmetic
// puts on its speed (benchmarks/multiply_peak.py builds this with g++ and calls it through ctypes
// on every thread at once). Torch-free, no libraries.
//
// Each kind runs independent accumulator chains of one instruction on register operands (no
// loads, no other work): 16 for zmm (half the registers), 12 for ymm (AVX2 has 16), more than the
// instruction's latency times its issue rate on the cores we run on (Zen 4: 6 x 1 for vdpbf16ps;
// a Xeon's FMAs: 4 x 2), so the loop is bound by the issue rate alone. That rate is an upper bound
// for any kernel built on the instruction, which also loads, converts and exponentiates.
//   kind 0: vdpbf16ps zmm (AVX512-BF16): 32 bf16 products summed into fp32 an instruction
//   kind 1: vfmadd231ps zmm (AVX-512F): 16 fp32 multiply-adds
//   kind 2: vfmadd231ps ymm (AVX2 + FMA): 8 fp32 multiply-adds
// FC_NO_DPBF16 leaves kind 0 out, for compilers without avx512bf16 (GCC before 10).
//
//   g++ -O2 -shared -fPIC benchmarks/cpu_harness/multiply_peak.cpp -o /tmp/multiply_peak.so
#include <immintrin.h>

#include <chrono>
#include <cstdint>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One function a kind, each compiled for its own ISA: `chains` accumulators, then their first
// lanes summed into *sink so that the loop is kept; returns instructions a second. (An empty asm
// pinning each accumulator made GCC keep them in memory: a load and a store an instruction. The
// test bounds the rate from above, which a loop shortened or removed would exceed.)
#define FC_PEAK_LOOP(Vec, chains, zero, step, first_lane)        \
  Vec c[chains];                                                \
  for (int i = 0; i < chains; ++i) c[i] = zero;                 \
  const auto t0 = std::chrono::steady_clock::now();             \
  for (int64_t it = 0; it < iters; ++it) {                      \
    _Pragma("GCC unroll 16") for (int i = 0; i < chains; ++i) c[i] = step; \
  }                                                             \
  const double s = seconds_since(t0);                           \
  float total = 0;                                              \
  for (int i = 0; i < chains; ++i) total += first_lane;         \
  *sink = total;                                                \
  return double(iters) * chains / s;

#ifndef FC_NO_DPBF16
__attribute__((target("avx512f,avx512bf16"))) double dpbf16(int64_t iters, float* sink) {
  // pairs of bf16 1/1024 (0x3A80): the sums stay finite over any run
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3A80);
  FC_PEAK_LOOP(__m512, 16, _mm512_setzero_ps(), _mm512_dpbf16_ps(c[i], x, x), _mm512_cvtss_f32(c[i]))
}
#endif

__attribute__((target("avx512f"))) double fma512(int64_t iters, float* sink) {
  const __m512 x = _mm512_set1_ps(1e-3f);
  FC_PEAK_LOOP(__m512, 16, _mm512_setzero_ps(), _mm512_fmadd_ps(x, x, c[i]), _mm512_cvtss_f32(c[i]))
}

__attribute__((target("avx2,fma"))) double fma256(int64_t iters, float* sink) {
  const __m256 x = _mm256_set1_ps(1e-3f);
  FC_PEAK_LOOP(__m256, 12, _mm256_setzero_ps(), _mm256_fmadd_ps(x, x, c[i]), _mm256_cvtss_f32(c[i]))
}

#undef FC_PEAK_LOOP

}  // namespace

// Instructions a second on the calling thread over `iters` loop iterations; a negative value for
// a kind unknown or left out. The caller checks that the CPU has the kind's ISA.
extern "C" double fc_multiply_peak(int kind, int64_t iters) {
  float sink = 0;
  double rate = -1;
#ifndef FC_NO_DPBF16
  if (kind == 0) rate = dpbf16(iters, &sink);
#endif
  if (kind == 1) rate = fma512(iters, &sink);
  if (kind == 2) rate = fma256(iters, &sink);
  volatile float keep = sink;
  (void)keep;
  return rate;
}
