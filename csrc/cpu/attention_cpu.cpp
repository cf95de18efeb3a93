// CPU backend: FlashAttention-2 (Dao, 2023) on ATen.
//
// Forward (Algorithm 1): each work item owns Br query rows of one head and streams the
// keys in tiles of Bc. Scores S = Q K^T come from a tile GEMM (tile_gemm.h); the online
// softmax (online_softmax.h) folds the scale into the exponent and keeps a reference max m,
// the row sum l and the unnormalised output, rescaled by exp(m_old - m_new) only when m moves;
// it is divided by the row sum once at the end, and lse = m + log(l) is saved for the
// backward pass. No Nq x Nk matrix is ever allocated: the extra memory is a few tiles per
// thread and the GEMM operands prepared once per call (O(N D)). Few query rows per kv group
// against more keys go through the KV-cache loop instead (takes_kvcache_loop).
//
// Backward (Algorithm 2, recomputation from lse): each work item owns a set of key tiles
// of one kv head and loops over the query tiles of every query head in its group, so dK
// and dV accumulate in per-thread tile buffers and are written once, without atomics.
// dQ is accumulated per key split into its own fp32 buffer and the splits are summed in
// a fixed order afterwards, so the result is bitwise reproducible.
//
// Causal masks and sliding windows (mask.h) limit the keys a query tile visits and the query
// rows a key tile visits; softcap, ALiBi and the additive bias are applied to each score tile
// after its GEMM (modify_tile), and the backward writes the bias gradient tile by tile.
// Dropout zeroes the dropped elements of each probability tile (its keep mask: philox.h, the bits
// the CUDA kernels draw) after the row sums, so lse is unaffected, and 1 / (1 - p) scales O at its
// normalisation and dV at its store, as in the CUDA kernels; the backward regenerates the mask.
//
// fp16/bf16 tiles are multiplied in their own precision with fp32 accumulation where the CPU
// has native dot products for them (P and dS rounded to the input dtype before their GEMMs, as
// the CUDA kernels round them), else converted to fp32 once per call; float64 runs the same
// algorithm in double so gradcheck can verify it.
#include "attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../empty_like.h"
#include "../kernels/mask.h"
#include "avx512_gemm.h"
#include "dropout_cpu.h"
#include "kvcache_cpu.h"
#include "online_softmax.h"
#include "rowops.h"
#include "scratch.h"
#include "tile_gemm.h"
#include "tiles.h"

namespace flash_cuda::cpu {
namespace {

// Tile sizes, measured on a 2-core Zen 4 against torch's CPU flash kernel (B=1, H=8,
// N in {1024, 4096}, D in {64, 128}). Tall query tiles amortise each K/V tile over more
// GEMM work: forward Br = 256 ran 1.1x (N = 4096) to 1.3x (N = 1024) faster than
// Br = 64. The fp32 score tile (512 KiB forward, 256 KiB backward) plus its operands
// fits the 1 MiB L2.
constexpr int64_t kFwdBr = 256;
constexpr int64_t kFwdBc = 512;
constexpr int64_t kBwdBr = 256;
constexpr int64_t kBwdBc = 256;
// A tile on the band's edge (a causal diagonal, a window's sides) goes in blocks of this many
// query rows, each multiplying and exponentiating only the keys its rows may see (from a
// boundary of as many keys: a micro-kernel panel): a causal diagonal tile then costs about half
// of a whole one. The backward's products over rows (dV, dK) go in blocks of as many keys.
constexpr int64_t kEdgeRows = 64;
// Query tiles whose dK and dV products sum apart in the backward before joining the head's sums
constexpr int64_t kTilesPerSum = 4;
// The backward's key splits each own a float dQ partial as large as dQ, so their count is bounded
// by memory as well as by the threads: the partials take at most this many dQs, or this many
// bytes where that is more (small problems keep every split). Splits by threads alone took
// 1 GiB at B = 1, H = 1, N = 32768, D = 64 on 64 threads (128 splits of 8 MiB), and a peak past
// the 1 GiB such a backward is promised from 16 threads on; 16 GiB at H 32, D 128.
constexpr int64_t kDqPartsPerDq = 4;
constexpr int64_t kDqPartsMinBytes = int64_t(64) << 20;
// Keys [c0, c1) of a tile of keys [j0, j1) (offsets in it) that some of the query rows [r0, r1)
// see, c0 on a kEdgeRows boundary, on the band's edge (`edge`); empty (c0 == c1) when they see
// none. Inside the band, the whole tile.
std::pair<int64_t, int64_t> edge_keys(bool edge, const BandMask& band, int64_t r0, int64_t r1, int64_t j0,
                                      int64_t j1, int64_t nk) {
  if (!edge) return {0, j1 - j0};
  const int64_t c0 = std::clamp(band.key_begin(r0, nk) / kEdgeRows * kEdgeRows, j0, j1);
  return {c0 - j0, std::clamp(band.key_end(r1, nk), c0, j1) - j0};
}
// Query rows [ra, rb) of a tile of rows [i0, i1) (offsets in it) that see some of the keys [k0, k1)
// on the band's edge; inside the band, the whole tile.
std::pair<int64_t, int64_t> edge_rows(bool edge, const BandMask& band, int64_t k0, int64_t k1, int64_t i0,
                                      int64_t i1, int64_t nq) {
  if (!edge) return {0, i1 - i0};
  const int64_t ra = std::clamp(band.row_begin(k0, nq), i0, i1);
  return {ra - i0, std::clamp(band.row_end(k1, nq), ra, i1) - i0};
}

// Packed blocks of the operands with D columns (V, K): every head dim up to 256 in one block.
constexpr int64_t kMaxBlockD = 256;

// Dropout of one call: the stream of (b, h) and the multiplier of kept values. As in the CUDA
// kernels (and FlashAttention-2), P is rounded for its GEMMs as it is and only zeroed where dropped,
// and 1 / (1 - p) multiplies the fp32 results (O's normalisation, dV at its store): multiplied into
// P before the rounding, a bf16 P V took a second rounding of every kept P (1.1e-2 off float64 where
// plain bf16 torch was 4.6e-3 off, a soak's draw).
template <typename acc_t>
struct Drop {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  int64_t batch0 = 0, hq = 1;
  acc_t scale = 1;  // 1 / (1 - p), 1 without dropout

  Drop(const AttnOptions& o, int64_t heads) : on(o.dropout()), batch0(o.dropout_batch0), hq(heads) {
    if (!on) return;
    const int64_t* st = o.rng_state->data_ptr<int64_t>();  // a CPU tensor here
    seed = uint64_t(st[0]), offset = uint64_t(st[1]);
    threshold = dropout_threshold(o.dropout_p);
    scale = acc_t(1.0 / (1.0 - o.dropout_p));
  }
  // z (rows x cols, leading dimension ld) = `kept` where query i0 + r, key j0 + c of (b, h) is kept, else 0
  void tile(acc_t* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, int64_t b, int64_t h,
            acc_t kept) const {
    dropout_tile(z, ld, rows, cols, i0, j0, PhiloxStream::make(seed, offset, (batch0 + b) * hq + h, threshold), kept);
  }
};

// GEMM operands, prepared once per call in O(N D): in the GEMM dtype, rows with unit stride
// (x itself where it has them, else a copy from the scratch cache, scratch.h).
at::Tensor rows_operand(const at::Tensor& x, at::ScalarType dtype) { return scratch_rows(x, dtype); }
// rows (B, H, N, D), a rows_operand, as (B, H, D, N), contiguous: the left operand of Q^T dS and
// dO^T P. fp32 on AVX-512: transposed head by head in 16 x 16 blocks of words (transpose()), in
// parallel; ATen's transposing copy ran on one thread (fp32 forward + backward at N = 1024, D =
// 128 on a Zen 4: 4.9 ms of ATen copies in 80 ms, with those of dK and dV below).
at::Tensor transposed_operand(const at::Tensor& rows) {
  if (rows.transpose(2, 3).is_contiguous()) return rows.transpose(2, 3);
  const int64_t B = rows.size(0), H = rows.size(1), N = rows.size(2), D = rows.size(3);
  at::Tensor y = scratch_empty({B, H, D, N}, rows.scalar_type());
  if (rows.scalar_type() != at::kFloat || !f32_gemm_supported()) return y.copy_(rows.transpose(2, 3));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      transpose(N, D, rows.data_ptr<float>() + i / H * rows.stride(0) + i % H * rows.stride(1), rows.stride(2),
                y.data_ptr<float>() + i * D * N, N);
  });
  return y;
}
// x (B, H, N, D) as a (B, H, D, N) view of its rows in the GEMM dtype (unit stride in D): a
// RightOperand packs it straight from the rows (for AMX, and for the micro-kernels where the rows
// hold whole words) and copies it only for the other paths.
at::Tensor transposed_view(const at::Tensor& x, at::ScalarType dtype) {
  return rows_operand(x, dtype).transpose(2, 3);
}
// Row `row` of head (b, h) of a (B, H, N, D) operand; column `col` of a transposed (B, H, D, N) one.
template <typename T>
const T* at_row(const at::Tensor& x, int64_t b, int64_t h, int64_t row) {
  return x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1) + row * x.stride(2);
}
template <typename T>
const T* at_col(const at::Tensor& xt, int64_t b, int64_t h, int64_t col) {
  return xt.data_ptr<T>() + b * xt.stride(0) + h * xt.stride(1) + col;
}

// The tile x (rows, cols; ld) as an in_t GEMM operand: x itself when in_t is its type, else
// rounded into buf (ld as x), as the CUDA kernels round P and dS before their GEMMs.
template <typename in_t, typename acc_t>
const in_t* gemm_operand(const acc_t* x, int64_t ld, int64_t rows, int64_t cols, TileVector<in_t>& buf) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    return x;
  } else {
    auto* y = reinterpret_cast<uint16_t*>(buf.data());
    for (int64_t r = 0; r < rows; ++r) {
      if constexpr (std::is_same_v<in_t, c10::BFloat16>)
        round_bf16(x + r * ld, cols, y + r * ld);
      else
        round_fp16(x + r * ld, cols, y + r * ld);
    }
    return buf.data();
  }
}

// x[r][c] = 0 for the rows r < rows of a tile with leading dimension ld.
template <typename T>
void zero_column(T* x, int64_t ld, int64_t rows, int64_t c) {
  for (int64_t r = 0; r < rows; ++r) x[r * ld + c] = T(0);
}

// Rows i0 .. i0 + rows of head (b, h) of out (unit stride in D) = o (rows x D, acc_t) in out's
// dtype, rounded to nearest even as a tensor copy rounds. Plain loops: a slice and a copy per
// work item (tensors made, the dispatcher run) measured 1.04x-1.06x slower forwards at N = 1024.
template <typename acc_t>
void store_rows(const acc_t* o, int64_t rows, int64_t D, at::Tensor& out, int64_t b, int64_t h, int64_t i0) {
  TORCH_INTERNAL_ASSERT(out.stride(3) == 1, "store_rows: unit stride in D");
  const int64_t ld = out.stride(2);
  const int64_t offset = b * out.stride(0) + h * out.stride(1) + i0 * ld;
  const auto dtype = out.scalar_type();
  if (dtype == c10::CppTypeToScalarType<acc_t>::value) {
    acc_t* y = out.data_ptr<acc_t>() + offset;
    for (int64_t r = 0; r < rows; ++r) std::copy(o + r * D, o + (r + 1) * D, y + r * ld);
  } else if constexpr (std::is_same_v<acc_t, float>) {
    TORCH_INTERNAL_ASSERT(dtype == at::kBFloat16 || dtype == at::kHalf, "store_rows: a 16-bit output");
    auto* y = static_cast<uint16_t*>(out.data_ptr()) + offset;
    for (int64_t r = 0; r < rows; ++r) {
      if (dtype == at::kBFloat16)
        round_bf16(o + r * D, D, y + r * ld);
      else
        round_fp16(o + r * D, D, y + r * ld);
    }
  }
}

// The tiled forward and backward prepare their GEMM operands (in the GEMM dtype, K^T, V and the
// like packed for the micro-kernels or AMX; the backward's dQ partials) for a chunk of (batch, kv
// head) pairs at a time, not for the whole call: at B 1, H 8, N 8192, D 128 the forward's took
// 64 MiB in fp32 and 160 MiB in fp16 on a CPU that multiplies it in fp32 (Q, K and V converted,
// then K^T and V packed) beside a 32 (16) MiB output, where torch's CPU flash kernel needs little
// beyond its output. A chunk is whole batches or some kv heads of one batch (views of the
// inputs). Each chunk ends at a barrier, where threads wait for its last items, so the chunks
// are the smallest whose work, modelled as items of equal cost dealt one a thread per round,
// takes no more rounds than the whole call's (dealt unchunked: a review found 1.6x as many
// rounds at 16 threads with chunks cut by memory alone), with at least items_per_thread items a
// thread (the forward's query tiles differ in cost under a causal mask: kFwdChunkItems; the
// backward's items are a kv head's keys or a round-robin share of them: kBwdChunkItems), and no
// smaller than operands of kScratchMaxBlock (rows: the larger of a kv group's query rows and the
// keys; padding not counted), which come back from the scratch cache (scratch.h) already mapped
// for the next chunk. Calls whose operands are below kChunkMinOperand a pair (short sequences,
// where per-call costs count: README, "Short sequences on the CPU") keep one chunk. Returns
// (batches, kv heads) per chunk. Every chunking gives the same bits (each item's work is the same).
constexpr int64_t kFwdChunkItems = 8, kBwdChunkItems = 1;
constexpr int64_t kChunkMinOperand = int64_t(1) << 20;
std::atomic<int64_t> forced_chunk_pairs{0};  // force_chunk_pairs (tests)
template <typename in_t>
std::pair<int64_t, int64_t> operand_chunk(int64_t B, int64_t Hkv, int64_t rows, int64_t D, int64_t items_per_pair,
                                          int64_t items_per_thread) {
  const int64_t forced = forced_chunk_pairs.load();
  if (forced > 0) return forced < Hkv ? std::pair{int64_t(1), forced} : std::pair{std::min(B, forced / Hkv), Hkv};
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t operand = std::max<int64_t>(1, rows * D * int64_t(sizeof(in_t)));
  if (operand < kChunkMinOperand) return {B, Hkv};
  const int64_t min_pairs = std::min(B * Hkv, std::max({int64_t(1), int64_t(kScratchMaxBlock) / operand,
                                                         ceil_div(items_per_thread * threads, items_per_pair)}));
  const auto rounds = [&](int64_t pairs) { return ceil_div(pairs * items_per_pair, threads); };
  const int64_t whole = rounds(B * Hkv);
  // rounds of chunks of n kv heads of a batch, or of n batches (the last chunk of each the rest)
  const auto head_rounds = [&](int64_t n) { return B * (Hkv / n * rounds(n) + (Hkv % n ? rounds(Hkv % n) : 0)); };
  const auto batch_rounds = [&](int64_t n) { return B / n * rounds(n * Hkv) + (B % n ? rounds(B % n * Hkv) : 0); };
  for (int64_t n = std::max<int64_t>(1, min_pairs); n < Hkv; ++n)
    if (head_rounds(n) <= whole) return {1, n};
  for (int64_t n = std::max<int64_t>(1, ceil_div(min_pairs, Hkv)); n < B; ++n)
    if (batch_rounds(n) <= whole) return {n, Hkv};
  return {B, Hkv};
}

// in_t: the dtype of the tile GEMMs' operands (tile_gemm.h); acc_t: of their products and of
// the softmax (float, or double for double). prescale: the scale applied to every score tile
// first. Returns whether a row's max score exceeded kFoldedScaleMax with the scale folded into
// the exponent (the caller then runs it again prescaled).
template <typename in_t>
bool fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              at::Tensor& lse, const AttnOptions& opt, bool prescale) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), group = Hq / Hkv;
  const int64_t n_qtiles = ceil_div(Nq, kFwdBr);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t scale = static_cast<acc_t>(opt.scale);
  const BandMask band = opt.band(Nq, Nk);
  const Mods<acc_t> mods(opt, Hq);
  const Drop<acc_t> drop(opt, Hq);
  const auto in_dtype = c10::CppTypeToScalarType<in_t>::value;
  const auto [chunk_batches, chunk_kv_heads] =
      operand_chunk<in_t>(B, Hkv, std::max(group * Nq, Nk), D, n_qtiles * group, kFwdChunkItems);
  constexpr int64_t kKeyAlign = RightOperand<in_t>::kBlock;  // key tiles start at micro-kernel panels
  static_assert(kEdgeRows % kKeyAlign == 0, "an edge block's keys start at a micro-kernel panel");

  // Probabilities: rounded straight into P for fp16/bf16 GEMMs (dropout then zeroes the dropped
  // ones there), else in Pf. The scores S stay intact for a redone row.
  constexpr bool rounded = !std::is_same_v<in_t, acc_t>;
  struct Scratch {
    TileVector<acc_t> S, Pf, O, Z;  // scores, probabilities (Br, Bc), unnormalised out (Br, D), dropout (Br, Bc)
    TileVector<in_t> P;             // probabilities as the P V operand (Br, Bc), when in_t != acc_t
    std::vector<SoftmaxRow<acc_t>> rows;  // online_softmax.h, (Br)
  };
  auto make_scratch = [&] {
    constexpr int64_t tile = kFwdBr * kFwdBc;
    return Scratch{TileVector<acc_t>(tile), TileVector<acc_t>(rounded ? 0 : tile), TileVector<acc_t>(kFwdBr * D),
                   TileVector<acc_t>(drop.on ? tile : 0), TileVector<in_t>(rounded ? tile : 0),
                   std::vector<SoftmaxRow<acc_t>>(kFwdBr)};
  };
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  // Whether some tile may fold the scale into the exponent (else every tile is prescaled already:
  // a fully masked row's max at a mask of finfo.min needs no second run).
  const bool may_fold = !prescale && !mods.any && scale > 0;
  std::atomic<bool> too_large{false};

  // The operands of one chunk of (batch, kv head) pairs (operand_chunk) at a time, its items in
  // parallel: head by head, so the items a thread takes in turn read the same head's K^T and V
  // (from its L2, not L3: 1.06x-1.07x faster bf16 forwards at D = 128 on a Xeon with AMX than
  // items taken across the heads); within a head the heaviest query tiles first (under a causal
  // mask later rows see more keys), so the last items handed out are light ones.
  for (int64_t b0 = 0; b0 < B; b0 += chunk_batches)
    for (int64_t g0 = 0; g0 < Hkv; g0 += chunk_kv_heads) {
      const int64_t nb = std::min(chunk_batches, B - b0), nkv = std::min(chunk_kv_heads, Hkv - g0), nh = nkv * group;
      const at::Tensor gQ = rows_operand(q.narrow(0, b0, nb).narrow(1, g0 * group, nh), in_dtype);  // (nb, nh, Nq, D)
      const int64_t ld_q = gQ.stride(2);
      // K^T (D x Nk) and V (Nk x D) per kv head of the chunk; K^T packed only for an even D (Q rows
      // have no zero column to pad an odd one with).
      const at::Tensor k_chunk = k.narrow(0, b0, nb).narrow(1, g0, nkv);
      const at::Tensor v_chunk = v.narrow(0, b0, nb).narrow(1, g0, nkv);
      const RightOperand<in_t> gKt(transposed_view(k_chunk, in_dtype), D % 2 == 0, kFwdBc),
          gV(rows_operand(v_chunk, in_dtype), true, kMaxBlockD);
      parallel_items(nb * nh * n_qtiles, make_scratch, [&](int64_t item, Scratch& t) {
        const int64_t bh_local = item / n_qtiles, qt = n_qtiles - 1 - item % n_qtiles;
        const int64_t lb = bh_local / nh, lh = bh_local % nh, lkv = lh / group;  // in the chunk
        const int64_t b = b0 + lb, h = g0 * group + lh, bh = b * Hq + h;
        const int64_t i0 = qt * kFwdBr, i1 = std::min(i0 + kFwdBr, Nq), br = i1 - i0;
        const in_t* gQi = at_row<in_t>(gQ, lb, lh, i0);  // (br, D)
        acc_t* o = t.O.data();                            // (br, D), unnormalised
        std::fill(o, o + br * D, acc_t(0));
        std::fill(t.rows.begin(), t.rows.end(), SoftmaxRow<acc_t>{});
        constexpr int64_t ld_s = kFwdBc;
        acc_t* s = t.S.data();    // (br, bc)
        acc_t* pf = t.Pf.data();  // (br, bc), unless rounded

        // Only the keys some row of the tile sees (a window: a band of width left + right + br).
        const int64_t key_end = band.key_end(i1, Nk);
        for (int64_t j0 = band.key_begin(i0, Nk) / kKeyAlign * kKeyAlign; j0 < key_end; j0 += kFwdBc) {
          const int64_t j1 = std::min(j0 + kFwdBc, key_end);
          const bool band_mask = band.tile_needs_mask(i0, i1, j0, j1);
          // The scale is folded into the exponent (exp(scale s - m)) unless the modifiers need the
          // scaled scores or a scale <= 0 turns the row max into a row min.
          const bool prescaled = prescale || band_mask || mods.any || !(scale > 0);
          const acc_t a = prescaled ? acc_t(1) : scale;
          const int64_t block_rows = band_mask ? kEdgeRows : br;
          for (int64_t r0 = 0; r0 < br; r0 += block_rows) {
            // rows r0 .. r0 + rows of the tile against the keys c0 .. c1 of it that some of them see
            const int64_t rows = std::min(block_rows, br - r0);
            const auto [c0, c1] = edge_keys(band_mask, band, i0 + r0, i0 + r0 + rows, j0, j1, Nk);
            if (c1 == c0) continue;  // none of these rows sees a key of this tile
            const int64_t cols = c1 - c0, jb = j0 + c0;
            acc_t* sb = s + r0 * ld_s + c0;  // (rows, cols)
            gKt.gemm(lb, lkv, rows, gQi + r0 * ld_q, ld_q, 0, D, jb, cols, sb, ld_s, false);  // S = Q K^T
            if (prescaled) {
              for (int64_t r = 0; r < rows; ++r) scale_row(sb + r * ld_s, cols, scale);
              if (band_mask || mods.any)
                modify_tile<acc_t>(sb, nullptr, ld_s, rows, cols, i0 + r0, jb, b, h, band, band_mask, mods);
            }
            const int64_t at = r0 * ld_s + c0;  // the block in the (Br, Bc) tiles
            for (int64_t r = 0; r < rows; ++r) {
              const acc_t* x = sb + r * ld_s;
              online_softmax_row(t.rows[r0 + r], o + (r0 + r) * D, D, a, x, cols, rounded,
                                 [&](acc_t m_ref, acc_t* x_max, acc_t* lp) {
                                   if constexpr (rounded)
                                     return exp_affine_sum_to(x, cols, a, m_ref, t.P.data() + at + r * ld_s, x_max,
                                                              lp);
                                   const acc_t l = exp_affine_sum(x, cols, a, m_ref, pf + at + r * ld_s, x_max);
                                   *lp = l;
                                   return l;
                                 });
            }
            if (drop.on) {  // P <- P Z, Z the keep mask (after the row sums, as on the GPU: lse is unaffected)
              acc_t* z = t.Z.data() + at;
              drop.tile(z, kFwdBc, rows, cols, i0 + r0, jb, b, h, acc_t(1));
              for (int64_t r = 0; r < rows; ++r) {
                if constexpr (rounded)
                  keep_row(reinterpret_cast<uint16_t*>(t.P.data() + at + r * ld_s), z + r * kFwdBc, cols);
                else
                  keep_row(pf + at + r * ld_s, z + r * kFwdBc, cols);
              }
            }
            // (rows, cols): in P where the exponent pass rounded it, else Pf itself (fp32, float64)
            const in_t* p = rounded ? t.P.data() + at : gemm_operand<in_t>(pf + at, ld_s, rows, cols, t.P);
            // (the packed V's pad row)
            if (cols % 2 && !t.P.empty()) zero_column(const_cast<in_t*>(p), ld_s, rows, cols);
            gV.gemm(lb, lkv, rows, p, ld_s, jb, cols, 0, D, o + r0 * D, D, true);  // O += P V
          }
        }

        for (int64_t r = 0; r < br; ++r) {
          const SoftmaxRow<acc_t>& row = t.rows[r];
          const bool empty = row.l == acc_t(0);  // the row sees no key: out 0, lse -inf
          scale_row(o + r * D, D, empty ? acc_t(0) : drop.scale / row.lp);  // kept values / (1 - p)
          lse_ptr[bh * Nq + i0 + r] = empty ? kNegInf : row.m + std::log(row.l);
          if (may_fold && std::abs(row.m) > kFoldedScaleMax) too_large = true;
        }
        store_rows(o, br, D, out, b, h, i0);
      });
    }
  return too_large;
}

// The D_i of row i's dS = P o (dP - D) (delta: rowsum(dO o O) - dlse), given the row's P and dP
// over the keys of this tile (n).
// A one-hot row (one nonzero P: one key visible, or the others' exponentials 0) has an exact P_ij
// of 1 and D_i = sum_j P_ij dP_ij = dP_ij, which rowsum(dO o O) misses by the rounding of this
// tile's dP GEMM; dS_ij = P_ij (dP_ij - D_i) would carry that into dQ and dK, whose exact
// gradient (and plain torch's) is 0 there, less what flows into lse. So there P_ij becomes 1 and
// D_i dP_ij - dlse_i. Where the tile holds all the keys the row sees (whole_row), P_ij recomputed
// as exp(s - lse) misses 1 by the scores' rounding between the forward and the backward's GEMM (up
// to 36 eps |lse| in the soaks' draws); a P further from 1 (or NaN) means lse covered other keys
// (bwd per key chunk with the whole forward's lse, as ring attention calls it) and keeps delta.
// Where the row has keys in other tiles too, a P near 1 may leave them weight delta_o (1 - P,
// which exp(s - lse)'s slack at large |lse| hid: dQ 0.04 off at scores of 100, an audit), and P
// within a few ulps of 1 does not bound it either: lse = m + log(l) drops any delta_o below half
// an ulp of lse (1000: 3e-5), where exp(s - lse) gives 1 (dQ and dK 100% off at scores of 1000
// and a second key 11 below, a review). There D_i itself tells: rowsum(dO o O) is dO . v_j (times
// the dropout's multiplier Z_j, keep / (1 - p)) up to O's rounding where the others' weight is 0, and misses it by
// delta_o (dP_j - dP_other) where it is not. exact(j): (dO . v_j Z_j, sum |dO_d v_jd Z_j|) in
// float64; eps_out: the epsilon of O's dtype.
template <typename acc_t, typename ExactDot>
acc_t row_delta(acc_t* p, const acc_t* dp, int64_t n, bool whole_row, acc_t delta, acc_t lse, acc_t dlse,
                double eps_out, ExactDot exact) {
  constexpr acc_t kEps = std::numeric_limits<acc_t>::epsilon();
  const acc_t slack = whole_row ? 128 * kEps * std::max(acc_t(1), std::abs(lse)) : 4 * kEps;
  const int64_t one = single_nonzero(p, n);
  if (one < 0 || !(std::abs(p[one] - acc_t(1)) <= slack)) return delta;
  if (!whole_row) {
    const auto [dot, magnitude] = exact(one);
    const double tol = 4 * eps_out * magnitude + 4 * double(kEps) * (std::abs(double(delta)) + std::abs(double(dlse)));
    if (!(std::abs(dot - double(dlse) - double(delta)) <= tol)) return delta;
  }
  p[one] = acc_t(1);
  return dp[one] - dlse;
}

// (sum_d dO_d v_d, sum_d |dO_d v_d|) in float64 (exact products) for key row `v_row` of v's dtype,
// element stride vs, against dO's row (D values).
template <typename T>
std::pair<double, double> key_dot_f64(const at::Tensor& v, const void* v_row, int64_t vs, const T* dO, int64_t D) {
  double dot = 0, magnitude = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "key_dot_f64", [&] {
    const scalar_t* x = static_cast<const scalar_t*>(v_row);
    for (int64_t d = 0; d < D; ++d) {
      const double t = double(dO[d]) * double(x[d * vs]);
      dot += t, magnitude += std::abs(t);
    }
  });
  return {dot, magnitude};
}

template <typename in_t>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& dlse,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const at::Tensor& dbias,
              const AttnOptions& opt) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), group = Hq / Hkv;
  const int64_t n_ktiles = ceil_div(Nk, kBwdBc);
  const acc_t scale = static_cast<acc_t>(opt.scale);
  const BandMask band = opt.band(Nq, Nk);
  Mods<acc_t> mods(opt, Hq);
  mods.dbias = dbias.defined() ? dbias.data_ptr<acc_t>() : nullptr;
  mods.dbias_ld = dbias.defined() ? dbias.stride(3) : 0;
  const Drop<acc_t> drop(opt, Hq);
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto in_dtype = c10::CppTypeToScalarType<in_t>::value;
  // O's dtype (q's: fp16 on the float GEMMs too), for row_delta's test of D_i
  const double eps_out = q.scalar_type() == at::kHalf       ? std::ldexp(1.0, -10)
                         : q.scalar_type() == at::kBFloat16 ? std::ldexp(1.0, -7)
                         : q.scalar_type() == at::kFloat    ? std::ldexp(1.0, -23)
                                                            : std::ldexp(1.0, -52);
  // Every GEMM below multiplies row-major operands, so the transposed ones are made once here
  // (those that the products below use):
  //   S = Q K^T, dP = dO V^T, dV^T += dO^T P, dK^T += Q^T dS, dQ += dS K.
  // The right operands shared by every tile (K^T, V^T, K) are RightOperand objects (packed on AMX).
  // fp32 on the micro-kernel (rows_dkdv): dV += P^T dO and dK += dS^T Q instead, into (Bc, D) rows,
  // the kernel reading the P and dS tiles transposed where they are and dO and Q as their rows
  // (f32_gemm_at_rows): no transposed Q and dO, no P and dS packed per tile, no dK and dV tiles
  // transposed back. The sums run over the query rows in the same order as before (the same bits,
  // but where fewer than 16 keys went to the BLAS). In-process A/B on a Zen 4 (2 threads): the
  // backward 1.12x-1.17x faster from 32 to 256 tokens (fp32; 1.11x-1.16x for fp16, multiplied in
  // fp32 there), 0.997x-1.014x at 1024 and 2048.
  const bool rows_dkdv = std::is_same_v<in_t, float> && use_avx512_f32();
  static_assert(kBwdBc % RightOperand<in_t>::kBlock == 0, "key tiles start at micro-kernel panels");
  static_assert(kEdgeRows % RightOperand<in_t>::kBlock == 0, "an edge block's keys start at a micro-kernel panel");

  // Enough (b, kv head, key split) items to keep every thread busy, as memory allows; each split
  // owns a dQ partial, summed in split order below.
  const int64_t threads = at::get_num_threads();
  const int64_t dq_bytes = std::max<int64_t>(1, B * Hq * Nq * D * int64_t(sizeof(acc_t)));
  const int64_t max_splits = std::max(kDqPartsPerDq, kDqPartsMinBytes / dq_bytes);
  const int64_t n_splits =
      std::max<int64_t>(1, std::min({n_ktiles, ceil_div(4 * threads, B * Hkv), max_splits}));
  const auto [chunk_batches, chunk_kv_heads] =
      operand_chunk<in_t>(B, Hkv, std::max(group * Nq, Nk), D, n_splits, kBwdChunkItems);
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* delta_ptr = delta.data_ptr<acc_t>();
  // P = exp(S - lse) is recomputed from the scores scaled and rounded first, fl(scale s), as
  // plain torch rounds them, not with the scale folded into the exponent's FMA as the forward
  // folds it: lse = m + log(l) keeps the forward's m = fl(scale s_max) and not the residue
  // scale s_max - m its exponents carried (below half an ulp of lse, lost in its rounding), so
  // folded, P at a saturated row's max was exp(residue), up to half an ulp of lse from 1: dV 62x
  // torch's CPU flash kernel's error at scores of a few hundred (fp32, D 32, one query row, any
  // scale not a power of two; an audit). Rounded, the max's exponent is exactly 0 where lse is m
  // (the others' weight and the residue below half an ulp of lse; where they pass it, lse is m's
  // neighbour and P an ulp of lse from 1, as in torch's flash kernel), and past kFoldedScaleMax
  // (where the forward ran prescaled) the scores are the forward's own.
  // A multiply per score, against 5 D multiply-adds of the tile's five GEMMs.
  const acc_t* dlse_ptr = dlse.defined() ? dlse.data_ptr<acc_t>() : nullptr;

  // dK and dV tiles (float) stored by store_rows where their rows have unit stride (transposed
  // back first by transpose(), one pass on AVX-512, unless rows_dkdv), else by ATen's copy
  const bool fast_store = std::is_same_v<acc_t, float> && f32_gemm_supported() && dk.stride(3) == 1 &&
                          dv.stride(3) == 1;
  struct Scratch {
    TileVector<acc_t> S, dP, dK, dV, Cap, Z;    // (Br, Bc) tiles, dK^T and dV^T (D, ld_t; rows_dkdv: (Bc, D))
    TileVector<acc_t> dKh, dVh;                 // GQA: one query head's part of dK^T and dV^T (as dK, dV)
    TileVector<acc_t> dKb, dVb;                 // up to kTilesPerSum query tiles' part of it (as dK, dV)
    TileVector<float> T;                        // fast_store without rows_dkdv: dK or dV (Bc, D), transposed back
    TileVector<in_t> P, dS;                     // P and dS as GEMM operands (Br, Bc), when in_t != acc_t
  };
  const bool rounded = !std::is_same_v<in_t, acc_t>;
  // The (Br, Bc) tiles sized to the query rows a tile can have (still kBwdBc wide), dK^T, dV^T and
  // T to its keys: at short sequences, allocating and zeroing whole tiles (704 KiB at D = 64 in
  // fp32) was most of the call.
  const int64_t tile = std::min(kBwdBr, Nq) * kBwdBc, tile_keys = std::min(kBwdBc, Nk);
  const int64_t ld_t = std::min(kBwdBc, ceil_div(Nk, 16) * 16);  // of dK^T and dV^T: a tile's keys, whole lines
  auto make_scratch = [&] {
    return Scratch{TileVector<acc_t>(tile), TileVector<acc_t>(tile), TileVector<acc_t>(D * ld_t),
                   TileVector<acc_t>(D * ld_t), TileVector<acc_t>(opt.softcap > 0 ? tile : 0),
                   TileVector<acc_t>(drop.on ? tile : 0), TileVector<acc_t>(group > 1 ? D * ld_t : 0),
                   TileVector<acc_t>(group > 1 ? D * ld_t : 0), TileVector<acc_t>(D * ld_t), TileVector<acc_t>(D * ld_t),
                   TileVector<float>(fast_store && !rows_dkdv ? tile_keys * D : 0),
                   TileVector<in_t>(rounded ? tile : 0), TileVector<in_t>(rounded ? tile : 0)};
  };

  // The operands of one chunk of (batch, kv head) pairs at a time (operand_chunk), its items in
  // parallel.
  for (int64_t b0 = 0; b0 < B; b0 += chunk_batches)
    for (int64_t g0 = 0; g0 < Hkv; g0 += chunk_kv_heads) {
      const int64_t nb = std::min(chunk_batches, B - b0), nkv = std::min(chunk_kv_heads, Hkv - g0), nh = nkv * group;
      const auto chunk_of = [&](const at::Tensor& x, int64_t h0, int64_t heads) {
        return x.narrow(0, b0, nb).narrow(1, h0, heads);
      };
      const at::Tensor gQ = rows_operand(chunk_of(q, g0 * group, nh), in_dtype);  // (nb, nh, Nq, D)
      const at::Tensor gdO = rows_operand(chunk_of(dout, g0 * group, nh), in_dtype);
      const at::Tensor gQt = rows_dkdv ? at::Tensor() : transposed_operand(gQ);  // (nb, nh, D, Nq)
      const at::Tensor gdOt = rows_dkdv ? at::Tensor() : transposed_operand(gdO);
      // per kv head: K^T (D, Nk), V^T (D, Nk), K (Nk, D)
      const RightOperand<in_t> gKt(transposed_view(chunk_of(k, g0, nkv), in_dtype), D % 2 == 0, kBwdBc),
          gVt(transposed_view(chunk_of(v, g0, nkv), in_dtype), D % 2 == 0, kBwdBc),
          gK(rows_operand(chunk_of(k, g0, nkv), in_dtype), true, kMaxBlockD);
      const int64_t ld_q = gQ.stride(2), ld_do = gdO.stride(2);
      at::Tensor dq_parts = scratch_empty({n_splits, nb, nh, Nq, D}, c10::CppTypeToScalarType<acc_t>::value).zero_();
      acc_t* dq_parts_ptr = dq_parts.data_ptr<acc_t>();  // contiguous (n_splits, nb, nh, Nq, D)
      parallel_items(nb * nkv * n_splits, make_scratch, [&](int64_t item, Scratch& t) {
        const int64_t split = item % n_splits, pair = item / n_splits;
        const int64_t lb = pair / nkv, lkv = pair % nkv, b = b0 + lb, hkv = g0 + lkv;  // lb, lkv: in the chunk
        constexpr int64_t ld = kBwdBc;      // of every (Br, Bc) tile
        acc_t* dK = t.dK.data();            // dK^T (D, bc), ld_t, unscaled Q^T dS; rows_dkdv: dK (bc, D), dS^T Q
        acc_t* dV = t.dV.data();            // dV^T (D, bc), ld_t; rows_dkdv: dV (bc, D)
        // Key tiles are dealt round-robin to the splits, which balances causal work.
        for (int64_t kt = split; kt < n_ktiles; kt += n_splits) {
          const int64_t j0 = kt * kBwdBc, j1 = std::min(j0 + kBwdBc, Nk), bc = j1 - j0;
          std::fill(t.dK.begin(), t.dK.end(), acc_t(0));
          std::fill(t.dV.begin(), t.dV.end(), acc_t(0));
          std::fill(t.dKb.begin(), t.dKb.end(), acc_t(0));
          std::fill(t.dVb.begin(), t.dVb.end(), acc_t(0));
          // Only the query rows that see some key of the tile (a window: a band).
          const int64_t i_first = band.row_begin(j0, Nq) / kBwdBr * kBwdBr, i_end = band.row_end(j1, Nq);

          for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
            const int64_t lh = h - g0 * group;  // in the chunk
            acc_t* gdQ = dq_parts_ptr + ((split * nb + lb) * nh + lh) * Nq * D;  // (Nq, D), unscaled dS K
            // dK and dV sum in levels: the products of kTilesPerSum query tiles (dKb, dVb), their sums
            // over the head's rows (dKs, dVs), with GQA each query head's sums into the kv head's
            // (plain torch's order: per-head products summed over the group). One running sum over
            // every row of the group's heads had up to 14x plain torch's fp32 error at 16 heads of 8k
            // rows, one per head 16x at 8k rows and 4 keys on the BLAS path (audit).
            acc_t* dKs = group > 1 ? t.dKh.data() : dK;  // this head's dK^T and dV^T sums (as dK, dV)
            acc_t* dVs = group > 1 ? t.dVh.data() : dV;
            acc_t *dKb = t.dKb.data(), *dVb = t.dVb.data();
            if (group > 1) {
              std::fill(t.dKh.begin(), t.dKh.end(), acc_t(0));
              std::fill(t.dVh.begin(), t.dVh.end(), acc_t(0));
            }
            // (dKb, dVb are zero here: filled at the key tile's start, and each head ends with an add_block)
            int64_t tiles_in_block = 0;
            auto add_block = [&] {
              add_row(dKs, dKb, 1, D * ld_t);
              add_row(dVs, dVb, 1, D * ld_t);
              std::fill(t.dKb.begin(), t.dKb.end(), acc_t(0));
              std::fill(t.dVb.begin(), t.dVb.end(), acc_t(0));
              tiles_in_block = 0;
            };
            for (int64_t i0 = i_first; i0 < i_end; i0 += kBwdBr) {
              const int64_t i1 = std::min(i0 + kBwdBr, Nq), br = i1 - i0;
              const bool band_mask = band.tile_needs_mask(i0, i1, j0, j1);
              const bool modified = band_mask || mods.any;
              const int64_t row0 = (b * Hq + h) * Nq + i0;
              acc_t* p = t.S.data();                                   // (br, bc): S, then P
              acc_t* ds = t.dP.data();                                 // (br, bc): dP, then dS
              acc_t* cap = opt.softcap > 0 ? t.Cap.data() : nullptr;  // d(capped)/ds, ld as p
              acc_t* z = drop.on ? t.Z.data() : nullptr;              // dropout multipliers Z, ld as p
              // A tile on the band's edge in blocks of kEdgeRows query rows over the keys they see (as
              // the forward); P and dS are 0 outside them, for the products over the whole tile.
              const int64_t block_rows = band_mask ? kEdgeRows : br, block_keys = band_mask ? kEdgeRows : bc;
              for (int64_t r0 = 0; r0 < br; r0 += block_rows) {
                const int64_t rows = std::min(block_rows, br - r0);
                const auto [c0, c1] = edge_keys(band_mask, band, i0 + r0, i0 + r0 + rows, j0, j1, Nk);
                const int64_t cols = c1 - c0, jb = j0 + c0, at = r0 * ld + c0;
                if (band_mask)
                  for (int64_t r = r0; r < r0 + rows; ++r) {
                    std::fill(p + r * ld, p + r * ld + c0, acc_t(0));
                    std::fill(p + r * ld + c1, p + r * ld + bc, acc_t(0));
                    std::fill(ds + r * ld, ds + r * ld + c0, acc_t(0));
                    std::fill(ds + r * ld + c1, ds + r * ld + bc, acc_t(0));
                  }
                if (cols == 0) continue;
                const in_t* gQr = at_row<in_t>(gQ, lb, lh, i0 + r0);
                gKt.gemm(lb, lkv, rows, gQr, ld_q, 0, D, jb, cols, p + at, ld, false);  // S = Q K^T
                for (int64_t r = 0; r < rows; ++r) scale_row(p + at + r * ld, cols, scale);
                if (modified)
                  modify_tile<acc_t>(p + at, cap ? cap + at : nullptr, ld, rows, cols, i0 + r0, jb, b, h, band,
                                     band_mask, mods);
                for (int64_t r = 0; r < rows; ++r) {
                  const acc_t l = lse_ptr[row0 + r0 + r];
                  // -inf guard: a row that sees no key has P = 0 (and lse = -inf).
                  // (Filled, not scaled by 0: its masked scores are -inf, and -inf * 0 is NaN.)
                  if (l == -std::numeric_limits<acc_t>::infinity())
                    std::fill(p + at + r * ld, p + at + r * ld + cols, acc_t(0));
                  else
                    exp_affine(p + at + r * ld, cols, acc_t(1), l);  // P = exp(S - lse)
                }
                gVt.gemm(lb, lkv, rows, at_row<in_t>(gdO, lb, lh, i0 + r0), ld_do, 0, D, jb, cols, ds + at, ld,
                         false);  // dP = dO V^T
                if (z) {  // the forward's O = (P Z) V / (1 - p): dP <- Z dP / (1 - p), and dV sees P Z
                  drop.tile(z + at, ld, rows, cols, i0 + r0, jb, b, h, drop.scale);
                  for (int64_t r = 0; r < rows; ++r) mul_row(ds + at + r * ld, z + at + r * ld, cols);
                }
                for (int64_t r = 0; r < rows; ++r) {  // dS' = dL/d(modified s)
                  const int64_t i = i0 + r0 + r, row = row0 + r0 + r;
                  const bool whole_row = band.key_begin(i, Nk) >= j0 && band.key_end(i + 1, Nk) <= j1;
                  acc_t* dsr = ds + at + r * ld;
                  const auto exact = [&](int64_t c) {  // key jb + c against this row's dO, times its Z (keep / (1 - p))
                    const int64_t v_at = b * v.stride(0) + hkv * v.stride(1) + (jb + c) * v.stride(2);
                    const char* v_row = static_cast<const char*>(v.data_ptr()) + v_at * v.element_size();
                    const auto [dot, magnitude] = key_dot_f64(v, v_row, v.stride(3), at_row<in_t>(gdO, lb, lh, i), D);
                    const double zc = z ? double(z[at + r * ld + c]) : 1.0;
                    return std::pair<double, double>{dot * zc, magnitude * std::abs(zc)};
                  };
                  const acc_t d = row_delta(p + at + r * ld, dsr, cols, whole_row, delta_ptr[row], lse_ptr[row],
                                            dlse_ptr ? dlse_ptr[row] : acc_t(0), eps_out, exact);
                  softmax_grad_row(dsr, p + at + r * ld, cols, d);
                }
                if (z)  // P Z: the dropped zeroed, the kept as they are (1 / (1 - p) scales dV at its store)
                  for (int64_t r = 0; r < rows; ++r) keep_row(p + at + r * ld, z + at + r * ld, cols);
              }
              if (mods.dbias)  // dL/d bias = dS', stored transposed; every (b, h, i, j) is visited once
                for (int64_t c = 0; c < bc; ++c) {
                  acc_t* col = mods.dbias + ((b * Hq + h) * Nk + j0 + c) * mods.dbias_ld + i0;
                  for (int64_t r = 0; r < br; ++r) col[r] = ds[r * ld + c];
                }
              if (cap)  // dS = dS' d(capped)/ds (0 where dS' is)
                for (int64_t r = 0; r < br; ++r)
                  for (int64_t c = 0; c < bc; ++c) ds[r * ld + c] *= cap[r * ld + c];
              const in_t* gP = gemm_operand<in_t>(p, ld, br, bc, t.P);
              const in_t* dS = gemm_operand<in_t>(ds, ld, br, bc, t.dS);
              // dV^T += dO^T (P Z), dK^T += Q^T dS (rows_dkdv: dV += (P Z)^T dO, dK += dS^T Q): on the
              // band's edge in blocks of kEdgeRows keys over the rows that see them (P and dS are 0 above
              // and below)
              for (int64_t c0 = 0; c0 < bc; c0 += block_keys) {
                const int64_t cols = std::min(block_keys, bc - c0);
                const auto [ra, rb] = edge_rows(band_mask, band, j0 + c0, j0 + c0 + cols, i0, i1, Nq);
                if (rb == ra) continue;
                if constexpr (std::is_same_v<in_t, float>)
                  if (rows_dkdv) {
                    f32_gemm_at_rows(cols, D, rb - ra, gP + ra * ld + c0, ld, at_row<float>(gdO, lb, lh, i0 + ra),
                                     ld_do, dVb + c0 * D, D, true);
                    f32_gemm_at_rows(cols, D, rb - ra, dS + ra * ld + c0, ld, at_row<float>(gQ, lb, lh, i0 + ra), ld_q,
                                     dKb + c0 * D, D, true);
                    continue;
                  }
                const in_t *gdOt_c = at_col<in_t>(gdOt, lb, lh, i0 + ra), *gQt_c = at_col<in_t>(gQt, lb, lh, i0 + ra);
                gemm(D, cols, rb - ra, gdOt_c, Nq, gP + ra * ld + c0, ld, dVb + c0, ld_t, true);
                gemm(D, cols, rb - ra, gQt_c, Nq, dS + ra * ld + c0, ld, dKb + c0, ld_t, true);
              }
              if (bc % 2 && rounded) zero_column(t.dS.data(), ld, br, bc);  // the packed K's pad row
              for (int64_t r0 = 0; r0 < br; r0 += block_rows) {  // dQ += dS K, the keys each block sees
                const int64_t rows = std::min(block_rows, br - r0);
                const auto [c0, c1] = edge_keys(band_mask, band, i0 + r0, i0 + r0 + rows, j0, j1, Nk);
                if (c1 > c0)
                  gK.gemm(lb, lkv, rows, dS + r0 * ld + c0, ld, j0 + c0, c1 - c0, 0, D, gdQ + (i0 + r0) * D, D, true);
              }
              if (++tiles_in_block == kTilesPerSum) add_block();
            }
            if (tiles_in_block > 0) add_block();
            if (group > 1) {
              add_row(dK, dKs, 1, D * ld_t);
              add_row(dV, dVs, 1, D * ld_t);
            }
          }
          scale_row(dK, D * ld_t, scale);  // dS was taken with respect to the scaled scores
          if (drop.on) scale_row(dV, D * ld_t, drop.scale);  // the kept values / (1 - p)
          if (rows_dkdv) {
            if constexpr (std::is_same_v<acc_t, float>)
              if (fast_store) {
                store_rows(dK, bc, D, dk, b, hkv, j0);
                store_rows(dV, bc, D, dv, b, hkv, j0);
                continue;
              }
            dk[b][hkv].slice(0, j0, j1).copy_(at::from_blob(dK, {bc, D}, acc_opts));
            dv[b][hkv].slice(0, j0, j1).copy_(at::from_blob(dV, {bc, D}, acc_opts));
            continue;
          }
          if constexpr (std::is_same_v<acc_t, float>)
            if (fast_store) {
              transpose(D, bc, dK, ld_t, t.T.data(), D);
              store_rows(t.T.data(), bc, D, dk, b, hkv, j0);
              transpose(D, bc, dV, ld_t, t.T.data(), D);
              store_rows(t.T.data(), bc, D, dv, b, hkv, j0);
              continue;
            }
          dk[b][hkv].slice(0, j0, j1).copy_(at::from_blob(dK, {D, bc}, {ld_t, 1}, acc_opts).t());
          dv[b][hkv].slice(0, j0, j1).copy_(at::from_blob(dV, {D, bc}, {ld_t, 1}, acc_opts).t());
        }
      });
      at::Tensor dq_acc = dq_parts[0];
      for (int64_t s = 1; s < n_splits; ++s) dq_acc.add_(dq_parts[s]);  // fixed order
      // one pass into dq's layout: mul_out's Tensor overload (its Scalar one makes a result, then copies it)
      at::Tensor dq_chunk = chunk_of(dq, g0 * group, nh);
      if (dq.scalar_type() == dq_acc.scalar_type())
        at::mul_out(dq_chunk, dq_acc, at::scalar_tensor(scale, dq_acc.options()));
      else
        dq_chunk.copy_(dq_acc.mul_(scale));
    }
}

// sum_d g_d o_d of one row with unit stride in float64, each product exact: fp32 rows by
// dot_f64's vectors, fp16/bf16 ones widened (exactly) into `wide` (2 D floats) first.
inline double row_dot(const float* g, const float* o, int64_t D, float*) { return dot_f64(g, o, D); }
inline double row_dot(const double* g, const double* o, int64_t D, float*) {
  double sum = 0;
  for (int64_t c = 0; c < D; ++c) sum += g[c] * o[c];
  return sum;
}
template <typename T>
double row_dot(const T* g, const T* o, int64_t D, float* wide) {
  std::copy(g, g + D, wide), std::copy(o, o + D, wide + D);
  return dot_f64(wide, wide + D, D);
}

// D_i = sum_d dO_id O_id of every row (B, H, N) in float64 (the products of fp16/bf16/fp32 values
// exact there), rounded once to acc: a loop over the rows, no float64 copies of dO and O.
at::Tensor row_dots(const at::Tensor& dout, const at::Tensor& out, at::ScalarType acc) {
  const int64_t B = out.size(0), H = out.size(1), N = out.size(2), D = out.size(3);
  at::Tensor delta = at::empty({B, H, N}, out.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "row_dots", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = dout.data_ptr<scalar_t>();
    const scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* d = delta.data_ptr<acc_t>();
    const auto gs = dout.strides(), os = out.strides();
    const bool unit_stride = gs[3] == 1 && os[3] == 1;
    at::parallel_for(0, B * H * N, 64, [&](int64_t r0, int64_t r1) {
      std::vector<float> wide(sizeof(scalar_t) == 2 && unit_stride ? 2 * D : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (H * N), h = r / N % H, i = r % N;
        const scalar_t* gr = g + b * gs[0] + h * gs[1] + i * gs[2];
        const scalar_t* orow = o + b * os[0] + h * os[1] + i * os[2];
        if (unit_stride) {
          d[r] = acc_t(row_dot(gr, orow, D, wide.data()));
          continue;
        }
        double sum = 0;
        for (int64_t c = 0; c < D; ++c) sum += double(gr[c * gs[3]]) * double(orow[c * os[3]]);
        d[r] = acc_t(sum);
      }
    });
  });
  return delta;
}

// Whether a forward goes through the KV-cache loop (kvcache_cpu.cpp) instead of the tiled one:
// few query rows per kv group (decoding, short prompts against a longer cache; no dropout). That
// loop reads each kv head's K and V once for all the query heads of its group and splits the keys
// across the threads, where the tiled loop would read them once per query head and prepare its
// operands (O(Nk D) work) for as little work again. Self-attention-like calls (at most twice as
// many keys as queries) from 16 queries on take the tiled loop: there its operands cost little
// beside the work, its edge blocks skip the masked half of a causal diagonal (the KV-cache loop
// exponentiates whole tiles and masks them), and its micro-kernels run where that loop's float
// path multiplies more than 32 rows by ATen GEMMs tile by tile. fp16/bf16 multiplied in fp32
// (native_lowp_gemm false: fp16 without AMX-FP16, bf16 without AVX512-BF16 or AMX) only from 129
// rows per kv group, or 128 under a band: below, the KV-cache loop widens the cache rows in
// registers while the tiled loop converts Q, K and V first. 8 queries ran 1.4x-1.7x slower tiled
// (a call's fixed costs), hence 16. Measured on a Zen 4: README, "Short sequences on the CPU".
bool takes_kvcache_loop(const at::Tensor& q, const at::Tensor& k, const AttnOptions& opt) {
  if (opt.dropout() || q.numel() == 0) return false;  // (an empty q may have no kv head to divide by)
  const int64_t Nq = q.size(2), Nk = k.size(2), rows = Nq * (q.size(1) / k.size(1));
  if (rows > kFwdBr) return false;
  const auto t = q.scalar_type();
  const bool converted = (t == at::kHalf || t == at::kBFloat16) && !native_lowp_gemm(t);
  const bool self_like = Nq >= 16 && Nk <= 2 * Nq &&
                         (!converted || rows > 128 || (rows == 128 && opt.band(Nq, Nk).banded()));
  return !self_like;
}

}  // namespace

int64_t force_chunk_pairs(int64_t pairs) { return forced_chunk_pairs.exchange(std::max<int64_t>(pairs, 0)); }

// The tiled forward (fwd_impl), whose scores the backward's tiles recompute bit for bit.
std::tuple<at::Tensor, at::Tensor> tiled_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const AttnOptions& opt) {
  // q's layout where it has unit stride in D (store_rows writes rows), else a contiguous one
  at::Tensor out = q.stride(3) == 1 ? empty_like_unit_stride(q) : at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  with_gemm_type(q.scalar_type(), [&](auto in) {
    if (fwd_impl<decltype(in)>(q, k, v, out, lse, opt, false)) fwd_impl<decltype(in)>(q, k, v, out, lse, opt, true);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const AttnOptions& opt) {
  if (takes_kvcache_loop(q, k, opt)) {
    // its out is contiguous: returned as is where that is the tiled loop's layout (below), else copied
    auto [o, l] = kvcache_fwd(q, k, v, std::vector<int64_t>(q.size(0), k.size(2)), {}, std::nullopt, opt, 0);
    if (q.stride(3) != 1 || q.strides() == o.strides()) return {o, l};
    return {empty_like_unit_stride(q).copy_(o), l};
  }
  return tiled_fwd(q, k, v, opt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& opt) {
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor dq = empty_like_unit_stride(q), dk = empty_like_unit_stride(k), dv = empty_like_unit_stride(v);
  // dL/d bias: in the kernels' layout (csrc/kernel_launch.cpp: [B][Hq][Nk][Nq rounded up to 8],
  // seen as (B, Hq, Nq, Nk)), so that a compiled graph, whose fake function gives one layout, is
  // right on either backend (a graph compiled inside flash_cuda.emulate() and replayed outside, or
  // the other way round, read the dense layout with the transposed strides: a dbias 5.7 off);
  // entries of keys a row never visits (outside the band) stay 0
  const int64_t nq_pad = (q.size(2) + 7) / 8 * 8;
  at::Tensor dbias = opt.bias_grad ? at::zeros({q.size(0), q.size(1), k.size(2), nq_pad}, q.options().dtype(acc))
                                         .narrow(3, 0, q.size(2))
                                         .transpose(2, 3)
                                   : at::Tensor();
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dbias};
  }
  // D_i = rowsum(dO o O); a gradient flowing into lse enters as D_i - dlse_i, because
  // d lse_i / d s_ij = P_ij gives dS_ij = P_ij (dP_ij - D_i + dlse_i). D_i is summed in
  // float64 (O(N*D) work, against O(N^2*D) for the GEMMs): dS cancels dP against D_i, and
  // a correctly rounded D_i halves the residue that otherwise accumulates into dK over
  // long sequences (e.g. Nk = 1, where P = 1 and the exact dS is 0). A loop over the rows:
  // (dO.double() * O).sum(-1) made two float64 copies: forward+backward at N = 1024 ran 1.05x
  // (fp32) and 1.02x-1.13x (bf16) faster without them (in-process A/B on a Xeon with AMX).
  // A forward through the KV-cache loop scored its rows on that loop's micro-kernels, whose
  // sums round differently from the tiles' here: exp(s - lse) then carried the difference, up to
  // |s| ulps of it (dV 33x plain fp32 torch's error at scores of 60, 1000x at 200, found by an
  // audit). Where lse is that forward's own (bitwise: the loop is deterministic), the backward
  // takes lse (and O, for D) from the tiled forward instead: two more passes over K and V for few
  // query rows. Any other lse is used as given: a blockwise (ring) caller's, the whole row's over
  // several key chunks. fp16/bf16 only where some |lse| passes 2^12: below, their rounding (2^-8)
  // hides the difference (fp32's ulps of the scores), above it does not (exp of a score's ulp:
  // inf gradients at 1e8), and the two forwards cost a few-row bf16 backward 1.4x-1.8x on a Zen 4.
  // fp64 always, as fp32: its ulps are small, but at scales of 1e16 and more one of a score is
  // past 1, and exp of it gave inf and NaN gradients (audit).
  at::Tensor out_t = out, lse_t = lse;
  const auto t = q.scalar_type();
  if (takes_kvcache_loop(q, k, opt) && (t == at::kFloat || t == at::kDouble ||
                                        any_beyond(lse.contiguous().data_ptr<float>(), lse.numel(), 4096.0f))) {
    const at::Tensor own_lse =
        std::get<1>(kvcache_fwd(q, k, v, std::vector<int64_t>(q.size(0), k.size(2)), {}, std::nullopt, opt, 0));
    if (at::equal(own_lse, lse)) std::tie(out_t, lse_t) = tiled_fwd(q, k, v, opt);
  }
  at::Tensor delta = dout.scalar_type() == out_t.scalar_type() ? row_dots(dout, out_t, acc)
                                                               : (dout.to(at::kDouble) * out_t).sum(-1).to(acc);
  if (dlse.has_value()) delta.sub_(*dlse);
  // (B, H, N) in acc, for the one-hot rows' D_i (bwd_impl)
  const at::Tensor dlse_acc = dlse.has_value() ? dlse->to(acc).expand_as(delta).contiguous() : at::Tensor();
  with_gemm_type(q.scalar_type(), [&](auto in) {
    bwd_impl<decltype(in)>(dout, q, k, v, lse_t.contiguous(), delta, dlse_acc, dq, dk, dv, dbias, opt);
  });
  return {dq, dk, dv, dbias};
}

}  // namespace flash_cuda::cpu
