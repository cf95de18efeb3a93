// The arguments every attention op shares beyond q, k, v: scale, the band (causal / sliding
// window) and the score modifiers (softcap, ALiBi, additive bias). Built once in ops.cpp from the
// op's schema and handed to whichever backend runs (CPU, CUDA kernels, emulator).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "kernels/mask.h"

namespace flash_cuda {

struct AttnOptions {
  double scale = 1.0;
  bool causal = false;
  bool bottom_right = true;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  double softcap = 0.0;                         // 0: off
  std::optional<at::Tensor> alibi;  // (1 or B, Hq) float32 slopes, contiguous
  std::optional<at::Tensor> bias;   // broadcast view (B, Hq, Nq, Nk) of an additive mask, float32
                                    // (float64 for float64 inputs)
  bool bias_grad = false;           // the backward also returns dL/d bias, dense (B, Hq, Nq, Nk)

  BandMask band(int64_t nq, int64_t nk) const {
    return BandMask::make(causal, bottom_right, nq, nk, window_left, window_right);
  }
  bool has_mods() const { return softcap > 0.0 || alibi.has_value() || bias.has_value(); }
};

}  // namespace flash_cuda
