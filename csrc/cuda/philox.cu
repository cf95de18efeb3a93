/* The CUDA side of dropout's bookkeeping: the (seed, offset) of a call, resolved on the device
 * (as torch's at::cuda::philox::unpack does, so CUDA graphs replay with fresh values), and the
 * keep mask materialised for return_dropout_mask (tests and debugging). The attention kernels
 * draw their own bits (csrc/kernels/dropout.h) and never read this mask. */
#include <cuda_runtime.h>

#include "cuda/philox_kernels.h"
#include "kernels/philox.h"

namespace flash_cuda::cuda_backend {
namespace {

__global__ void philox_state_kernel(int64_t* out, PhiloxSource src) {
  out[0] = src.seed_ptr ? *src.seed_ptr : int64_t(src.seed);
  out[1] = src.offset_ptr ? *src.offset_ptr + int64_t(src.offset_intragraph) : int64_t(src.offset);
}

// One thread per element (4x the Philox calls the kernels make: a debugging path).
__global__ void dropout_mask_kernel(bool* out, const int64_t* rng_state, uint32_t threshold, int64_t heads, int64_t nq,
                                    int64_t nk, int64_t total, const int* cu_q, const int* cu_k) {
  const uint64_t seed = uint64_t(rng_state[0]), offset = uint64_t(rng_state[1]);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % nk, i = (idx / nk) % nq, bh = idx / (nq * nk), b = bh / heads;
    bool keep = PhiloxStream::make(seed, offset, bh, threshold).keep_at(i, j);
    if (cu_q && (i >= cu_q[b + 1] - cu_q[b] || j >= cu_k[b + 1] - cu_k[b])) keep = false;
    out[idx] = keep;
  }
}

const char* error_text() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* write_philox_state(int64_t* out, const PhiloxSource& src, void* stream) {
  philox_state_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(out, src);
  return error_text();
}

const char* write_dropout_mask(bool* out, const int64_t* rng_state, uint32_t threshold, int64_t batch, int64_t heads,
                               int64_t nq, int64_t nk, const int* cu_seqlens_q, const int* cu_seqlens_k, void* stream) {
  const int64_t total = batch * heads * nq * nk;
  if (total == 0) return nullptr;
  const int64_t blocks = (total + 255) / 256;
  dropout_mask_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0,
                        static_cast<cudaStream_t>(stream)>>>(out, rng_state, threshold, heads, nq, nk, total,
                                                             cu_seqlens_q, cu_seqlens_k);
  return error_text();
}

}  // namespace flash_cuda::cuda_backend
