// Causal masking rule shared by every executor (CPU backend, CUDA kernels, emulator).
//
// Torch-free on purpose: this header is compiled by the host compiler and by nvcc.
// Key j is visible to query i iff j <= i + offset, where
//   bottom_right: offset = Nk - Nq  (FlashAttention >= 2.1, KV-cache decoding)
//   top_left:     offset = 0        (torch.nn.functional.scaled_dot_product_attention)
// With bottom_right and Nq > Nk the first Nq - Nk rows see no key: their output is 0
// and their lse is -inf.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#endif

namespace flash_cuda {

struct CausalMask {
  bool causal;
  int64_t offset;  // key j visible to query i iff !causal || j <= i + offset

  FC_HOST_DEVICE static CausalMask make(bool causal, bool bottom_right, int64_t nq, int64_t nk) {
    return CausalMask{causal, (causal && bottom_right) ? nk - nq : 0};
  }
  FC_HOST_DEVICE bool visible(int64_t i, int64_t j) const { return !causal || j <= i + offset; }
  // The last key query i sees when causal (may be negative: none).
  FC_HOST_DEVICE int64_t last_key(int64_t i) const { return i + offset; }
  // Last key (exclusive) any row of [row_begin, row_end) can see, clamped to [0, nk].
  FC_HOST_DEVICE int64_t key_end(int64_t row_end, int64_t nk) const {
    if (!causal) return nk;
    int64_t e = row_end + offset;  // (row_end - 1) + offset + 1
    return e < 0 ? 0 : (e > nk ? nk : e);
  }
  // First query row that sees key `key_begin`, clamped to [0, nq].
  FC_HOST_DEVICE int64_t row_begin(int64_t key_begin, int64_t nq) const {
    if (!causal) return 0;
    int64_t r = key_begin - offset;
    return r < 0 ? 0 : (r > nq ? nq : r);
  }
  // Leading key tiles (of `tile` keys) that every row from row_begin on sees entirely: the
  // tiles a query tile starting at row_begin walks without a per-element predicate.
  FC_HOST_DEVICE int64_t unmasked_key_tiles(int64_t row_begin, int tile, int64_t nk) const {
    const int64_t full = nk / tile;  // tiles inside the sequence
    if (!causal) return full;
    const int64_t e = row_begin + offset + 1;  // keys every row sees: [0, e)
    const int64_t t = e <= 0 ? 0 : e / tile;
    return t < full ? t : full;
  }
  // First tile of `tile` rows whose every row sees every key before key_end (causal: all tiles
  // from there on need no mask for the keys up to key_end).
  FC_HOST_DEVICE int64_t first_unmasked_row_tile(int64_t key_end, int tile) const {
    if (!causal) return 0;
    const int64_t r = key_end - 1 - offset;  // first row that sees key key_end - 1
    return r <= 0 ? 0 : (r + tile - 1) / tile;
  }
  // True when some key of [key_begin, key_end) is hidden from some row of [row_begin, row_end).
  FC_HOST_DEVICE bool tile_needs_mask(int64_t row_begin, int64_t key_end) const {
    return causal && key_end - 1 > row_begin + offset;
  }
};

}  // namespace flash_cuda
