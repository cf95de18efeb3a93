// The environment variables that force a CPU kernel choice (FLASH_CUDA_CPU_GEMM, _BF16_GEMM,
// _F32_GEMM, _ROWS, _GENERIC_BF16: README, "CPU backend"), read one way everywhere.
#pragma once

namespace flash_cuda::cpu {

// The value of `var`: nullptr where it is unset or empty, else `a` or `b` (the pointers passed);
// any other value is a ValueError naming the variable and its values (a typo ran the automatic
// choice silently; audit). Defined in tile_gemm.cpp.
const char* env_choice(const char* var, const char* a, const char* b);

// Every variable above checked (each is read only where its kernels run: a typo in one the call
// did not reach would pass unnoticed); called at the CPU backend's entry points.
void check_kernel_choices();

}  // namespace flash_cuda::cpu
