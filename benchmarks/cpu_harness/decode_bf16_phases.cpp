// The CPU decoding loop of bf16 at 16 query rows per kv group (Nq = 4 with 4 query heads per kv
// head), D = 128, tiles of 512 keys, on the library's own AVX-512 kernels (csrc/cpu/avx512_gemm.cpp)
// without torch: S^T = K Q^T streaming the key rows (the value rows fetched into L2 alongside), V
// staged into the pairs layout, P V on the staged tile (the next tile's key rows fetched into L2),
// each phase timed with the TSC. No softmax: P is fixed, so the figures are the kernels' alone.
// Used for the phase figures in the README's KV-cache decoding section (one thread).
//
// Build and run (x86-64 with AVX512-BF16; from the repository root):
//   g++ -O2 -std=c++17 -Icsrc/cpu benchmarks/cpu_harness/decode_bf16_phases.cpp csrc/cpu/avx512_gemm.cpp -o /tmp/phases
//   /tmp/phases KV_HEADS KEYS MODE [REPS]     e.g. /tmp/phases 8 8192 7
// MODE is a sum of 1 (S^T), 2 (V's staging), 4 (P V from the staged tile), 8 (P V with V's row
// pairs interleaved in registers, dpbf16_gemm_rows, no staging), 16 (the same in the pairs order,
// fetching the next tile's key rows into L2: the loop's P V at 16 rows and D 128, so 17 is the
// loop's two GEMMs). Prints the best of REPS passes.
#include <x86intrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cache_line.h"
#include "avx512_gemm.h"

using namespace flash_cuda::cpu;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s KV_HEADS KEYS MODE [REPS]\n", argv[0]);
    return 2;
  }
  if (!dpbf16_supported()) {
    std::fprintf(stderr, "this CPU has no AVX512-BF16\n");
    return 1;
  }
  const int64_t heads = std::atol(argv[1]), keys = std::atol(argv[2]), mode = std::atol(argv[3]);
  const int reps = argc > 4 ? std::atoi(argv[4]) : 20;
  constexpr int64_t D = 128, R = 16, Bc = 512;
  TileVector<uint16_t> K(heads * keys * D), V(heads * keys * D), Q(R * D), P(R * Bc);
  TileVector<uint16_t> Qtp(pairs_size(D, R)), Vp(pairs_size(Bc, D));
  for (auto& x : K) x = 0x3f80 + (std::rand() & 0x7f);  // bf16 values in [1, 2)
  for (auto& x : V) x = 0x3f80 + (std::rand() & 0x7f);
  for (auto& x : Q) x = 0x3f80 + (std::rand() & 0x7f);
  for (auto& x : P) x = 0x3f00 + (std::rand() & 0x7f);  // [0.5, 1)
  pack_pairs_bf16_transposed(D, R, Q.data(), D, Qtp.data());
  TileVector<float> St(Bc * R), O(R * D);
  double best = 1e30, phase[3] = {0, 0, 0}, best_phase[3] = {0, 0, 0};
  for (int rep = 0; rep < reps; ++rep) {
    phase[0] = phase[1] = phase[2] = 0;
    const auto t = std::chrono::steady_clock::now();
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* k = K.data() + h * keys * D;
      const uint16_t* v = V.data() + h * keys * D;
      for (int64_t j0 = 0; j0 < keys; j0 += Bc) {
        const int64_t bc = std::min(Bc, keys - j0);
        const uint64_t t0 = __rdtsc();
        if (mode & 1)
          dpbf16_gemm_stream_a(bc, R, D, k + j0 * D, D, Qtp.data(), pairs_panel_size(D), St.data(), R, false,
                               RowsAhead{reinterpret_cast<const char*>(v + j0 * D), D * 2, bc, D * 2});
        const uint64_t t1 = __rdtsc();
        if (mode & 2) stage_rows_pairs(bc, D, v + j0 * D, D, 0, Vp.data(), pairs_panel_size(Bc));
        const uint64_t t2 = __rdtsc();
        if (mode & 8) dpbf16_gemm_rows(R, D, bc, P.data(), Bc, v + j0 * D, D, O.data(), D, true);
        if (mode & 16) {
          const bool next = j0 + Bc < keys;
          dpbf16_gemm_rows_pairs_order(R, D, bc, P.data(), Bc, v + j0 * D, D, O.data(), D,
                                       next ? reinterpret_cast<const char*>(k + (j0 + Bc) * D) : nullptr,
                                       next ? Bc * D * 2 : 0);
        }
        if (mode & 4) {
          const bool next = j0 + Bc < keys;
          dpbf16_gemm(R, D, bc, P.data(), Bc, Vp.data(), pairs_panel_size(Bc), O.data(), D, true,
                      next ? reinterpret_cast<const char*>(k + (j0 + Bc) * D) : nullptr, next ? Bc * D * 2 : 0);
        }
        phase[0] += t1 - t0, phase[1] += t2 - t1, phase[2] += __rdtsc() - t2;
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    if (s < best) best = s, best_phase[0] = phase[0], best_phase[1] = phase[1], best_phase[2] = phase[2];
  }
  const double total = best_phase[0] + best_phase[1] + best_phase[2];
  const double bytes = 2.0 * heads * keys * D * 2, per_gemm = double(heads) * keys * R * D / 32;  // vdpbf16ps
  std::printf("kv heads %ld, keys %ld, mode %ld: %.3f ms, %.1f GB/s of K and V; one GEMM's vdpbf16ps %.2f G/s\n",
              long(heads), long(keys), long(mode), best * 1e3, bytes / best / 1e9, per_gemm / best / 1e9);
  std::printf("phases (share of TSC cycles): S^T %.0f%%, staging %.0f%%, P V %.0f%% -> ms %.3f / %.3f / %.3f\n",
              100 * best_phase[0] / total, 100 * best_phase[1] / total, 100 * best_phase[2] / total,
              best * 1e3 * best_phase[0] / total, best * 1e3 * best_phase[1] / total, best * 1e3 * best_phase[2] / total);
  return 0;
}
