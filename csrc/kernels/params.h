/* Plain parameter structs of the attention kernels: pointers, sizes, strides. Built on the
 * host (csrc/kernel_launch.cpp) and passed by value to the kernels; no torch, no CUDA. */
#pragma once
#include <stdint.h>

#include "mask.h"

namespace flash_cuda {

struct FwdParams {
  // q, k, v, o: 16-bit (fp16 or bf16) [B, H, N, D] with unit stride in D; strides in elements.
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // [B, Hq, Nq] contiguous, natural log, softmax scale included
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int b, hq, hkv, nq, nk;
  int d;              // the real head dim; the kernel's instantiation may be wider (zero padded)
  float scale_log2;   // softmax scale * log2(e): scores go to the base-2 domain in one multiply
  CausalMask mask;
  // Every row start of q, k, v and o is 16-byte aligned, so tiles move as 16-byte cp.async
  // and 128-bit stores; otherwise (e.g. an odd, packed head dim) element by element.
  bool vec_aligned;
};

}  // namespace flash_cuda
