/* FC_HOST_DEVICE: a function the kernels and the host code both call (the masks' and dropout's
 * arithmetic, which the CPU backend shares; the launchers' split heuristics). The lowest kernel
 * header: no CUDA and no torch headers, so the CPU backend's C++ includes it as it is. */
#pragma once

#if defined(__CUDACC__)
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#endif
