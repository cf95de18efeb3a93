// The arguments every attention op shares beyond q, k, v: scale, the band (causal / sliding
// window), the score modifiers (softcap, ALiBi, additive bias) and dropout. Built once in ops.cpp
// from the op's schema and handed to whichever backend runs (CPU, CUDA kernels, emulator).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "kernels/mask.h"
#include "kernels/philox.h"

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
  double dropout_p = 0.0;           // in [0, 1); 0: off
  std::optional<at::Tensor> rng_state;  // dropout: int64 (seed, offset) on q's device (philox.h)
  int64_t dropout_batch0 = 0;       // the batch index of the first sequence (CPU varlen: per sequence)

  BandMask band(int64_t nq, int64_t nk) const {
    return BandMask::make(causal, bottom_right, nq, nk, window_left, window_right);
  }
  bool has_mods() const { return softcap > 0.0 || alibi.has_value() || bias.has_value(); }
  bool dropout() const { return dropout_p > 0.0; }
  // Dropout as the kernels take it (rng_state: the tensor's memory, read in the kernels).
  Dropout kernel_dropout() const {
    if (!dropout()) return Dropout{false, 0, 1.0f, nullptr};
    return Dropout{true, dropout_threshold(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p)),
                   rng_state->data_ptr<int64_t>()};
  }
};

}  // namespace flash_cuda
