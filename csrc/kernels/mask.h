// Which keys each query sees: the causal / sliding-window band, shared by every executor (CPU
// backend, CUDA kernels, emulator). Torch-free on purpose: compiled by the host compiler and nvcc.
//
// With d = j - (i + offset), the key's offset from query i's diagonal, key j is visible to
// query i iff  (left < 0 || d >= -left) && (right < 0 || d <= right)  (FlashAttention-2's
// window_size; -1 = unbounded on that side). causal is right = 0. The diagonal is
//   bottom_right: offset = Nk - Nq  (FlashAttention >= 2.1, KV-cache decoding)
//   top_left:     offset = 0        (torch.nn.functional.scaled_dot_product_attention)
// A row that sees no key (e.g. causal with Nq > Nk) gives output 0 and lse -inf.
//
// Tile helpers answer the questions the tiled loops ask: which key tiles a query tile visits
// (the others are skipped: cost proportional to the band), which query tiles a key tile visits,
// and whether a tile lies entirely inside the band (no per-element predicate needed).
#pragma once
#include <stdint.h>

#include "host_device.h"

namespace flash_cuda {

struct BandMask {
  int64_t offset;       // query i's diagonal is key i + offset (also ALiBi's distance origin)
  int64_t left, right;  // visible iff -left <= d <= right; a negative bound is unbounded

  // A bound of nq + nk or more hides nothing (|d| < max(nq, nk) for every pair, and for every
  // sequence no longer than nq, nk): unbounded, which keeps the kernels' 32-bit diagonals
  // (hi_diag, lo_diag) in range; a window of 2^31 - 1 wrapped around there and hid keys.
  FC_HOST_DEVICE static BandMask make(bool causal, bool bottom_right, int64_t nq, int64_t nk, int64_t left = -1,
                                      int64_t right = -1) {
    const int64_t open_from = nq + nk;
    return BandMask{bottom_right ? nk - nq : 0, left < 0 || left >= open_from ? -1 : left,
                    causal ? 0 : (right < 0 || right >= open_from ? -1 : right)};
  }
  FC_HOST_DEVICE bool banded() const { return left >= 0 || right >= 0; }
  FC_HOST_DEVICE bool visible(int64_t i, int64_t j) const {
    const int64_t d = j - (i + offset);
    return (left < 0 || d >= -left) && (right < 0 || d <= right);
  }
  // First and last key query i may see (unclamped; a bound that is open gives +-2^62).
  FC_HOST_DEVICE int64_t first_key(int64_t i) const { return left < 0 ? -(int64_t(1) << 62) : i + offset - left; }
  FC_HOST_DEVICE int64_t last_key(int64_t i) const { return right < 0 ? (int64_t(1) << 62) : i + offset + right; }

  // Keys [key_begin, key_end) some row of [row_begin, row_end) sees, clamped to [0, nk].
  FC_HOST_DEVICE int64_t key_begin(int64_t row_begin, int64_t nk) const { return clamp(first_key(row_begin), nk); }
  FC_HOST_DEVICE int64_t key_end(int64_t row_end, int64_t nk) const { return clamp(last_key(row_end - 1) + 1, nk); }
  // Rows [row_begin, row_end) that see some key of [key_begin, key_end), clamped to [0, nq].
  FC_HOST_DEVICE int64_t row_begin(int64_t key_begin, int64_t nq) const {
    return right < 0 ? 0 : clamp(key_begin - offset - right, nq);
  }
  FC_HOST_DEVICE int64_t row_end(int64_t key_end, int64_t nq) const {
    return left < 0 ? nq : clamp(key_end - 1 - offset + left + 1, nq);
  }

  // True when some key of [key_begin, key_end) is hidden from some row of [row_begin, row_end)
  // by the band (sequence ends are the caller's business).
  FC_HOST_DEVICE bool tile_needs_mask(int64_t row_begin, int64_t row_end, int64_t key_begin, int64_t key_end) const {
    return (right >= 0 && key_end - 1 > last_key(row_begin)) || (left >= 0 && key_begin < first_key(row_end - 1));
  }
  // Key tiles [*begin, *end) (of `tile` keys, whole and inside [0, nk)) that every row of
  // [row_begin, row_end) sees entirely.
  FC_HOST_DEVICE void unmasked_key_tiles(int64_t row_begin, int64_t row_end, int tile, int64_t nk, int64_t* begin,
                                         int64_t* end) const {
    const int64_t full = nk / tile;
    const int64_t lo = key_begin(row_end - 1, nk), hi = key_end(row_begin + 1, nk);  // keys all rows see: [lo, hi)
    *begin = (lo + tile - 1) / tile;
    *end = hi / tile < full ? hi / tile : full;
    if (*end < *begin) *end = *begin;
  }
  // Query tiles [*begin, *end) (of `tile` rows, within [0, m_tiles)) whose every row sees every
  // key of [key_begin, key_end).
  FC_HOST_DEVICE void unmasked_row_tiles(int64_t key_begin, int64_t key_end, int tile, int64_t m_tiles,
                                         int64_t* begin, int64_t* end) const {
    // row i sees all of them iff last_key(i) >= key_end - 1 and first_key(i) <= key_begin
    const int64_t r0 = right < 0 ? 0 : key_end - 1 - offset - right;
    *begin = r0 <= 0 ? 0 : (r0 + tile - 1) / tile;
    if (*begin > m_tiles) *begin = m_tiles;
    if (left < 0) {
      *end = m_tiles;
    } else {
      const int64_t r1 = key_begin - offset + left + 1;  // rows [r0, r1)
      *end = r1 <= 0 ? 0 : r1 / tile;
      if (*end > m_tiles) *end = m_tiles;
    }
    if (*end < *begin) *end = *begin;
  }
  // last_key(i) - n0 and first_key(i) - n0 as ints, for the kernels' 32-bit compares against
  // local key offsets; meaningful only when that side is bounded (has_hi / has_lo), which the
  // kernels test first (a uniform predicate; an open side costs no compare). In range when
  // fits_32_bits() (the launchers check it).
  FC_HOST_DEVICE bool has_hi() const { return right >= 0; }
  FC_HOST_DEVICE bool has_lo() const { return left >= 0; }
  FC_HOST_DEVICE int hi_diag(int i, int n0) const { return i + int(offset + right) - n0; }
  FC_HOST_DEVICE int lo_diag(int i, int n0) const { return i + int(offset - left) - n0; }
  // Only a bounded side computes its diagonal. For rows i < nq + 128 (a tile's padding) and key
  // tiles 0 <= n0 < nk, i - n0 + offset lies in (-max(nq, nk), max(nq, nk) + 128) for either
  // diagonal and for every sequence no longer than nq, nk; the kernels add local offsets < 128.
  FC_HOST_DEVICE bool fits_32_bits(int64_t nq, int64_t nk) const {
    if (!banded()) return true;
    const int64_t n = nq > nk ? nq : nk, bound = left > right ? left : right;
    return n + bound + 256 < (int64_t(1) << 31);
  }

 private:
  FC_HOST_DEVICE static int64_t clamp(int64_t x, int64_t hi) { return x < 0 ? 0 : (x > hi ? hi : x); }
};

}  // namespace flash_cuda
