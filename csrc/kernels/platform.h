/* The one place that knows which compiler builds the kernels: nvcc gets the CUDA headers,
 * the host compiler gets the emulator's version of the CUDA device API. Kernel headers
 * include this and nothing CUDA-specific of their own. */
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FC_DEVICE __device__ __forceinline__
#else
#include "../emu/cuda_host.h"
#define FC_DEVICE inline
#endif
