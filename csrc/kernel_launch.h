// Host side of the attention kernels (CUDA build and emulator): see kernel_launch.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "attn_options.h"
#include "emu/runtime.h"

namespace flash_cuda {

enum class Executor { cuda, emu };

// The global memory a tensor's strides reach, [data_ptr, last element]: what an emulated launch
// may touch (emu::set_buffers).
emu::Buffer tensor_footprint(const at::Tensor& t, bool writable);

// q, k, v: (B, H, N, D) fp16/bf16 with unit stride in D, checked by the caller (ops.cpp).
// opt.bias (if any) is float32.
std::tuple<at::Tensor, at::Tensor> fwd_kernels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const AttnOptions& opt, Executor executor);

// Gradients of fwd_kernels' (out, lse), and of the bias when opt.bias_grad (dense float32
// (B, Hq, Nq, Nk); else undefined); deterministic: dQ without atomics (bitwise repeatable).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_kernels(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& opt, bool deterministic,
    Executor executor);

}  // namespace flash_cuda
