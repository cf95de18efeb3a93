// CPU backend of KV-cache attention (attention_with_kvcache): see kvcache_cpu.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../attn_options.h"

namespace flash_cuda::cpu {

// Writes k_new, v_new (B, Hkv, Nnew, D) into the cache at positions seqlens[b] .. seqlens[b] +
// Nnew (validated by the caller), through block_table (B, pages per sequence) when paged.
void kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
               const std::vector<int64_t>& seqlens, const std::optional<at::Tensor>& block_table);

// Attention of q (B, Hq, Nq, D) to n_keys[b] keys of each sequence's cache (contiguous (B, Hkv,
// capacity, D), or a page pool with block_table), bottom-right aligned: its first ones, or with a
// left pad rows first_keys[b] .. (first_keys: empty, or one valid entry per sequence).
// num_splits 0: chosen from the shapes alone (never from the thread count, so results are
// bitwise the same for any number of threads). Returns out (B, Hq, Nq, D) and lse (B, Hq, Nq).
std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const std::vector<int64_t>& n_keys,
                                               const std::vector<int64_t>& first_keys,
                                               const std::optional<at::Tensor>& block_table, const AttnOptions& opt,
                                               int64_t num_splits);

}  // namespace flash_cuda::cpu
