/* The one place that knows which compiler builds the kernels: nvcc gets the CUDA headers,
 * the host compiler gets the emulator's version of the CUDA device API. Kernel headers
 * include this and nothing CUDA-specific of their own. Both builds link into one module, so
 * launch code lives in namespace flash_cuda::FC_BACKEND (cuda_backend or emu_backend). */
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FC_DEVICE __device__ __forceinline__
#define FC_BACKEND cuda_backend
#define FC_HOST_BUILD false
#else
#include "../emu/cuda_host.h"
#define FC_DEVICE inline
#define FC_BACKEND emu_backend
#define FC_HOST_BUILD true  // the emulator's source executor: no register file to fit
#endif
