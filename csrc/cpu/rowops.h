// Row operations of the online softmax on one score tile row (CPU backend).
//
// The float versions are compiled once per x86 ISA level (AVX-512, AVX2, baseline) with
// GCC's target_clones and picked at load time, so one build is fast on every machine.
// The double versions exist for gradcheck and favour accuracy over speed.
#pragma once
#include <stdint.h>

namespace flash_cuda::cpu {

// max_j x[j]; -inf for an empty or fully masked row.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// x[j] = exp(x[j] - m) in place and returns sum_j x[j]. Requires m finite (callers pass
// 0 for a row whose max is -inf, so masked entries give exp(-inf) = 0, never NaN).
float exp_sub_sum(float* x, int64_t n, float m);
double exp_sub_sum(double* x, int64_t n, double m);

// x[j] *= a.
void scale_row(float* x, int64_t n, float a);
void scale_row(double* x, int64_t n, double a);

// dp[j] = p[j] * (dp[j] - d): the softmax backward dS = P o (dP - D) for one row.
void softmax_grad_row(float* dp, const float* p, int64_t n, float d);
void softmax_grad_row(double* dp, const double* p, int64_t n, double d);

}  // namespace flash_cuda::cpu
