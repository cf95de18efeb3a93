/* Launch of one KV-cache forward instantiation (kv_cache.h): the forward kernel's kCache
 * instantiation over (query tile x key split, head, batch), then, with more than one split, the
 * merge (splitkv_combine.h). It is the modifier variant (softcap and ALiBi are runtime branches;
 * causal and windows run through its band), so one instantiation per dtype and head dim covers
 * every option (per shared-memory budget: device.h). Generated files csrc/cuda/fwd_kvcache_*.cu and csrc/emu/generated/ instantiate it. */
#pragma once
#include <string>

#include "fwd_kernel.h"
#include "launch.h"
#include "splitkv_combine.h"

namespace flash_cuda {
namespace FC_BACKEND {

template <class T, int kHeadDim, int kSmemKiB>
cudaError_t run_fwd_kvcache(const FwdParams& p, cudaStream_t stream) {
  using Kt = KvCacheTraits<T, kHeadDim, kSmemKiB>;
  static_assert(kSmemKiB == kSmemKiBWide || kSmemKiB == kSmemKiBSm75 || kvcache_smem_bytes<T, kHeadDim, kSmemKiBWide>() > kSmemKiBCompact * 1024,
                "a compact instantiation only where the wide one needs more (tools/generate_kernels.py)");
  static const std::string suffix = std::string("<") + Elem<T>::kName + ",hdim" +
                                    std::to_string(kHeadDim) + budget_suffix(kSmemKiB) + ">";
  static const std::string name = "flash_fwd_kvcache" + suffix, combine = "flash_fwd_kvcache_combine" + suffix;
  const int m_blocks = (p.nq + Kt::kBlockM - 1) / Kt::kBlockM;
  const dim3 grid(m_blocks * p.cache.num_splits, p.hq, p.b);
  cudaError_t e = launch_kernel(name.c_str(), flash_fwd_kernel<Kt, true, true, false, true, true>, grid, dim3(Kt::kThreads),
                                Kt::kSmemBytes, stream, p);
  if (e != cudaSuccess || p.cache.num_splits == 1) return e;
  const int64_t rows = int64_t(p.b) * p.hq * p.nq;
  return launch_kernel(combine.c_str(), splitkv_combine_kernel<T>,
                       dim3(static_cast<unsigned>((rows + kCombineWarps - 1) / kCombineWarps)), dim3(32 * kCombineWarps),
                       0, stream, p);
}

}  // namespace FC_BACKEND
}  // namespace flash_cuda
