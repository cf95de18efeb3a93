/* In-place append of new keys and values to a KV cache (attention_with_kvcache's k, v):
 * k_new[b][h][n] goes to key position seqlens[b] + n of sequence b's cache, contiguous or
 * through the block table (kv_cache.h). Runs before the attention kernel, on the same stream.
 *
 * The positions come from device memory the host never reads (no synchronising copy), so
 * each row is checked here: a row whose position is negative or at or past the capacity is
 * not written (the attention kernel clamps its key count the same way, seqlen.h), and table
 * entries are clamped to the pool. Wrong lengths may give wrong values, never an access
 * outside the tensors. Rows are copied 16 bytes per thread (d a multiple of 8, rows 16-byte
 * aligned: the launcher's contract for every kernel).
 */
#pragma once
#include "kv_cache.h"
#include "launch.h"

namespace flash_cuda {

constexpr int kAppendThreads = 64;  // 32 lanes for the key row, 32 for the value row (d <= 256)

// Grid (n_new, Hkv, B): one new row of keys and values per block.
// A template, like every kernel: its symbol is weak (the CUDA build and the emulator both
// define it) and visible, which is how the PTX executor finds its entry by name.
template <int kAppendThreadsT = kAppendThreads>
__global__ void __launch_bounds__(kAppendThreadsT) kv_append_kernel(const KvAppendParams p) {
  const int n = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int64_t pos = int64_t(ld_global(&p.seqlens[batch])) + n;
  if (pos - n < 0 || pos >= p.capacity) return;
  const bool value = threadIdx.x >= 32;
  const TensorRef& src = value ? p.v_new : p.k_new;
  const TensorRef& dst = value ? p.v_cache : p.k_cache;
  const uint16_t* g_src = head_ptr<const uint16_t>(src, batch, head, n);
  uint16_t* g_dst = const_cast<uint16_t*>(cache_row<uint16_t>(dst, p.cache, batch, head, int(pos)));
  for (int col = 8 * (threadIdx.x % 32); col < p.d; col += 8 * 32)
    st_global(reinterpret_cast<uint4*>(g_dst + col), ld_global(reinterpret_cast<const uint4*>(g_src + col)));
}

namespace FC_BACKEND {

inline cudaError_t run_kv_append(const KvAppendParams& p, cudaStream_t stream) {
  if (p.n_new == 0 || p.b == 0 || p.hkv == 0) return cudaSuccess;
  return launch_kernel("kv_append", kv_append_kernel<>, dim3(p.n_new, p.hkv, p.b), dim3(kAppendThreads), 0, stream, p);
}

}  // namespace FC_BACKEND
}  // namespace flash_cuda
