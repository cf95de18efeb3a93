// The environment variables that force a CPU kernel choice (FLASH_CUDA_CPU_GEMM, _BF16_GEMM,
// _F32_GEMM, _ROWS, _GENERIC_BF16: README, "CPU backend"), read one way everywhere.
#pragma once

namespace flash_cuda::cpu {

// A variable and its two values.
struct KernelChoice {
  const char* var;
  const char* a;
  const char* b;
};
inline constexpr KernelChoice kGemmChoice{"FLASH_CUDA_CPU_GEMM", "native", "float"};
inline constexpr KernelChoice kBf16GemmChoice{"FLASH_CUDA_CPU_BF16_GEMM", "dpbf16", "onednn"};
inline constexpr KernelChoice kF32GemmChoice{"FLASH_CUDA_CPU_F32_GEMM", "avx512", "blas"};
inline constexpr KernelChoice kRowsChoice{"FLASH_CUDA_CPU_ROWS", "avx2", "off"};
inline constexpr KernelChoice kGenericBf16Choice{"FLASH_CUDA_CPU_GENERIC_BF16", "1", "0"};

// The choice's value: nullptr where its variable is unset or empty, else c.a or c.b (those
// pointers); any other value is a ValueError naming the variable and its values (a typo ran the
// automatic choice silently; audit). Defined in tile_gemm.cpp.
const char* env_choice(const KernelChoice& c);

// Every variable above checked (each is read only where its kernels run: a typo in one the call
// did not reach would pass unnoticed); called once per CPU op, before it does anything
// (csrc/ops.cpp: the KV cache's append included).
void check_kernel_choices();

}  // namespace flash_cuda::cpu
