// Dropout on the CPU backend: the keep mask of csrc/kernels/philox.h for a tile of scores.
#pragma once
#include <stdint.h>

#include "../kernels/philox.h"

namespace flash_cuda::cpu {

// z[r * ld + c] = scale if element (i0 + r, j0 + c) of stream s is kept, else 0, for a rows x
// cols tile (any i0, j0 >= 0). Each Philox call fills the four elements it covers that lie in
// the tile.
void dropout_tile(float* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const PhiloxStream& s,
                  float scale);
void dropout_tile(double* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const PhiloxStream& s,
                  double scale);

// x[j] *= z[j]: a row of probabilities or of dP times its dropout multipliers.
void mul_row(float* x, const float* z, int64_t n);
void mul_row(double* x, const double* z, int64_t n);

}  // namespace flash_cuda::cpu
