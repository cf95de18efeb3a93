// GEMM micro-kernels on AVX-512 for the CPU backend's tiles, with fp32 accumulators: bf16 on
// AVX512-BF16 dot products (vdpbf16ps) and fp32 on FMA. One register tile (6 rows x 64 columns,
// 24 zmm accumulators) over B packed into panels of 64 columns, each contiguous. No torch headers.
//
// Why: on a CPU with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake) ATen's bf16 brgemm
// falls back to a GEMM that ran no faster than fp32 sgemm (85 GFLOP/s a core on a Zen 4), where
// vdpbf16ps does two products per fp32 lane (oneDNN's bf16 matmul reached 190 GFLOP/s there, but
// only with a bf16 output); the bf16 kernel ran 210-229. The fp32 kernel ran 110-116 GFLOP/s on
// the same core at the tile shapes, MKL's sgemm 93-100 (peaks: 231 and 117, one vdpbf16ps or FMA
// on zmm a cycle).
//
// bf16 "pairs" layout: in each panel, row pair kk (rows 2kk and 2kk + 1) holds, for each column
// n, B[2kk][n] then B[2kk+1][n] (128 bf16, 256 bytes), so one 64-byte load gives the pairs of 16
// columns that vdpbf16ps multiplies by a broadcast pair of A (A[i][2kk], A[i][2kk+1]). An odd K
// has a zero second row in its last pair. Each product of two bf16 values is exact in fp32 and
// the instruction adds with round to nearest even, denormal inputs and outputs flushed to zero.
// fp32 "panels" layout: row k of a panel is B[k][n0 .. n0 + 63] (64 floats, 256 bytes).
#pragma once
#include <stdint.h>

#include "prefetch.h"  // RowsAhead, FarRows

namespace flash_cuda::cpu {

// Whether this CPU runs the kernel (AVX512-BF16, checked once).
bool dpbf16_supported();

// fp32 products sum at most this many terms of K in one chain before the partial goes into C
// (the micro-kernels' registers, the BLAS path's calls): one chain over all of K had up to 21x
// plain torch's error in the attention's sums over 4k-32k keys or rows (audit).
constexpr int64_t kF32SumChain = 128;

constexpr int64_t kPanelCols = 64;                  // columns per panel
constexpr int64_t kPairsPanel = kPanelCols;
constexpr int64_t kPairsRow = 2 * kPairsPanel;      // elements per row pair of a panel
// Elements of one panel of a pairs-packed operand of K rows (the stride between panels), and of
// the whole K x N operand.
inline int64_t pairs_panel_size(int64_t K) { return (K + 1) / 2 * kPairsRow; }
inline int64_t pairs_size(int64_t K, int64_t N) { return (N + kPairsPanel - 1) / kPairsPanel * pairs_panel_size(K); }

// Bp (pairs layout, panel stride pairs_panel_size(K)) = B (K x N, row stride ldb), bf16 bits.
void pack_pairs_bf16(int64_t K, int64_t N, const uint16_t* B, int64_t ldb, uint16_t* Bp);
// The same for B = Bt^T given as its N rows Bt of K elements (row stride ldbt): decoding's query
// rows as the right operand of S^T = K Q^T, packed once per work item. No AVX-512 needed.
void pack_pairs_bf16_transposed(int64_t K, int64_t N, const uint16_t* Bt, int64_t ldbt, uint16_t* Bp);

// Rows r0 .. r0 + n of a K x N operand in the pairs layout (panel stride panel_stride), written
// from n row-major 16-bit rows (row stride lds) a whole pair at a time, and a row's half of its
// pair alone at an odd start or end, so a tile's rows may come in runs of any length (a paged
// cache's); the rows 16 ahead are fetched as it goes (the rows are read once from memory), and row
// r of `also` with row r of the operand. Requires f32_gemm_supported().
void stage_rows_pairs(int64_t n, int64_t N, const uint16_t* src, int64_t lds, int64_t r0, uint16_t* Bp,
                      int64_t panel_stride, const RowsAhead& also = {});
// Zeroes row r's half of row pair r / 2 in every panel (r = K for an odd K: the missing row).
void zero_pair_half(int64_t r, int64_t N, uint16_t* Bp, int64_t panel_stride);

// C (M x N, row stride ldc) = A (M x K, row stride lda) B, or C += A B when `accumulate`. B in the
// pairs layout: Bp points at row pair 0 of B's first panel, panels panel_stride elements apart
// (so rows k0.. and columns n0.. of a larger packed operand, k0 even and n0 a multiple of 64, are
// multiplied from the pointer to their first pair). Requires dpbf16_supported().
// stream: stream_bytes of memory from there fetched into L2 while it multiplies, two lines per
// step along K of each micro-tile (decoding's next key rows, during P V), as far as its steps reach.
void dpbf16_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp,
                 int64_t panel_stride, float* C, int64_t ldc, bool accumulate, const char* stream = nullptr,
                 int64_t stream_bytes = 0);
// The same for an A whose rows are read once from memory (decoding's cache rows as the broadcast
// operand of S^T = K Q^T): each block of A's rows fetched ahead of its use, as f32_gemm_stream_a,
// and the rows of `also` with the same indices (the value rows, read after the scores) into L2
// alongside, where also.base is set (also.rows is not checked: it holds M rows). Both only in
// the row blocks that stream (an even K, and rows of A past the block after the next): a run's
// last 12 rows or more, and all of a run of 12 or fewer (small pages), are left to what reads
// them next (a staging's own fetches; P V in registers reads them on demand). Blocks of 6 rows; of
// 8 where N <= 16 and K is a multiple of 4 up to 256 (avx512_gemm.cpp: split steps), the last 16
// rows or more.
void dpbf16_gemm_stream_a(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp,
                          int64_t panel_stride, float* C, int64_t ldc, bool accumulate, const RowsAhead& also = {});

// S (rows x n, row stride lds) = Q (rows x K) Kr^T for n row-major rows Kr (row stride ldk),
// bf16: each score a dot product along the rows (vdpbf16ps on pairs, masked at the end of a row),
// blocks of up to 4 query rows by 4 keys reduced together. For few query rows against many keys
// (decoding), where the GEMM would need Kr transposed into pairs first. Requires
// dpbf16_supported(). The key rows are fetched 16 ahead into L1 and, when far.ahead > 0, far.ahead
// rows ahead into L2 as well, up to row far.end (prefetch.h; kvcache_cpu.cpp sets it for caches
// at least the last-level cache's size); so are B's rows in the *_gemm_rows below (dpbf16_gemm_rows
// 16 ahead, the others the next block of 32; dpbf16_gemm_rows_pairs_order none: its caller fetched
// them into L2).
void dpbf16_rows_dot(int64_t rows, int64_t n, int64_t K, const uint16_t* Q, int64_t ldq, const uint16_t* Kr,
                     int64_t ldk, float* S, int64_t lds, const FarRows& far = {});
// The same in fp32 with FMA. Requires f32_gemm_supported().
void f32_rows_dot(int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const float* Kr, int64_t ldk,
                  float* S, int64_t lds, const FarRows& far = {});

// The fp32 kernel (AVX-512F), B in the panels layout.
bool f32_gemm_supported();
inline int64_t panels_f32_panel_size(int64_t K) { return K * kPanelCols; }
inline int64_t panels_f32_size(int64_t K, int64_t N) { return (N + kPanelCols - 1) / kPanelCols * panels_f32_panel_size(K); }
void pack_panels_f32(int64_t K, int64_t N, const float* B, int64_t ldb, float* Bp);
void f32_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t panel_stride,
              float* C, int64_t ldc, bool accumulate);
// The same for an A whose rows are read once from memory (decoding's cache rows as the broadcast
// operand of S^T = K Q^T): each block of A's rows fetched ahead of its use, and `also` as in
// dpbf16_gemm_stream_a; when far.ahead > 0, the rows far.ahead below each block's into L2 as well.
// Where N <= 16 and K is even up to 128, in split steps (avx512_gemm.cpp): blocks of 8 rows (the
// last 16 rows or more not fetched ahead), each output the sum of its even and its odd steps,
// summed apart.
void f32_gemm_stream_a(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
                       int64_t panel_stride, float* C, int64_t ldc, bool accumulate, const RowsAhead& also = {},
                       const FarRows& far = {});
// The fp32 kernel on a row-major B (row stride ldb) as it is, no packing: for B read once (the V
// tiles of decoding), where packing would cost as much as the product; B's rows in blocks, the
// next block fetched ahead.
void f32_gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, bool accumulate, const FarRows& far = {});
// C (M x N) (+)= A B for A given as its transpose At (K x M, row stride ldat) and a row-major B
// as f32_gemm_rows: the backward's dV = P^T dO and dK = dS^T Q from the P and dS tiles as they are
// and the rows of dO and Q, no transposed or packed copies. Requires f32_gemm_supported().
void f32_gemm_at_rows(int64_t M, int64_t N, int64_t K, const float* At, int64_t ldat, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate);
// The same for bf16 A and B, multiplied in fp32 FMAs (each product exact), B widened in registers.
// Requires f32_gemm_supported().
void bf16_gemm_rows(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate, const FarRows& far = {});
// The same product on vdpbf16ps (two products a lane, each exact, each instruction's sum rounded as
// in dpbf16_gemm, denormals flushed), B's row pairs interleaved in registers rather than packed.
// Requires dpbf16_supported().
void dpbf16_gemm_rows(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate, const FarRows& far = {});
// C += A B as dpbf16_gemm_rows, with C's columns held in the pairs order (avx512_gemm.cpp: the order
// the interleaved pairs give, within each 32 columns), so no C is permuted per call: for a product
// accumulated over many calls (decoding's P V over the key tiles), put back in column order once
// by pairs_order_to_columns. N a multiple of 32. While it multiplies, stream_bytes of `stream` are
// fetched into L2 (the next key tile), one line per step along K of each register tile, as far as
// its steps reach. Requires dpbf16_supported().
void dpbf16_gemm_rows_pairs_order(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                                  int64_t ldb, float* C, int64_t ldc, const char* stream, int64_t stream_bytes);
// A row of N floats (a multiple of 32) from the pairs order back to column order. Requires
// dpbf16_supported().
void pairs_order_to_columns(int64_t N, float* row);
// fp32 Q or A against IEEE half rows read in place (decoding's K and V where fp16 is not multiplied
// natively), each half widened exactly in registers: S = Q Kr^T as f32_rows_dot, C (+)= A B as
// f32_gemm_rows. Requires f32_gemm_supported() (AVX-512F converts halves).
void f32_f16_rows_dot(int64_t rows, int64_t n, int64_t K, const float* Q, int64_t ldq, const uint16_t* Kr,
                      int64_t ldk, float* S, int64_t lds, const FarRows& far = {});
void f32_f16_gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate, const FarRows& far = {});

}  // namespace flash_cuda::cpu
