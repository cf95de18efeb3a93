/* What the host side (csrc/kernel_launch.cpp) calls: one entry point per backend, with the
 * same signature. No torch and no CUDA headers, so torch code can include it. */
#pragma once
#include <stddef.h>

#include "device.h"
#include "params.h"

namespace flash_cuda {

// The inputs' dtype. fp32 runs on tf32 tensor cores (tf32.h; p.tf32x3 picks the precision) in
// the forward and the backward (always deterministic); fwd_kvcache returns an error for it.
enum class Dtype { f16, bf16, f32 };

// fwd: launch the forward kernel for p on `stream` (a cudaStream_t; ignored by the emulator),
// in the tile configuration that fits dev (device.h). Returns nullptr on success, else the
// launch error's text (or why no configuration fits dev). Emulator check failures throw.
//
// bwd: launch the backward kernels (deterministic: the dQ pass instead of atomics). p.dq_accum
// must hold bwd_dq_accum_floats(p) floats unless deterministic.
//
// Both pick the instantiation from p (dispatch.h, FC_VARIANT_SWITCH): the modifier one when
// p.mod has any modifier, else the band one when p.mask is banded or dropout is on, else the
// dense one.
//
// KV cache (kv_cache.h): fwd_kvcache runs the split forward and the merge (p.cache's partials
// hold p.cache.num_splits splits when more than 1); kv_append writes new keys and values into
// the cache first; kvcache_num_splits is the split count chosen for p on dev.
#define FC_BACKEND_API                                                                                  \
  const char* fwd(const FwdParams& p, Dtype dtype, const DeviceLimits& dev, void* stream);              \
  const char* bwd(const BwdParams& p, Dtype dtype, bool deterministic, const DeviceLimits& dev, void* stream); \
  size_t bwd_dq_accum_floats(const BwdParams& p);                                                       \
  const char* fwd_kvcache(const FwdParams& p, Dtype dtype, const DeviceLimits& dev, void* stream);      \
  const char* kv_append(const KvAppendParams& p, void* stream);                                         \
  int kvcache_num_splits(const FwdParams& p, const DeviceLimits& dev);
namespace cuda_backend {
FC_BACKEND_API
}
namespace emu_backend {
FC_BACKEND_API
}
#undef FC_BACKEND_API

}  // namespace flash_cuda
