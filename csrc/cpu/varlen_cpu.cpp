// CPU backend of the packed (varlen) ops: each sequence of the batch is one attention problem on
// views into the packed tensors, computed by attention_fwd / attention_bwd (no padding, no
// copies of the inputs). Sequence b: queries [cu_q[b], cu_q[b+1]) to keys [cu_k[b], cu_k[b+1]);
// rows past cu[B] belong to no sequence: out 0, lse -inf, gradients 0.
#include "varlen_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "attention_cpu.h"

namespace flash_cuda::cpu {
namespace {

// Rows [s, e) of a packed (total, H, D) tensor as a (1, H, e - s, D) view.
at::Tensor seq_view(const at::Tensor& x, int64_t s, int64_t e) { return x.narrow(0, s, e - s).transpose(0, 1).unsqueeze(0); }

// The options of sequence b: its ALiBi slopes when they are per sequence, and its batch index
// for dropout's keep mask.
AttnOptions seq_options(const AttnOptions& o, int64_t b) {
  AttnOptions s = o;
  if (o.alibi && o.alibi->size(0) > 1) s.alibi = o.alibi->narrow(0, b, 1);
  s.dropout_batch0 = o.dropout_batch0 + b;
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::vector<int64_t>& cu_q, const std::vector<int64_t>& cu_k,
                                              const AttnOptions& opt) {
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(acc));  // (Hq, total_q)
  for (size_t b = 0; b + 1 < cu_q.size(); ++b) {
    const int64_t qs = cu_q[b], qe = cu_q[b + 1];
    if (qe == qs) continue;
    auto [o, l] = attention_fwd(seq_view(q, qs, qe), seq_view(k, cu_k[b], cu_k[b + 1]),
                                seq_view(v, cu_k[b], cu_k[b + 1]), seq_options(opt, b));
    seq_view(out, qs, qe).copy_(o);
    lse.narrow(1, qs, qe - qs).copy_(l[0]);
  }
  // rows past the last sequence (a buffer with room to spare) see no key
  const int64_t end = cu_q.back();
  out.narrow(0, end, q.size(0) - end).zero_();
  lse.narrow(1, end, q.size(0) - end).fill_(-std::numeric_limits<double>::infinity());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& out, const at::Tensor& lse,
                                                          const std::optional<at::Tensor>& dlse,
                                                          const std::vector<int64_t>& cu_q,
                                                          const std::vector<int64_t>& cu_k, const AttnOptions& opt) {
  // keys of a sequence without queries get zero gradients
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
             dv = at::zeros(v.sizes(), v.options());
  for (size_t b = 0; b + 1 < cu_q.size(); ++b) {
    const int64_t qs = cu_q[b], qe = cu_q[b + 1], ks = cu_k[b], ke = cu_k[b + 1];
    if (qe == qs || ke == ks) continue;
    std::optional<at::Tensor> dl;
    if (dlse) dl = dlse->narrow(1, qs, qe - qs).unsqueeze(0).contiguous();
    auto [gq, gk, gv, gbias] =
        attention_bwd(seq_view(dout, qs, qe), seq_view(q, qs, qe), seq_view(k, ks, ke), seq_view(v, ks, ke),
                      seq_view(out, qs, qe), lse.narrow(1, qs, qe - qs).unsqueeze(0).contiguous(), dl,
                      seq_options(opt, b));
    seq_view(dq, qs, qe).copy_(gq);
    seq_view(dk, ks, ke).copy_(gk);
    seq_view(dv, ks, ke).copy_(gv);
  }
  return {dq, dk, dv};
}

}  // namespace flash_cuda::cpu
