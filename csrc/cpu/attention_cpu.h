// CPU backend: the FlashAttention-2 algorithm on ATen tile GEMMs (see attention_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../attn_options.h"

namespace flash_cuda::cpu {

// q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), each with stride(-1) == 1.
// Returns out (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const AttnOptions& opt);

// Gradients of out (and, when dlse is given, of lse) with respect to q, k, v, and the bias
// (dense (B, Hq, Nq, Nk) in the accumulation dtype when opt.bias_grad, else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& opt);

// Tests: (batch, kv head) pairs per chunk of the tiled forward's and backward's operands
// (attention_cpu.cpp, operand_chunk) forced to `pairs`, or automatic again at 0; returns the
// previous setting.
int64_t force_chunk_pairs(int64_t pairs);

}  // namespace flash_cuda::cpu
