/* Small CUDA kernels that test the emulator itself (and, compiled by nvcc, would run
 * unchanged on a GPU): probes that expose one PTX primitive per launch for comparison with
 * ../shared/ptx-oracle, a tiled GEMM and a block reduction checked against torch, and kernels
 * with planted bugs that the checkers must report. Torch-free; csrc/emu/ops_emu.cpp wraps
 * them as torch ops. Each function performs one launch on raw pointers. */
#pragma once
#include <cstdint>

namespace flash_cuda::selftest {

// One warp: the 16-bit tile g_tile[tile_elems] is copied to shared memory, then every lane
// passes s_tile + g_row_offset[lane] (in elements) to ldmatrix.x{num}[.trans]; g_out[lane*num + r]
// receives register r.
void ldmatrix_probe(const uint16_t* g_tile, int tile_elems, const int32_t* g_row_offset, int num, bool trans,
                    uint32_t* g_out);

// One warp: d = mma.m16n8k16(a, b, c); fragments indexed [lane][register].
void mma_probe(const uint32_t* g_a, const uint32_t* g_b, const float* g_c, bool bf16, float* g_d);
// One mma.m16n8k8 (type 0 f16, 1 bf16, 2 tf32): g_a [32][4] (f16/bf16: the first 2 of each
// lane), g_b [32][2] (f16/bf16: the first), g_c and g_d [32][4], per lane in fragment order.
void mma_k8_probe(const uint32_t* g_a, const uint32_t* g_b, const float* g_c, int type, float* g_d);
// cvt.rna.tf32.f32 of n values.
void tf32_probe(const float* g_x, int n, uint32_t* g_out);

// One warp: lanes in mask call the shuffle (mode 0 up, 1 down, 2 xor, 3 idx) with argument b
// and width; the others keep their own value. A 64-bit variant shuffles (in[l], in[l] + 2^32).
void shfl_probe(const uint32_t* g_in, int mode, int b, int width, unsigned mask, bool wide, uint64_t* g_out);

// One warp: every lane loads `width` (4, 8 or 16) bytes at byte offset g_offset[lane] of a
// shared buffer of smem_bytes, for counting wavefronts.
void shared_load_probe(const int32_t* g_offset, int width, int smem_bytes, uint32_t* g_sink);

// One block: g_out[4*i + 0..3] = bits of __float2half_rn(x[i]), __float2bfloat16_rn(x[i]),
// __floats2half2_rn(x[i], 1) (as 32 bits: x[i] in the low half) and __hfma(h, h, h) with
// h = __float2half_rn(x[i]) - the host conversions and the 16-bit math the emulator supplies.
void convert_probe(const float* g_x, int n, uint32_t* g_out);

// One block: for registers a[i], b[i] of two 16-bit values (fp16, or bf16 if bf16),
// g_out[3*i] = pack2 of the fp32 products of unpack2(a[i]) and unpack2(b[i]) (each rounded once)
// and g_out[3*i + 1], g_out[3*i + 2] = the fp32 bits of unpack2(a[i]) (low, high): the pair math
// of the backward kernel's dS^T from the rounded P^T.
void pair_math_probe(const uint32_t* g_a, const uint32_t* g_b, int n, bool bf16, uint32_t* g_out);

// One thread replays ptx-oracle's cp.async example (three groups, wait_group 1, wait_group 0)
// from g_src[256]; g_out[0:8] = dst[0:8] and g_out[8:24] = dst[16:32] after wait_group 1,
// g_out[24:40] = dst[32:48] after wait_group 0.
void cp_async_trace(const uint8_t* g_src, uint8_t* g_out);

// C[M,N] (fp32) = A[M,K] * B[N,K]^T in fp16 or bf16, K a multiple of 8: 64x64 tiles, 4 warps,
// cp.async double buffering, ldmatrix, mma.m16n8k16. swizzle=false stores tiles unswizzled
// (bank conflicts, for the counter tests).
void gemm(const void* g_a, const void* g_b, float* g_c, int M, int N, int K, bool bf16, bool swizzle);

// out[0] += sum(x[0:n]): per-thread strided sums, warp shuffle reduction, a static
// __shared__ array of warp sums, and one float atomicAdd per block.
void block_reduce(const float* g_x, int n, float* g_out);

// Kernels with one planted bug each (see kBugNames in selftest_kernels.cpp); "none" is the
// correct twin. g_buf has n floats.
int bug_index(const char* name);  // -1 when unknown
void planted_bug(int which, float* g_buf, int n);

}  // namespace flash_cuda::selftest
