/* KV-cache attention (attention_with_kvcache): where a cached key lives, which keys a split
 * owns, and where a split's partial result goes. Used by the forward kernel's kCache
 * instantiation (fwd_kernel.h), the append kernel (kv_append.h) and the host's split heuristic.
 *
 * Layouts. Contiguous: the cache of sequence b, kv head h is rows [0, capacity) of
 * k[b][h]. Paged (vLLM's block tables, FlashAttention-2's page_block_size): the pool is
 * [num_pages][Hkv][page_size][d]; key n of sequence b is row n % page_size of page
 * block_table[b][n / page_size]. Table entries are clamped to the pool (never validated on the
 * GPU, where that would need a synchronising copy): a wrong entry reads the wrong page, never
 * outside the pool. Any page size works; a key tile may span pages (vLLM's 16), so paged
 * tiles are gathered row by row. With a left pad (cache_leftpad) a sequence's keys start at row
 * cache_first_row of its cache, either layout (seqlen.h).
 *
 * Splits (Flash-Decoding). One query tile of a decoding step is a few rows: B x Hkv tiles
 * leave most SMs idle. The key tiles of a sequence are cut into num_splits ranges, one block
 * each; a block writes its rows' output normalised by its own softmax sum, in fp32, and its
 * lse; splitkv_combine.h merges them: lse = log sum_s exp(lse_s), O = sum_s exp(lse_s - lse) O_s.
 * A split without keys writes lse -inf and O 0, which the merge gives weight 0.
 */
#pragma once
#include "copy.h"
#include "params.h"

namespace flash_cuda {

// Row n of (batch, head) in a cache tensor t: contiguous or through the block table.
template <class T>
FC_DEVICE const T* cache_row(const TensorRef& t, const KvCache& c, int batch, int head, int n) {
  if (c.block_table == nullptr) return head_ptr<const T>(t, batch, head, n);
  const int logical = n / c.page_size;
  int page = ld_global(&c.block_table[batch * c.block_table_stride + logical]);
  page = page < 0 ? 0 : (page >= c.num_pages ? c.num_pages - 1 : page);
  return head_ptr<const T>(t, page, head, n % c.page_size);
}

// Rows [row0, row0 + kRows) of a cached (batch, head) into a swizzled shared tile (load_tile's
// contract: rows past n_rows and columns past d zero-filled). Contiguous caches take load_tile
// itself; paged ones address each row through the table (chunks of one row share its lookup).
// With a left pad the caller passes rows, not keys: row0 and n_rows both moved by the pad.
template <class Layout, int kThreads, class T>
FC_DEVICE void load_cache_tile(T* s_tile, const TensorRef& t, const KvCache& c, int batch, int head, int row0,
                               int n_rows, int d) {
  if (c.block_table == nullptr) {
    load_tile<Layout, kThreads>(s_tile, head_ptr<const T>(t, batch, head, 0), t.row_stride, row0, n_rows, d);
    return;
  }
  using Plan = typename Layout::template CopyPlan<kThreads>;
  const int row_t = threadIdx.x / Layout::kChunks, col_t = 8 * (threadIdx.x % Layout::kChunks);
  T* s_t = s_tile + Layout::offset(row_t, col_t);
  const int rows_left = n_rows - row0 - row_t;
  const T* fallback = static_cast<const T*>(t.ptr);  // the address of a zero-filled chunk (read nothing)
#pragma unroll
  for (int i = 0; i < Plan::kIters; ++i) {
    const bool valid = Plan::row_step(i) < rows_left && col_t + Plan::col_step(i) < d;
    const T* src = valid ? cache_row<T>(t, c, batch, head, row0 + row_t + Plan::row_step(i)) + col_t + Plan::col_step(i)
                         : fallback;
    cp_async_cg16_zfill(s_t + Plan::offset_step(i), src, valid);
  }
}

// Key tiles [*begin, *end) of split `split` among num_splits over a sequence of n_tiles key
// tiles: equal ranges of ceil(n_tiles / num_splits), the last ones possibly empty.
FC_HOST_DEVICE void split_key_tiles(int n_tiles, int split, int num_splits, int* begin, int* end) {
  const int per = (n_tiles + num_splits - 1) / num_splits;
  *begin = split * per < n_tiles ? split * per : n_tiles;
  *end = *begin + per < n_tiles ? *begin + per : n_tiles;
}

// The split count when the caller leaves it to us (num_splits = 0). Splitting pays when the
// launch's blocks (query tiles x heads x batch) cannot fill the SMs: then as many splits as
// fill one wave, but at least kMinTilesPerSplit key tiles each (each split costs a partial
// write and its share of the combine), at most kMaxSplits. FlashAttention-2's heuristic also
// weighs wave efficiency; one wave's worth is enough for decoding, which is memory-bound.
constexpr int kMaxSplits = 128;
constexpr int kMinTilesPerSplit = 4;
FC_HOST_DEVICE int choose_num_splits(int64_t blocks, int key_tiles, int num_sms) {
  if (blocks <= 0 || blocks * 5 >= int64_t(num_sms) * 4) return 1;  // 80% of the SMs busy without splits
  int64_t splits = (num_sms + blocks - 1) / blocks;
  const int64_t by_length = key_tiles / kMinTilesPerSplit;
  if (splits > by_length) splits = by_length;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : int(splits);
}

// A split's row of output (fp32, normalised by the split's own sum) and its lse, for the merge.
FC_DEVICE float* partial_out_row(const FwdParams& p, int split, int batch, int head, int row) {
  return p.cache.o_partial + (((int64_t(split) * p.b + batch) * p.hq + head) * p.nq + row) * p.d;
}
FC_DEVICE float* partial_lse(const FwdParams& p, int split, int batch, int head, int row) {
  return p.cache.lse_partial + ((int64_t(split) * p.b + batch) * p.hq + head) * p.nq + row;
}

}  // namespace flash_cuda
