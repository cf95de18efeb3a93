// Pieces of the CPU backend's tiled loops shared by its attention kernels (attention_cpu.cpp,
// kvcache_cpu.cpp): the work-item pool, tile loads, and the mask and score modifiers of a tile.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "../attn_options.h"
#include "../kernels/mask.h"
#include "cache_line.h"
#include "rowops.h"
#include "tile_gemm.h"

namespace flash_cuda::cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs work(item, scratch) for item in [0, n) on all intra-op threads. Items are handed
// out dynamically (causal tiles differ in cost), which keeps results deterministic
// because every item writes its own outputs and carries no state between items.
// OpenMP workers do not inherit the dispatcher's thread-local state: without the guard
// the tile ops below would run through autograd again on tensors that require grad. Each
// worker releases the AMX tiles its GEMMs held (release_tiles, tile_gemm.h) when it is done.
// Items that run outside an OpenMP team (one item; or inline, inside a caller's parallel_for) run
// their GEMMs sequential on their thread (SequentialGemms): outside a parallel region, the BLAS
// (MKL) and oneDNN that an item's ATen GEMMs call spread them over every thread, and their sums
// then round by the thread count (KV-cache results at one item differed from 3 threads on, where
// the README promises the same bits for any count, and a backward at another count than its
// forward missed its check of the forward's lse; an audit). A team of two with one thread idle
// did the same, but at the cost of waking that thread: 44 us decoding calls took 0.1 to 6 ms
// while other processes kept the cores busy. The price: one large item (B 1, one kv head, a
// chunked prefill of thousands of rows) no longer spreads its GEMMs over the threads.
template <typename MakeScratch, typename Work>
inline void parallel_items(int64_t n, MakeScratch make_scratch, Work work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    struct ReleaseTiles {  // also when an item throws
      ~ReleaseTiles() { release_tiles(); }
    } release;
    SequentialGemms sequential;  // (a no-op in a team: the items run in parallel there)
    auto scratch = make_scratch();
    for (int64_t item = next++; item < n; item = next++) work(item, scratch);
  });
}

// Rows [r0, r1) of a 2-D (N, D) slice as an acc_t tile: a view when the dtype already is
// acc_t, else converted into `buf` (a (rows, D) scratch tensor).
inline at::Tensor load_rows(const at::Tensor& x2d, int64_t r0, int64_t r1, const at::Tensor& buf) {
  at::Tensor rows = x2d.slice(0, r0, r1);
  if (rows.scalar_type() == buf.scalar_type()) return rows;
  at::Tensor dst = buf.slice(0, 0, r1 - r0);
  dst.copy_(rows);
  return dst;
}

// The score modifiers of one call in the accumulation type (the semantics of
// csrc/kernels/score_mod.h, applied a row at a time by modify_tile).
template <typename acc_t>
struct Mods {
  acc_t softcap = 0;
  const float* alibi = nullptr;  // slopes, [1 or B][Hq]
  int64_t alibi_bstride = 0;
  const acc_t* bias = nullptr;   // [B][Hq][Nq][Nk] with strides bs (0 on broadcast dims)
  int64_t bs[4] = {0, 0, 0, 0};
  acc_t* dbias = nullptr;        // transposed [B][Hq][Nk][dbias_ld >= Nq], or nullptr
  int64_t dbias_ld = 0;
  bool any = false;

  Mods(const AttnOptions& o, int64_t hq) {
    softcap = static_cast<acc_t>(o.softcap);
    if (o.alibi) alibi = o.alibi->data_ptr<float>(), alibi_bstride = o.alibi->size(0) == 1 ? 0 : hq;
    if (o.bias) {
      bias = o.bias->data_ptr<acc_t>();
      for (int d = 0; d < 4; ++d) bs[d] = o.bias->stride(d);
    }
    any = o.has_mods();
  }
};

// Scores s (rows, cols; leading dimension ld) of queries i0.. and keys j0.. of (b, h), scale
// included: keys outside the band become -inf (when `band_mask`), the visible ones get the
// modifiers, a row at a time in simple passes (rowops.h). dcap (same layout), when given,
// receives d(capped)/ds of each score.
template <typename acc_t>
inline void modify_tile(acc_t* s, acc_t* dcap, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, int64_t b,
                 int64_t h, const BandMask& band, bool band_mask, const Mods<acc_t>& mods) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t slope = mods.alibi ? static_cast<acc_t>(mods.alibi[b * mods.alibi_bstride + h]) : acc_t(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    acc_t* x = s + r * ld;
    // visible columns [c0, c1) of this row
    int64_t c0 = 0, c1 = cols;
    if (band_mask) {
      c0 = std::min<int64_t>(cols, std::max<int64_t>(0, band.first_key(i) - j0));
      c1 = std::max<int64_t>(c0, std::min<int64_t>(cols, band.last_key(i) + 1 - j0));
      std::fill(x, x + c0, kNegInf);
      std::fill(x + c1, x + cols, kNegInf);
    }
    acc_t* d = dcap ? dcap + r * ld : nullptr;
    if (d) std::fill(d, d + cols, acc_t(1));
    if (!mods.any || c1 == c0) continue;
    if (mods.softcap > 0) softcap_row(x + c0, d ? d + c0 : nullptr, c1 - c0, mods.softcap);
    if (mods.alibi) alibi_row(x + c0, c1 - c0, slope, j0 + c0 - (i + band.offset));
    if (mods.bias)
      add_row(x + c0, mods.bias + b * mods.bs[0] + h * mods.bs[1] + i * mods.bs[2] + (j0 + c0) * mods.bs[3], mods.bs[3],
              c1 - c0);
  }
}

}  // namespace flash_cuda::cpu
