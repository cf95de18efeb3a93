/* Plain parameter structs of the attention kernels: pointers, sizes, strides. Built on the
 * host (csrc/kernel_launch.cpp) and passed by value to the kernels; no torch, no CUDA. */
#pragma once
#include <stdint.h>

#include "mask.h"
#include "philox.h"
#include "score_mod.h"

namespace flash_cuda {

// A [B, H, N, D] tensor of 16-bit or fp32 values with unit stride in D; strides in elements. Every
// (b, h, n) row starts 16-byte aligned (the launcher copies a tensor whose rows do not).
struct TensorRef {
  void* ptr;
  int64_t batch_stride, head_stride, row_stride;
};

// Fields both kernels read.
struct AttnShape {
  int b, hq, hkv, nq, nk;
  int d;              // the head dim rounded up to a multiple of 8 (the launcher zero-pads to
                      // it); the kernel's instantiation may be wider still (zero filled)
  float scale;        // softmax scale
  float scale_log2;   // scale * log2(e): scores go to the base-2 domain in one multiply
  BandMask mask;      // causal / sliding window (read by the kBand instantiations)
  ScoreMod mod;       // softcap, ALiBi, bias (read by the kMod instantiations)
  Dropout drop;       // attention dropout (philox.h; read by the kBand instantiations: band and modifier)
  bool tf32x3;        // fp32 inputs: each product as three TF32 mma (fp32-level), else one (tf32.h)
  // lse (and dlse) of (batch, head) start at batch * lse_batch_stride + head * lse_head_stride.
  int64_t lse_batch_stride, lse_head_stride;
  // Packed sequences (varlen_attention), else nullptr: sequence b is rows cu_seqlens_q[b] ..
  // cu_seqlens_q[b + 1] of q, o, lse against rows cu_seqlens_k[b] .. of k, v (every tensor's
  // batch_stride 0); nq, nk are the longest lengths (they size the grid) and total_q, total_k the
  // tensors' rows, to which every entry is clamped (seqlen.h). Bottom-right aligned per sequence.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int total_q, total_k;
  int q_row0, k_row0;  // this sequence's first query and key rows (seqlen.h); 0 for dense batches
  // KV cache (attention_with_kvcache), else nullptr: sequence b of a dense batch attends to rows
  // [leftpad_k[b], seqused_k[b] + seqused_k_add) of its cache (leftpad_k nullptr: from row 0),
  // clamped to [0, nk] (nk: the cache's capacity); FlashAttention-2's cache_leftpad.
  const int* seqused_k;
  const int* leftpad_k;
  int seqused_k_add;
};

// The keys and values of a KV-cache launch (kv_cache.h): contiguous, [B][Hkv][capacity][d], or
// paged, [num_pages][Hkv][page_size][d] with a block table; and the split of the keys.
struct KvCache {
  const int* block_table;  // paged: [B][pages per sequence] physical page of each logical page, else nullptr
  int64_t block_table_stride;  // entries from one sequence's row of the table to the next
  int page_size, num_pages;    // paged: keys per page, pages in the pool (entries are clamped to it)
  int num_splits;              // key splits per query tile (1: no split, out and lse written directly)
  float* o_partial;            // num_splits > 1: [num_splits][B][Hq][Nq][d] fp32, each split's output
  float* lse_partial;          //   normalised by its own row sum, and [num_splits][B][Hq][Nq] its lse
};

struct FwdParams : AttnShape {
  TensorRef q, k, v, o;
  float* lse;  // [B, Hq, Nq] (packed: [Hq, total_q]), natural log, softmax scale included
  KvCache cache;  // read by the KV-cache instantiation only (kCache)
};

// The append of new keys and values to a cache (kv_append.h).
struct KvAppendParams {
  TensorRef k_new, v_new;  // [B][Hkv][n_new][d]
  TensorRef k_cache, v_cache;
  KvCache cache;           // the paging (block_table, page_size, num_pages)
  const int* seqlens;      // [B] keys already in each sequence's cache
  int b, hkv, n_new, d;    // d: a multiple of 8
  int capacity;            // keys a sequence's cache holds
};

// Rows of the padded scratch of one (batch, head): nq rounded up to the 64-row tiles of the
// preprocess, so that the kernels copy whole 16-byte chunks without a bounds check.
constexpr int kStatsRowTile = 64;
FC_HOST_DEVICE int64_t stats_rows(int nq) { return int64_t(nq + kStatsRowTile - 1) / kStatsRowTile * kStatsRowTile; }
// Packed sequences share one scratch slice per head: sequence b's rows start at
// packed_scratch_row0(cu_seqlens_q[b], b), 64-row aligned and at least stats_rows(its length)
// after the previous sequence's start, whatever the lengths (clamped or not), inside
// packed_scratch_rows(total_q, B) rows.
FC_HOST_DEVICE int64_t packed_scratch_row0(int q_row0, int batch) {
  return stats_rows(q_row0) + 2 * kStatsRowTile * int64_t(batch);
}
FC_HOST_DEVICE int64_t packed_scratch_rows(int total_q, int b) { return packed_scratch_row0(total_q, b); }

struct BwdParams : AttnShape {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse;   // [B, Hq, Nq] (packed: [Hq, total_q]) from the forward
  const float* dlse;  // the gradient flowing into lse, laid out as lse, or nullptr
  // Scratch written by the preprocess: slices of scratch_slice_rows() padded rows, one per
  // (batch, query head), or per query head for a packed batch (its sequences at
  // packed_scratch_row0 within). row_stats holds per slice a row of lse2 (the lse in base 2;
  // the modifier variant's: the lse itself, bwd_preprocess.h; +inf where the row sees no key and past nq: probabilities exactly 0) and then a row of
  // D = rowsum(dO * O) - dlse (0 past nq), from stats_offset(batch, head); dq_accum holds
  // kHeadDim floats per scratch row (traits.h accum_offset).
  float* row_stats;
  float* dq_accum;    // fp32 dQ in mma fragment order (see bwd_kernel.h), or nullptr when
                      // dQ is computed by the deterministic pass instead of atomics

  // kVarlen: the kernel may run a packed batch, narrowed to `batch` by seqlen.h. Without it the
  // dense formulas alone are compiled.
  template <bool kVarlen>
  FC_HOST_DEVICE int64_t scratch_slice_rows() const {
    return kVarlen && cu_seqlens_q ? packed_scratch_rows(total_q, b) : stats_rows(nq);
  }
  // A packed batch's first scratch row of (sequence batch, head).
  FC_HOST_DEVICE int64_t packed_scratch_row(int batch, int head) const {
    return head * packed_scratch_rows(total_q, b) + packed_scratch_row0(q_row0, batch);
  }
  // Offset of (batch, head)'s lse2 row in row_stats; its D row follows at + scratch_slice_rows().
  template <bool kVarlen>
  FC_HOST_DEVICE int64_t stats_offset(int batch, int head) const {
    if (!kVarlen || cu_seqlens_q == nullptr) return (int64_t(batch) * hq + head) * 2 * stats_rows(nq);
    return packed_scratch_row(batch, head) + head * packed_scratch_rows(total_q, b);  // 2 rows per head
  }
  // Rows of scratch in all (host: buffer sizes; 2 floats per row of row_stats).
  FC_HOST_DEVICE int64_t scratch_rows_total() const {
    return scratch_slice_rows<true>() * hq * (cu_seqlens_q ? 1 : b);
  }
};

// The (batch, head) slice of t from row row0 (a packed sequence's first row; 0 otherwise), as T*.
template <class T>
FC_HOST_DEVICE T* head_ptr(const TensorRef& t, int batch, int head, int row0) {
  return static_cast<T*>(t.ptr) + batch * t.batch_stride + head * t.head_stride + int64_t(row0) * t.row_stride;
}

}  // namespace flash_cuda
