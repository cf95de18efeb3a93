// CPU backend of the packed-sequence (varlen) ops: see varlen_cpu.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../attn_options.h"

namespace flash_cuda::cpu {

// q (total_q, Hq, D), k and v (total_k, Hkv, D) with stride(-1) == 1; cu_q, cu_k: the validated
// cumulative sequence lengths (B + 1 entries each). Returns out (total_q, Hq, D) and lse
// (Hq, total_q) in the accumulation dtype; rows of sequences without keys give 0 and -inf.
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::vector<int64_t>& cu_q, const std::vector<int64_t>& cu_k,
                                              const AttnOptions& opt);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& out, const at::Tensor& lse,
                                                          const std::optional<at::Tensor>& dlse,
                                                          const std::vector<int64_t>& cu_q,
                                                          const std::vector<int64_t>& cu_k, const AttnOptions& opt);

}  // namespace flash_cuda::cpu
