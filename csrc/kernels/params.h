/* Plain parameter structs of the attention kernels: pointers, sizes, strides. Built on the
 * host (csrc/kernel_launch.cpp) and passed by value to the kernels; no torch, no CUDA. */
#pragma once
#include <stdint.h>

#include "mask.h"

namespace flash_cuda {

// A [B, H, N, D] tensor of 16-bit values with unit stride in D; strides in elements.
struct TensorRef {
  void* ptr;
  int64_t batch_stride, head_stride, row_stride;
};

// Fields both kernels read.
struct AttnShape {
  int b, hq, hkv, nq, nk;
  int d;              // the real head dim; the kernel's instantiation may be wider (zero padded)
  float scale;        // softmax scale
  float scale_log2;   // scale * log2(e): scores go to the base-2 domain in one multiply
  CausalMask mask;
  // Every row start of every TensorRef is 16-byte aligned, so tiles move as 16-byte cp.async
  // and 128-bit stores; otherwise (e.g. an odd, packed head dim) element by element.
  bool vec_aligned;
};

struct FwdParams : AttnShape {
  TensorRef q, k, v, o;
  float* lse;  // [B, Hq, Nq] contiguous, natural log, softmax scale included
};

struct BwdParams : AttnShape {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse;   // [B, Hq, Nq] from the forward
  const float* dlse;  // [B, Hq, Nq] gradient flowing into lse, or nullptr
  float* di;          // [B, Hq, Nq] scratch: rowsum(dO * O) - dlse
  float* dq_accum;    // fp32 dQ in mma fragment order (see bwd_kernel.h), or nullptr when
                      // dQ is computed by the deterministic pass instead of atomics
};

// The (batch, head) slice of t, as T*.
template <class T>
FC_HOST_DEVICE T* head_ptr(const TensorRef& t, int batch, int head) {
  return static_cast<T*>(t.ptr) + batch * t.batch_stride + head * t.head_stride;
}

}  // namespace flash_cuda
