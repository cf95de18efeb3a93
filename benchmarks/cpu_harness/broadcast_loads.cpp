// How fast a core runs vdpbf16ps when one operand is broadcast from memory, the inner loop of
// decoding's S^T = K Q^T at 16 query rows a kv group (csrc/cpu/avx512_gemm.cpp: micro_tile's
// one-vector tiles and split_tile). Every operand in L1 (one 128-element row per
// accumulator row, read over and over), so the figures are the loop's alone:
//   pairs, vpbroadcastd: a pair of A broadcast per vdpbf16ps (two sets of R accumulators), as micro_tile
//   pairs, {1to16}:      the same with the broadcast embedded in the vdpbf16ps
//   A in registers:      no broadcasts (the multiplies' own peak)
//   split, vpbroadcastq: two pairs of A broadcast for two vdpbf16ps (R rows x 2 vectors), as split_tile
// and the same for fp32 FMAs: a step of A broadcast per FMA (one set of R accumulators, as
// micro_tile<F32, R, 1>), and two steps broadcast for two FMAs (split_tile<F32>).
// Build and run (x86-64 with AVX512-BF16; from the repository root):
//   g++ -O2 -std=c++17 -Icsrc/cpu benchmarks/cpu_harness/broadcast_loads.cpp -o /tmp/broadcast_loads
//   /tmp/broadcast_loads
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "cache_line.h"

using flash_cuda::cpu::TileVector;

#define TARGET __attribute__((target("arch=x86-64-v4,avx512bf16"), noinline))
#define UNROLL _Pragma("GCC unroll 16")

enum Mode { kPairs, kEmbedded, kRegisters, kSplit };
constexpr int64_t kK = 128, kLda = 128;

template <Mode M, int R>
TARGET float run(const uint16_t* A, const uint16_t* B, int reps) {
  __m512 c[R][2];
  UNROLL for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  const __m512bh in_registers = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  for (int rep = 0; rep < reps; ++rep)
    for (int64_t k = 0; k < kK; k += 4) {  // two pairs of A a step
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + 16 * k), b1 = (__m512bh)_mm512_loadu_si512(B + 16 * k + 32);
      UNROLL for (int r = 0; r < R; ++r) {
        const uint16_t* a = A + r * kLda + k;
        if constexpr (M == kSplit) {
          int64_t quad;
          std::memcpy(&quad, a, sizeof(quad));
          const __m512bh x = (__m512bh)_mm512_set1_epi64(quad);
          c[r][0] = _mm512_dpbf16_ps(c[r][0], x, b0), c[r][1] = _mm512_dpbf16_ps(c[r][1], x, b1);
        } else {
          UNROLL for (int s = 0; s < 2; ++s) {
            const __m512bh b = s ? b1 : b0;
            if constexpr (M == kEmbedded) {
              const uint32_t& pair = *reinterpret_cast<const uint32_t*>(a + 2 * s);
              asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(c[r][s]) : "v"(b), "m"(pair));
            } else if constexpr (M == kPairs) {
              uint32_t pair;
              std::memcpy(&pair, a + 2 * s, sizeof(pair));
              c[r][s] = _mm512_dpbf16_ps(c[r][s], (__m512bh)_mm512_set1_epi32(int(pair)), b);
            } else {
              c[r][s] = _mm512_dpbf16_ps(c[r][s], in_registers, b);
            }
          }
        }
      }
    }
  __m512 sum = _mm512_setzero_ps();
  UNROLL for (int r = 0; r < R; ++r) sum = _mm512_add_ps(sum, _mm512_add_ps(c[r][0], c[r][1]));
  return _mm512_reduce_add_ps(sum);
}

// fp32: kPairs broadcasts one step of A per FMA into one set of R accumulators, kSplit two steps
template <Mode M, int R>
TARGET float run_f32(const float* A, const float* B, int reps) {
  __m512 c[R][2];
  UNROLL for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  for (int rep = 0; rep < reps; ++rep)
    for (int64_t k = 0; k < kK; k += 2) {
      const __m512 b0 = _mm512_loadu_ps(B + 16 * k), b1 = _mm512_loadu_ps(B + 16 * k + 16);
      UNROLL for (int r = 0; r < R; ++r) {
        const float* a = A + r * kLda + k;
        if constexpr (M == kSplit) {
          double two;
          std::memcpy(&two, a, sizeof(two));
          const __m512 x = _mm512_castpd_ps(_mm512_set1_pd(two));
          c[r][0] = _mm512_fmadd_ps(x, b0, c[r][0]), c[r][1] = _mm512_fmadd_ps(x, b1, c[r][1]);
        } else {
          c[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), b0, c[r][0]);
          c[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), b1, c[r][0]);
        }
      }
    }
  __m512 sum = _mm512_setzero_ps();
  UNROLL for (int r = 0; r < R; ++r) sum = _mm512_add_ps(sum, _mm512_add_ps(c[r][0], c[r][1]));
  return _mm512_reduce_add_ps(sum);
}

template <typename F>
void report_f32(const char* name, int rows, F run) {
  const int reps = 200000;
  run(reps / 10);
  const auto t = std::chrono::steady_clock::now();
  const float x = run(reps);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  std::printf("%-22s %2d rows: %5.2f G FMA/s  (checksum %g)\n", name, rows, double(reps) * kK * rows / s / 1e9, x);
}

template <Mode M, int R>
void report(const char* name, const uint16_t* A, const uint16_t* B) {
  const int reps = 200000;
  run<M, R>(A, B, reps / 10);  // warm-up
  const auto t = std::chrono::steady_clock::now();
  const float x = run<M, R>(A, B, reps);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  std::printf("%-22s %2d rows (%2d chains): %5.2f G vdpbf16ps/s  (checksum %g)\n", name, R, 2 * R,
              double(reps) * kK / 2 * R / s / 1e9, x);
}

int main() {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::fprintf(stderr, "this CPU has no AVX512-BF16\n");
    return 1;
  }
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0) {
      std::printf("%s (one thread)\n", line.c_str());
      break;
    }
  TileVector<uint16_t> A(16 * kLda, 0x3f80), B(kK * 32, 0x3c00);  // bf16 1.0 and 2^-7: no overflow
  report<kPairs, 6>("pairs, vpbroadcastd", A.data(), B.data());
  report<kEmbedded, 6>("pairs, {1to16}", A.data(), B.data());
  report<kRegisters, 6>("A in registers", A.data(), B.data());
  report<kSplit, 6>("split, vpbroadcastq", A.data(), B.data());
  report<kSplit, 8>("split, vpbroadcastq", A.data(), B.data());
  TileVector<float> Af(16 * kLda, 1.0f), Bf(kK * 32, 1e-6f);
  report_f32("fp32, vbroadcastss", 6, [&](int reps) { return run_f32<kPairs, 6>(Af.data(), Bf.data(), reps); });
  report_f32("fp32, vbroadcastss", 12, [&](int reps) { return run_f32<kPairs, 12>(Af.data(), Bf.data(), reps); });
  report_f32("fp32 split, vbroadcastsd", 8, [&](int reps) { return run_f32<kSplit, 8>(Af.data(), Bf.data(), reps); });
  return 0;
}
