/* Two small CUDA kernels of dropout (csrc/cuda/philox.cu), declared without torch or CUDA headers
 * for the host side (csrc/dropout_ops.cpp). */
#pragma once
#include <stdint.h>

namespace flash_cuda::cuda_backend {

// torch's PhiloxCudaState, field by field: (seed, offset) given on the host, or, under CUDA graph
// capture, read from device memory when the kernel runs (offset = *offset_ptr + offset_intragraph).
struct PhiloxSource {
  uint64_t seed, offset;
  const int64_t* seed_ptr;    // nullptr: not captured
  const int64_t* offset_ptr;
  uint64_t offset_intragraph;
};

// out[0] = seed, out[1] = offset. Returns nullptr or the launch error's text.
const char* write_philox_state(int64_t* out, const PhiloxSource& src, void* stream);

// out (B, H, nq, nk) bool, contiguous: the keep mask of csrc/kernels/philox.h for rng_state (device
// memory); cu_seqlens_q/k (or nullptr): positions past sequence b's lengths are false.
const char* write_dropout_mask(bool* out, const int64_t* rng_state, uint32_t threshold, int64_t batch, int64_t heads,
                               int64_t nq, int64_t nk, const int* cu_seqlens_q, const int* cu_seqlens_k, void* stream);

}  // namespace flash_cuda::cuda_backend
