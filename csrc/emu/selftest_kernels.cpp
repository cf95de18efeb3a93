/* The emulator's own test kernels (see selftest_kernels.h). Written as ordinary CUDA kernels
 * against csrc/kernels/ptx.h; compiled here by the host compiler into the emulator. */
#include "selftest_kernels.h"

#include <algorithm>
#include <cstring>

#include "../kernels/launch.h"
#include "../kernels/ptx.h"

namespace flash_cuda::selftest {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- primitive probes
template <int N, bool Trans>
__global__ void ldmatrix_probe_kernel(const uint16_t* g_tile, int tile_elems, const int32_t* g_row_offset,
                                      uint32_t* g_out) {
  uint16_t* s_tile = dynamic_smem<uint16_t>();  // [tile_elems]
  const int lane = threadIdx.x;
  for (int i = lane; i < tile_elems; i += 32) st_shared(&s_tile[i], ld_global(&g_tile[i]));
  __syncthreads();
  uint32_t r[N];  // register m holds this lane's part of matrix m
  ldmatrix<N, Trans>(r, s_tile + ld_global(&g_row_offset[lane]));
  for (int m = 0; m < N; ++m) st_global(&g_out[lane * N + m], r[m]);
}

template <class T>
__global__ void mma_probe_kernel(const uint32_t* g_a, const uint32_t* g_b, const float* g_c, float* g_d) {
  const int lane = threadIdx.x;
  uint32_t rA[4], rB[2];  // 16x16 A and 16x8 B fragments, 16-bit pairs
  float rC[4], rD[4];     // 16x8 accumulator fragments
  for (int i = 0; i < 4; ++i) rA[i] = ld_global(&g_a[lane * 4 + i]);
  for (int i = 0; i < 2; ++i) rB[i] = ld_global(&g_b[lane * 2 + i]);
  for (int i = 0; i < 4; ++i) rC[i] = ld_global(&g_c[lane * 4 + i]);
  mma_m16n8k16<T>(rD, rA, rB, rC);
  for (int i = 0; i < 4; ++i) st_global(&g_d[lane * 4 + i], rD[i]);
}

template <int kType>  // 0 f16, 1 bf16, 2 tf32
__global__ void mma_k8_probe_kernel(const uint32_t* g_a, const uint32_t* g_b, const float* g_c, float* g_d) {
  const int lane = threadIdx.x;
  float rC[4], rD[4];  // 16x8 accumulator fragments
  for (int i = 0; i < 4; ++i) rC[i] = ld_global(&g_c[lane * 4 + i]);
  if constexpr (kType == 2) {
    uint32_t rA[4], rB[2];  // 16x8 A and 8x8 B fragments, tf32
    for (int i = 0; i < 4; ++i) rA[i] = ld_global(&g_a[lane * 4 + i]);
    for (int i = 0; i < 2; ++i) rB[i] = ld_global(&g_b[lane * 2 + i]);
    mma_m16n8k8_tf32(rD, rA, rB, rC);
  } else {
    uint32_t rA[2], rB[1];  // 16x8 A and 8x8 B fragments, 16-bit pairs
    for (int i = 0; i < 2; ++i) rA[i] = ld_global(&g_a[lane * 4 + i]);
    rB[0] = ld_global(&g_b[lane * 2]);
    mma_m16n8k8<std::conditional_t<kType == 0, __half, __nv_bfloat16>>(rD, rA, rB, rC);
  }
  for (int i = 0; i < 4; ++i) st_global(&g_d[lane * 4 + i], rD[i]);
}

__global__ void tf32_probe_kernel(const float* __restrict__ g_x, int n, uint32_t* __restrict__ g_out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) st_global(&g_out[i], to_tf32(ld_global(&g_x[i])));
}

template <class T>
__device__ T shuffle(int mode, unsigned mask, T v, int b, int width) {
  switch (mode) {
    case 0: return __shfl_up_sync(mask, v, b, width);
    case 1: return __shfl_down_sync(mask, v, b, width);
    case 2: return __shfl_xor_sync(mask, v, b, width);
    default: return __shfl_sync(mask, v, b, width);
  }
}

__global__ void shfl_probe_kernel(const uint32_t* g_in, int mode, int b, int width, unsigned mask, bool wide,
                                  uint64_t* g_out) {
  const int lane = threadIdx.x;
  const uint32_t v = ld_global(&g_in[lane]);
  uint64_t out = wide ? (uint64_t(v) | uint64_t(v + 1) << 32) : v;
  if (mask >> lane & 1)
    out = wide ? shuffle<uint64_t>(mode, mask, out, b, width) : shuffle<uint32_t>(mode, mask, v, b, width);
  st_global(&g_out[lane], out);
}

template <class T>
__global__ void shared_load_probe_kernel(const int32_t* g_offset, int smem_bytes, uint32_t* g_sink) {
  char* s_buf = dynamic_smem<char>();
  const int lane = threadIdx.x;
  for (int i = lane * 4; i < smem_bytes; i += 128) st_shared(reinterpret_cast<uint32_t*>(s_buf + i), uint32_t(i));
  __syncthreads();
  const T v = ld_shared(reinterpret_cast<const T*>(s_buf + ld_global(&g_offset[lane])));
  uint32_t first;
  std::memcpy(&first, &v, 4);
  st_global(&g_sink[lane], first);
}

__global__ void convert_probe_kernel(const float* __restrict__ g_x, int n, uint32_t* __restrict__ g_out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = ld_global(&g_x[i]);
    const __half h = __float2half_rn(x);
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    const __half2 h2 = __floats2half2_rn(x, 1.0f);
    const __half f = __hfma(h, h, h);
    uint16_t hb, bb, fb;
    uint32_t h2b;
    std::memcpy(&hb, &h, 2);
    std::memcpy(&bb, &b, 2);
    std::memcpy(&h2b, &h2, 4);
    std::memcpy(&fb, &f, 2);
    st_global(&g_out[4 * i], uint32_t(hb));
    st_global(&g_out[4 * i + 1], uint32_t(bb));
    st_global(&g_out[4 * i + 2], h2b);
    st_global(&g_out[4 * i + 3], uint32_t(fb));
  }
}

template <class T>
__global__ void pair_math_probe_kernel(const uint32_t* __restrict__ g_a, const uint32_t* __restrict__ g_b, int n,
                                       uint32_t* __restrict__ g_out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint32_t a = ld_global(&g_a[i]);
    float lo, hi;
    unpack2<T>(a, lo, hi);
    uint32_t lo_bits, hi_bits;
    std::memcpy(&lo_bits, &lo, 4);
    std::memcpy(&hi_bits, &hi, 4);
    float b_lo, b_hi;
    unpack2<T>(ld_global(&g_b[i]), b_lo, b_hi);
    st_global(&g_out[3 * i], pack2<T>(lo * b_lo, hi * b_hi));
    st_global(&g_out[3 * i + 1], lo_bits);
    st_global(&g_out[3 * i + 2], hi_bits);
  }
}

__global__ void cp_async_trace_kernel(const uint8_t* g_src, uint8_t* g_out) {
  uint8_t* s_dst = dynamic_smem<uint8_t>();  // [256]
  for (int i = 0; i < 64; ++i) st_shared(reinterpret_cast<uint32_t*>(s_dst) + i, 0u);
  cp_async_ca<8>(s_dst, g_src, 8);
  cp_async_commit();  // group 1
  cp_async_cg16(s_dst + 16, g_src + 16, 16);
  cp_async_commit();  // group 2
  cp_async_cg16(s_dst + 32, g_src + 32, 5);
  cp_async_commit();  // group 3: 5 bytes copied, 11 zero-filled
  cp_async_wait<1>();  // groups 1 and 2 complete; group 3 may still be in flight
  for (int i = 0; i < 8; ++i) st_global(&g_out[i], ld_shared(&s_dst[i]));
  for (int i = 0; i < 16; ++i) st_global(&g_out[8 + i], ld_shared(&s_dst[16 + i]));
  cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) st_global(&g_out[24 + i], ld_shared(&s_dst[32 + i]));
}

// ---------------------------------------------------------------- tiled GEMM
// Tiles of 64 rows x 64 16-bit values = 128-byte rows. Swizzle (CuTe Swizzle<3,3,3>, as in
// FlashAttention-2): the 16-byte chunk c of row r is stored at chunk c ^ (r % 8), so the 8
// rows an ldmatrix phase reads (same chunk, consecutive rows) hit 8 different 16-byte bank
// groups, and so do the 8 chunks a cp.async phase writes (one row).
constexpr int kTile = 64, kChunks = kTile / 8, kGemmThreads = 128;

template <bool Swizzle>
__device__ int tile_offset(int row, int col) {  // element offset of (row, col) in a tile
  const int chunk = Swizzle ? ((col / 8) ^ (row % 8)) : col / 8;
  return row * kTile + chunk * 8 + col % 8;
}

// Rows [row0, row0+64) x cols [k0, k0+64) of a row-major [rows, K] matrix into s_tile;
// out-of-range parts are zero-filled by cp.async's src-size.
template <bool Swizzle, class T>
__device__ void load_tile(T* s_tile, const T* g_m, int row0, int rows, int k0, int K) {
  for (int id = threadIdx.x; id < kTile * kChunks; id += kGemmThreads) {
    const int r = id / kChunks, c = (id % kChunks) * 8;
    const int valid = (row0 + r < rows) ? max(0, min(8, K - (k0 + c))) : 0;
    const T* src = valid ? g_m + size_t(row0 + r) * K + k0 + c : g_m;
    cp_async_cg16(s_tile + tile_offset<Swizzle>(r, c), src, valid * 2);
  }
}

template <class T, bool Swizzle>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const T* g_a, const T* g_b, float* g_c, int M, int N, int K) {
  T* s_a = dynamic_smem<T>();       // [2][64][64] double buffer
  T* s_b = s_a + 2 * kTile * kTile;  // [2][64][64]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
  float rC[8][4] = {};  // this warp's 16x64 slice of C: 8 n-tiles of 16x8

  const int k_tiles = (K + kTile - 1) / kTile;
  load_tile<Swizzle>(s_a, g_a, m0, M, 0, K);
  load_tile<Swizzle>(s_b, g_b, n0, N, 0, K);
  cp_async_commit();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buf = kt % 2;
    if (kt + 1 < k_tiles) {  // prefetch the next k tile into the other buffer
      load_tile<Swizzle>(s_a + (1 - buf) * kTile * kTile, g_a, m0, M, (kt + 1) * kTile, K);
      load_tile<Swizzle>(s_b + (1 - buf) * kTile * kTile, g_b, n0, N, (kt + 1) * kTile, K);
    }
    cp_async_commit();
    cp_async_wait<1>();  // tile kt has landed (this thread's part)...
    __syncthreads();     // ...and everyone else's
    const T* sA = s_a + buf * kTile * kTile;
    const T* sB = s_b + buf * kTile * kTile;
    for (int kk = 0; kk < kTile; kk += 16) {
      uint32_t rA[4];  // A 16x16 at rows warp*16.., cols kk..
      ldmatrix<4>(rA, sA + tile_offset<Swizzle>(warp * 16 + lane % 16, kk + 8 * (lane / 16)));
      for (int nt = 0; nt < 8; nt += 2) {
        uint32_t rB[4];  // B for n-tiles nt and nt+1: {b0b1, b2b3} each, from [n][k] storage
        ldmatrix<4>(rB, sB + tile_offset<Swizzle>(nt * 8 + lane % 8 + 8 * (lane / 16), kk + 8 * ((lane / 8) % 2)));
        const uint32_t rB0[2] = {rB[0], rB[1]}, rB1[2] = {rB[2], rB[3]};
        mma_m16n8k16<T>(rC[nt], rA, rB0, rC[nt]);
        mma_m16n8k16<T>(rC[nt + 1], rA, rB1, rC[nt + 1]);
      }
    }
    __syncthreads();  // everyone is done reading buf before it is refilled
  }
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 8; ++nt)
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp * 16 + g + 8 * half, col = n0 + nt * 8 + 2 * t;
      if (row >= M) continue;
      float* dst = g_c + size_t(row) * N + col;
      if (col + 1 < N && N % 2 == 0) {
        st_global(reinterpret_cast<float2*>(dst), make_float2(rC[nt][2 * half], rC[nt][2 * half + 1]));
      } else {
        if (col < N) st_global(dst, rC[nt][2 * half]);
        if (col + 1 < N) st_global(dst + 1, rC[nt][2 * half + 1]);
      }
    }
}

// ---------------------------------------------------------------- block reduction
constexpr int kReduceThreads = 256;

__global__ void block_reduce_kernel(const float* g_x, int n, float* g_out) {
  __shared__ float s_warp_sum[kReduceThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float v = 0.0f;
  for (int i = blockIdx.x * kReduceThreads + threadIdx.x; i < n; i += gridDim.x * kReduceThreads)
    v += ld_global(&g_x[i]);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  if (lane == 0) st_shared(&s_warp_sum[warp], v);
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kReduceThreads / 32;
    v = lane < kWarps ? ld_shared(&s_warp_sum[lane]) : 0.0f;
    for (int offset = kWarps / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset, kWarps);
    if (lane == 0) atomicAdd(g_out, v);
  }
}

// ---------------------------------------------------------------- planted bugs
const char* const kBugNames[] = {
    "none",                // correct: write, __syncthreads, read a neighbour
    "race_read",           // read a neighbour's write with no barrier between
    "race_write",          // overwrite what a neighbour read with no barrier between
    "warp_ordered",        // exchange inside a warp through __syncwarp: no race
    "oob_global",          // read past the end of the buffer
    "oob_shared",          // write past the end of the dynamic shared memory
    "missing_wait",        // read another thread's cp.async destination without waiting
    "wait_group_uncommitted",  // wait_group 0 does not cover uncommitted copies
    "wait_all_uncommitted",    // wait_all does (correct)
    "divergent_shfl",      // a full-mask shuffle reached by half the warp
    "divergent_syncthreads",   // a __syncthreads reached by half the block
    "ldmatrix_misaligned", // a row address that is not 16-byte aligned
    "uninitialised",       // read shared memory nobody wrote
    "ldmatrix_unordered",  // ldmatrix rows other lanes stored, with no __syncwarp between
    "ldmatrix_ordered",    // the same with __syncwarp (correct)
    "global_race",         // two blocks add 1 and 2 into one word with plain loads and stores
    "global_atomics",      // two blocks add into one word with atomics (correct)
    "global_mixed",        // one block adds atomically, the other stores plainly
    "global_same_value",   // two blocks store the same value to one word
};
// The bugs above from this one on run two blocks (the others one).
constexpr int kFirstTwoBlockBug = 15;
constexpr int kBugThreads = 128;

__global__ void planted_bug_kernel(int which, float* g_buf, int n) {
  float* s = dynamic_smem<float>();  // [kBugThreads + 4]
  const int tid = threadIdx.x, lane = tid % 32;
  const int next = (tid + 1) % kBugThreads;
  switch (which) {
    case 0:
    case 1: {
      st_shared(&s[tid], float(tid));
      if (which == 0) __syncthreads();
      st_global(&g_buf[tid], ld_shared(&s[next]));
      break;
    }
    case 2: {
      st_shared(&s[tid], float(tid));
      __syncthreads();
      const float v = ld_shared(&s[next]);
      st_shared(&s[tid], v + 1.0f);  // missing __syncthreads before overwriting
      break;
    }
    case 3: {
      st_shared(&s[tid], float(tid));
      __syncwarp();
      st_global(&g_buf[tid], ld_shared(&s[(tid & ~31) | ((lane + 1) % 32)]));
      break;
    }
    case 4: st_global(&g_buf[tid], ld_global(&g_buf[n + tid])); break;
    case 5: st_shared(&s[kBugThreads + 4 + tid], 1.0f); break;
    case 6:
    case 7:
    case 8: {
      if (tid % 4 == 0) cp_async_cg16(&s[tid], &g_buf[tid], 16);  // 4 floats per copy
      if (which == 6) cp_async_commit();       // committed, never waited for
      else if (which == 7) cp_async_wait<0>();  // waits for committed groups only: there are none
      else cp_async_wait_all();                 // commits, then waits
      __syncthreads();
      st_global(&g_buf[tid], ld_shared(&s[next]));
      break;
    }
    case 9:
      if (lane < 16) st_global(&g_buf[tid], __shfl_xor_sync(kFullMask, float(tid), 1));
      break;
    case 10:
      if (tid < kBugThreads / 2) __syncthreads();
      break;
    case 11: {
      uint32_t r[1];
      for (int i = tid; i < kBugThreads; i += kBugThreads) st_shared(&s[i], 0.0f);
      __syncthreads();
      ldmatrix<1>(r, reinterpret_cast<char*>(s) + 4 * (lane % 8));
      break;
    }
    case 12: st_global(&g_buf[tid], ld_shared(&s[tid])); break;
    case 13:
    case 14:
      // warp 0: lane l stores word l, so the 16-byte row r is lanes 4r..4r+3's; lanes 0-7 give
      // ldmatrix rows 0-7: each reads three other lanes' stores
      if (tid < 32) {
        uint32_t r[1];
        st_shared(&s[tid], float(tid));
        if (which == 14) __syncwarp();
        ldmatrix<1>(r, s + 4 * (lane % 8));
        st_global(&g_buf[tid], __uint_as_float(r[0]));
      }
      break;
    case 15: st_global(&g_buf[tid], ld_global(&g_buf[tid]) + 1.0f + blockIdx.x); break;  // (never the same bytes)
    case 16: atomicAdd(&g_buf[tid], 1.0f); break;
    case 17:
      if (blockIdx.x == 0) atomicAdd(&g_buf[tid], 1.0f);
      else st_global(&g_buf[tid], 1.0f);
      break;
    case 18: st_global(&g_buf[tid], 1.0f); break;  // (equal values: the schedule alone keeps them so)
  }
}

}  // namespace

void ldmatrix_probe(const uint16_t* g_tile, int tile_elems, const int32_t* g_row_offset, int num, bool trans,
                    uint32_t* g_out) {
  using Kernel = void (*)(const uint16_t*, int, const int32_t*, uint32_t*);
  Kernel k = num == 1 ? (trans ? ldmatrix_probe_kernel<1, true> : ldmatrix_probe_kernel<1, false>)
           : num == 2 ? (trans ? ldmatrix_probe_kernel<2, true> : ldmatrix_probe_kernel<2, false>)
                      : (trans ? ldmatrix_probe_kernel<4, true> : ldmatrix_probe_kernel<4, false>);
  launch_kernel("ldmatrix_probe", k, dim3(1), dim3(32), size_t(tile_elems) * 2, nullptr, g_tile, tile_elems,
                g_row_offset, g_out);
}

void mma_probe(const uint32_t* g_a, const uint32_t* g_b, const float* g_c, bool bf16, float* g_d) {
  launch_kernel("mma_probe", bf16 ? mma_probe_kernel<__nv_bfloat16> : mma_probe_kernel<__half>, dim3(1), dim3(32), 0,
                nullptr, g_a, g_b, g_c, g_d);
}

void mma_k8_probe(const uint32_t* g_a, const uint32_t* g_b, const float* g_c, int type, float* g_d) {
  auto k = type == 0 ? mma_k8_probe_kernel<0> : type == 1 ? mma_k8_probe_kernel<1> : mma_k8_probe_kernel<2>;
  launch_kernel("mma_k8_probe", k, dim3(1), dim3(32), 0, nullptr, g_a, g_b, g_c, g_d);
}

void tf32_probe(const float* g_x, int n, uint32_t* g_out) {
  launch_kernel("tf32_probe", tf32_probe_kernel, dim3(1), dim3(64), 0, nullptr, g_x, n, g_out);
}

void shfl_probe(const uint32_t* g_in, int mode, int b, int width, unsigned mask, bool wide, uint64_t* g_out) {
  launch_kernel("shfl_probe", shfl_probe_kernel, dim3(1), dim3(32), 0, nullptr, g_in, mode, b, width, mask, wide, g_out);
}

void shared_load_probe(const int32_t* g_offset, int width, int smem_bytes, uint32_t* g_sink) {
  auto k = width == 4 ? shared_load_probe_kernel<uint32_t> : width == 8 ? shared_load_probe_kernel<uint2>
                                                                        : shared_load_probe_kernel<uint4>;
  launch_kernel("shared_load_probe", k, dim3(1), dim3(32), size_t(smem_bytes), nullptr, g_offset, smem_bytes, g_sink);
}

void convert_probe(const float* g_x, int n, uint32_t* g_out) {
  launch_kernel("convert_probe", convert_probe_kernel, dim3(1), dim3(64), 0, nullptr, g_x, n, g_out);
}

void pair_math_probe(const uint32_t* g_a, const uint32_t* g_b, int n, bool bf16, uint32_t* g_out) {
  if (bf16)
    launch_kernel("pair_math_probe", pair_math_probe_kernel<__nv_bfloat16>, dim3(1), dim3(64), 0, nullptr, g_a, g_b, n, g_out);
  else
    launch_kernel("pair_math_probe", pair_math_probe_kernel<__half>, dim3(1), dim3(64), 0, nullptr, g_a, g_b, n, g_out);
}

void cp_async_trace(const uint8_t* g_src, uint8_t* g_out) {
  launch_kernel("cp_async_trace", cp_async_trace_kernel, dim3(1), dim3(1), 256, nullptr, g_src, g_out);
}

void gemm(const void* g_a, const void* g_b, float* g_c, int M, int N, int K, bool bf16, bool swizzle) {
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
  const size_t smem = 4 * kTile * kTile * 2;
  if (bf16) {
    auto k = swizzle ? gemm_kernel<__nv_bfloat16, true> : gemm_kernel<__nv_bfloat16, false>;
    launch_kernel("gemm", k, grid, dim3(kGemmThreads), smem, nullptr, static_cast<const __nv_bfloat16*>(g_a),
                  static_cast<const __nv_bfloat16*>(g_b), g_c, M, N, K);
  } else {
    auto k = swizzle ? gemm_kernel<__half, true> : gemm_kernel<__half, false>;
    launch_kernel("gemm", k, grid, dim3(kGemmThreads), smem, nullptr, static_cast<const __half*>(g_a),
                  static_cast<const __half*>(g_b), g_c, M, N, K);
  }
}

void block_reduce(const float* g_x, int n, float* g_out) {
  const int blocks = std::max(1, std::min(64, (n + kReduceThreads - 1) / kReduceThreads));
  launch_kernel("block_reduce", block_reduce_kernel, dim3(blocks), dim3(kReduceThreads), 0, nullptr, g_x, n, g_out);
}

int bug_index(const char* name) {
  for (int i = 0; i < int(sizeof(kBugNames) / sizeof(kBugNames[0])); ++i)
    if (std::strcmp(kBugNames[i], name) == 0) return i;
  return -1;
}

void planted_bug(int which, float* g_buf, int n) {
  launch_kernel("planted_bug", planted_bug_kernel, dim3(which >= kFirstTwoBlockBug ? 2 : 1), dim3(kBugThreads),
                (kBugThreads + 4) * sizeof(float),
                nullptr, which, g_buf, n);
}

}  // namespace flash_cuda::selftest
