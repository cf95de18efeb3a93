// CPU backend: FlashAttention-2 (Dao, 2023) on ATen.
//
// Forward (Algorithm 1): each work item owns Br query rows of one head and streams the
// keys in tiles of Bc. Scores S = (scale*Q) K^T come from a BLAS GEMM; the online softmax
// keeps a running row max m and row sum l; the output accumulator is left unnormalised and
// only rescaled by exp(m_old - m_new); it is divided by l once at the end, and
// lse = m + log(l) is saved for the backward pass. No Nq x Nk matrix is ever allocated:
// the extra memory is a few tiles per thread.
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
// Dropout multiplies each probability tile by its keep mask / (1 - p) (philox.h, the bits the
// CUDA kernels draw) after the row sums, so lse is unaffected; the backward regenerates it.
//
// fp16/bf16 tiles are converted to fp32 in per-thread buffers (fp32 accumulation);
// float64 runs the same algorithm in double so gradcheck can verify it.
#include "attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <atomic>
#include <cmath>
#include <limits>

#include "../kernels/mask.h"
#include "dropout_cpu.h"
#include "rowops.h"
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

// Dropout of one call: the stream of (b, h) and the multiplier of kept values.
template <typename acc_t>
struct Drop {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  int64_t batch0 = 0, hq = 1;
  acc_t scale = 1;

  Drop(const AttnOptions& o, int64_t heads) : on(o.dropout()), batch0(o.dropout_batch0), hq(heads) {
    if (!on) return;
    const int64_t* st = o.rng_state->data_ptr<int64_t>();  // a CPU tensor here
    seed = uint64_t(st[0]), offset = uint64_t(st[1]);
    threshold = dropout_threshold(o.dropout_p);
    scale = acc_t(1.0 / (1.0 - o.dropout_p));
  }
  // z (rows x cols, leading dimension ld) = the multipliers of queries i0.., keys j0.. of (b, h)
  void tile(acc_t* z, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, int64_t b, int64_t h) const {
    dropout_tile(z, ld, rows, cols, i0, j0, PhiloxStream::make(seed, offset, (batch0 + b) * hq + h, threshold), scale);
  }
};

template <typename acc_t>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              at::Tensor& lse, const AttnOptions& opt) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), group = Hq / Hkv;
  const int64_t n_qtiles = ceil_div(Nq, kFwdBr);
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const double scale = opt.scale;
  const BandMask band = opt.band(Nq, Nk);
  const Mods<acc_t> mods(opt, Hq);
  const Drop<acc_t> drop(opt, Hq);

  struct Scratch {
    at::Tensor sQ, sK, sV, sS, sO, sZ;  // (Br, D), (Bc, D), (Bc, D), (Br, Bc), (Br, D), dropout (Br, Bc)
    std::vector<acc_t> m, l;            // running row max and row sum, (Br)
  };
  auto make_scratch = [&] {
    return Scratch{at::empty({kFwdBr, D}, acc_opts), at::empty({kFwdBc, D}, acc_opts),
                   at::empty({kFwdBc, D}, acc_opts), at::empty({kFwdBr, kFwdBc}, acc_opts),
                   at::empty({kFwdBr, D}, acc_opts), drop.on ? at::empty({kFwdBr, kFwdBc}, acc_opts) : at::Tensor(),
                   std::vector<acc_t>(kFwdBr), std::vector<acc_t>(kFwdBr)};
  };
  acc_t* lse_ptr = lse.data_ptr<acc_t>();

  // Heaviest query tiles first (under a causal mask later rows see more keys).
  parallel_items(B * Hq * n_qtiles, make_scratch, [&](int64_t item, Scratch& t) {
    const int64_t bh = item % (B * Hq), qt = n_qtiles - 1 - item / (B * Hq);
    const int64_t b = bh / Hq, h = bh % Hq, hkv = h / group;
    const int64_t i0 = qt * kFwdBr, i1 = std::min(i0 + kFwdBr, Nq), br = i1 - i0;
    const at::Tensor gK = k[b][hkv], gV = v[b][hkv];  // (Nk, D)

    at::Tensor rQ = t.sQ.slice(0, 0, br);  // (br, D), scale folded in
    rQ.copy_(q[b][h].slice(0, i0, i1));
    rQ.mul_(scale);
    at::Tensor rO = t.sO.slice(0, 0, br);  // (br, D), unnormalised
    rO.zero_();
    std::fill(t.m.begin(), t.m.end(), kNegInf);
    std::fill(t.l.begin(), t.l.end(), acc_t(0));
    acc_t* o = rO.data_ptr<acc_t>();
    const int64_t ld_o = rO.stride(0);

    // Only the keys some row of the tile sees (a window: a band of width left + right + br).
    const int64_t key_end = band.key_end(i1, Nk);
    for (int64_t j0 = band.key_begin(i0, Nk); j0 < key_end; j0 += kFwdBc) {
      const int64_t j1 = std::min(j0 + kFwdBc, key_end), bc = j1 - j0;
      at::Tensor rS = t.sS.slice(0, 0, br).slice(1, 0, bc);  // (br, bc)
      at::mm_out(rS, rQ, load_rows(gK, j0, j1, t.sK).t());
      acc_t* s = rS.data_ptr<acc_t>();
      const int64_t ld_s = rS.stride(0);
      const bool band_mask = band.tile_needs_mask(i0, i1, j0, j1);
      if (band_mask || mods.any) modify_tile<acc_t>(s, nullptr, ld_s, br, bc, i0, j0, b, h, band, band_mask, mods);

      for (int64_t r = 0; r < br; ++r) {
        const acc_t m_new = std::max(t.m[r], row_max(s + r * ld_s, bc));
        // -inf guard: a row with no visible key so far keeps m = -inf; subtracting 0
        // instead turns its masked scores into exp(-inf) = 0 rather than NaN.
        const acc_t m_use = m_new == kNegInf ? acc_t(0) : m_new;
        const acc_t row_sum = exp_sub_sum(s + r * ld_s, bc, m_use);
        const acc_t alpha = std::exp(t.m[r] - m_use);  // exp(-inf) = 0 on the first tile
        if (alpha != acc_t(1)) scale_row(o + r * ld_o, D, alpha);
        t.l[r] = t.l[r] * alpha + row_sum;
        t.m[r] = m_new;
      }
      if (drop.on) {  // P <- P Z (after the row sums: lse is unaffected)
        acc_t* z = t.sZ.template data_ptr<acc_t>();
        drop.tile(z, kFwdBc, br, bc, i0, j0, b, h);
        for (int64_t r = 0; r < br; ++r) mul_row(s + r * ld_s, z + r * kFwdBc, bc);
      }
      rO.addmm_(rS, load_rows(gV, j0, j1, t.sV));  // O += P V
    }

    for (int64_t r = 0; r < br; ++r) {
      const bool empty = t.l[r] == acc_t(0);  // the row sees no key: out 0, lse -inf
      scale_row(o + r * ld_o, D, empty ? acc_t(0) : acc_t(1) / t.l[r]);
      lse_ptr[bh * Nq + i0 + r] = empty ? kNegInf : t.m[r] + std::log(t.l[r]);
    }
    out[b][h].slice(0, i0, i1).copy_(rO);
  });
}

template <typename acc_t>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const at::Tensor& dbias,
              const AttnOptions& opt) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), group = Hq / Hkv;
  const int64_t n_ktiles = ceil_div(Nk, kBwdBc);
  const double scale = opt.scale;
  const BandMask band = opt.band(Nq, Nk);
  Mods<acc_t> mods(opt, Hq);
  mods.dbias = dbias.defined() ? dbias.data_ptr<acc_t>() : nullptr;
  const Drop<acc_t> drop(opt, Hq);
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // Enough (b, kv head, key split) items to keep every thread busy; each split owns a
  // dQ partial, summed in split order below.
  const int64_t threads = at::get_num_threads();
  const int64_t n_splits =
      std::max<int64_t>(1, std::min<int64_t>(n_ktiles, ceil_div(4 * threads, B * Hkv)));
  at::Tensor dq_parts = at::zeros({n_splits, B, Hq, Nq, D}, acc_opts);
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* delta_ptr = delta.data_ptr<acc_t>();

  struct Scratch {
    at::Tensor sQ, sdO, sK, sV, sS, sdP, sdK, sdV, sCap, sZ;  // (Br|Bc, D) tiles, (Br, Bc) scores
  };
  auto make_scratch = [&] {
    auto tile = [&](int64_t rows, int64_t cols) { return at::empty({rows, cols}, acc_opts); };
    return Scratch{tile(kBwdBr, D), tile(kBwdBr, D), tile(kBwdBc, D), tile(kBwdBc, D),
                   tile(kBwdBr, kBwdBc), tile(kBwdBr, kBwdBc), tile(kBwdBc, D), tile(kBwdBc, D),
                   opt.softcap > 0 ? tile(kBwdBr, kBwdBc) : at::Tensor(),
                   drop.on ? tile(kBwdBr, kBwdBc) : at::Tensor()};
  };

  parallel_items(B * Hkv * n_splits, make_scratch, [&](int64_t item, Scratch& t) {
    const int64_t split = item % n_splits, bhkv = item / n_splits;
    const int64_t b = bhkv / Hkv, hkv = bhkv % Hkv;
    // Key tiles are dealt round-robin to the splits, which balances causal work.
    for (int64_t kt = split; kt < n_ktiles; kt += n_splits) {
      const int64_t j0 = kt * kBwdBc, j1 = std::min(j0 + kBwdBc, Nk), bc = j1 - j0;
      const at::Tensor rK = load_rows(k[b][hkv], j0, j1, t.sK);  // (bc, D)
      const at::Tensor rV = load_rows(v[b][hkv], j0, j1, t.sV);  // (bc, D)
      at::Tensor rdK = t.sdK.slice(0, 0, bc), rdV = t.sdV.slice(0, 0, bc);  // (bc, D)
      rdK.zero_();
      rdV.zero_();
      // Only the query rows that see some key of the tile (a window: a band).
      const int64_t i_first = band.row_begin(j0, Nq) / kBwdBr * kBwdBr, i_end = band.row_end(j1, Nq);

      for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
        at::Tensor gdQ = dq_parts[split][b][h];  // (Nq, D), unscaled dS K
        for (int64_t i0 = i_first; i0 < i_end; i0 += kBwdBr) {
          const int64_t i1 = std::min(i0 + kBwdBr, Nq), br = i1 - i0;
          at::Tensor rQ = t.sQ.slice(0, 0, br);  // (br, D), scale folded in
          rQ.copy_(q[b][h].slice(0, i0, i1));
          rQ.mul_(scale);
          const at::Tensor rdO = load_rows(dout[b][h], i0, i1, t.sdO);  // (br, D)

          at::Tensor rP = t.sS.slice(0, 0, br).slice(1, 0, bc);  // (br, bc)
          at::mm_out(rP, rQ, rK.t());
          acc_t* p = rP.data_ptr<acc_t>();
          const int64_t ld = rP.stride(0);
          acc_t* cap = opt.softcap > 0 ? t.sCap.template data_ptr<acc_t>() : nullptr;  // d(capped)/ds, ld as p
          const bool band_mask = band.tile_needs_mask(i0, i1, j0, j1);
          if (band_mask || mods.any) modify_tile<acc_t>(p, cap, ld, br, bc, i0, j0, b, h, band, band_mask, mods);
          const int64_t row0 = (b * Hq + h) * Nq + i0;
          for (int64_t r = 0; r < br; ++r) {
            const acc_t l = lse_ptr[row0 + r];
            // -inf guard: a row that sees no key has P = 0 (and lse = -inf).
            // (Filled, not scaled by 0: its masked scores are -inf, and -inf * 0 is NaN.)
            if (l == -std::numeric_limits<acc_t>::infinity())
              std::fill(p + r * ld, p + r * ld + bc, acc_t(0));
            else
              exp_sub_sum(p + r * ld, bc, l);  // P = exp(S - lse)
          }

          at::Tensor rdS = t.sdP.slice(0, 0, br).slice(1, 0, bc);  // (br, bc)
          at::mm_out(rdS, rdO, rV.t());                            // dP = dO V^T
          acc_t* ds = rdS.data_ptr<acc_t>();
          acc_t* z = drop.on ? t.sZ.template data_ptr<acc_t>() : nullptr;  // dropout multipliers Z, ld as p
          if (z) {  // the forward's O = (P Z) V: dP <- Z dP, and dV sees P Z
            drop.tile(z, ld, br, bc, i0, j0, b, h);
            for (int64_t r = 0; r < br; ++r) mul_row(ds + r * ld, z + r * ld, bc);
          }
          for (int64_t r = 0; r < br; ++r)
            softmax_grad_row(ds + r * ld, p + r * ld, bc, delta_ptr[row0 + r]);  // dS' = dL/d(modified s)
          if (z)
            for (int64_t r = 0; r < br; ++r) mul_row(p + r * ld, z + r * ld, bc);
          rdV.addmm_(rP.t(), rdO);  // dV += (P Z)^T dO
          if (mods.dbias)  // dL/d bias = dS'; every (b, h, i, j) is visited once: plain stores
            for (int64_t r = 0; r < br; ++r)
              std::copy(ds + r * ld, ds + r * ld + bc, mods.dbias + ((b * Hq + h) * Nq + i0 + r) * Nk + j0);
          if (cap)  // dS = dS' d(capped)/ds
            for (int64_t r = 0; r < br; ++r)
              for (int64_t c = 0; c < bc; ++c) ds[r * ld + c] *= cap[r * ld + c];
          rdK.addmm_(rdS.t(), rQ);                  // dK += dS^T (scale Q)
          gdQ.slice(0, i0, i1).addmm_(rdS, rK);     // dQ += dS K (scaled at the end)
        }
      }
      dk[b][hkv].slice(0, j0, j1).copy_(rdK);
      dv[b][hkv].slice(0, j0, j1).copy_(rdV);
    }
  });

  at::Tensor dq_acc = dq_parts[0];
  for (int64_t s = 1; s < n_splits; ++s) dq_acc.add_(dq_parts[s]);  // fixed order
  dq.copy_(dq_acc.mul_(scale));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const AttnOptions& opt) {
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  if (acc == at::kDouble)
    fwd_impl<double>(q, k, v, out, lse, opt);
  else
    fwd_impl<float>(q, k, v, out, lse, opt);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& opt) {
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // dL/d bias: dense; entries of keys a row never visits (outside the band) stay 0
  at::Tensor dbias = opt.bias_grad ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options().dtype(acc))
                                   : at::Tensor();
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dbias};
  }
  // D_i = rowsum(dO o O); a gradient flowing into lse enters as D_i - dlse_i, because
  // d lse_i / d s_ij = P_ij gives dS_ij = P_ij (dP_ij - D_i + dlse_i). D_i is summed in
  // float64 (O(N*D) work, against O(N^2*D) for the GEMMs): dS cancels dP against D_i, and
  // a correctly rounded D_i halves the residue that otherwise accumulates into dK over
  // long sequences (e.g. Nk = 1, where P = 1 and the exact dS is 0).
  at::Tensor delta = (dout.to(at::kDouble) * out).sum(-1).to(acc);  // out promotes exactly
  if (dlse.has_value()) delta.sub_(*dlse);
  if (acc == at::kDouble)
    bwd_impl<double>(dout, q, k, v, lse.contiguous(), delta, dq, dk, dv, dbias, opt);
  else
    bwd_impl<float>(dout, q, k, v, lse.contiguous(), delta, dq, dk, dv, dbias, opt);
  return {dq, dk, dv, dbias};
}

}  // namespace flash_cuda::cpu
