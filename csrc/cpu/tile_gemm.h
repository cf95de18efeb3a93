// Tile GEMMs of the CPU backend: C (+)= A B on row-major tiles, with the operands in their own
// precision and the products accumulated in float (double for double operands).
//
// fp16/bf16 operands go through ATen's batch-reduce GEMM (at::native::cpublas::brgemm), which
// runs oneDNN's low-precision kernels: AMX tiles or AVX512-BF16/FP16 dot products where the CPU
// has them. Whether a call's fp16/bf16 inputs are multiplied natively or converted to float once
// per call (and the float path taken) is decided from the CPU's ISA flags (native_lowp_gemm).
//
// bf16 on a CPU with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake) goes through the
// project's own micro-kernel instead (avx512_gemm.h): there ATen's brgemm ran no faster than fp32
// sgemm, the micro-kernel 2.5x faster (215 against 85 GFLOP/s a core on a Zen 4).
//
// A right operand that many tiles share (K^T, V, ...) is a RightOperand, prepared once per
// call: where the CPU has AMX for its dtype it is packed into the VNNI layout of oneDNN's
// brgemm micro-kernel (measured 1.5x to 2.3x faster than the unpacked GEMM at the forward's tile
// shapes on a Xeon with AMX), by our own packing, in blocks as wide as the GEMMs that use it (a
// whole key tile of K^T: one brgemm call per tile); for the bf16 micro-kernel, into its pairs
// layout. A right operand of one GEMM only (P, dS) is packed into that layout per call.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <vector>

#include "env_choice.h"

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
// The packed GEMMs (RightOperand, RowsTransposed, amx_gemm_pairs) leave the AMX tile
// configuration of oneDNN's brgemm loaded, as torch's own CPU flash attention does across its
// tiles: releasing it after every call (and configuring it again on the next) measured 1.04x-1.2x
// slower bf16 forwards at N = 1024 on a Xeon with AMX. ATen keeps a per-thread record of the
// loaded configuration, which other AMX code (oneDNN's own GEMMs) would make stale, so
// release_tiles() releases it before those (the unpacked GEMMs here call it) and parallel_items
// at the end of each worker's items. A no-op when this thread holds none.
void release_tiles();

// While alive (outside an active OpenMP team), the calling thread's own GEMMs through
// ATen run on that thread alone: its OpenMP thread count (which oneDNN and ATen read) and MKL's
// thread-local count set to 1, both restored after. Either library missing from torch's build
// (their symbols weak here) leaves its part out.
class SequentialGemms {
 public:
  SequentialGemms();
  ~SequentialGemms();
  SequentialGemms(const SequentialGemms&) = delete;
  SequentialGemms& operator=(const SequentialGemms&) = delete;

 private:
  int omp_before_ = 0, mkl_before_ = -1;
};

// dst (m x n, row stride ldd) = src (n x m, row stride lds)^T, 16 x 16 blocks on AVX-512.
void transpose(int64_t n, int64_t m, const float* src, int64_t lds, float* dst, int64_t ldd);

// Whether fp16/bf16 tiles of this dtype are multiplied in their own precision: when the CPU has
// native dot products for it (bf16: AMX-BF16 or AVX512-BF16; fp16: AMX-FP16; AVX512-FP16
// alone measured no faster than float on a Xeon). FLASH_CUDA_CPU_GEMM=native or =float
// overrides the choice (tests run both paths on every machine).
bool native_lowp_gemm(at::ScalarType dtype);
// Whether bf16 tiles go through the AVX512-BF16 micro-kernel (avx512_gemm.h): where the CPU has
// AVX512-BF16 and no AMX-BF16. FLASH_CUDA_CPU_BF16_GEMM=dpbf16 or =onednn overrides the choice
// (dpbf16 only where the CPU has the instructions).
bool use_dpbf16();
// Whether fp32 tiles go through the AVX-512 FMA micro-kernel (avx512_gemm.h) rather than the
// BLAS: where the CPU has AVX-512 and no AMX (measured on a Zen 4: 110-116 GFLOP/s a core against
// MKL's 93-100; on the Xeon with AMX the BLAS was kept, as measured before the kernel existed).
// FLASH_CUDA_CPU_F32_GEMM=avx512 or =blas overrides the choice.
bool use_avx512_f32();

// Whether the decoding loop's in-place AVX-512 kernels (row dot products, P V with V widened in
// registers: kvcache_cpu.cpp) may run for operands of `dtype` (fp32 or bf16): where the CPU has
// AVX-512, unless FLASH_CUDA_CPU_F32_GEMM=blas (fp32 and widened fp16) or
// FLASH_CUDA_CPU_BF16_GEMM=onednn (bf16) forces the library GEMMs there too.
bool rows_kernels_allowed(at::ScalarType dtype);

// The decoding loop's in-place kernels for fp32 query rows against a cache of `dtype` (its rows
// read where they are, fp16 and bf16 widened in registers; kvcache_cpu.cpp): the AVX-512 ones for
// fp32 and fp16 caches where rows_kernels_allowed(kFloat), else the AVX2 ones (avx2_rows.h: any
// CPU with AVX2, FMA and F16C), else none (each tile converted to fp32 for the BLAS).
// FLASH_CUDA_CPU_F32_GEMM=blas or FLASH_CUDA_CPU_ROWS=off take none; FLASH_CUDA_CPU_ROWS=avx2
// the AVX2 ones wherever the CPU runs them (tests use it on AVX-512 machines).
enum class RowsKernels { kNone, kAvx512, kAvx2 };
RowsKernels float_rows_kernels(at::ScalarType dtype);

// The dtype of the tile GEMMs for inputs of `dtype`: fp16/bf16 themselves where the CPU
// multiplies them natively (tile_gemm.h), else float (the inputs converted once per call).
template <typename Fn>
inline void with_gemm_type(at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kDouble: return fn(double{});
    case at::kBFloat16: return native_lowp_gemm(dtype) ? fn(c10::BFloat16{}) : fn(float{});
    case at::kHalf: return native_lowp_gemm(dtype) ? fn(c10::Half{}) : fn(float{});
    default: return fn(float{});
  }
}

// The right operand B (K x N) of one (b, h) of a (B, H, K, N) tensor, for GEMMs over a range of
// its rows and columns. Packed (AMX, even K), in the micro-kernels' panels (avx512_gemm.h: bf16
// pairs or fp32, any K) or row-major with unit column stride; a transposed view stays one where
// float's BLAS reads it or the micro-kernels' panels were packed from its rows (their narrow
// blocks are gathered from it).
template <typename T>
class RightOperand {
 public:
  static constexpr int64_t kBlock = 64;  // the micro-kernels' panel width; their n0 must be a multiple

  // x: (B, H, K, N) in T; a view with unit stride along K (the transpose of rows, e.g. K^T of K)
  // is packed for AMX, and for the micro-kernels where its rows hold whole words (fp32; bf16 at an
  // even K on aligned rows), without a dense copy. pack: use the packed layout where the CPU
  // supports it.
  // block: columns per packed AMX block, the widest product one brgemm call computes (a GEMM
  // over a whole key tile in one call reads its left operand once; blocks of 64 columns made the
  // forward's Q K^T eight calls per 512-key tile).
  RightOperand(const at::Tensor& x, bool pack, int64_t block = kBlock);

  // C (M x nn) (+)= A (M x kn) B[k0 : k0 + kn, n0 : n0 + nn] for head (b, h). Packed: k0 even, any
  // n0; an odd kn is rounded up, so A must then hold a zero column kn (the packed B has a zero row).
  // Micro-kernel panels: k0 even, n0 a multiple of kBlock.
  void gemm(int64_t b, int64_t h, int64_t M, const T* A, int64_t lda, int64_t k0, int64_t kn, int64_t n0, int64_t nn,
            at::opmath_type<T>* C, int64_t ldc, bool accumulate) const;
  bool packed() const { return packed_; }

 private:
  at::Tensor data_;        // packed: (B, H, blocks, K_even, block_); else the operand (also when micro)
  at::Tensor micro_data_;  // micro: (B, H, packed size)
  int64_t K_ = 0, N_ = 0, K_even_ = 0, N16_ = 0, block_ = kBlock;
  bool packed_ = false, micro_ = false;
  bool transposed_ = false;  // float/double: data_ is a view with unit stride along K (the BLAS transposes)
};

// C (M x N) (+)= A (M x K) B on AMX, B in the micro-kernels' pairs layout (avx512_gemm.h: panels
// of 64 columns, panel_stride elements apart, each brgemm's VNNI layout with a row of 64 pairs); K
// even (an odd K's A padded with a zero column, B with a zero row). Requires
// RowsTransposed<T>::supported(K).
template <typename T>
void amx_gemm_pairs(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp, int64_t panel_stride,
                    float* C, int64_t ldc, bool accumulate);

// B^T for a few fp16/bf16 rows B (N x K: decoding's query rows), packed once into brgemm's VNNI
// layout and multiplied on AMX by many row-major left operands read in place (the cache's key
// rows): C (M x N) = A (M x K) B^T. Plain memory, no tensors: it is packed once per work item.
template <typename T>
class RowsTransposed {
 public:
  // Whether the CPU has AMX for T and K is even (the VNNI layout pairs K).
  static bool supported(int64_t K);
  void pack(int64_t N, int64_t K, const T* B, int64_t ldb);
  void gemm(int64_t M, const T* A, int64_t lda, float* C, int64_t ldc) const;
  int64_t bytes() const { return int64_t(data_.capacity() * sizeof(uint32_t)); }

 private:
  std::vector<uint32_t> data_;  // [K / 2][w][2] in 16-bit units, w = N rounded up to 16
  int64_t N_ = 0, K_ = 0, w_ = 0;
};

}  // namespace flash_cuda::cpu
