/* Attention dropout's keep mask: a pure function of (seed, offset, batch, head, query row i,
 * key column j), drawn from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
 * 1, 2, 3", SC 2011; the generator of cuRAND and torch's CUDA kernels). Torch-free and shared by
 * every executor: the CPU backend, the CUDA kernels and the emulator compute the same bits.
 *
 * The mapping (README "Dropout"), with i, j the row and column within the sequence and
 * b, h the sequence (batch entry) and query head of Hq:
 *   key     k = (seed & 0xffffffff, seed >> 32)
 *   units   ui = 8 floor(i / 16) + i % 8,  uj = 8 floor(j / 16) + j % 8
 *   counter c = (lo32(n), hi32(n), ui, b Hq + h)  with n = floor(offset / 4) + uj (mod 2^64)
 *   draw    r = Philox4x32-10(c, k)[2 ((i / 8) % 2) + (j / 8) % 2]
 *   keep    iff r >= floor(p 2^32)
 * One call gives the four elements {i, i + 8} x {j, j + 8}: exactly the four values one thread
 * holds of an mma.m16n8k16 accumulator pair in either orientation (rows g, g + 8 of two n-tiles
 * 8 columns apart), so the kernels use every value they draw, in the forward (queries x keys)
 * and in the backward (keys x queries) alike. Per (b, h, ui) the counters n run over
 * floor(offset / 4) + [0, 8 ceil(Nk / 16)): a call reserves 32 ceil(Nk / 16) of the generator's
 * offset, as torch's fused kernels reserve theirs (offsets count 32-bit values per subsequence).
 * Kept probabilities are scaled by 1 / (1 - p); lse is not affected.
 */
#pragma once
#include <stdint.h>

#include "host_device.h"

namespace flash_cuda {

// Dropout of one launch. rng_state points at (seed, offset) as two int64 in the memory of the
// tensors (device memory on the GPU: read by the kernels, so a CUDA graph replays with the
// generator's current state).
struct Dropout {
  bool enabled;
  uint32_t threshold;        // drop iff draw < threshold = floor(p 2^32)
  float scale;               // 1 / (1 - p) for kept values; 1 when disabled
  const int64_t* rng_state;  // (seed, offset)
};

// The Philox4x32-10 bijection: c <- Philox(c, key). Ten rounds; the key is bumped between them.
FC_HOST_DEVICE void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0], p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t x0 = uint32_t(p1 >> 32) ^ c[1] ^ k0, x2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(p1);
    c[3] = uint32_t(p0);
    c[0] = x0;
    c[2] = x2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The draws of one (batch, head): the key, the counters' base and the subsequence.
struct PhiloxStream {
  uint32_t k0, k1;
  uint64_t base;  // floor(offset / 4)
  uint32_t bh;    // b Hq + h
  uint32_t threshold;

  FC_HOST_DEVICE static PhiloxStream make(uint64_t seed, uint64_t offset, int64_t bh, uint32_t threshold) {
    return {uint32_t(seed), uint32_t(seed >> 32), offset / 4, uint32_t(bh), threshold};
  }
  // The four draws of unit (ui, uj): r[2 a + c] is element (i + 8 a, j + 8 c).
  FC_HOST_DEVICE void draw(uint32_t ui, uint32_t uj, uint32_t (&r)[4]) const {
    const uint64_t n = base + uj;
    r[0] = uint32_t(n);
    r[1] = uint32_t(n >> 32);
    r[2] = ui;
    r[3] = bh;
    philox4x32_10(r, k0, k1);
  }
  FC_HOST_DEVICE bool keep(uint32_t r) const { return r >= threshold; }
  // Element (i, j) alone (the reference mapping; the tiled code draws four at a time).
  FC_HOST_DEVICE bool keep_at(int64_t i, int64_t j) const {
    uint32_t r[4];
    draw(uint32_t(unit(i)), uint32_t(unit(j)), r);
    return keep(r[2 * ((i >> 3) & 1) + ((j >> 3) & 1)]);
  }
  FC_HOST_DEVICE static int64_t unit(int64_t x) { return 8 * (x >> 4) + (x & 7); }
};

// floor(p 2^32) for p in [0, 1): a draw below it drops its element.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : uint32_t(t);
}

// The generator offset one call reserves for nk keys (a multiple of 4).
FC_HOST_DEVICE int64_t dropout_offset_increment(int64_t nk) { return 32 * ((nk + 15) / 16); }

}  // namespace flash_cuda
