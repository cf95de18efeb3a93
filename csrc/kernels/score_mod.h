// Score modifiers, applied to s = scale * q_i . k_j before the softmax, in this order (the
// FlashAttention-2 order for softcap and ALiBi; the bias is torch SDPA's attn_mask):
//   softcap c > 0:  s <- c tanh(s / c)
//   ALiBi:          s <- s - slope[b, h] |j - (i + offset)|     (offset: BandMask's diagonal)
//   bias:           s <- s + bias[b, h, i, j]   (a floating attn_mask; a boolean one arrives as
//                                                0 / -inf; broadcast dims have stride 0)
// and their backward: with dS' = dL/ds after the cap (the bias gradient itself),
// dL/ds = dS' (1 - tanh^2(s / c)).
//
// Torch-free. The kernels (on a GPU and in the emulator) call modify_score on their fp32 score
// fragments in registers; the CPU backend applies the same formulas a row at a time
// (csrc/cpu/rowops.cpp: softcap_row, alibi_row, add_row).
#pragma once
#include <math.h>
#include <stdint.h>

#include "mask.h"

namespace flash_cuda {

struct ScoreMod {
  float softcap;      // c; 0 = off
  const float* alibi;  // slopes [B or 1][Hq] (batch stride alibi_bstride, 0 when shared), or nullptr
  int64_t alibi_bstride;
  const float* bias;   // additive bias, [B][Hq][Nq][Nk] with strides bias_stride (0 = broadcast), or nullptr
  int64_t bias_stride[4];
  float* dbias;        // dL/d bias (kernels), transposed and dense: [B][Hq][Nk][dbias_stride >= Nq], a
                      // multiple of 8 floats (32-byte rows), or nullptr: not wanted
  int64_t dbias_stride;

  FC_HOST_DEVICE bool any() const { return softcap > 0.0f || alibi != nullptr || bias != nullptr; }
  FC_HOST_DEVICE float slope(int b, int h) const { return alibi ? alibi[b * alibi_bstride + h] : 0.0f; }
  FC_HOST_DEVICE const float* bias_head(int b, int h) const {
    return bias ? bias + b * bias_stride[0] + h * bias_stride[1] : nullptr;
  }
};

#if defined(__CUDA_ARCH__)
extern "C" __device__ float __nv_tanhf(float);  // libdevice's tanhf
#endif

// tanh of a capped score. The build's --use_fast_math turns tanhf into tanh.approx.f32 (one MUFU
// op, relative error up to 2^-10.987: PTX ISA, "tanh",
// https://docs.nvidia.com/cuda/parallel-thread-execution/#floating-point-instructions-tanh),
// far finer than fp16/bf16 inputs' rounding but 2^12 times fp32's: on an H200 it put the fp32
// (3xTF32) softcap outputs at 4x-7x the error bound that the dense ones meet. So with fp32 inputs
// (kExact) the kernels call libdevice's tanhf itself (about 20 instructions, an ex2.approx and an
// rcp.approx among them; within 2 ulp). The emulator's source executor computes tanhf either way.
template <bool kExact>
FC_HOST_DEVICE float score_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return kExact ? __nv_tanhf(x) : tanhf(x);
#else
  return tanhf(x);
#endif
}

// One score: s (scale included) -> modified score; *dcap = d(capped)/ds = 1 - tanh^2 (1 without
// a cap). slope: ALiBi slope of this head (0: none); dist = j - (i + offset); bias: the bias
// element (0: none). kExactTanh: score_tanh's choice (the inputs are fp32).
template <class F, bool kExactTanh = false>
FC_HOST_DEVICE F modify_score(F s, F softcap, F slope, int64_t dist, F bias, F* dcap) {
  F d = F(1);
  if (softcap > F(0)) {
    const F t = score_tanh<kExactTanh>(s / softcap);
    s = softcap * t;
    d = F(1) - t * t;
  }
  *dcap = d;
  return s - slope * F(dist < 0 ? -dist : dist) + bias;
}

}  // namespace flash_cuda
