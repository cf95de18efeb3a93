// Decoding's kernels on AVX2 (x86-64-v3: AVX2, FMA, F16C), for CPUs without AVX-512 (AMD Zen 2
// and 3, Intel client cores, ...) and for bf16 caches on AVX-512 CPUs without AVX512-BF16: fp32
// query rows against the cache's key and value rows, fp32, fp16 or bf16, each element widened
// exactly, fp32 FMAs. Below 16 query rows per kv group the rows are read where they are; from 16
// on each tile is staged in fp32 for a register-tiled GEMM. No torch headers.
//
// Why: without them, each key and value tile of a fp16/bf16 cache is converted into an fp32 copy
// before the BLAS multiplies it (and the BLAS copies it again into its own layout): decoding is
// bound by the bytes of the cache, and those passes read and write them two more times.
#pragma once
#include <stdint.h>

#include "prefetch.h"  // RowsAhead

namespace flash_cuda::cpu {

enum class RowType { kF32, kF16, kBF16 };  // the cache rows' element type

// Whether this CPU runs the kernels (AVX2, FMA and F16C, checked once).
bool avx2_rows_supported();

// S (rows x n, row stride lds) = Q (rows x K, fp32, row stride ldq) Kr^T for n rows Kr (row stride
// ldk elements, of type t): each score a dot product along the rows, 8 lanes at a time, blocks of
// 4 query rows by 2 keys reduced together; row j of `also` fetched into L2 with key row j.
// Requires avx2_rows_supported().
void avx2_rows_dot(RowType t, int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const void* Kr,
                   int64_t ldk, float* S, int64_t lds, const RowsAhead& also = {});

// C (M x N, row stride ldc) = A (M x K, fp32, row stride lda) B, or C += A B when `accumulate`,
// for a row-major B (K x N, row stride ldb elements, of type t) read in place: register tiles of
// 4 rows by 16 columns over blocks of 32 rows of B (which stay in L1 while every tile uses them),
// the next block's rows fetched as they go; row k of `also` fetched into L2 with row k of B.
// Requires avx2_rows_supported().
void avx2_gemm_rows(RowType t, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate, const RowsAhead& also = {});

// C (M x N, row stride ldc) = A (M x K, fp32, row stride lda) B, or C += A B when `accumulate`, for
// B in the fp32 panels layout of avx512_gemm.h (panels of 64 columns, panel_stride elements apart,
// rows 64 floats apart): register tiles of 6 rows by 16 columns (12 of the 16 ymm registers as
// accumulators), each A element broadcast. Decoding's S^T = K Q^T from 16 query rows per kv group
// (kvcache_cpu.cpp: up to 32, Q^T one panel): the key rows (A) read once, where the dot products
// above would read them once per 4 query rows and reduce every score on its own. Requires
// avx2_rows_supported().
void avx2_panel_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
                     int64_t panel_stride, float* C, int64_t ldc, bool accumulate);

// dst (n x K, fp32, row stride ldd) = n rows of src (row stride lds elements, of type t), widened
// exactly: decoding's K and V tiles staged for avx2_panel_gemm and avx2_gemm_rows, read from memory
// in one streaming pass (the GEMMs then read them from cache, once per 6 or 4 rows of the other
// operand). Requires avx2_rows_supported().
void avx2_stage_rows(RowType t, int64_t n, int64_t K, const void* src, int64_t lds, float* dst, int64_t ldd);

}  // namespace flash_cuda::cpu
