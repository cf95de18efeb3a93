// Tile GEMMs of the CPU backend: C (+)= A B on row-major tiles, with the operands in their own
// precision and the product accumulated in float (double for double operands).
//
// fp16/bf16 operands go through ATen's batch-reduce GEMM (at::native::cpublas::brgemm), which
// runs oneDNN's low-precision GEMMs: AMX tiles or AVX512-BF16/FP16 dot products where the CPU has
// them. Whether a call's fp16/bf16 inputs are multiplied natively or converted to float once per
// call (and the float path taken) is decided from the CPU's ISA flags (native_lowp_gemm).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

namespace flash_cuda::cpu {

// C (M x N, row stride ldc) = A (M x K, lda) B (K x N, ldb), or C += A B when `accumulate`.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const c10::Half* A, int64_t lda, const c10::Half* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate);

// Whether fp16/bf16 tiles of this dtype are multiplied in their own precision: when the CPU has
// native dot products for it (bf16: AMX-BF16 or AVX512-BF16; fp16: AMX-FP16; AVX512-FP16
// alone measured no faster than float on a Xeon). FLASH_CUDA_CPU_GEMM=native or =float
// overrides the choice (tests run both paths on every machine).
bool native_lowp_gemm(at::ScalarType dtype);

}  // namespace flash_cuda::cpu
