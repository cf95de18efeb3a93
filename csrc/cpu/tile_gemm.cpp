// Tile GEMMs of the CPU backend (tile_gemm.h).
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_gemm.h"

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

// The micro-kernels multiply products of at least one vector of columns. Narrower ones (the last
// key tile of an odd length, one key) go to oneDNN or the BLAS: the kernel would leave most lanes
// idle, and its sequential fp32 sums along K (64 terms for dP = dO V^T at D = 64) measured a
// larger error than MKL's there, enough to fail the FA rule on a one-key gradient (Nk = 1, where
// dS = dP - D_i cancels exactly in plain torch).
constexpr int64_t kMicroMinCols = 16;

// The micro-kernels (avx512_gemm.h) by operand type: whether the CPU takes them, the size of a
// packed K x N operand (of one panel with N = kPanelCols; of rows 0..k0 at an even k0), its packing
// and its GEMM.
template <typename T>
bool use_micro_kernel() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return use_dpbf16();
  if constexpr (std::is_same_v<T, float>) return use_avx512_f32();
  return false;
}
template <typename T>
int64_t micro_size(int64_t K, int64_t N) {
  return std::is_same_v<T, c10::BFloat16> ? pairs_size(K, N) : panels_f32_size(K, N);
}
void micro_pack(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, c10::BFloat16* Bp) {
  pack_pairs_bf16(K, N, reinterpret_cast<const uint16_t*>(B), ldb, reinterpret_cast<uint16_t*>(Bp));
}
void micro_pack(int64_t K, int64_t N, const float* B, int64_t ldb, float* Bp) { pack_panels_f32(K, N, B, ldb, Bp); }
template <typename T>
void micro_pack(int64_t, int64_t, const T*, int64_t, T*) {}
void micro_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* Bp,
                int64_t panel, float* C, int64_t ldc, bool accumulate) {
  dpbf16_gemm(M, N, K, reinterpret_cast<const uint16_t*>(A), lda, reinterpret_cast<const uint16_t*>(Bp), panel, C, ldc,
              accumulate);
}
void micro_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t panel, float* C,
                int64_t ldc, bool accumulate) {
  f32_gemm(M, N, K, A, lda, Bp, panel, C, ldc, accumulate);
}
template <typename T, typename C>
void micro_gemm(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, C*, int64_t, bool) {}

// C (+)= A B through the micro-kernel with B (K x N, row stride ldb) packed here, into a per-thread
// buffer (O(K N), against O(M K N) for the product): for the operands of one GEMM (P, dS).
template <typename T>
void micro_gemm_packing(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C,
                        int64_t ldc, bool accumulate) {
  thread_local std::vector<T> packed;
  packed.resize(micro_size<T>(K, N));
  micro_pack(K, N, B, ldb, packed.data());
  micro_gemm(M, N, K, A, lda, packed.data(), micro_size<T>(K, kPanelCols), C, ldc, accumulate);
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  if (!use_avx512_f32() || N < kMicroMinCols) return blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  micro_gemm_packing(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  if (!use_dpbf16() || N < kMicroMinCols) return brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  micro_gemm_packing(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
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

namespace {
// A micro-kernel where the CPU supports it: the environment variable `var` set to `on` or `off`
// decides, else the CPU's flags (no AMX: the class of CPU the kernels were measured to win on).
bool choose_micro_kernel(bool supported, const char* var, const char* on, const char* off) {
  if (!supported) return false;
  if (const char* env = std::getenv(var)) {
    if (std::strcmp(env, on) == 0) return true;
    if (std::strcmp(env, off) == 0) return false;
  }
  static const bool amx = cpu_has("amx_bf16");
  return !amx;
}
}  // namespace

bool use_dpbf16() { return choose_micro_kernel(dpbf16_supported(), "FLASH_CUDA_CPU_BF16_GEMM", "dpbf16", "onednn"); }
bool use_avx512_f32() { return choose_micro_kernel(f32_gemm_supported(), "FLASH_CUDA_CPU_F32_GEMM", "avx512", "blas"); }

template <typename T>
RightOperand<T>::RightOperand(const at::Tensor& x, bool pack) : K_(x.size(2)), N_(x.size(3)) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  if (use_micro_kernel<T>() && N_ >= kMicroMinCols) {  // any K: the bf16 kernel handles an odd one itself
    const int64_t B = x.size(0), H = x.size(1), size = micro_size<T>(K_, N_);
    const at::Tensor src = x.stride(3) == 1 ? x : x.contiguous();
    micro_data_ = at::empty({B, H, std::max<int64_t>(size, 1)}, x.options());
    data_ = src;  // for the GEMMs of fewer columns than a vector
    micro_ = true;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* in = src.data_ptr<T>() + i / H * src.stride(0) + i % H * src.stride(1);
        micro_pack(K_, N_, in, src.stride(2), micro_data_.data_ptr<T>() + i * micro_data_.size(2));
      }
    });
    return;
  }
  packed_ = pack && !std::is_same_v<T, at::opmath_type<T>> && x.numel() > 0 && at::native::cpublas::could_pack(dtype);
  if (!packed_) {
    data_ = x.stride(3) == 1 ? x : x.contiguous();
    return;
  }
  // Zero padding: rows to an even count (the VNNI layout interleaves row pairs), columns to a
  // multiple of 16 (the packing accepts no other widths; the GEMMs compute the real columns only).
  K_even_ = K_ + K_ % 2;
  N16_ = (N_ + 15) / 16 * 16;
  const int64_t B = x.size(0), H = x.size(1), blocks = (N_ + kBlock - 1) / kBlock;
  at::Tensor src = x;
  if (K_even_ != K_ || N16_ != N_ || !x.is_contiguous()) {  // the packing reads (B, H, K, N) densely
    src = at::zeros({B, H, K_even_, N16_}, x.options());
    src.slice(2, 0, K_).slice(3, 0, N_).copy_(x);
  }
  data_ = at::empty({B, H, blocks, K_even_, kBlock}, x.options());
  const T* in = src.data_ptr<T>();
  T* out = data_.data_ptr<T>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / blocks, blk = i % blocks, n0 = blk * kBlock, w = std::min(kBlock, N16_ - n0);
      at::native::cpublas::pack(K_even_, w, N16_, w, dtype, dtype, in + bh * K_even_ * N16_ + n0,
                                out + i * K_even_ * kBlock);
    }
  });
}

template <typename T>
void RightOperand<T>::gemm(int64_t b, int64_t h, int64_t M, const T* A, int64_t lda, int64_t k0, int64_t kn,
                           int64_t n0, int64_t nn, at::opmath_type<T>* C, int64_t ldc, bool accumulate) const {
  if (micro_ && nn >= kMicroMinCols) {
    static_assert(kBlock == kPanelCols, "a key tile starts at a panel of the micro-kernel's layout");
    TORCH_INTERNAL_ASSERT(k0 % 2 == 0 && n0 % kPanelCols == 0, "RightOperand: from an even row, a whole panel");
    const int64_t panel = micro_size<T>(K_, kPanelCols);
    const T* B = micro_data_.data_ptr<T>() + (b * micro_data_.size(1) + h) * micro_data_.size(2) +
                 n0 / kPanelCols * panel + micro_size<T>(k0, kPanelCols);
    return micro_gemm(M, nn, kn, A, lda, B, panel, C, ldc, accumulate);
  }
  if (!packed_) {
    const T* B = data_.data_ptr<T>() + b * data_.stride(0) + h * data_.stride(1) + k0 * data_.stride(2) + n0;
    flash_cuda::cpu::gemm(M, nn, kn, A, lda, B, data_.stride(2), C, ldc, accumulate);
    return;
  }
  if constexpr (!std::is_same_v<T, at::opmath_type<T>>) {
    const int64_t kk = kn + kn % 2, blocks = data_.size(2);
    const T* base = data_.data_ptr<T>() + (b * data_.size(1) + h) * blocks * K_even_ * kBlock;
    for (int64_t n = n0; n < n0 + nn; n += kBlock) {
      const int64_t blk = n / kBlock, w = std::min(kBlock, N16_ - n);  // the block's packed width
      const T* B = base + blk * K_even_ * kBlock + k0 * w;           // row k0 of the VNNI block
      at::native::cpublas::brgemm(M, std::min(w, n0 + nn - n), kk, lda, w, ldc, accumulate, A, B, C + (n - n0),
                                  /*is_vnni=*/true);
    }
    // The micro-kernel keeps the AMX tile configuration of its last shape; release it so the
    // unpacked GEMMs (oneDNN/MKL, which configure tiles on their own) start from a clean state.
    at::native::cpublas::brgemm_release(true);
  }
}

template class RightOperand<float>;
template class RightOperand<double>;
template class RightOperand<c10::BFloat16>;
template class RightOperand<c10::Half>;

}  // namespace flash_cuda::cpu
