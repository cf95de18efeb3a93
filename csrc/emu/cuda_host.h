/* The CUDA device API on the host, for compiling kernel headers with g++ into the emulator.
 *
 * Included (through csrc/kernels/platform.h) instead of the nvcc environment. It takes the
 * real cuda_fp16.h / cuda_bf16.h (their host conversions round to nearest even), then:
 *   - takes over the keywords the CUDA headers leave empty or unknown on the host
 *     (__shared__ becomes per-OS-thread static storage: one block runs per OS thread at a
 *     time, so it is per block; __launch_bounds__, __noinline__, __global__, __device__);
 *   - maps threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp, the shuffles and
 *     atomicAdd onto the emulator runtime (csrc/emu/runtime.h);
 *   - supplies the device-only math the headers lack on the host (__hfma, hexp2, __expf,
 *     __float_as_uint, ...).
 * __CUDA_ARCH__ stays undefined: the CUDA headers would otherwise select device code.
 * Every function that synchronises or touches memory takes the caller's source location as
 * a defaulted argument, so checker reports point into the kernel.
 */
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "runtime.h"

#undef __shared__
#define __shared__ static thread_local
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif

#define EMU_HERE ::emu::Site()

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
static constexpr int warpSize = 32;
using std::max;  // the device-side integer/float min and max
using std::min;

inline void __syncthreads(::emu::Site s = EMU_HERE) { ::emu::syncthreads(s); }
inline void __syncwarp(unsigned mask = 0xffffffffu, ::emu::Site s = EMU_HERE) { ::emu::syncwarp(mask, s); }
inline void __trap(::emu::Site s = EMU_HERE) { ::emu::trap(s); }

namespace emu {
// One shuffle of a value of 1 to 8 bytes, as the CUDA wrappers do it: 64-bit values move as
// two 32-bit halves. c = ((32 - width) << 8) | clamp (clang __clang_cuda_intrinsics.h).
template <class T>
T shfl_value(int mode, unsigned mask, T var, int b, int width, Site s) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
  const int c = ((32 - width) << 8) | (mode == 0 ? 0 : 0x1F);
  uint32_t words[2] = {0, 0};
  std::memcpy(words, &var, sizeof(T));
  for (int i = 0; i < (sizeof(T) + 3) / 4; ++i) words[i] = shfl(mode, mask, words[i], b, c, s);
  T out;
  std::memcpy(&out, words, sizeof(T));
  return out;
}
}  // namespace emu

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, ::emu::Site s = EMU_HERE) {
  return ::emu::shfl_value(3, mask, var, src_lane, width, s);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, ::emu::Site s = EMU_HERE) {
  return ::emu::shfl_value(0, mask, var, static_cast<int>(delta), width, s);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, ::emu::Site s = EMU_HERE) {
  return ::emu::shfl_value(1, mask, var, static_cast<int>(delta), width, s);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, ::emu::Site s = EMU_HERE) {
  return ::emu::shfl_value(2, mask, var, lane_mask, width, s);
}

inline float atomicAdd(float* address, float val, ::emu::Site s = EMU_HERE) {
  return ::emu::atomic_add_f32(address, val, s);
}

// ---- fast-math and bit-cast intrinsics (device-only in the CUDA headers) ----
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }

// ---- 16-bit arithmetic missing on the host: computed exactly in double, rounded once ----
inline __half __hfma(__half a, __half b, __half c) {
  return __double2half(double(__half2float(a)) * __half2float(b) + __half2float(c));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(__hfma(__low2half(a), __low2half(b), __low2half(c)),
                        __hfma(__high2half(a), __high2half(b), __high2half(c)));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __double2bfloat16(double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __halves2bfloat162(__hfma(__low2bfloat16(a), __low2bfloat16(b), __low2bfloat16(c)),
                            __hfma(__high2bfloat16(a), __high2bfloat16(b), __high2bfloat16(c)));
}
inline __half hexp2(__half x) { return __float2half(std::exp2(__half2float(x))); }
inline __half2 h2exp2(__half2 x) { return __halves2half2(hexp2(__low2half(x)), hexp2(__high2half(x))); }
inline __nv_bfloat16 hexp2(__nv_bfloat16 x) { return __float2bfloat16(std::exp2(__bfloat162float(x))); }
inline __nv_bfloat162 h2exp2(__nv_bfloat162 x) {
  return __halves2bfloat162(hexp2(__low2bfloat16(x)), hexp2(__high2bfloat16(x)));
}
