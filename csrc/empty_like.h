// Outputs and gradients allocated like an input, for every backend (CPU, CUDA kernels, emulator).
//
// They keep the input's memory layout (FlashAttention's (B, N, H, D) memory passed as a transposed
// view gives an output in that layout) with unit stride in the head dim, which the kernels' row
// loads and stores and the CPU backend's row stores need. at::empty_like keeps it for every input
// with stride(-1) == 1 but self-overlapping ones whose other dims have stride 1 or 0 (heads as
// sliding windows over the features, x.unfold(-1, D, 1)), where it may order another dim
// innermost: those get a contiguous tensor. flash_cuda/ops.py's fake functions allocate by the
// same rule, so compiled graphs see the strides the ops return.
#pragma once
#include <ATen/ATen.h>

namespace flash_cuda {

inline at::Tensor empty_like_unit_stride(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x);
  return y.size(-1) <= 1 || y.stride(-1) == 1 ? y : at::empty(x.sizes(), x.options());
}

}  // namespace flash_cuda
