/* Launch of one backward instantiation: preprocess (Di, zeroed dQ accumulator), the main
 * kernel, then either the dQ postprocess (atomic path) or the deterministic dQ pass. All on
 * one stream, in order. */
#pragma once
#include <string>

#include "bwd_dq_kernel.h"
#include "bwd_kernel.h"
#include "bwd_preprocess.h"
#include "launch.h"

namespace flash_cuda {
namespace FC_BACKEND {

template <class T, int kHeadDim, bool kBand, bool kMod, int kSmemKiB>
cudaError_t run_bwd(const BwdParams& p, bool deterministic, cudaStream_t stream) {
  using Kt = BwdTraits<T, kHeadDim, kMod, kSmemKiB>;
  using Dq = BwdDqTraits<T, kHeadDim, kMod, kSmemKiB>;
  static_assert(kSmemKiB == kSmemKiBWide || kSmemKiB == kSmemKiBSm75 ||
                    (kSmemKiB == kSmemKiBLarge ? kBwdLargeConfig<T, kHeadDim, kMod>
                                               : bwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBWide>() > kSmemKiBCompact * 1024),
                "a compact instantiation only where the wide one needs more, a large one only where it differs "
                "(tools/generate_kernels.py, traits.h kBwdLargeConfig)");
  static_assert(Kt::kFits, "an sm_75 backward only where one fits 64 KiB (traits.h)");
  static const std::string suffix = std::string("<") + Elem<T>::kName + ",hdim" +
                                    std::to_string(kHeadDim) + variant_suffix(kBand, kMod) +
                                    budget_suffix(kSmemKiB) + ">";
  static const std::string pre = "flash_bwd_preprocess" + suffix, main = "flash_bwd" + suffix,
                           post = "flash_bwd_postprocess" + suffix, dq = "flash_bwd_dq" + suffix;
  const dim3 q_grid((p.nq + Kt::kPrepRows - 1) / Kt::kPrepRows, p.hq, p.b);
  cudaError_t e = launch_kernel(pre.c_str(), flash_bwd_preprocess_kernel<Kt>, q_grid, dim3(128),
                                preprocess_smem_bytes<Kt>(), stream, p);
  if (e != cudaSuccess) return e;
  // (kDSplit blocks per key tile: fp32 above head dim 128, traits.h)
  const dim3 kv_grid((p.nk + Kt::kBlockN - 1) / Kt::kBlockN * Kt::kDSplit, p.hkv, p.b);
  const bool dq_pass = deterministic || Kt::kTf32;  // fp32: always the deterministic pass (traits.h)
  e = with_varlen(p, [&](auto varlen) {
    constexpr bool kVarlen = decltype(varlen)::value;
    // the main kernel with dropout's code or without it (dropout.h)
    const cudaError_t e2 = with_dropout_kernel<Kt, kBand, kMod>(p.drop.enabled, [&](auto dropout) {
      constexpr bool kDropout = decltype(dropout)::value;
      if constexpr (!Kt::kTf32) {
        if (!dq_pass)
          return launch_kernel(main.c_str(), flash_bwd_kernel<Kt, kBand, kMod, true, kDropout, kVarlen>, kv_grid,
                               dim3(Kt::kThreads), Kt::kSmemBytes, stream, p);
      }
      return launch_kernel(main.c_str(), flash_bwd_kernel<Kt, kBand, kMod, false, kDropout, kVarlen>, kv_grid,
                           dim3(Kt::kThreads), Kt::kSmemBytes, stream, p);
    });
    if (e2 != cudaSuccess || !dq_pass) return e2;
    const dim3 dq_grid((p.nq + Dq::kBlockM - 1) / Dq::kBlockM, p.hq, p.b);
    return launch_kernel(dq.c_str(), flash_bwd_dq_kernel<Dq, kBand, kMod, kVarlen>, dq_grid, dim3(Dq::kThreads),
                         Dq::kSmemBytes, stream, p);
  });
  if (e != cudaSuccess || dq_pass) return e;
  if constexpr (!Kt::kTf32)  // (fp32 never gets here)
    return launch_kernel(post.c_str(), flash_bwd_postprocess_kernel<Kt>, q_grid, dim3(128),
                         size_t(Kt::kPrepRows) * kHeadDim * sizeof(T), stream, p);
  return e;
}

}  // namespace FC_BACKEND
}  // namespace flash_cuda
