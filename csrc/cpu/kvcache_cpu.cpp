// CPU backend of KV-cache attention: the semantics of the CUDA kernels (csrc/kernels/kv_cache.h)
// with the CPU backend's tiles (attention_cpu.cpp).
//
// Work items are (batch, kv head, key split). An item takes the queries of every query head of
// its kv group at once, (heads in group x Nq) rows, so each key and value tile is read once for
// the group: decoding is bound by the bytes of the cache. The cache rows are read in place where
// a kernel takes them in their dtype (AMX and the AVX-512 kernels below; kvcache_impl lists the
// paths); else each tile is converted to fp32 first. attention_cpu.cpp sends its decoding-like
// calls here too.
// The band and the modifiers are applied per head's rows (modify_tile). Each item keeps its own
// online softmax and writes its rows normalised by its own sum with their lse; the splits are
// then merged in a fixed order (lse = log sum exp lse_s, out = sum exp(lse_s - lse) out_s).
// The split count depends on the shapes alone, so results do not depend on the thread count.
#include "kvcache_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include "avx2_rows.h"
#include "avx512_gemm.h"
#include "online_softmax.h"
#include "prefetch.h"
#include "scratch.h"
#include "tile_gemm.h"
#include "tiles.h"

namespace flash_cuda::cpu {
namespace {

constexpr int64_t kBc = 512;            // keys per tile (attention_cpu.cpp's forward tile)
constexpr int64_t kTargetItems = 32;    // items a launch aims for when it picks the splits
constexpr int64_t kMinSplitKeys = 1024; // keys per split at least
// Fewer query rows per kv group than this: scores as dot products along the cache rows and P V
// with V widened in registers, on the AVX-512 kernels (avx512_gemm.h); from one vector of rows on,
// the GEMMs fill whole vectors while the dot products would reduce every (row, key) on its own.
constexpr int64_t kDotRows = 16;
constexpr int64_t kPanelRows = 32;  // up to this many rows, fp32/fp16 caches on the fp32 micro-kernel
constexpr int64_t kKeptRows = 64;   // up to this many rows a call's buffers are kept for the next calls
constexpr int64_t kStagePageRows = 32;  // pages of fewer rows: tiles staged contiguous (kvcache_impl)
constexpr int64_t kStageAhead = 64;     // rows fetched ahead of the run being staged (stage_rows)

// The AVX-512 rows kernels below kDotRows rows (avx512_gemm.h: the dot products and P V with V in
// place) fetch the rows just ahead into L1 (16 rows, or the next block of 32); where a call's cache
// is at least the last-level cache's size, also the rows kFarRows ahead into L2, so more of the
// memory's latency is covered. Measured on a Zen 4 (2 cores, in-process A/B, two runs, GQA 32/8, D 128,
// Nq = 1, outputs bit-identical; 128 rows against none): fp32 1.15x-1.22x at 8k and 32k keys, fp16
// and bf16 0.98x-1.06x; at 2k keys, whose 8 MB (16 in fp32) stayed in the 32 MB L3 between calls,
// 0.87x-0.95x, hence only past the last level; fp32 P V at 16 rows (Nq = 4) 0.98x-1.00x, hence
// not there. From 16 rows, fp32 S^T streams the key rows (f32_gemm_stream_a: two blocks of rows
// ahead into L1, 6 rows a block, 8 in its split steps since 65f939a: the figures that follow are
// from the 6-row blocks) and fetches those kFarKeyRows ahead into L2: at Nq = 4 (five runs, 8k and 32k
// keys) 1.05x-1.16x with 64, 1.08x with 32, 1.05x-1.07x with 96; 0.96x-1.03x at 2k; the same for
// bf16's S^T 0.99x-1.00x (its key rows are half the bytes for the same products), so not there.
// In a contiguous cache the far fetches go on past a run's end into the item's next keys (so the
// next tile's first rows are fetched far too; a paged cache's stop at each run's end, its page's
// or its tile's): in-process A/B against stopping at the run's end, on a Zen 4 (two runs, outputs
// bit-identical): Nq = 1 fp32 1.07x-1.12x, fp16 1.09x-1.10x and bf16 1.04x-1.05x at 32k keys;
// Nq = 4 fp32 1.02x-1.03x. With these, the 16-bit caches of 8k keys (exactly the 32 MiB of that
// L3) fetching far against not: Nq = 1 bf16 1.18x-1.19x, fp16 1.03x-1.08x (Nq = 4 0.99x-1.00x),
// hence "at least" the size; at half the size (16 MiB: 4k keys, fp32 2k) 0.90x-0.94x, the cache
// staying in L3 between calls.
constexpr int64_t kFarRows = 128;
constexpr int64_t kFarKeyRows = 64;
// The size of the largest cache level sysfs lists for CPU 0 (glibc's sysconf reported 10x lscpu's
// L3 on a VM); 32 MiB if sysfs says nothing.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int i = 0; i < 8; ++i) {
      std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
      std::string size;
      if (!(f >> size)) break;
      int64_t v = std::atoll(size.c_str());
      switch (std::toupper(static_cast<unsigned char>(size.back()))) {  // "32768K", "1M": units of 1024
        case 'G': v <<= 10; [[fallthrough]];
        case 'M': v <<= 10; [[fallthrough]];
        case 'K': v <<= 10;
      }
      best = std::max(best, v);
    }
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// q (B, H, N, D) times scale, in acc_t and contiguous. Rows of an acc_t q by a loop: decoding
// calls this once per token and layer, and ATen's multiply was 4.6 us of a 14.8 us call under
// torch.profiler (which adds its own cost per op; 8 tokens, 4 heads, D = 64, fp32, Zen 4). The
// same bits either way (one rounding per entry).
template <typename acc_t>
at::Tensor scaled_rows(const at::Tensor& q, acc_t scale) {
  if (q.scalar_type() != c10::CppTypeToScalarType<acc_t>::value || q.stride(3) != 1)
    return q.to(c10::CppTypeToScalarType<acc_t>::value).mul(scale).contiguous();
  at::Tensor y = at::empty(q.sizes(), q.options());
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3);
  const acc_t* src = q.data_ptr<acc_t>();
  acc_t* dst = y.data_ptr<acc_t>();
  at::parallel_for(0, q.size(0) * H * N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* row = src + r / (H * N) * q.stride(0) + r / N % H * q.stride(1) + r % N * q.stride(2);
      for (int64_t d = 0; d < D; ++d) dst[r * D + d] = row[d] * scale;
    }
  });
  return y;
}

// Where the rows of a cache lie: its base, element strides (batch or page, kv head, row) and
// block table (nullptr: contiguous, [B][Hkv][capacity][D]; else a pool of pages). Key r of
// sequence b is row r of its cache, or with a left pad row first[b] + r (through the table when
// paged). A tile staged contiguous (stage_rows) is a cache of one sequence and head whose key
// `origin` is at base.
struct CacheRows {
  const char* base;
  at::ScalarType dtype;
  int64_t elem, s0, s1, row_stride, D;
  const int32_t* table = nullptr;
  int64_t table_stride = 0, page_size = 0, origin = 0;
  const int64_t* first = nullptr;
  CacheRows(const at::Tensor& cache, const int32_t* table_ptr, int64_t table_stride_, const int64_t* first_)
      : base(static_cast<const char*>(cache.data_ptr())), dtype(cache.scalar_type()), elem(cache.element_size()),
        s0(cache.stride(0)), s1(cache.stride(1)), row_stride(cache.stride(2)), D(cache.size(3)), table(table_ptr),
        table_stride(table_stride_), page_size(cache.size(2)), first(first_) {}
  CacheRows(const char* tile, const CacheRows& of, int64_t first_key)
      : base(tile), dtype(of.dtype), elem(of.elem), s0(0), s1(0), row_stride(of.D), D(of.D), origin(first_key) {}
  // the row of key r of sequence b in its cache (paged: the logical row, page by page)
  int64_t row(int64_t b, int64_t r) const { return r - origin + (first ? first[b] : 0); }
  // the element offset of key r of sequence b, kv head h, in a contiguous cache or staged tile
  int64_t contiguous_offset(int64_t b, int64_t h, int64_t r) const { return b * s0 + h * s1 + row(b, r) * row_stride; }
};

// Calls fn(element offset, first key, count) for the runs of keys [r0, r1) of sequence b's cache
// (kv head h) whose rows are contiguous in memory: one run, or one per page when paged. (Keys,
// here and below: key r is cache row r, or first[b] + r with a left pad: CacheRows::row.)
template <typename Fn>
void for_each_run(const CacheRows& c, int64_t b, int64_t h, int64_t r0, int64_t r1, Fn fn) {
  if (c.table == nullptr) {
    fn(c.contiguous_offset(b, h, r0), r0, r1 - r0);
    return;
  }
  for (int64_t r = r0; r < r1;) {
    const int64_t row = c.row(b, r), page = c.table[b * c.table_stride + row / c.page_size], off = row % c.page_size;
    const int64_t n = std::min(r1 - r, c.page_size - off);
    fn(page * c.s0 + h * c.s1 + off * c.row_stride, r, n);
    r += n;
  }
}

// Keys [r0, r1) of sequence b's cache (kv head h) as an acc_t (keys, D) tile: a view of
// contiguous rows already in acc_t, else gathered (run by run) and converted into buf.
at::Tensor gather_rows(const CacheRows& c, int64_t b, int64_t h, int64_t r0, int64_t r1, const at::Tensor& buf) {
  const auto run = [&](int64_t off, int64_t n) {
    return at::from_blob(const_cast<char*>(c.base) + off * c.elem, {n, c.D}, {c.row_stride, 1},
                         buf.options().dtype(c.dtype));
  };
  if (c.table == nullptr)
    return load_rows(run(c.contiguous_offset(b, h, r0), r1 - r0), 0, r1 - r0, buf);
  for_each_run(c, b, h, r0, r1, [&](int64_t off, int64_t r, int64_t n) {
    buf.slice(0, r - r0, r - r0 + n).copy_(run(off, n));
  });
  return buf.slice(0, 0, r1 - r0);
}

// The first run of keys [r0, r1) (r0 <= r1) of sequence b's cache (kv head h), as rows to fetch
// ahead (prefetch.h): decoding's next tile of key rows, fetched while this tile's values are used.
RowsAhead first_run(const CacheRows& c, int64_t b, int64_t h, int64_t r0, int64_t r1) {
  if (r0 >= r1) return {};
  if (c.table == nullptr) return {c.base + c.contiguous_offset(b, h, r0) * c.elem, c.row_stride * c.elem, r1 - r0,
                                  c.D * c.elem};
  const int64_t at = c.row(b, r0), page = c.table[b * c.table_stride + at / c.page_size], row = at % c.page_size;
  return {c.base + (page * c.s0 + h * c.s1 + row * c.row_stride) * c.elem, c.row_stride * c.elem,
          std::min(r1 - r0, c.page_size - row), c.D * c.elem};
}

// Keys [r0, r1) of sequence b's cache (kv head h) copied into dst, (r1 - r0, D) contiguous, the
// keys up to kStageAhead ahead of each run (to fetch_end at most: the item's next tile too)
// fetched into L2 first: the runs of a paged cache lie apart, where the hardware's fetches ahead
// stop.
void stage_rows(const CacheRows& c, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t fetch_end, char* dst) {
  const int64_t row_bytes = c.D * c.elem;
  int64_t fetched = r0;  // keys [r0, fetched) requested
  for_each_run(c, b, h, r0, r1, [&](int64_t off, int64_t r, int64_t n) {
    for (const int64_t want = std::min(r + n + kStageAhead, fetch_end); fetched < want;) {
      const RowsAhead run = first_run(c, b, h, fetched, want);
      for (int64_t i = 0; i < run.rows; ++i) run.fetch(i);
      fetched += run.rows;
    }
    const char* src = c.base + off * c.elem;
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(dst + (r - r0 + i) * row_bytes, src + i * c.row_stride * c.elem, row_bytes);
  });
}

// The rows of D elements of a contiguous output in its own dtype: store(x, row) writes row `row`
// = x rounded to nearest even (the low-precision ones by rowops' vector passes).
template <typename acc_t>
struct OutRows {
  void* base;
  at::ScalarType dtype;
  int64_t D;
  // out's dtype is acc_t itself, or fp16/bf16 with acc_t = float (at::opmath_type)
  explicit OutRows(const at::Tensor& out) : base(out.data_ptr()), dtype(out.scalar_type()), D(out.size(-1)) {
    TORCH_INTERNAL_ASSERT(dtype == c10::CppTypeToScalarType<acc_t>::value ||
                          (std::is_same_v<acc_t, float> && (dtype == at::kBFloat16 || dtype == at::kHalf)));
  }
  void store(const acc_t* x, int64_t row) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (dtype == at::kBFloat16) return round_bf16(x, D, static_cast<uint16_t*>(base) + row * D);
      if (dtype == at::kHalf) return round_fp16(x, D, static_cast<uint16_t*>(base) + row * D);
    }
    std::copy(x, x + D, static_cast<acc_t*>(base) + row * D);
  }
};

// The splits' rows merged in split order: lse = m + log sum_s exp(lse_s - m) (m = max_s lse_s) and
// out = sum_s exp(lse_s - lse) out_s; a row no split saw (every lse_s = -inf) gets out 0, lse -inf.
// A NaN goes through as with one split: a NaN lse_s makes m, lse and out NaN, and a row no split
// saw keeps the NaN of an out_s (0 * out_s, as each item scales such a row by 0). o_part (splits,
// rows, D) and lse_part (splits, rows); rows independent, so any thread count gives the same bits.
template <typename acc_t>
void merge_splits(const acc_t* o_part, const acc_t* lse_part, int64_t splits, int64_t n_rows, int64_t D,
                  const at::Tensor& out, acc_t* lse) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const OutRows<acc_t> out_rows(out);
  at::parallel_for(0, n_rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> row(D);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t m = kNegInf;
      for (int64_t s = 0; s < splits; ++s) {
        const acc_t x = lse_part[s * n_rows + r];
        m = x > m || std::isnan(x) ? x : m;  // a NaN stays
        if (std::isnan(m)) break;
      }
      std::fill(row.begin(), row.end(), acc_t(0));
      if (m == kNegInf) {
        for (int64_t s = 0; s < splits; ++s)
          for (int64_t d = 0; d < D; ++d) row[d] += acc_t(0) * o_part[(s * n_rows + r) * D + d];
        lse[r] = kNegInf;
        out_rows.store(row.data(), r);
        continue;
      }
      acc_t sum = 0;
      for (int64_t s = 0; s < splits; ++s) sum += std::exp(lse_part[s * n_rows + r] - m);
      acc_t* __restrict y = row.data();
      const int64_t n = D;
      for (int64_t s = 0; s < splits; ++s) {
        const acc_t w = std::exp(lse_part[s * n_rows + r] - m) / sum;
        const acc_t* __restrict o = o_part + (s * n_rows + r) * D;
        // (through row[d] the compiler reloaded D and the vector's data each element, one scalar
        // multiply-add at a time: 2.3% of a bf16 decoding step's samples at Nq = 4, 2k keys)
        for (int64_t d = 0; d < n; ++d) y[d] += w * o[d];
      }
      lse[r] = m + std::log(sum);
      out_rows.store(row.data(), r);
    }
  });
}

// in_t: the tile GEMMs' operand dtype (tile_gemm.h). fp16/bf16 multiplied natively read K and V
// straight from the cache: S^T = K Q^T (the cache rows as the left operand, so no transposed
// copy), transposed in the tile to S, and O += P V with P rounded to the cache's dtype. float:
// fp32 and fp16 caches on the AVX-512 kernels read in place (fp16 widened in registers), else the
// tiles gathered and converted, ATen's fp32 GEMMs.
// prescale: the native path's scores scaled first, as the float path's always are (its Q carries
// the scale). Returns whether a row's max score exceeded kFoldedScaleMax with the scale folded into
// the exponent (the caller then runs it again prescaled).
template <typename in_t>
bool kvcache_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::vector<int64_t>& n_keys, const std::vector<int64_t>& first_keys,
                  const std::optional<at::Tensor>& block_table,
                  const AttnOptions& opt, int64_t splits, bool prescale, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<in_t>;
  constexpr bool native = !std::is_same_v<in_t, acc_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k_cache.size(1);
  const int64_t group = Hq / Hkv, rows = group * Nq, n_rows = B * Hq * Nq;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor table = block_table ? block_table->contiguous() : at::Tensor();
  const int32_t* table_ptr = block_table ? table.data_ptr<int32_t>() : nullptr;
  const int64_t table_stride = block_table ? table.stride(0) : 0;
  const Mods<acc_t> mods(opt, Hq);
  const acc_t scale = static_cast<acc_t>(opt.scale);
  // Q once for all items, (B, Hq, Nq, D) contiguous so a kv group's rows (head, query) are one
  // (rows, D) block: native in its dtype, unscaled (the scale goes into the exponent); float in
  // acc_t with the scale folded in.
  const at::Tensor qc = native ? q.contiguous() : scaled_rows<acc_t>(q, scale);
  // Each split's rows (normalised by its own sum) and lse, merged after the items (every entry is
  // written by its item first, so they start uninitialised); with one split the items write out
  // and lse themselves.
  const std::unique_ptr<acc_t[]> o_part(splits > 1 ? new acc_t[splits * n_rows * D] : nullptr);
  const std::unique_ptr<acc_t[]> lse_part(splits > 1 ? new acc_t[splits * n_rows] : nullptr);
  acc_t* lse_ptr = lse.data_ptr<acc_t>();  // (B, Hq, Nq), contiguous
  const OutRows<acc_t> out_rows(out);
  const bool may_fold = native && !prescale && !mods.any && scale > 0;  // else every tile is prescaled
  std::atomic<bool> too_large{false};
  // The second fetches into L2 (above), where the call reads at least as much of the cache as the
  // last-level cache holds.
  int64_t cache_bytes = 0;
  for (const int64_t n : n_keys) cache_bytes += 2 * n * Hkv * D * k_cache.element_size();
  const bool past_llc = cache_bytes >= last_level_cache_bytes();
  const int64_t far = rows < kDotRows && past_llc ? kFarRows : 0;
  const int64_t far_keys = past_llc ? kFarKeyRows : 0;  // fp32 S^T from 16 rows (f32_gemm_stream_a)

  // bf16 below kDotRows rows where the CPU has AVX512-BF16, AMX or not: the scores as dot
  // products along the cache rows (avx512_gemm.h), the rows ahead fetched as they go. The GEMM
  // S^T = K Q^T would fill only `rows` of its 16 lanes (4 at Nq = 1 and 4 query heads per kv
  // head); on a Xeon with AMX, oneDNN's AMX brgemm there was 1.4x to 1.7x slower (in-process A/B,
  // GQA 32/8, D 128, Nq = 1, 2k to 32k keys).
  const bool rows_dot = std::is_same_v<in_t, c10::BFloat16> && rows < kDotRows && dpbf16_supported() &&
                        rows_kernels_allowed(at::kBFloat16);
  // Caches in the float path, read in place (fp16 and bf16 widened in registers): no gathered,
  // converted copy of each tile. fp32 and fp16 below kDotRows rows on the AVX-512 kernels
  // (avx512_gemm.h), else (no AVX-512, or a bf16 cache) below kDotRows rows on the AVX2 ones
  // (avx2_rows.h; tile_gemm.h picks). Measured on a Zen 3 (AVX2) against the converted tiles and
  // MKL: 1.1x to 2.5x faster at 4 rows.
  const RowsKernels rows_isa = !native && std::is_same_v<acc_t, float> && rows <= kPanelRows
                                   ? float_rows_kernels(k_cache.scalar_type())
                                   : RowsKernels::kNone;
  const bool f32_rows = rows_isa == RowsKernels::kAvx512 && rows < kDotRows;
  const bool avx2_rows = rows_isa == RowsKernels::kAvx2 && rows < kDotRows;
  const RowType row_type = k_cache.scalar_type() == at::kHalf       ? RowType::kF16
                           : k_cache.scalar_type() == at::kBFloat16 ? RowType::kBF16
                                                                    : RowType::kF32;
  const bool f16_cache = k_cache.scalar_type() == at::kHalf;
  // The same caches with 16 to kPanelRows rows: S^T = K Q^T on an fp32 micro-kernel, the key rows
  // as its broadcast operand, Q^T packed once per item. AVX-512 (fp32 and fp16 caches): fp32 K and
  // V in place, P V as above; measured on a Xeon against MKL's GEMMs (which pack K and V first), 3%
  // to 12% faster at 16 rows, 4% to 7% at 32, no better at 64. AVX2 (avx2_panel_gemm; any cache
  // dtype) and fp16 on AVX-512 (K only, below): each K tile, then each V tile, staged in fp32 (one
  // streaming pass over the cache's bytes, widened on the way; avx2_stage_rows) and multiplied from
  // cache.
  // Measured on a Zen 3 against the row dot products (which read each key row once per 4 query rows
  // and reduce every score alone), GQA 32/8, D 128, 8k and 32k keys: 16 rows 1.2x faster in fp32,
  // 0.95x to 1.07x in fp16/bf16; 32 rows 1.12x to 1.27x. On a Xeon with AMX (in-process A/B, same
  // shapes and 2k keys): fp16 staged 1.01x to 1.09x faster at 16 rows and 1.08x to 1.11x at 32 than
  // K converted per tile by ATen and V widened in registers; fp32 staged 0.99x to 1.04x, so in place.
  // fp16 on AVX-512 stages its K tiles only: P V widens V's rows in registers (f32_f16_gemm_rows),
  // in-process A/B on a Zen 4 against V staged too (GQA 32/8, D 128, 2k to 32k keys, outputs
  // bit-identical): 1.09x-1.13x faster at 16 rows, 1.04x-1.08x at 32 (the staging's write and
  // reread of 256 KiB a tile saved; not measured on the Xeon, which takes it too); its scores as dot
  // products along K's rows instead of K staged (f32_f16_rows_dot, 4 query rows at a time):
  // 0.88x-0.95x at 16 rows, so K stays staged.
  const bool avx512_panels = !native && std::is_same_v<acc_t, float> && !f32_rows && !avx2_rows &&
                             rows <= kPanelRows && rows_kernels_allowed(at::kFloat) &&
                             (k_cache.scalar_type() == at::kFloat || (f16_cache && avx2_rows_supported()));
  const bool avx2_panels = rows_isa == RowsKernels::kAvx2 && !avx2_rows;
  const bool f32_panels = avx512_panels || avx2_panels;
  const bool staged = avx2_panels || (avx512_panels && f16_cache);  // the K tiles
  const bool v_staged = avx2_panels;
  // fp16's V rows widened in place after staged K tiles (no scores fetched them) fetch far from 16
  // rows on too: 1.02x-1.04x at 16 rows, 1.01x-1.02x at 32 (Zen 4, 8k and 32k keys, as above).
  const int64_t far_v = staged && past_llc ? kFarRows : far;
  static_assert(kPanelRows <= kPanelCols, "Q^T of an item is one panel");
  const bool v_in_place = f32_rows || f32_panels || avx2_rows;
  // native on AMX (an even D; bf16 unless the micro-kernel is chosen): S^T = K Q^T with the cache
  // rows as brgemm's left operand, in place, and Q^T packed once per item (RowsTransposed).
  const bool amx_s = [&] {
    if constexpr (native)
      return !rows_dot && !(std::is_same_v<in_t, c10::BFloat16> && use_dpbf16()) && RowsTransposed<in_t>::supported(D);
    return false;
  }();
  // amx_s: each V tile staged into the pairs layout, which is brgemm's VNNI layout panel by panel
  // (stage_rows_pairs: the rows streamed once from memory, fetched ahead, with the next tile's key
  // rows fetched into L2 alongside), and P V on AMX from there; the key rows of a tile that no
  // staging fetched (the first, a paged cache's later runs) fetched into L2 before S^T. Measured
  // on a Xeon with AMX (in-process A/B, GQA 32/8, D 128, Nq = 4, bit-identical outputs): 1.27x to
  // 1.36x faster at 8k and 32k keys than MKL's GEMM (which copies V into its own layout first, the
  // cache rows waiting on memory there and in S^T's brgemm).
  const bool amx_v = amx_s && f32_gemm_supported();
  // bf16 on the AVX512-BF16 micro-kernel (no AMX) from kDotRows rows on: amx_s and amx_v's flow
  // on dpbf16 GEMMs, each phase's multiplies covering the next phase's memory reads. S^T = K Q^T
  // (Q^T packed once per item) fetches its key rows ahead into L1 and the same rows of V into L2
  // (dpbf16_gemm_stream_a: the rows of a run but its last 12 or 16 or more, for an even D); P V
  // multiplies V from there (pv_pairs_in_registers, below, reading those last rows on demand; else
  // V staged into the pairs layout first, the staging fetching them) and fetches the next tile's
  // first run of key rows into L2 where its rows are contiguous (a contiguous cache, or one page:
  // the GEMMs' stream; (B, N, H, D) caches: S^T's own fetches alone).
  // Before, RightOperand's GEMM and V packed by pack_pairs_bf16 waited on memory in turn (half the
  // call in those two: perf on a Zen 4, GQA 32/8, D 128, Nq = 4, 8k keys). Measured there, in-process
  // A/B one step at a time on a 2-core VM whose bandwidth varied run to run: this flow with V
  // fetched in S^T 1.23x-1.32x faster than before at 8k keys (1.14x at 32k); the next keys fetched
  // in P V rather than during the staging a further 1.12x-1.19x (8k, 32k).
  const bool dpbf16_pairs = [&] {
    if constexpr (std::is_same_v<in_t, c10::BFloat16>) return !rows_dot && use_dpbf16();
    return false;
  }();
  // dpbf16_pairs with D a multiple of 32: P V with V's row pairs interleaved in registers (as below
  // 16 rows) rather than staged into the pairs layout, the tiles accumulating O in the pairs order
  // (no permutes per tile; put back in column order once per item) and streaming the next tile's
  // first key rows as the staged GEMM did. In-process A/B on a Zen 4 against V staged (GQA 32/8,
  // D 128, outputs bit-identical): Nq = 4 1.08x-1.12x at 2k, 8k and 32k keys (four runs), Nq = 8
  // 1.05x-1.07x, Nq = 16 1.01x-1.03x (2k, 32k); register tiles of 8 rows x 32 columns or 6 x 64
  // measured slower than 4 x 64, key blocks kept in L1 no faster (32 to 256 keys a block).
  const bool pv_pairs_in_registers = dpbf16_pairs && D % 32 == 0;
  const bool pairs_v = amx_v || (dpbf16_pairs && !pv_pairs_in_registers);  // V staged into the pairs layout
  // A thread's buffers: from the pool of those kept between calls up to kKeptRows rows (decoding
  // calls this once per token; KeptPool, scratch.h), else the call's own. Written before they
  // are read, so they are only resized.
  struct Buffers {
    TileVector<acc_t> S, P, O;      // scores (rows, Bc), float P (rows, Bc), output (rows, D; its columns
                                    // in the pairs order until the item ends where pv_pairs_in_registers)
    std::vector<SoftmaxRow<acc_t>> rows;  // online_softmax.h, (rows)
    TileVector<acc_t> St;           // native and f32_panels: S^T (Bc, rows)
    TileVector<in_t> Pn;            // native: P rounded, (rows, Bc)
    RowsTransposed<in_t> Qt;        // native on AMX: Q^T packed
    TileVector<in_t> Qtp;           // dpbf16_pairs: Q^T (D, rows) in the pairs layout
    TileVector<float> Qp;           // f32_panels: Q^T (D, rows) as one panel of the micro-kernels
    TileVector<float> Stage;        // staged: the K tile (v_staged: then the V tile), in fp32 (Bc, D)
    TileVector<in_t> Vp;            // pairs_v: the V tile in the pairs layout (avx512_gemm.h)
    TileVector<char> Kst, Vst;      // stage_k, stage_v: the K and V tiles' rows, (Bc, D) contiguous
    int64_t bytes() const {
      auto of = [](const auto& v) { return int64_t(v.capacity() * sizeof(v[0])); };
      return of(S) + of(P) + of(O) + of(rows) + of(St) + of(Pn) + Qt.bytes() + of(Qtp) + of(Qp) + of(Stage) + of(Vp) +
             of(Kst) + of(Vst);
    }
  };
  struct Scratch {
    typename KeptPool<Buffers>::Handle buffers;
    Buffers& b;
    at::Tensor sK, sV;              // gathered: the K and V tiles converted to acc_t (Bc, D)
  };
  const bool gathered = !native && !v_in_place;
  // Pages of fewer than kStagePageRows rows: each tile's rows staged contiguous first (stage_rows),
  // then read as one run by the paths below (not where a path widens its tile run by run into fp32
  // anyway: staged, v_staged). Measured on a Zen 4 (2 cores, B 4, GQA 32/8, D 128, 8k keys, the
  // pool's pages shuffled; medians of interleaved runs of separate builds, this VM's speed drifting
  // up to 20% between runs) against the runs read in place: pages of 16 rows 1.1x-1.6x faster
  // (bf16 Nq = 1 14.4 -> 11.8 ms, a contiguous cache 6.1; fp32 Nq = 4 1.0x-1.1x), pages of one row
  // (flash_attn_with_kvcache's cache_leftpad then) 2.5x-6x (bf16 Nq = 1 83 -> 20 ms); pages of 32 to 63
  // rows staged were 5%-15% faster at Nq = 1 (fp32, bf16; fp16 even) but 5%-33% slower at Nq = 4
  // (16 rows a kv group, whose kernels stream a run's rows themselves), hence 32; fetching 64 rows
  // ahead during the staging against the next run alone 1.0x-1.2x, 256 no better than 64.
  const bool stage_pages = table_ptr != nullptr && k_cache.size(2) < kStagePageRows;
  const bool stage_k = stage_pages && !staged, stage_v = stage_pages && !v_staged;  // (staged: widened run by run)
  auto make_scratch = [&] {
    auto buffers = KeptPool<Buffers>::take(rows <= kKeptRows);
    Buffers& b = *buffers;
    b.S.resize(rows * kBc), b.P.resize(native ? 0 : rows * kBc), b.O.resize(rows * D), b.rows.resize(rows);
    b.St.resize(native || f32_panels ? kBc * rows : 0), b.Pn.resize(native ? rows * kBc : 0);
    b.Qp.resize(f32_panels ? panels_f32_size(D, rows) : 0), b.Stage.resize(staged ? kBc * D : 0);
    b.Vp.resize(pairs_v ? pairs_size(kBc, D) : 0), b.Qtp.resize(dpbf16_pairs ? pairs_size(D, rows) : 0);
    b.Kst.resize(stage_k ? kBc * D * k_cache.element_size() : 0), b.Vst.resize(stage_v ? kBc * D * k_cache.element_size() : 0);
    if (!gathered) return Scratch{std::move(buffers), b, at::Tensor(), at::Tensor()};
    return Scratch{std::move(buffers), b, at::empty({kBc, D}, acc_opts), at::empty({kBc, D}, acc_opts)};
  };
  const int64_t* first = first_keys.empty() ? nullptr : first_keys.data();
  const CacheRows k_rows(k_cache, table_ptr, table_stride, first), v_rows(v_cache, table_ptr, table_stride, first);
  const int64_t elem = k_cache.element_size();
  parallel_items(B * Hkv * splits, make_scratch, [&](int64_t item, Scratch& t) {
    const int64_t split = item % splits, bh = item / splits, b = bh / Hkv, hkv = bh % Hkv;
    const int64_t nk = n_keys[b];
    const BandMask band = opt.band(Nq, nk);
    // this split's keys: its share of the key tiles, within the band of the queries
    const int64_t tiles = ceil_div(nk, kBc), per = ceil_div(tiles, splits);
    const int64_t k_begin = std::max(std::min(split * per, tiles) * kBc, band.key_begin(0, nk));
    const int64_t k_end = std::min(std::min((split + 1) * per, tiles) * kBc, band.key_end(Nq, nk));

    acc_t* o = t.b.O.data();  // (rows, D)
    std::fill(t.b.O.begin(), t.b.O.end(), acc_t(0));
    std::fill(t.b.rows.begin(), t.b.rows.end(), SoftmaxRow<acc_t>{});
    const int64_t q_row0 = (b * Hq + hkv * group) * Nq;  // the group's first row of qc
    const auto* gq = qc.data_ptr<std::conditional_t<native, in_t, acc_t>>() + q_row0 * D;  // (rows, D)
    std::optional<RightOperand<in_t>> rQt;  // Q^T (D, rows), unscaled: the scale goes into the exponent
    if constexpr (native) {
      if (amx_s)
        t.b.Qt.pack(rows, D, gq, D);
      else if (dpbf16_pairs)
        pack_pairs_bf16_transposed(D, rows, reinterpret_cast<const uint16_t*>(gq), D,
                                   reinterpret_cast<uint16_t*>(t.b.Qtp.data()));
      else if (!rows_dot)  // the micro-kernel's layout, or MKL's GEMM (which copies the cache rows first)
        rQt.emplace(qc.view({B * Hq * Nq, D}).slice(0, q_row0, q_row0 + rows).t().unsqueeze(0).unsqueeze(0), false);
    }
    if constexpr (!native && std::is_same_v<acc_t, float>) {
      if (f32_panels) transpose(rows, D, gq, D, t.b.Qp.data(), kPanelCols);  // row d of the panel: Q[:, d]
    }
    // staged: rows j0 .. j1 of this sequence's cache (kv head hkv) widened into dst, (j1 - j0, D) fp32
    const auto stage_tile = [&](const CacheRows& cache, int64_t j0, int64_t j1, float* dst) {
      for_each_run(cache, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
        avx2_stage_rows(row_type, n, D, cache.base + off * elem, cache.row_stride, dst + (r - j0) * D, D);
      });
      return dst;
    };
    acc_t* s = t.b.S.data();  // (rows, bc)
    constexpr int64_t ld_s = kBc;
    // far fetches `ahead` rows ahead of the run of rows that starts at key r and holds n: to this
    // item's last key in a contiguous cache, to the run's end in a paged one, none in staged tiles
    // (in cache already; the staging fetched ahead)
    const auto far_from = [&](int64_t ahead, int64_t r, int64_t n) {
      return stage_pages ? FarRows{} : FarRows{ahead, table_ptr ? n : k_end - r};
    };
    int64_t k_fetched = k_begin;  // amx_v: the key rows up to here were fetched by the last tile's staging
    for (int64_t j0 = k_begin; j0 < k_end; j0 += kBc) {
      const int64_t j1 = std::min(j0 + kBc, k_end), bc = j1 - j0;
      at::Tensor rV;
      // small pages: the tile's rows copied contiguous first (each run of rows costs every kernel
      // below a call and its fetches ahead stop at a run's end), then read as one run
      const int64_t fetch_end = std::min(j1 + kStageAhead, k_end);
      if (stage_k) stage_rows(k_rows, b, hkv, j0, j1, fetch_end, t.b.Kst.data());
      if (stage_v) stage_rows(v_rows, b, hkv, j0, j1, fetch_end, t.b.Vst.data());
      const CacheRows kr = stage_k ? CacheRows(t.b.Kst.data(), k_rows, j0) : k_rows;
      const CacheRows vr = stage_v ? CacheRows(t.b.Vst.data(), v_rows, j0) : v_rows;
      if (rows_dot) {
        if constexpr (std::is_same_v<in_t, c10::BFloat16>) {  // (rows_dot is false for other types)
          for_each_run(kr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
            dpbf16_rows_dot(rows, n, D, reinterpret_cast<const uint16_t*>(gq), D,
                            reinterpret_cast<const uint16_t*>(kr.base + off * elem), kr.row_stride, s + (r - j0),
                            ld_s, far_from(far, r, n));
          });  // S = Q K^T
        }
      } else if constexpr (native) {
        for_each_run(kr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
          const in_t* k = reinterpret_cast<const in_t*>(kr.base + off * elem);
          acc_t* st = t.b.St.data() + (r - j0) * rows;  // S^T = K Q^T
          if (amx_v && !stage_k)  // the rows of this run no staging fetched, into L2
            for (int64_t i = std::max<int64_t>(k_fetched - r, 0); i < n; ++i)
              prefetch_l2(k + i * kr.row_stride, D * elem);
          if (amx_s)
            t.b.Qt.gemm(n, k, kr.row_stride, st, rows);
          else if (dpbf16_pairs)  // this run's value rows fetched into L2 alongside its key rows
            dpbf16_gemm_stream_a(n, rows, D, reinterpret_cast<const uint16_t*>(k), kr.row_stride,
                                 reinterpret_cast<const uint16_t*>(t.b.Qtp.data()), pairs_panel_size(D), st, rows,
                                 false, first_run(vr, b, hkv, r, r + n));
          else
            rQt->gemm(0, 0, n, k, kr.row_stride, 0, D, 0, rows, st, rows, false);
        });
        transpose(bc, rows, t.b.St.data(), rows, s, ld_s);
      } else if (f32_rows) {
        if constexpr (std::is_same_v<acc_t, float>)
          for_each_run(kr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
            if (f16_cache)
              f32_f16_rows_dot(rows, n, D, gq, D, reinterpret_cast<const uint16_t*>(kr.base + off * elem),
                               kr.row_stride, s + (r - j0), ld_s, far_from(far, r, n));
            else
              f32_rows_dot(rows, n, D, gq, D, reinterpret_cast<const float*>(kr.base + off * elem), kr.row_stride,
                           s + (r - j0), ld_s, far_from(far, r, n));
          });  // S = Q K^T
      } else if (avx2_rows) {
        if constexpr (std::is_same_v<acc_t, float>)
          for_each_run(kr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
            const RowsAhead v_rows{vr.base + off * elem, vr.row_stride * elem, n, D * elem};
            avx2_rows_dot(row_type, rows, n, D, gq, D, kr.base + off * elem, kr.row_stride, s + (r - j0), ld_s,
                          v_rows);
          });  // S = Q K^T, this run's value rows fetched into L2 alongside
      } else if (f32_panels) {
        if constexpr (std::is_same_v<acc_t, float>) {
          const int64_t panel = panels_f32_panel_size(D);
          // S^T (n, rows) = K Q^T
          const auto st_gemm = [&](int64_t n, const float* k, int64_t ldk, float* st, const RowsAhead& v_rows,
                                   const FarRows& far_k) {
            if (avx2_panels)
              avx2_panel_gemm(n, rows, D, k, ldk, t.b.Qp.data(), panel, st, rows, false);
            else  // the cache's rows, read once from memory, or the tile just staged (nothing alongside)
              f32_gemm_stream_a(n, rows, D, k, ldk, t.b.Qp.data(), panel, st, rows, false, v_rows, far_k);
          };
          if (staged) {
            st_gemm(bc, stage_tile(kr, j0, j1, t.b.Stage.data()), D, t.b.St.data(), {}, {});
          } else {
            for_each_run(kr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
              st_gemm(n, reinterpret_cast<const float*>(kr.base + off * elem), kr.row_stride,
                      t.b.St.data() + (r - j0) * rows,
                      first_run(vr, b, hkv, r, r + n), far_from(far_keys, r, n));
            });
          }
          transpose(bc, rows, t.b.St.data(), rows, s, ld_s);  // S^T = K Q^T, then S
        }
      } else {
        const at::Tensor rK = gather_rows(kr, b, hkv, j0, j1, t.sK);
        rV = gather_rows(vr, b, hkv, j0, j1, t.sV);
        const at::Tensor rQ = at::from_blob(const_cast<acc_t*>(gq), {rows, D}, acc_opts);
        at::Tensor rS = at::from_blob(s, {rows, bc}, {ld_s, 1}, acc_opts);
        at::mm_out(rS, rQ, rK.t());
      }
      const bool band_mask = band.tile_needs_mask(0, Nq, j0, j1);
      // native: the scale is folded into the exponent unless the modifiers need scaled scores
      const bool prescaled = !native || prescale || band_mask || mods.any || !(scale > 0);
      if (native && prescaled)
        for (int64_t r = 0; r < rows; ++r) scale_row(s + r * ld_s, bc, scale);
      if (band_mask || mods.any)
        for (int64_t g = 0; g < group; ++g)
          modify_tile<acc_t>(s + g * Nq * ld_s, nullptr, ld_s, Nq, bc, 0, j0, b, hkv * group + g, band, band_mask, mods);
      const acc_t a = prescaled ? acc_t(1) : scale;
      if constexpr (native) {
        in_t* p = t.b.Pn.data();  // (rows, bc), ld as s
        for (int64_t r = 0; r < rows; ++r)
          online_softmax_row(t.b.rows[r], o + r * D, D, a, s + r * ld_s, bc, true, [&](acc_t m_ref, acc_t* x_max, acc_t* lp) {
            return exp_affine_sum_to(s + r * ld_s, bc, a, m_ref, p + r * ld_s, x_max, lp);
          });
        if (pv_pairs_in_registers) {  // O += P V, O in the pairs order, the next tile's first key rows fetched
          const RowsAhead next_keys =
              first_run(k_rows, b, hkv, j1, std::min(j1 + kBc, k_end));
          const bool contiguous = next_keys.stride == next_keys.bytes;
          for_each_run(vr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
            dpbf16_gemm_rows_pairs_order(rows, D, n, reinterpret_cast<const uint16_t*>(p + (r - j0)), ld_s,
                                         reinterpret_cast<const uint16_t*>(vr.base + off * elem), vr.row_stride, o,
                                         D, contiguous && r == j0 ? next_keys.base : nullptr,
                                         next_keys.rows * next_keys.bytes);
          });
          continue;
        }
        if (pairs_v) {  // O += P V, V staged into the pairs layout, the next tile's first key rows fetched
                        // (amx_v: by the staging; dpbf16_pairs: by P V, contiguous rows only)
          auto* vp = reinterpret_cast<uint16_t*>(t.b.Vp.data());
          const int64_t panel = pairs_panel_size(kBc);
          const RowsAhead next_keys = first_run(k_rows, b, hkv, j1, std::min(j1 + kBc, k_end));
          k_fetched = j1 + next_keys.rows;
          for_each_run(vr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
            stage_rows_pairs(n, D, reinterpret_cast<const uint16_t*>(vr.base + off * elem), vr.row_stride, r - j0,
                             vp, panel, dpbf16_pairs ? RowsAhead{} : next_keys);
          });
          if (dpbf16_pairs) {  // (an odd bc's last row multiplied alone by the micro-kernel)
            const bool contiguous = next_keys.stride == next_keys.bytes;
            dpbf16_gemm(rows, D, bc, reinterpret_cast<const uint16_t*>(p), ld_s, vp, panel, o, D, true,
                        contiguous ? next_keys.base : nullptr, next_keys.rows * next_keys.bytes);
            continue;
          }
          if (bc % 2) {  // K of the GEMM rounded up to even: a zero row of V, a zero column of P
            zero_pair_half(bc, D, vp, panel);
            for (int64_t r = 0; r < rows; ++r) p[r * ld_s + bc] = in_t(0);
          }
          amx_gemm_pairs(rows, D, bc + bc % 2, p, ld_s, t.b.Vp.data(), panel, o, D, true);
          continue;
        }
        for_each_run(vr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
          const in_t* v = reinterpret_cast<const in_t*>(vr.base + off * elem);
          // bf16, few rows: V read in place. With AVX512-BF16 (rows_dot) on vdpbf16ps, V's row
          // pairs interleaved in registers: half the multiply instructions of fp32 FMAs on widened
          // rows, which bound the step on a Zen 4 (in-process A/B, GQA 32/8, D 128, Nq = 1: 1.13x,
          // 1.18x, 1.26x faster at 2k, 8k, 32k keys); not measured on AMX machines, which take it
          // too. Else widened in registers, fp32 FMAs. On AMX, MKL's GEMM copies each V tile into
          // its own layout first, and V interleaved for AMX by us (before amx_v's staging, which
          // fetches the rows ahead) measured no faster than the FMAs.
          if constexpr (std::is_same_v<in_t, c10::BFloat16>)
            if (rows < kDotRows && rows_kernels_allowed(at::kBFloat16)) {
              const auto* pv = reinterpret_cast<const uint16_t*>(p + (r - j0));
              const auto* vv = reinterpret_cast<const uint16_t*>(v);
              if (rows_dot)
                return dpbf16_gemm_rows(rows, D, n, pv, ld_s, vv, vr.row_stride, o, D, true, far_from(far, r, n));
              return bf16_gemm_rows(rows, D, n, pv, ld_s, vv, vr.row_stride, o, D, true, far_from(far, r, n));
            }
          gemm(rows, D, n, p + (r - j0), ld_s, v, vr.row_stride, o, D, true);  // O += P V
        });
      } else {
        acc_t* p = t.b.P.data();  // (rows, bc), ld as s
        for (int64_t r = 0; r < rows; ++r)
          online_softmax_row(t.b.rows[r], o + r * D, D, a, s + r * ld_s, bc, false, [&](acc_t m_ref, acc_t* x_max, acc_t* lp) {
            return *lp = exp_affine_sum(s + r * ld_s, bc, a, m_ref, p + r * ld_s, x_max);
          });
        if (v_staged) {  // O += P V, V staged in fp32
          if constexpr (std::is_same_v<acc_t, float>) {
            const float* vf = stage_tile(vr, j0, j1, t.b.Stage.data());
            if (avx2_panels)
              avx2_gemm_rows(RowType::kF32, rows, D, bc, p, ld_s, vf, D, o, D, true);
            else
              f32_gemm_rows(rows, D, bc, p, ld_s, vf, D, o, D, true);
          }
        } else if (v_in_place) {  // O += P V, V read in place, no packing
          // avx2_rows: the next tile's first run of key rows fetched into L2 alongside
          const RowsAhead next_keys =
              avx2_rows ? first_run(k_rows, b, hkv, j1, std::min(j1 + kBc, k_end)) : RowsAhead{};
          if constexpr (std::is_same_v<acc_t, float>)
            for_each_run(vr, b, hkv, j0, j1, [&](int64_t off, int64_t r, int64_t n) {
              if (avx2_rows)
                avx2_gemm_rows(row_type, rows, D, n, p + (r - j0), ld_s, vr.base + off * elem, vr.row_stride, o, D,
                               true, r == j0 ? next_keys : RowsAhead{});
              else if (f16_cache)
                f32_f16_gemm_rows(rows, D, n, p + (r - j0), ld_s, reinterpret_cast<const uint16_t*>(vr.base + off * elem),
                                  vr.row_stride, o, D, true, far_from(far_v, r, n));
              else
                f32_gemm_rows(rows, D, n, p + (r - j0), ld_s, reinterpret_cast<const float*>(vr.base + off * elem),
                              vr.row_stride, o, D, true, far_from(far, r, n));
            });
        } else {
          at::Tensor rO = at::from_blob(o, {rows, D}, acc_opts);
          rO.addmm_(at::from_blob(p, {rows, bc}, {ld_s, 1}, acc_opts), rV);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const SoftmaxRow<acc_t>& row = t.b.rows[r];
      if constexpr (std::is_same_v<acc_t, float>)
        if (pv_pairs_in_registers) pairs_order_to_columns(D, o + r * D);
      const bool empty = row.l == acc_t(0);  // no visible key: out 0, lse -inf
      scale_row(o + r * D, D, empty ? acc_t(0) : acc_t(1) / row.lp);
      const acc_t row_lse = empty ? kNegInf : row.m + std::log(row.l);
      if (may_fold && std::abs(row.m) > kFoldedScaleMax) too_large = true;
      const int64_t out_row = q_row0 + r;  // row (b, head, query) of out and lse
      if (splits > 1) {
        std::copy(o + r * D, o + (r + 1) * D, o_part.get() + (split * n_rows + out_row) * D);
        lse_part[split * n_rows + out_row] = row_lse;
      } else {
        out_rows.store(o + r * D, out_row);
        lse_ptr[out_row] = row_lse;
      }
    }
  });
  if (splits > 1) merge_splits(o_part.get(), lse_part.get(), splits, n_rows, D, out, lse_ptr);
  return too_large;
}

}  // namespace

void kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
               const std::vector<int64_t>& seqlens, const std::optional<at::Tensor>& block_table) {
  const int64_t n_new = k_new.size(2);
  const at::Tensor table = block_table ? block_table->contiguous() : at::Tensor();
  for (int64_t b = 0; b < k_new.size(0); ++b) {
    const int64_t s = seqlens[b];
    if (!block_table) {
      k_cache[b].slice(1, s, s + n_new).copy_(k_new[b]);
      v_cache[b].slice(1, s, s + n_new).copy_(v_new[b]);
      continue;
    }
    const int64_t page_size = k_cache.size(2);
    const int32_t* row = table.data_ptr<int32_t>() + b * table.stride(0);
    for (int64_t n = 0; n < n_new;) {  // runs of positions within one page
      const int64_t pos = s + n, page = row[pos / page_size], off = pos % page_size;
      const int64_t len = std::min(n_new - n, page_size - off);
      k_cache[page].slice(1, off, off + len).copy_(k_new[b].slice(1, n, n + len));
      v_cache[page].slice(1, off, off + len).copy_(v_new[b].slice(1, n, n + len));
      n += len;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const std::vector<int64_t>& n_keys,
                                               const std::vector<int64_t>& first_keys,
                                               const std::optional<at::Tensor>& block_table, const AttnOptions& opt,
                                               int64_t num_splits) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t B = q.size(0), Hkv = k_cache.size(1);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, q.size(1), q.size(2)}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  const int64_t longest = n_keys.empty() ? 0 : *std::max_element(n_keys.begin(), n_keys.end());
  if (num_splits == 0)  // enough items for the machines we know, each split at least kMinSplitKeys keys
    num_splits = std::max<int64_t>(1, std::min(ceil_div(kTargetItems, B * Hkv), longest / kMinSplitKeys));
  // Splits past the longest sequence's key tiles would be empty (the same bits without them) but
  // each holds a partial output as large as out.
  num_splits = std::min(num_splits, std::max<int64_t>(1, ceil_div(longest, kBc)));
  with_gemm_type(q.scalar_type(), [&](auto in) {
    using T = decltype(in);
    if (kvcache_impl<T>(q, k_cache, v_cache, n_keys, first_keys, block_table, opt, num_splits, false, out, lse))
      kvcache_impl<T>(q, k_cache, v_cache, n_keys, first_keys, block_table, opt, num_splits, true, out, lse);
  });
  return {out, lse};
}

}  // namespace flash_cuda::cpu
