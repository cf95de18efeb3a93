// Row operations of the online softmax on one score tile row (CPU backend).
//
// The float versions are compiled once per x86 ISA level (AVX-512, AVX2, baseline) with
// GCC's target_clones and picked at load time, so one build is fast on every machine; some also
// have a version written with AVX-512 intrinsics, picked when the CPU has them.
// The double versions exist for gradcheck and favour accuracy over speed.
#pragma once
#include <stdint.h>

namespace flash_cuda::cpu {

// max_j x[j]; -inf for an empty or fully masked row.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// y[j] = exp(a x[j] - m) (y may be x) and returns sum_j y[j]; *x_max = max_j x[j] of the input
// (-inf for an empty row), taken in the same pass (online_softmax.h). Requires m finite
// (callers pass 0 for a row whose max is -inf, so masked entries give exp(-inf) = 0, never NaN).
float exp_affine_sum(const float* x, int64_t n, float a, float m, float* y, float* x_max);
double exp_affine_sum(const double* x, int64_t n, double a, double m, double* y, double* x_max);
// The same with y[j] rounded to nearest even as bfloat16 / IEEE half bits (P written straight
// into the P V operand): returns the sum of the unrounded values, *rounded_sum gets the sum of
// the rounded ones. generic: the portable version (the tests compare its bits with the vector
// instructions' version this CPU runs otherwise).
float exp_affine_sum_bf16(const float* x, int64_t n, float a, float m, uint16_t* y, float* x_max, float* rounded_sum,
                          bool generic = false);
float exp_affine_sum_fp16(const float* x, int64_t n, float a, float m, uint16_t* y, float* x_max, float* rounded_sum,
                          bool generic = false);

// x[j] = exp(a x[j] - m) in place (no sum: the backward's P from the saved lse m, finite).
void exp_affine(float* x, int64_t n, float a, float m);
void exp_affine(double* x, int64_t n, double a, double m);

// y[j] = 2^x[j] by the exponent passes' exp2: generic = the portable polynomial (exp2_poly),
// else the one the passes run on this CPU (AVX-512's where present). For the tests, which check
// that both give the same bits.
void exp2_row(const float* x, int64_t n, float* y, bool generic);

// x[j] *= a.
void scale_row(float* x, int64_t n, float a);
void scale_row(double* x, int64_t n, double a);

// y[j] = x[j] rounded to nearest even as bfloat16 / IEEE half bits: P and dS as the operands of
// the low-precision tile GEMMs (tile_gemm.h), rounded exactly as the CUDA kernels round them.
// round_fp16's generic: as for exp_affine_sum_fp16.
void round_bf16(const float* x, int64_t n, uint16_t* y);
void round_fp16(const float* x, int64_t n, uint16_t* y, bool generic = false);

// sum_j x[j] y[j] in float64, each product exact (two floats' product fits a double): the
// backward's D_i = rowsum(dO o O). Eight interleaved partial sums, added in a fixed order (the
// same result on every thread count and ISA level).
double dot_f64(const float* x, const float* y, int64_t n);

// The index of x's only nonzero entry, or -1 where it has none or several: the backward's test
// for a one-hot row of P.
int64_t single_nonzero(const float* x, int64_t n);
int64_t single_nonzero(const double* x, int64_t n);

// dp[j] = p[j] * (dp[j] - d): the softmax backward dS = P o (dP - D) for one row.
void softmax_grad_row(float* dp, const float* p, int64_t n, float d);
void softmax_grad_row(double* dp, const double* p, int64_t n, double d);

// Score modifiers on one row (csrc/kernels/score_mod.h's order), each a simple vectorisable pass:
// x[j] = c tanh(x[j] / c) and dcap[j] = 1 - tanh^2 (dcap may be null);
void softcap_row(float* x, float* dcap, int64_t n, float c);
void softcap_row(double* x, double* dcap, int64_t n, double c);
// x[j] -= slope * |d0 + j| (ALiBi; d0: the row's distance of its first key);
void alibi_row(float* x, int64_t n, float slope, int64_t d0);
void alibi_row(double* x, int64_t n, double slope, int64_t d0);
// x[j] += b[j * stride] (the bias; stride 0: one value for the row).
void add_row(float* x, const float* b, int64_t stride, int64_t n);
void add_row(double* x, const double* b, int64_t stride, int64_t n);

}  // namespace flash_cuda::cpu
