// Decoding's P V at 16 query rows a kv group (GQA 4 x Nq 4), D = 128, on the library's own kernel
// (csrc/cpu/avx512_gemm.cpp: dpbf16_gemm_rows_pairs_order, V's row pairs interleaved in registers),
// one thread, without torch. V is either one block read over and over (COPIES 1: in L1 up to
// ~160 keys on a 48 KiB L1) or COPIES blocks cycled (8 x 512 keys: in L2, as decoding's V tile is
// after S^T fetched it there); STREAM 1 fetches a line of fresh memory into L2 a step, as decoding
// fetches the next tile's key rows. Prints the best of 7 runs in G vdpbf16ps/s.
//
// Build and run (x86-64 with AVX512-BF16; from the repository root):
//   g++ -O2 -std=c++17 -Icsrc/cpu benchmarks/cpu_harness/pairs_order_pv.cpp csrc/cpu/avx512_gemm.cpp -o /tmp/pv
//   /tmp/pv KEYS [ROWS [COPIES [STREAM]]]      e.g. /tmp/pv 512 16 8 1
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "cache_line.h"
#include "avx512_gemm.h"

using namespace flash_cuda::cpu;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s KEYS [ROWS [COPIES [STREAM]]]\n", argv[0]);
    return 2;
  }
  if (!dpbf16_supported()) {
    std::fprintf(stderr, "this CPU has no AVX512-BF16\n");
    return 1;
  }
  constexpr int64_t D = 128, kStreamBlocks = 64;
  const int64_t keys = std::atol(argv[1]), rows = argc > 2 ? std::atol(argv[2]) : 16;
  const int64_t copies = argc > 3 ? std::atol(argv[3]) : 1;
  const bool stream = argc > 4 && std::atoi(argv[4]);
  if (keys < 1 || rows < 1 || copies < 1) {
    std::fprintf(stderr, "KEYS, ROWS and COPIES must be at least 1\n");
    return 2;
  }
  const int64_t kStreamBlock = std::max<int64_t>(1 << 20, keys * D * 2);  // a call's stream, fresh each call
  TileVector<uint16_t> V(copies * keys * D), P(rows * keys);
  for (auto& x : V) x = 0x3f80 + (std::rand() & 0x7f);  // bf16 values in [1, 2)
  for (auto& x : P) x = 0x3f00 + (std::rand() & 0x7f);  // [0.5, 1)
  TileVector<char> fresh(stream ? kStreamBlock * kStreamBlocks : 0, 1);
  TileVector<float> O(rows * D, 0.f);
  const int64_t calls = std::max<int64_t>(1, int64_t(4e8) / (rows * D * keys));
  double best = 0;
  for (int run = 0; run < 7; ++run) {
    const auto t = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < calls; ++i)
      dpbf16_gemm_rows_pairs_order(rows, D, keys, P.data(), keys, V.data() + (i % copies) * keys * D, D, O.data(), D,
                                   stream ? fresh.data() + (i % kStreamBlocks) * kStreamBlock : nullptr,
                                   stream ? keys * D * 2 : 0);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    best = std::max(best, double(calls) * rows * D * keys / 32 / s / 1e9);
  }
  std::printf("keys %ld, rows %ld, V blocks %ld, stream %d: %.2f G vdpbf16ps/s (O[0] %g)\n", long(keys), long(rows),
              long(copies), int(stream), best, O[0]);
  return 0;
}
