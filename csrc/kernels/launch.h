/* Kernel launch, written once for both builds: <<<>>> on the current stream under nvcc, the
 * emulator's launch on the host. Launchers call launch_kernel and nothing else, so the grid,
 * block and shared-memory size the emulator runs are exactly the ones a GPU would get. */
#pragma once
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

#include "params.h"
#include "platform.h"

namespace flash_cuda {

// The variant part of a launch's name (kernel reports, emulator records): "", ",band", ",mod".
inline const char* variant_suffix(bool band, bool mod) { return mod ? ",mod" : (band ? ",band" : ""); }

// Calls f(std::bool_constant<kVarlen>): the instantiation of the forward, backward and dQ
// kernels for p (seqlen.h). On the GPU dense batches get their own (no narrowing, no registers
// spent on it); the emulator's source executor runs the kVarlen one for both, whose narrowing
// is the identity on dense params, so its host build compiles each kernel once. The PTX
// executor runs the dense kernel's PTX for a dense batch, as a GPU does (runtime.h).
template <class F>
cudaError_t with_varlen(const AttnShape& p, F&& f) {
#if defined(__CUDACC__)
  if (p.cu_seqlens_q == nullptr) return f(std::false_type{});
#else
  const ::emu::DenseBatch dense(p.cu_seqlens_q == nullptr);
#endif
  return f(std::true_type{});
}

// Dynamic shared memory above 48 KiB needs an opt-in per kernel on the GPU.
constexpr size_t kDefaultSmemLimit = 48 * 1024;

template <class... Params, class... Args>
inline cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, Args&&... args) {
#if defined(__CUDACC__)
  (void)name;
  if (smem > kDefaultSmemLimit) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#else
  (void)stream;
  // Every kernel has __launch_bounds__(its block size): ptxas keeps it to 64K registers per
  // block, at most 255 per thread, allocated in units of 8.
  const unsigned threads = block.x * block.y * block.z;
  const int max_regs = threads == 0 ? 255 : static_cast<int>(std::min<unsigned>(255, 65536 / threads / 8 * 8));
  if constexpr (sizeof...(Params) == 1) {
    // The one parameter (a params struct) as the kernel receives it: its bytes are the .param
    // space of the PTX entry when the PTX executor runs the launch.
    using P = std::decay_t<std::tuple_element_t<0, std::tuple<Params...>>>;
    static_assert(std::is_trivially_copyable_v<P>, "a kernel's params are copied byte for byte to the GPU");
    const P params(std::forward<Args>(args)...);
    ::emu::launch(name, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem, max_regs, [&] { kernel(params); },
                  reinterpret_cast<const void*>(kernel), &params, sizeof(P));
  } else {  // the emulator's self-test kernels (no PTX: the PTX executor refuses them)
    ::emu::launch(name, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem, max_regs, [&] { kernel(args...); });
  }
  return cudaSuccess;
#endif
}

}  // namespace flash_cuda
