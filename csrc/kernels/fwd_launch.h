/* Launch of one forward instantiation: grid, block and shared memory from the traits. The
 * generated files csrc/cuda/fwd_*.cu and csrc/emu/generated/fwd_*.cpp instantiate it once each
 * (per shared-memory budget: device.h). */
#pragma once
#include <string>

#include "fwd_kernel.h"
#include "launch.h"

namespace flash_cuda {
namespace FC_BACKEND {

template <class T, int kHeadDim, bool kBand, bool kMod, int kSmemKiB>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  using Kt = FwdTraits<T, kHeadDim, kMod, kSmemKiB>;
  static_assert(kSmemKiB == kSmemKiBWide || kSmemKiB == kSmemKiBSm75 || fwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBWide>() > kSmemKiBCompact * 1024,
                "a compact instantiation only where the wide one needs more (tools/generate_kernels.py)");
  static const std::string name = std::string("flash_fwd<") + Elem<T>::kName +
                                  ",hdim" + std::to_string(kHeadDim) + variant_suffix(kBand, kMod) +
                                  budget_suffix(kSmemKiB) + ">";
  const dim3 grid((p.nq + Kt::kBlockM - 1) / Kt::kBlockM, p.hq, p.b);
  return with_varlen(p, [&](auto varlen) {
    // the kernel with dropout's code or without it (dropout.h)
    return with_dropout_kernel<Kt, kBand, kMod>(p.drop.enabled, [&](auto dropout) {
      return launch_kernel(name.c_str(),
                           flash_fwd_kernel<Kt, kBand, kMod, decltype(dropout)::value, decltype(varlen)::value>,
                           grid, dim3(Kt::kThreads), Kt::kSmemBytes, stream, p);
    });
  });
}

}  // namespace FC_BACKEND
}  // namespace flash_cuda
