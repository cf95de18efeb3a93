// Dropout multipliers of a score tile (CPU backend), from the mapping of csrc/kernels/philox.h.
// The draws of a row of units are one batch of independent Philox calls on arrays (counters
// base + uj for consecutive uj), which the compiler vectorises: the same 10 rounds of 32 x 32 ->
// 64-bit multiplies the GPU runs per thread, here 8 or 16 lanes at a time. No torch headers;
// compiled with -O3 and cloned per ISA level like rowops.cpp.
#include "dropout_cpu.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "multiversion.h"


namespace flash_cuda::cpu {
namespace {

constexpr int kBatch = 64;  // units per batch

// r0..r3[u] = Philox(c(ui, uj0 + u)) for u < n <= kBatch: PhiloxStream::draw on arrays.
FC_MULTIVERSION void philox_batch(const PhiloxStream& s, uint32_t ui, uint32_t uj0, int n, uint32_t* r0,
                                  uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  for (int u = 0; u < n; ++u) {
    const uint64_t c = s.base + uj0 + uint32_t(u);
    r0[u] = uint32_t(c);
    r1[u] = uint32_t(c >> 32);
    r2[u] = ui;
    r3[u] = s.bh;
  }
  uint32_t k0 = s.k0, k1 = s.k1;
  for (int round = 0; round < 10; ++round) {
    for (int u = 0; u < n; ++u) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * r0[u], p1 = uint64_t(0xCD9E8D57u) * r2[u];
      const uint32_t x0 = uint32_t(p1 >> 32) ^ r1[u] ^ k0, x2 = uint32_t(p0 >> 32) ^ r3[u] ^ k1;
      r1[u] = uint32_t(p1);
      r3[u] = uint32_t(p0);
      r0[u] = x0;
      r2[u] = x2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// z[c] = keep(r[c]) ? kept : 0 for c < n: one run of 8 columns of a row (vectorisable: inlined
// into each ISA's clone of dropout_tile, where a compare and a masked move do a run).
// As bit masks: GCC turns the select of two floats into a branch per element (profiled on a Zen 5:
// a third of a bf16 dropout forward's samples in this function).
template <typename acc_t>
__attribute__((always_inline)) inline void keep_run(acc_t* z, const uint32_t* r, int n, uint32_t threshold,
                                                    acc_t kept) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  bits_t kept_bits;
  std::memcpy(&kept_bits, &kept, sizeof kept);
  for (int c = 0; c < n; ++c) {
    const bits_t v = kept_bits & (bits_t(0) - bits_t(r[c] >= threshold));
    std::memcpy(z + c, &v, sizeof v);
  }
}

template <typename acc_t>
__attribute__((always_inline)) inline void dropout_tile_impl(acc_t* z, int64_t ld, int64_t rows, int64_t cols,
                                                             int64_t i0, int64_t j0, const PhiloxStream& s,
                                                             acc_t kept) {
  if (rows <= 0 || cols <= 0) return;
  // Units: rows i0.. in 16-row groups [a0, a1], columns j0.. in 16-column groups [b0, b1]; the
  // column units of groups b0..b1 are the consecutive uj = 8 b0 .. 8 b1 + 7, drawn in batches of
  // kBatch (8 groups). Unit 8 b + c of row unit 8 a + ri gives r0, r1 for row 16 a + ri, columns
  // 16 b + c and 16 b + 8 + c, and r2, r3 for row 16 a + ri + 8: runs of 8 columns per row.
  const int64_t a0 = i0 / 16, a1 = (i0 + rows - 1) / 16, b0 = j0 / 16, b1 = (j0 + cols - 1) / 16;
  const int64_t n_units = 8 * (b1 - b0 + 1);
  alignas(64) uint32_t r[4][kBatch];
  for (int64_t a = a0; a <= a1; ++a)
    for (int ri = 0; ri < 8; ++ri) {
      const int64_t row[2] = {16 * a + ri - i0, 16 * a + ri + 8 - i0};  // tile rows of r0/r1 and r2/r3
      const bool in[2] = {row[0] >= 0 && row[0] < rows, row[1] >= 0 && row[1] < rows};
      if (!in[0] && !in[1]) continue;
      for (int64_t u0 = 0; u0 < n_units; u0 += kBatch) {
        const int n = int(std::min<int64_t>(kBatch, n_units - u0));
        philox_batch(s, uint32_t(8 * a + ri), uint32_t(8 * b0 + u0), n, r[0], r[1], r[2], r[3]);
        for (int g = 0; g < n / 8; ++g) {  // 16-column group b0 + (u0 / 8) + g
          const int64_t col = 16 * (b0 + u0 / 8 + g) - j0;  // its first column in the tile
          for (int h = 0; h < 2; ++h) {
            if (!in[h]) continue;
            acc_t* zr = z + row[h] * ld;
            for (int half = 0; half < 2; ++half) {  // columns col + 8 half .. + 8
              const uint32_t* draws = r[2 * h + half] + 8 * g;
              const int64_t c0 = col + 8 * half;
              if (c0 >= 0 && c0 + 8 <= cols) {
                keep_run(zr + c0, draws, 8, s.threshold, kept);
              } else {
                for (int c = 0; c < 8; ++c)
                  if (c0 + c >= 0 && c0 + c < cols) zr[c0 + c] = s.keep(draws[c]) ? kept : acc_t(0);
              }
            }
          }
        }
      }
    }
}

template <typename T>
inline void mul_row_impl(T* x, const T* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= z[j];
}

template <typename T, typename Z>
inline void keep_row_impl(T* x, const Z* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = z[j] != Z(0) ? x[j] : T(0);  // (+0 in fp16 and bf16 too)
}

}  // namespace

FC_MULTIVERSION void dropout_tile(float* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
                                  const PhiloxStream& s, float kept) {
  dropout_tile_impl(z, ld, rows, cols, i0, j0, s, kept);
}
void dropout_tile(double* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const PhiloxStream& s,
                  double kept) {
  dropout_tile_impl(z, ld, rows, cols, i0, j0, s, kept);
}

FC_MULTIVERSION void mul_row(float* x, const float* z, int64_t n) { mul_row_impl(x, z, n); }
void mul_row(double* x, const double* z, int64_t n) { mul_row_impl(x, z, n); }
FC_MULTIVERSION void keep_row(float* x, const float* z, int64_t n) { keep_row_impl(x, z, n); }
void keep_row(double* x, const double* z, int64_t n) { keep_row_impl(x, z, n); }
FC_MULTIVERSION void keep_row(uint16_t* x, const float* z, int64_t n) { keep_row_impl(x, z, n); }

}  // namespace flash_cuda::cpu
