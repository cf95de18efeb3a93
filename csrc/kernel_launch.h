// Host side of the attention kernels (CUDA build and emulator): see kernel_launch.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "attn_options.h"
#include "emu/runtime.h"

namespace flash_cuda {

enum class Executor { cuda, emu };

// The global memory a tensor's strides reach, [data_ptr, last element]: what an emulated launch
// may touch (emu::set_buffers).
emu::Buffer tensor_footprint(const at::Tensor& t, bool writable);

// Packed sequences (varlen_attention): the kernels get (1, H, total, D) views of the packed
// (total, H, D) tensors and read sequence b's rows from cu_seqlens (int32, B + 1 entries, on the
// tensors' device; clamped in the kernels, never read on the host); max_q, max_k size the grid.
struct Packed {
  at::Tensor cu_q, cu_k;
  int64_t max_q, max_k;
  int64_t batch() const { return cu_q.numel() - 1; }
};

// q, k, v: (B, H, N, D) fp16/bf16/fp32 (fp32 on TF32) with unit stride in D, checked by the caller (ops.cpp);
// packed: B = 1 views of the packed tensors, out and lse then (1, Hq, total_q, D) and
// (1, Hq, total_q) views of (total_q, Hq, D) and (Hq, total_q) tensors. opt.bias (if any) is
// float32 (dense batches only).
std::tuple<at::Tensor, at::Tensor> fwd_kernels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const AttnOptions& opt, Executor executor,
                                               const std::optional<Packed>& packed = std::nullopt);

// Gradients of fwd_kernels' (out, lse), and of the bias when opt.bias_grad (dense float32
// (B, Hq, Nq, Nk); else undefined); deterministic: dQ without atomics (bitwise repeatable).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_kernels(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& opt, bool deterministic,
    Executor executor, const std::optional<Packed>& packed = std::nullopt);

// The most key splits a KV-cache call takes (FlashAttention-2's limit, and the most the kernels'
// heuristic picks: kernels/kv_cache.h kMaxSplits); the partial outputs are num_splits times out.
constexpr int64_t kMaxNumSplits = 128;

// KV-cache attention (attention_with_kvcache, csrc/kernels/kv_cache.h): q (B, Hq, Nq, D);
// k_cache, v_cache contiguous (B, Hkv, capacity, D) or, with block_table (B, pages per
// sequence) int32, a page pool (num_pages, Hkv, page_size, D); D a multiple of 8 and rows 16-byte
// aligned (the cache is written in place, so it cannot be copied to fix either). k_new, v_new
// (B, Hkv, Nnew, D) are written at positions cache_seqlens[b].. first. cache_leftpad (B,) int32:
// sequence b's keys are rows [cache_leftpad[b], cache_seqlens[b] + Nnew) of its cache.
// num_splits 0: chosen for the device (the emulator: the profile's SM count), at most
// kMaxNumSplits. All on q's device; checked by the caller.
std::tuple<at::Tensor, at::Tensor> kvcache_kernels(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                                                   const std::optional<at::Tensor>& v_new,
                                                   const at::Tensor& cache_seqlens,
                                                   const std::optional<at::Tensor>& cache_leftpad,
                                                   const std::optional<at::Tensor>& block_table,
                                                   const AttnOptions& opt, int64_t num_splits, Executor executor);

// The TORCH_CUDA_ARCH_LIST this extension's CUDA kernels were built for (nullptr: no CUDA
// build), and whether such a list has code that runs on compute capability cc (major x 10 +
// minor).
const char* cuda_arch_list();
bool arch_list_covers(const std::string& list, int cc);

}  // namespace flash_cuda
