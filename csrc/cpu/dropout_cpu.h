// Dropout on the CPU backend: the keep mask of csrc/kernels/philox.h for a tile of scores.
#pragma once
#include <stdint.h>

#include "../kernels/philox.h"

namespace flash_cuda::cpu {

// z[r * ld + c] = kept if element (i0 + r, j0 + c) of stream s is kept, else 0, for a rows x
// cols tile (any i0, j0 >= 0): the keep mask (kept = 1) or the multipliers of dP (1 / (1 - p)).
// Each Philox call fills the four elements it covers that lie in the tile.
void dropout_tile(float* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const PhiloxStream& s,
                  float kept);
void dropout_tile(double* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const PhiloxStream& s,
                  double kept);

// x[j] *= z[j]: a row of dP times its dropout multipliers.
void mul_row(float* x, const float* z, int64_t n);
void mul_row(double* x, const double* z, int64_t n);
// x[j] = 0 where z[j] is 0 (dropped), else unchanged, whatever z's multiplier of the kept.
void keep_row(float* x, const float* z, int64_t n);
void keep_row(double* x, const double* z, int64_t n);
void keep_row(uint16_t* x, const float* z, int64_t n);  // a row of fp16/bf16 values (any 16-bit type)

}  // namespace flash_cuda::cpu
