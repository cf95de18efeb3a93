// Tile GEMMs of the CPU backend (tile_gemm.h).
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <cstring>

namespace flash_cuda::cpu {
namespace {

// is_vnni = false: B is plain row-major, no packing; brgemm then runs oneDNN's GEMM for these
// types (C += A B with the C++ types' own precision, accumulated in float).
template <typename T>
void brgemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C, int64_t ldc,
            bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

bool cpu_has(const char* flag) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(flag);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// float and double: ATen's mm (the BLAS sgemm/dgemm) on views of the tiles.
template <typename T>
void blas_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
               bool accumulate) {
  if (M == 0 || N == 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  if (accumulate)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const c10::Half* A, int64_t lda, const c10::Half* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

bool native_lowp_gemm(at::ScalarType dtype) {
  if (const char* env = std::getenv("FLASH_CUDA_CPU_GEMM")) {
    if (std::strcmp(env, "native") == 0) return true;
    if (std::strcmp(env, "float") == 0) return false;
  }
  static const bool bf16 = cpu_has("amx_bf16") || cpu_has("avx512_bf16");
  static const bool fp16 = cpu_has("amx_fp16");
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : false;
}

}  // namespace flash_cuda::cpu
