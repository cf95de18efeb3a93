/* Dropout in the kernels: the keep bits of a warp's mma score fragments, generated in
 * registers from the mapping of philox.h (one Philox call per four elements a thread holds),
 * never loaded or stored. Run by the band and modifier instantiations when Dropout::enabled.
 *
 * Which kernels hold dropout's code (template flag kDropout of the forward and backward main
 * kernels; with_dropout_kernel picks one at launch): the band variant's 16-bit instantiations
 * come twice, a kernel without it for every call without dropout (causal and windowed ones: the
 * loop the retune shaped, benchmarks/sass_compare.py, with no Philox code or registers in it) and
 * one that tests the flag where it draws. The modifier variant and the fp32 kernels (whose walk is
 * already compiled twice, by precision) have only the second; the dense variant and the KV-cache
 * kernels only the first (no call of theirs has dropout). The dQ pass tests the flag (one kernel).
 *
 * Two orientations of a 16 x 16 block of scores (C tiles nt = 2k, 2k + 1 of m-tile mt; lane
 * g = lane / 4, t = lane % 4):
 *   rows = queries (forward, dQ pass): element e of C tile (mt, nt) is query row0 + 16 mt + g +
 *     8 (e / 2), key col0 + 8 nt + 2 t + e % 2;
 *   rows = keys (backward main kernel, S^T): key row0 + 16 mt + g + 8 (e / 2), query col0 +
 *     8 nt + 2 t + e % 2.
 * Either way the unit of (row g, column 2 t + e) covers elements e and e + 2 of C tiles 2k and
 * 2k + 1 of the thread (rows g, g + 8; columns 2 t + e, 2 t + e + 8), so its four draws are the
 * thread's own; only which of them is the query decides the order of the four.
 */
#pragma once
#include <type_traits>

#include "philox.h"
#include "ptx.h"

namespace flash_cuda {

// f(std::bool_constant<kDropout>) for the kernel a launch of variant (kBand, kMod) with traits Kt
// runs, dropout `enabled` or not: the variants that may draw (kBand: band and modifier) and,
// of those, the ones with a kernel without dropout's code too (the band variant's 16-bit ones),
// as above.
template <class Kt, bool kBand, bool kMod, class F>
auto with_dropout_kernel(bool enabled, F&& f) {
  constexpr bool kCan = kBand, kSplit = kBand && !kMod && !Kt::kTf32;
  if constexpr (!kCan) {
    return f(std::false_type{});
  } else {
    if constexpr (kSplit)
      if (!enabled) return f(std::false_type{});
    return f(std::true_type{});
  }
}

// The draws of (batch, head) for this launch; the seed and offset are read from rng_state.
FC_DEVICE PhiloxStream dropout_stream(const Dropout& d, int batch, int hq, int head) {
  const uint64_t seed = uint64_t(ld_global(d.rng_state)), offset = uint64_t(ld_global(d.rng_state + 1));
  return PhiloxStream::make(seed, offset, int64_t(batch) * hq + head, d.threshold);
}

// The keep decisions of the unit of (row g, column 2 t + e) of the 16 x 16 block at (row0, col0)
// (multiples of 16, in the sequence): keep[a][c] is element e + 2 a of C tile 2 k + c of the block,
// i.e. (row + 8 a, column + 8 c). kQueryRows: rows are queries, else keys.
template <bool kQueryRows>
FC_DEVICE void unit_keep(const PhiloxStream& s, int row0, int col0, int e, int lane, bool (&keep)[2][2]) {
  const uint32_t row_unit = 8 * uint32_t(row0 / 16) + lane / 4, col_unit = 8 * uint32_t(col0 / 16) + 2 * (lane % 4) + e;
  uint32_t r[4];  // r[2 a + c]: (query + 8 a, key + 8 c)
  if (kQueryRows) s.draw(row_unit, col_unit, r);
  else s.draw(col_unit, row_unit, r);
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c) keep[a][c] = s.keep(r[kQueryRows ? 2 * a + c : 2 * c + a]);
}

// Zero the dropped elements of the 16 x 16 block of C tiles s0 = tile 2k, s1 = tile 2k + 1 (the
// forward and the dQ pass, rows = queries, just before the block is packed into an A operand).
FC_DEVICE void drop_block(const PhiloxStream& s, int row0, int col0, int lane, float (&s0)[4], float (&s1)[4]) {
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    bool keep[2][2];
    unit_keep<true>(s, row0, col0, e, lane, keep);
    if (!keep[0][0]) s0[e] = 0.0f;
    if (!keep[0][1]) s1[e] = 0.0f;
    if (!keep[1][0]) s0[e + 2] = 0.0f;
    if (!keep[1][1]) s1[e + 2] = 0.0f;
  }
}

// Keep bits of a warp tile of kMT x kNT C tiles whose rows are keys (the backward main kernel's
// S^T): bit (mt kNT + nt) 4 + e is element e of C tile (mt, nt); row0 and col0 (multiples of 16)
// are the tile's first key and query. Held as bits because the backward needs each one twice
// (for dS and for the P that dV sees).
template <int kMT, int kNT>
struct KeepBits {
  static_assert(kNT % 2 == 0, "whole 16-column blocks");
  static constexpr int kWords = (kMT * kNT * 4 + 31) / 32;
  uint32_t w[kWords];

  FC_DEVICE void keep_all() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = ~0u;
  }
  FC_DEVICE bool operator()(int mt, int nt, int e) const {
    const int bit = (mt * kNT + nt) * 4 + e;
    return (w[bit / 32] >> (bit % 32)) & 1u;
  }
  FC_DEVICE void generate_key_rows(const PhiloxStream& s, int row0, int col0, int lane) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int k = 0; k < kNT / 2; ++k)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          bool keep[2][2];
          unit_keep<false>(s, row0 + 16 * mt, col0 + 16 * k, e, lane, keep);
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int bit = (mt * kNT + 2 * k + c) * 4 + e + 2 * a;
              w[bit / 32] |= uint32_t(keep[a][c]) << (bit % 32);
            }
        }
  }
};

}  // namespace flash_cuda
