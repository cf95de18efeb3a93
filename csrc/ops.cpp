// flash_cuda operator library: schemas, the argument checks every backend relies on, and
// registration of the backends. The Python layer (flash_cuda/api.py) checks arguments
// first with user-facing messages; the checks here keep a direct torch.ops call from ever
// reaching a kernel with inconsistent shapes.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <iomanip>
#include <limits>
#include <vector>

#include "attn_options.h"
#include "cpu/attention_cpu.h"
#include "cpu/kvcache_cpu.h"
#include "cpu/rowops.h"
#include "cpu/scratch.h"
#include "cpu/tile_gemm.h"
#include "cpu/varlen_cpu.h"
#include "emu/emu_session.h"
#include "kernel_launch.h"

namespace flash_cuda {
namespace {

constexpr int64_t kMaxHeadDim = 256;

// Kernels need unit stride in the head dimension; any other stride is accepted as is.
at::Tensor unit_last_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "flash_cuda: q, k, v must be 4-D (B, H, N, D), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && q.scalar_type() == k.scalar_type() &&
                  q.scalar_type() == v.scalar_type(),
              "flash_cuda: q, k, v must share one floating dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "flash_cuda: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.sizes() == v.sizes(), "flash_cuda: k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "flash_cuda: q and k must agree in batch and head dim, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "flash_cuda: the number of query heads must be a multiple of kv heads, got ",
              q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim,
              "flash_cuda: head dim must be in [1, 256], got ", q.size(3));
}

void check_like(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.sizes() == like.sizes() && x.scalar_type() == like.scalar_type() &&
                  x.device() == like.device(),
              "flash_cuda: ", name, " must match q in shape, dtype and device, got ", x.sizes(),
              " ", x.scalar_type());
}

void check_lse(const at::Tensor& x, const at::Tensor& q, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == q.size(0) && x.size(1) == q.size(1) &&
                  x.size(2) == q.size(2) &&
                  x.scalar_type() == at::toOpMathType(q.scalar_type()) &&
                  x.device() == q.device(),
              "flash_cuda: ", name, " must be (B, Hq, Nq) in the accumulation dtype, got ",
              x.sizes(), " ", x.scalar_type());
}

// Dropout's arguments into o: p in [0, 1) and, when p > 0, the int64 (seed, offset) on q's device
// that philox_state made (csrc/kernels/philox.h).
AttnOptions with_dropout(AttnOptions o, const at::Tensor& q, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0,
              "flash_cuda: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return o;
  TORCH_CHECK(rng_state.has_value() && rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 &&
                  rng_state->dim() == 1 && rng_state->device() == q.device(),
              "flash_cuda: rng_state must be an int64 tensor (seed, offset) of 2 entries on q's device when dropout_p > 0",
              rng_state.has_value() ? ", got a tensor " : ", got None",
              rng_state.has_value() ? c10::str(rng_state->sizes(), " ", rng_state->scalar_type(), " on ", rng_state->device()) : "");
  o.dropout_p = dropout_p;
  o.rng_state = rng_state->contiguous();
  return o;
}

// The options every op shares (scale, band, softcap, ALiBi for `batch` sequences of q's heads,
// dropout), checked for what a direct torch.ops call could get wrong.
AttnOptions base_options(const at::Tensor& q, int64_t batch, double scale, bool causal, bool bottom_right,
                         int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                         const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "flash_cuda: window bounds must be >= -1, got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "flash_cuda: softcap must be finite and >= 0, got ", softcap);
  // (the kernels and the CPU backend take scale in the accumulation dtype: float32 below float64)
  // (printed in all digits: in 6 a refused scale can print as float32's max)
  const bool in_f32 = q.scalar_type() != at::kDouble;
  const double f32_max = std::numeric_limits<float>::max();
  TORCH_CHECK(std::isfinite(scale) && (!in_f32 || std::abs(scale) <= f32_max), std::setprecision(17),
              "flash_cuda: scale must be finite",
              in_f32 ? c10::str(std::setprecision(17), " in float32 (|scale| <= ", f32_max, ")") : "", ", got ", scale);
  // A bound past every key offset hides nothing: unbounded (d = j - (i + Nk - Nq) lies in
  // (-Nk, Nq), lengths below 2^31). Near 2^63 the band's int64 arithmetic (i + offset + right)
  // would overflow and hide every key; the CUDA kernels compare offsets in 32 bits.
  constexpr int64_t kUnboundedFrom = int64_t(1) << 31;
  AttnOptions o;
  o.scale = scale;
  o.causal = causal;
  o.bottom_right = bottom_right;
  o.window_left = window_left >= kUnboundedFrom ? -1 : window_left;
  o.window_right = window_right >= kUnboundedFrom ? -1 : window_right;
  o.softcap = softcap;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.device() == q.device() && a.dim() == 2 &&
                    (a.size(0) == 1 || a.size(0) == batch) && a.size(1) == q.size(1),
                "flash_cuda: alibi_slopes must be float32 (1 or B, Hq) on q's device, got ", a.sizes(), " ",
                a.scalar_type());
    o.alibi = a.contiguous();
  }
  return with_dropout(o, q, dropout_p, rng_state);
}

// The op arguments beyond q, k, v of the (B, H, N, D) ops: base_options and the bias.
AttnOptions make_options(const at::Tensor& q, const at::Tensor& k, double scale, bool causal, bool bottom_right,
                         int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& bias,
                         bool bias_grad, double dropout_p,
                         const std::optional<at::Tensor>& rng_state) {
  AttnOptions o = base_options(q, q.size(0), scale, causal, bottom_right, window_left, window_right, softcap,
                               alibi_slopes, dropout_p, rng_state);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = k.size(2);
  if (bias.has_value()) {
    const at::Tensor& m = *bias;
    TORCH_CHECK(m.scalar_type() == at::toOpMathType(q.scalar_type()) && m.device() == q.device() &&
                    m.sizes() == at::IntArrayRef({B, Hq, Nq, Nk}),
                "flash_cuda: bias must be (B, Hq, Nq, Nk) = (", B, ", ", Hq, ", ", Nq, ", ", Nk,
                ") in the accumulation dtype on q's device (broadcast dims may have stride 0), got ", m.sizes(), " ",
                m.scalar_type());
    o.bias = m;
  }
  o.bias_grad = bias_grad && bias.has_value();
  return o;
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                           bool causal, bool bottom_right, bool /*deterministic: for bwd*/,
                                           int64_t window_left, int64_t window_right, double softcap,
                                           const std::optional<at::Tensor>& alibi_slopes,
                                           const std::optional<at::Tensor>& bias, double dropout_p,
                                           const std::optional<at::Tensor>& rng_state) {
  check_qkv(q, k, v);
  const AttnOptions o = make_options(q, k, scale, causal, bottom_right, window_left, window_right, softcap,
                                     alibi_slopes, bias, false, dropout_p, rng_state);
  if (emu_active())  // inside flash_cuda.emulate(): the CUDA kernels, run by the emulator
    return fwd_kernels(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), o, Executor::emu);
  cpu::check_kernel_choices();
  return cpu::attention_fwd(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), o);
}

void check_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse) {
  check_qkv(q, k, v);
  check_like(dout, q, "dout");
  check_like(out, q, "out");
  check_lse(lse, q, "lse");
  if (dlse.has_value()) check_lse(*dlse, q, "dlse");
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// dbias as the op returns it: the gradient when asked for, else an empty tensor.
BwdResult with_dbias(BwdResult r, const at::Tensor& q) {
  if (!std::get<3>(r).defined()) std::get<3>(r) = at::empty({0}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  return r;
}

BwdResult bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse, double scale,
                  bool causal, bool bottom_right, bool deterministic, int64_t window_left, int64_t window_right,
                  double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& bias,
                  bool bias_grad, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  check_bwd(dout, q, k, v, out, lse, dlse);
  const AttnOptions o = make_options(q, k, scale, causal, bottom_right, window_left, window_right, softcap,
                                     alibi_slopes, bias, bias_grad, dropout_p, rng_state);
  if (emu_active())
    return with_dbias(bwd_kernels(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k),
                                  unit_last_stride(v), unit_last_stride(out), lse, dlse, o, deterministic,
                                  Executor::emu),
                      q);
  // The CPU backend is deterministic for a fixed thread count either way.
  cpu::check_kernel_choices();
  return with_dbias(cpu::attention_bwd(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k),
                                       unit_last_stride(v), unit_last_stride(out), lse, dlse, o),
                    q);
}

#if defined(FLASH_CUDA_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale, bool causal, bool bottom_right, bool /*deterministic*/,
                                            int64_t window_left, int64_t window_right, double softcap,
                                            const std::optional<at::Tensor>& alibi_slopes,
                                            const std::optional<at::Tensor>& bias, double dropout_p,
                                            const std::optional<at::Tensor>& rng_state) {
  check_qkv(q, k, v);
  const AttnOptions o = make_options(q, k, scale, causal, bottom_right, window_left, window_right, softcap,
                                     alibi_slopes, bias, false, dropout_p, rng_state);
  return fwd_kernels(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), o, Executor::cuda);
}

BwdResult bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse, double scale,
                   bool causal, bool bottom_right, bool deterministic, int64_t window_left, int64_t window_right,
                   double softcap, const std::optional<at::Tensor>& alibi_slopes,
                   const std::optional<at::Tensor>& bias, bool bias_grad, double dropout_p,
                   const std::optional<at::Tensor>& rng_state) {
  check_bwd(dout, q, k, v, out, lse, dlse);
  const AttnOptions o = make_options(q, k, scale, causal, bottom_right, window_left, window_right, softcap,
                                     alibi_slopes, bias, bias_grad, dropout_p, rng_state);
  return with_dbias(bwd_kernels(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                                unit_last_stride(out), lse, dlse, o, deterministic, Executor::cuda),
                    q);
}
#endif

// ---- packed sequences (varlen) ----

void check_packed_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "flash_cuda: packed q, k, v must be 3-D (total, H, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_qkv(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0));
}

void check_cu_seqlens_tensor(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1, "flash_cuda: ", name,
              " must be a 1-D int32 tensor of B + 1 entries, got ", cu.sizes(), " ", cu.scalar_type());
  TORCH_CHECK(cu.device() == q.device(), "flash_cuda: ", name, " must be on q's device (", q.device(), "), got ",
              cu.device());
}

// The validated cumulative sequence lengths of a CPU tensor (host values): int32 (B + 1,),
// starting at 0, non-decreasing, ending at most at total (rows past the end belong to no
// sequence, as a caller's buffer with room to spare in FlashAttention); each length at most
// max_seqlen.
std::vector<int64_t> check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen) {
  const at::Tensor c = cu.to(at::kLong).contiguous();
  std::vector<int64_t> v(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  TORCH_CHECK(v[0] == 0, "flash_cuda: ", name, " must start at 0, got ", v[0]);
  for (size_t b = 0; b + 1 < v.size(); ++b) {
    TORCH_CHECK(v[b + 1] >= v[b], "flash_cuda: ", name, " must be non-decreasing, got ", v[b], " then ", v[b + 1],
                " at index ", b + 1);
    TORCH_CHECK(v[b + 1] - v[b] <= max_seqlen, "flash_cuda: sequence ", b, " has ", v[b + 1] - v[b],
                " tokens, more than max_seqlen (", max_seqlen, ") for ", name);
  }
  TORCH_CHECK(v.back() <= total, "flash_cuda: the last entry of ", name, " must be at most the number of tokens (",
              total, "), got ", v.back());
  return v;
}

// Both cu_seqlens checked and the options of a varlen op. CPU tensors (the CPU backend and the
// emulator): their values too, into vq, vk. CUDA tensors: dtype, shape and device only (their
// values stay on the GPU; the kernels clamp them, csrc/kernels/seqlen.h).
AttnOptions varlen_options(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                           int64_t max_q, int64_t max_k, double scale, bool causal, int64_t window_left,
                           int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                           double dropout_p, const std::optional<at::Tensor>& rng_state, std::vector<int64_t>* vq,
                           std::vector<int64_t>* vk) {
  check_cu_seqlens_tensor(cu_q, "cu_seqlens_q", q);
  check_cu_seqlens_tensor(cu_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), "flash_cuda: cu_seqlens_q and cu_seqlens_k must have the same length, got ",
              cu_q.numel(), " and ", cu_k.numel());
  TORCH_CHECK(max_q >= 0 && max_k >= 0, "flash_cuda: max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q, " and ",
              max_k);
  if (vq) {
    *vq = check_cu_seqlens(cu_q, "cu_seqlens_q", q.size(0), max_q);
    *vk = check_cu_seqlens(cu_k, "cu_seqlens_k", k.size(0), max_k);
  }
  return base_options(q, cu_q.numel() - 1, scale, causal, true, window_left, window_right, softcap, alibi_slopes,
                      dropout_p, rng_state);
}

// (total, H, D) -> the (1, H, total, D) view the kernels take, and back.
at::Tensor kernel_view(const at::Tensor& x) { return unit_last_stride(x).transpose(0, 1).unsqueeze(0); }
at::Tensor packed_view(const at::Tensor& x) { return x.squeeze(0).transpose(0, 1); }

std::tuple<at::Tensor, at::Tensor> varlen_fwd_kernels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const AttnOptions& o, const Packed& packed, Executor executor) {
  auto [out, lse] = fwd_kernels(kernel_view(q), kernel_view(k), kernel_view(v), o, executor, packed);
  return {packed_view(out), lse.squeeze(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_kernels(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& o, const Packed& packed,
    bool deterministic, Executor executor) {
  const std::optional<at::Tensor> dlse4 = dlse ? std::optional<at::Tensor>(dlse->unsqueeze(0)) : std::nullopt;
  auto [dq, dk, dv, dbias] = bwd_kernels(kernel_view(dout), kernel_view(q), kernel_view(k), kernel_view(v),
                                         kernel_view(out), lse.unsqueeze(0), dlse4, o, deterministic, executor, packed);
  return {packed_view(dq), packed_view(dk), packed_view(dv)};
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                  int64_t max_k, double scale, bool causal, bool /*deterministic*/,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                                  const std::optional<at::Tensor>& rng_state) {
  check_packed_qkv(q, k, v);
  std::vector<int64_t> vq, vk;
  const AttnOptions o = varlen_options(q, k, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right,
                                       softcap, alibi_slopes, dropout_p, rng_state, &vq, &vk);
  if (emu_active())  // inside flash_cuda.emulate(): the CUDA kernels, run by the emulator
    return varlen_fwd_kernels(q, k, v, o, Packed{cu_q.contiguous(), cu_k.contiguous(), max_q, max_k}, Executor::emu);
  cpu::check_kernel_choices();
  return cpu::varlen_fwd(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), vq, vk, o);
}

void check_varlen_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse) {
  check_packed_qkv(q, k, v);
  check_like(dout, q, "dout");
  check_like(out, q, "out");
  auto check_packed_lse = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == q.size(1) && x.size(1) == q.size(0) &&
                    x.scalar_type() == at::toOpMathType(q.scalar_type()) && x.device() == q.device(),
                "flash_cuda: ", name, " must be (Hq, total_q) in the accumulation dtype, got ", x.sizes(), " ",
                x.scalar_type());
  };
  check_packed_lse(lse, "lse");
  if (dlse) check_packed_lse(*dlse, "dlse");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, double scale, bool causal, bool deterministic, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  check_varlen_bwd(dout, q, k, v, out, lse, dlse);
  std::vector<int64_t> vq, vk;
  const AttnOptions o = varlen_options(q, k, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right,
                                       softcap, alibi_slopes, dropout_p, rng_state, &vq, &vk);
  if (emu_active())
    return varlen_bwd_kernels(dout, q, k, v, out, lse, dlse, o, Packed{cu_q.contiguous(), cu_k.contiguous(), max_q, max_k}, deterministic,
                              Executor::emu);
  // The CPU backend is deterministic for a fixed thread count either way.
  cpu::check_kernel_choices();
  return cpu::varlen_bwd(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                         unit_last_stride(out), lse, dlse, vq, vk, o);
}

#if defined(FLASH_CUDA_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                   int64_t max_k, double scale, bool causal, bool /*deterministic*/,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                                   const std::optional<at::Tensor>& rng_state) {
  check_packed_qkv(q, k, v);
  const AttnOptions o = varlen_options(q, k, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right,
                                       softcap, alibi_slopes, dropout_p, rng_state, nullptr, nullptr);
  return varlen_fwd_kernels(q, k, v, o, Packed{cu_q.contiguous(), cu_k.contiguous(), max_q, max_k}, Executor::cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, double scale, bool causal, bool deterministic, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  check_varlen_bwd(dout, q, k, v, out, lse, dlse);
  const AttnOptions o = varlen_options(q, k, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right,
                                       softcap, alibi_slopes, dropout_p, rng_state, nullptr, nullptr);
  return varlen_bwd_kernels(dout, q, k, v, out, lse, dlse, o, Packed{cu_q.contiguous(), cu_k.contiguous(), max_q, max_k},
                            deterministic, Executor::cuda);
}
#endif

// ---- KV cache (attention_with_kvcache) ----

// Whether a view's positions meet those of the view with its sizes and strides `delta` elements
// further: delta = sum_d c_d stride_d for some |c_d| < size_d (some c_d != 0 when `distinct`:
// a view against itself). Searched per dimension, largest stride first, keeping the c_d whose
// remainder the smaller dimensions can still reach (one or two a dimension for a cache's nested
// strides; past kMaxVisits in all, counted as meeting).
bool positions_meet(const at::Tensor& x, int64_t delta, bool distinct) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions that move
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1 && x.stride(d) == 0) return true;  // expanded
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  }
  std::sort(dims.begin(), dims.end(), std::greater<>());
  std::vector<int64_t> reach(dims.size() + 1, 0);  // reach[i]: the most dimensions i.. can add
  for (size_t i = dims.size(); i-- > 0;) reach[i] = reach[i + 1] + (dims[i].second - 1) * dims[i].first;
  constexpr int kMaxVisits = 1 << 12;
  int visits = 0;
  auto floor_div = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };  // (b > 0)
  std::function<bool(size_t, int64_t, bool)> reachable = [&](size_t i, int64_t rest, bool moved) {
    if (++visits > kMaxVisits) return true;
    if (i == dims.size()) return rest == 0 && (moved || !distinct);
    const auto [stride, size] = dims[i];
    // |rest - c stride| <= reach[i + 1], |c| < size
    const int64_t lo = std::max(-(size - 1), -floor_div(reach[i + 1] - rest, stride)),
                  hi = std::min(size - 1, floor_div(rest + reach[i + 1], stride));
    for (int64_t c = lo; c <= hi; ++c)
      if (reachable(i + 1, rest - c * stride, moved || c != 0)) return true;
    return false;
  };
  return reachable(0, delta, false);
}

// Whether two positions of cache x share memory (at::has_internal_overlap answers "too hard" for
// every view that is not dense, and "yes" only for stride 0).
bool cache_overlaps_itself(const at::Tensor& x) {
  const at::MemOverlap status = at::has_internal_overlap(x);
  return status == at::MemOverlap::Yes || (status == at::MemOverlap::TooHard && positions_meet(x, 0, true));
}

// Whether a position of cache a and one of cache b share memory. Views of disjoint bytes never do
// (whatever their storages: two tensors made from one numpy array share memory, not storage);
// two views with the same sizes and strides do iff positions_meet at their offsets' difference
// (FlashAttention's packed (B, N, 2, Hkv, D) cache seen as k and v, halves of one allocation and
// padded rows do not). Other pairs whose bytes interleave count as overlapping.
bool caches_may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const int64_t item = a.element_size();
  auto span = [&](const at::Tensor& x) {  // the bytes [begin, end) x's positions lie in
    int64_t extent = 1;
    for (int64_t d = 0; d < x.dim(); ++d) extent += (x.size(d) - 1) * x.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(x.data_ptr());
    return std::pair{begin, begin + uintptr_t(extent * x.element_size())};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  if (a1 <= b0 || b1 <= a0) return false;
  const int64_t delta_bytes = int64_t(b0 - a0);
  if (a.sizes() != b.sizes() || a.strides() != b.strides() || b.element_size() != item || delta_bytes % item) return true;
  return positions_meet(a, delta_bytes / item, false);
}

// Shapes, dtypes and devices of a KV-cache call (csrc/kernel_launch.h kvcache_kernels). CPU
// tensors: cache_seqlens, cache_leftpad and the pages they reach are checked by value too
// (kvcache_lengths).
void check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                      const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                      const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& alibi_slopes,
                      int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "flash_cuda: q, k_cache, v_cache must be 4-D, got ", q.sizes(), ", ", k_cache.sizes(), ", ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "flash_cuda: k_cache and v_cache must have the same shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  for (const at::Tensor* x : {&k_cache, &v_cache})  // read and appended to in place: never copied
    TORCH_CHECK(x->size(3) <= 1 || x->stride(3) == 1, "flash_cuda: k_cache and v_cache must have unit stride in the "
                "head dim (stride(-1) == 1), got strides ", x->strides());
  const int64_t B = q.size(0);
  const bool paged = block_table.has_value();
  if (paged) {
    const at::Tensor& t = *block_table;
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.size(0) == B && t.device() == q.device(),
                "flash_cuda: block_table must be an int32 (B, pages per sequence) tensor on q's device, got ",
                t.sizes(), " ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK(k_cache.size(0) >= 1 && k_cache.size(2) >= 1, "flash_cuda: a paged cache needs at least one page of "
                "at least one key, got k_cache of shape ", k_cache.sizes());
  }
  // the checks of q against a (B, Hkv, *, D) cache
  check_qkv(q, paged ? k_cache.narrow(0, 0, 1).expand({B, -1, -1, -1}) : k_cache,
            paged ? v_cache.narrow(0, 0, 1).expand({B, -1, -1, -1}) : v_cache);
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "flash_cuda: k and v (the new keys and values) must be given "
              "together or not at all");
  if (k_new) {
    const std::vector<int64_t> want{B, k_cache.size(1), k_new->dim() == 4 ? k_new->size(2) : -1, q.size(3)};
    for (const at::Tensor* x : {&*k_new, &*v_new})
      TORCH_CHECK(x->dim() == 4 && x->sizes() == at::IntArrayRef(want) && x->scalar_type() == q.scalar_type() &&
                      x->device() == q.device(),
                  "flash_cuda: k and v must be (B, Hkv, Nnew, D) = (", B, ", ", k_cache.size(1), ", Nnew, ", q.size(3),
                  ") in q's dtype and device, the same shape for both, got ", x->sizes(), " ", x->scalar_type());
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.device() == q.device(),
              "flash_cuda: cache_seqlens must be an int32 (B,) tensor on q's device, got ", cache_seqlens.sizes(), " ",
              cache_seqlens.scalar_type(), " on ", cache_seqlens.device());
  if (cache_leftpad) {
    const at::Tensor& t = *cache_leftpad;
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == B && t.device() == q.device(),
                "flash_cuda: cache_leftpad must be an int32 (B,) tensor on q's device, got ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxNumSplits, "flash_cuda: num_splits must be in [0, ",
              kMaxNumSplits, "] (0: chosen for the device), got ", num_splits);
  if (k_new) {  // written in place: every position of the caches its own memory, and k's apart from v's
    for (const auto& [name, x] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}})
      TORCH_CHECK_VALUE(!cache_overlaps_itself(*x), "flash_cuda: ", name, " has positions that share memory "
                        "(strides ", x->strides(), " for shape ", x->sizes(), ": an expanded view, or overlapping "
                        "rows), so appending k and v would overwrite other positions; pass a cache with memory of "
                        "its own (e.g. .contiguous())");
    TORCH_CHECK_VALUE(!caches_may_overlap(k_cache, v_cache), "flash_cuda: k_cache and v_cache share memory (or "
                      "interleave in memory with different strides, which is not searched), so appending v could "
                      "overwrite keys; pass separate caches");
    // nor may the call's other inputs lie in the caches' memory: the append would write what the
    // call reads (a race on a GPU; the CPU copy refused it in torch's words)
    for (const auto& [name, x] : {std::pair{"k", &*k_new}, std::pair{"v", &*v_new}, std::pair{"q", &q}})
      for (const auto& [cache_name, cache] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}})
        TORCH_CHECK_VALUE(!caches_may_overlap(*x, *cache), "flash_cuda: ", name, " shares memory with ", cache_name,
                          ", into which k and v are appended in place (the call would read what it writes); pass ",
                          name == std::string("q") ? "queries" : "new keys and values", " of their own (e.g. "
                          ".clone())");
    // the same for the tensors that say where and how to attend: pages re-read after the append
    // reached past the pool (a crash), ALiBi slopes read after it were the new keys' values
    const std::optional<at::Tensor> seqlens = cache_seqlens;
    const std::pair<const char*, const std::optional<at::Tensor>*> others[] = {
        {"block_table", &block_table}, {"cache_seqlens", &seqlens}, {"cache_leftpad", &cache_leftpad},
        {"alibi_slopes", &alibi_slopes}};
    for (const auto& [name, x] : others)
      for (const auto& [cache_name, cache] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}})
        TORCH_CHECK_VALUE(!x->has_value() || (*x)->device() != cache->device() || !caches_may_overlap(**x, *cache),
                          "flash_cuda: ", name, " shares memory with ", cache_name, ", into which k and v are "
                          "appended in place (the call would read what it writes); give it memory of its own (e.g. "
                          ".clone())");
  }
}

// The checked arguments of a KV-cache call as the options every backend takes (no dropout).
AttnOptions kvcache_options(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                            const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                            const std::optional<at::Tensor>& block_table, double scale, bool causal,
                            int64_t window_left, int64_t window_right, double softcap,
                            const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits) {
  check_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table, alibi_slopes, num_splits);
  return base_options(q, q.size(0), scale, causal, true, window_left, window_right, softcap, alibi_slopes, 0.0,
                      std::nullopt);
}

// CPU tensors: cache_seqlens' values, each in [0, capacity - Nnew], and cache_leftpad's, each in
// [0, cache_seqlens[b]]; with every page that sequence b's keys (cache rows cache_leftpad[b] ..
// cache_seqlens[b] + Nnew; from row 0 without a pad) reach inside the pool, and no page that takes
// new keys reached by any other entry of the table (the append would overwrite keys in use, or
// race on a GPU); pages only read may be shared (a common prefix), and pages only the pad covers
// are never read. Returns the lengths and the first rows (empty without cache_leftpad).
std::pair<std::vector<int64_t>, std::vector<int64_t>> kvcache_lengths(const at::Tensor& cache_seqlens,
                                                                      const std::optional<at::Tensor>& cache_leftpad,
                                                                      const std::optional<at::Tensor>& block_table,
                                                                      int64_t n_new, int64_t capacity,
                                                                      int64_t num_pages, int64_t page_size) {
  const at::Tensor s = cache_seqlens.to(at::kLong).contiguous();
  std::vector<int64_t> n(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + s.numel()), first;
  if (cache_leftpad) {
    const at::Tensor f = cache_leftpad->to(at::kLong).contiguous();
    first.assign(f.data_ptr<int64_t>(), f.data_ptr<int64_t>() + f.numel());
  }
  const auto first_page = [&](size_t b) { return first.empty() ? 0 : first[b] / page_size; };
  const at::Tensor table = block_table ? block_table->to(at::kLong).contiguous() : at::Tensor();
  for (size_t b = 0; b < n.size(); ++b) {
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] + n_new <= capacity, "flash_cuda: cache_seqlens[", b, "] = ", n[b],
                      n_new > 0 ? c10::str(" plus the ", n_new, " new keys") : std::string(),
                      " does not fit the cache of ", capacity, " keys per sequence",
                      n_new > 0 ? c10::str(": cache_seqlens must be in [0, ", capacity - n_new, "]")
                                : c10::str(": cache_seqlens must be in [0, ", capacity, "]"));
    if (!first.empty())
      TORCH_CHECK_VALUE(first[b] >= 0 && first[b] <= n[b], "flash_cuda: cache_leftpad[", b, "] = ", first[b],
                        " is out of range: it must be in [0, cache_seqlens[", b, "] = ", n[b], "] (sequence ", b,
                        "'s keys are cache rows cache_leftpad[", b, "] .. cache_seqlens[", b, "] + Nnew - 1)");
    if (!block_table) continue;
    const int64_t* row = table.data_ptr<int64_t>() + b * table.size(1);
    for (int64_t page = first_page(b); page * page_size < n[b] + n_new; ++page)
      TORCH_CHECK_VALUE(row[page] >= 0 && row[page] < num_pages, "flash_cuda: block_table[", b, ", ", page, "] = ",
                        row[page], " is outside the pool of ", num_pages, " pages (k_cache.shape[0])");
  }
  if (block_table && n_new > 0) {
    // (page, b, entry) of every entry the new keys are written through, sorted by page
    std::vector<std::array<int64_t, 3>> written;
    for (size_t b = 0; b < n.size(); ++b)
      for (int64_t e = n[b] / page_size; e * page_size < n[b] + n_new; ++e)
        written.push_back({table.data_ptr<int64_t>()[b * table.size(1) + e], int64_t(b), e});
    std::sort(written.begin(), written.end());
    for (size_t b = 0; b < n.size(); ++b) {
      const int64_t* row = table.data_ptr<int64_t>() + b * table.size(1);
      for (int64_t e = first_page(b); e * page_size < n[b] + n_new; ++e) {
        auto w = std::lower_bound(written.begin(), written.end(), std::array<int64_t, 3>{row[e], -1, -1});
        for (; w != written.end() && (*w)[0] == row[e]; ++w)
          TORCH_CHECK_VALUE((*w)[1] == int64_t(b) && (*w)[2] == e, "flash_cuda: block_table[", b, ", ", e, "] = ",
                            row[e], " is also block_table[", (*w)[1], ", ", (*w)[2], "], a page that sequence ",
                            (*w)[1], "'s new keys are written into: the append would overwrite keys in use; give "
                            "every page that takes new keys to one entry of the table");
      }
    }
  }
  return {n, first};
}

// The caches are appended to in place: their version counters move, as ATen's in-place ops move
// them, so that autograd refuses a graph that saved them (and an inference tensor outside
// inference mode is refused here, before anything is written).
void bump_cache_versions(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  k_cache.unsafeGetTensorImpl()->bump_version();
  v_cache.unsafeGetTensorImpl()->bump_version();
}

std::tuple<at::Tensor, at::Tensor> kvcache_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                                                   const std::optional<at::Tensor>& v_new,
                                                   const at::Tensor& cache_seqlens,
                                                   const std::optional<at::Tensor>& block_table, double scale,
                                                   bool causal, int64_t window_left, int64_t window_right,
                                                   double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                                   int64_t num_splits, const std::optional<at::Tensor>& cache_leftpad) {
  const AttnOptions o = kvcache_options(q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table,
                                        scale, causal, window_left, window_right, softcap, alibi_slopes, num_splits);
  // Inside flash_cuda.emulate(): the CUDA kernels, run by the emulator, which like a GPU do not
  // read the lengths and the table on the host (they clamp them; flash_cuda's Python API checks
  // CPU values before any op runs).
  if (emu_active()) {
    if (k_new && k_new->size(2) > 0) bump_cache_versions(k_cache, v_cache);
    return kvcache_kernels(unit_last_stride(q), k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad,
                           block_table, o, num_splits, Executor::emu);
  }
  cpu::check_kernel_choices();  // before the append: a refused call leaves the cache as it was
  const int64_t n_new = k_new ? k_new->size(2) : 0;
  const int64_t capacity = block_table ? block_table->size(1) * k_cache.size(2) : k_cache.size(2);
  const auto [seqlens, first_keys] =
      kvcache_lengths(cache_seqlens, cache_leftpad, block_table, n_new, capacity, k_cache.size(0), k_cache.size(2));
  std::vector<int64_t> n_keys(seqlens);  // what each sequence attends to: its cache and the new keys
  for (size_t b = 0; b < n_keys.size(); ++b) n_keys[b] += n_new - (first_keys.empty() ? 0 : first_keys[b]);
  if (n_new > 0) {
    bump_cache_versions(k_cache, v_cache);  // first: the copies below would refuse an inference tensor half-way
    cpu::kv_append(k_cache, v_cache, *k_new, *v_new, seqlens, block_table);
  }
  return cpu::kvcache_fwd(unit_last_stride(q), k_cache, v_cache, n_keys, first_keys, block_table, o, num_splits);
}

#if defined(FLASH_CUDA_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> kvcache_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                                                    const std::optional<at::Tensor>& v_new,
                                                    const at::Tensor& cache_seqlens,
                                                    const std::optional<at::Tensor>& block_table, double scale,
                                                    bool causal, int64_t window_left, int64_t window_right,
                                                    double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                                    int64_t num_splits, const std::optional<at::Tensor>& cache_leftpad) {
  const AttnOptions o = kvcache_options(q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table,
                                        scale, causal, window_left, window_right, softcap, alibi_slopes, num_splits);
  if (k_new && k_new->size(2) > 0) bump_cache_versions(k_cache, v_cache);
  return kvcache_kernels(unit_last_stride(q), k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table,
                         o, num_splits, Executor::cuda);
}
#endif

}  // namespace

TORCH_LIBRARY(flash_cuda, m) {
  // causal: key j is visible to query i iff j <= i + (bottom_right ? Nk - Nq : 0).
  // deterministic: for the backward of this call (a bitwise repeatable dQ on CUDA).
  // window_left/right: the sliding window (-1: unbounded; causal sets right to 0); softcap: 0
  // = off; alibi_slopes: float32 (1 or B, Hq); bias: additive, a (B, Hq, Nq, Nk) view (stride
  // 0 on broadcast dims) in the accumulation dtype (csrc/attn_options.h).
  m.def("fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, bool bottom_right,"
        " bool deterministic=False, SymInt window_left=-1, SymInt window_right=-1, float softcap=0.0,"
        " Tensor? alibi_slopes=None, Tensor? bias=None, float dropout_p=0.0, Tensor? rng_state=None)"
        " -> (Tensor out, Tensor lse)");
  // dlse: optional gradient flowing into lse (None when lse was not used). dbias: dL/d bias,
  // (B, Hq, Nq, Nk) over the kernels' transposed storage [B][Hq][Nk][Nq rounded up to 8] on every
  // backend, when bias_grad; else an empty tensor. out and lse may come from a
  // forward over more keys than k and v (blockwise or ring attention: the chunks' gradients sum
  // to the whole's); the CPU backend's exact one-hot rows check lse against the row's own keys.
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse,"
        " float scale, bool causal, bool bottom_right, bool deterministic=False,"
        " SymInt window_left=-1, SymInt window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None,"
        " Tensor? bias=None, bool bias_grad=False, float dropout_p=0.0, Tensor? rng_state=None)"
        " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  // Packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D); sequence b is rows
  // [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q against [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k, v
  // (int32, B + 1 entries), bottom-right causal per sequence; lse (Hq, total_q).
  m.def("varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q,"
        " SymInt max_seqlen_k, float scale, bool causal, bool deterministic=False, SymInt window_left=-1,"
        " SymInt window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0,"
        " Tensor? rng_state=None) -> (Tensor out, Tensor lse)");
  m.def("varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool causal,"
        " bool deterministic=False, SymInt window_left=-1, SymInt window_right=-1, float softcap=0.0,"
        " Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Dropout (csrc/kernels/philox.h): rng_state is (seed, offset), int64 on q's device, from
  // philox_state, which reserves what a call with nk keys per row draws (philox.h
  // dropout_offset_increment) of the generator's offset (CUDA: read on the device,
  // safe under CUDA graph capture; CPU: a fresh seed from the CPU generator, offset 0).
  // inputs: the call's other input tensors, not read: under torch.func.vmap the op's rule
  // (flash_cuda/ops.py) runs when any of them is batched, not only like.
  m.def("philox_state(Tensor like, SymInt nk, Tensor[] inputs, Generator? generator=None) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // The keep mask of (rng_state, dropout_p) as a bool (B, H, Nq, Nk) tensor on rng_state's device;
  // with cu_seqlens (packed sequences) positions past a sequence's lengths are False.
  m.def("dropout_mask(Tensor rng_state, float dropout_p, SymInt batch, SymInt heads, SymInt nq, SymInt nk,"
        " Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> Tensor");
  // KV cache (inference): q (B, Hq, Nq, D) against the first cache_seqlens[b] + Nnew keys of a
  // contiguous (B, Hkv, capacity, D) cache, or of a page pool (num_pages, Hkv, page_size, D)
  // through block_table (B, pages per sequence) int32; k, v (B, Hkv, Nnew, D) are first written
  // into the cache in place at cache_seqlens[b].. (int32 (B,)). Causal is bottom-right aligned.
  // num_splits: key splits per query tile (0: chosen for the device; 1: none). cache_leftpad
  // (int32 (B,), either layout): sequence b's keys start at row cache_leftpad[b] of its cache.
  m.def("kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens,"
        " Tensor? block_table, float scale, bool causal, SymInt window_left=-1, SymInt window_right=-1,"
        " float softcap=0.0, Tensor? alibi_slopes=None, int num_splits=0, Tensor? cache_leftpad=None)"
        " -> (Tensor out, Tensor lse)");
  // The build's TORCH_CUDA_ARCH_LIST ("" without CUDA kernels), and whether a list has code for
  // compute capability cc (major x 10 + minor): what the launcher checks before a launch.
  m.def("_cuda_arch_list() -> str", [] {
    const char* a = cuda_arch_list();
    return std::string(a ? a : "");
  });
  m.def("_arch_list_covers(str arch_list, int cc) -> bool",
        [](std::string list, int64_t cc) { return arch_list_covers(list, static_cast<int>(cc)); });
  // 2^x by the CPU backend's exponent passes (rowops.h): the portable polynomial (generic) or the
  // version this CPU runs, for the tests that compare their bits.
  m.def("_cpu_exp2(Tensor x, bool generic) -> Tensor", [](const at::Tensor& x, bool generic) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "flash_cuda._cpu_exp2: x must be a float32 CPU "
                "tensor, got ", x.scalar_type(), " on ", x.device());
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    cpu::exp2_row(xc.data_ptr<float>(), xc.numel(), y.data_ptr<float>(), generic);
    return y;
  });
  // The CPU backend's softcap on a row (rowops.h: c tanh(x / c), and 1 - tanh^2), for the tests of
  // its tanh.
  m.def("_cpu_softcap(Tensor x, float c) -> (Tensor, Tensor)", [](const at::Tensor& x, double c) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "flash_cuda._cpu_softcap: x must be a float32 "
                "CPU tensor, got ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK(c > 0, "flash_cuda._cpu_softcap: c must be > 0, got ", c);
    at::Tensor y = x.clone(at::MemoryFormat::Contiguous), dcap = at::empty_like(y);  // (one copy, contiguous)
    cpu::softcap_row(y.data_ptr<float>(), dcap.data_ptr<float>(), y.numel(), static_cast<float>(c));
    return std::make_tuple(y, dcap);
  });
  // The CPU backend's cache of per-call temporaries (cpu/scratch.h): blocks served from it and
  // allocated since the process started, bytes idle in it now; for the tests.
  m.def("_cpu_scratch_stats() -> int[]", [] {
    const cpu::ScratchStats s = cpu::scratch_stats();
    return std::vector<int64_t>{s.hits, s.misses, s.idle_bytes};
  });
  m.def("_cpu_scratch_release() -> int", [] { return cpu::scratch_release(); });
  // The CPU forward's and backward's operand chunks forced to `pairs` (batch, kv head) pairs each, or
  // automatic at 0 (cpu/attention_cpu.h); returns the previous setting. For the tests.
  m.def("_cpu_force_chunk_pairs(int pairs) -> int", [](int64_t pairs) { return cpu::force_chunk_pairs(pairs); });
  // Fills every block the cache hands out with NaN from now on (on) or not (off): a test that
  // results never read temporaries no one wrote.
  m.def("_cpu_scratch_poison(bool on) -> ()", [](bool on) { cpu::scratch_poison(on); });
  // The in-place kernels the CPU decoding loop runs for a cache of `dtype` in its float path
  // (tile_gemm.h, float_rows_kernels): "avx512", "avx2" or "none", for the tests and benchmarks.
  m.def("_cpu_rows_kernels(ScalarType dtype) -> str", [](at::ScalarType dtype) {
    switch (cpu::float_rows_kernels(dtype)) {
      case cpu::RowsKernels::kAvx512: return std::string("avx512");
      case cpu::RowsKernels::kAvx2: return std::string("avx2");
      default: return std::string("none");
    }
  });
  // The exponent and rounding passes of the GEMM operands (rowops.h) on one row x: exp_affine_sum_*
  // (P = exp(a x - m), rounded to fp16/bf16 bits as int16, or in float32) with (sum, max x, sum of
  // the rounded values), or round_fp16 (a, m unused; no stats); generic as for _cpu_exp2 (fp16 and
  // bf16; float32 runs the version this CPU runs).
  m.def("_cpu_round_row(Tensor x, str op, str dtype, float a, float m, bool generic) -> Tensor[]",
        [](const at::Tensor& x, const std::string& op, const std::string& dtype, double a, double mm, bool generic) {
          TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1,
                      "flash_cuda._cpu_round_row: x must be a 1-D float32 CPU tensor");
          TORCH_CHECK(dtype == "float16" || dtype == "bfloat16" || dtype == "float32",
                      "flash_cuda._cpu_round_row: dtype must be float16, bfloat16 or float32, got ", dtype);
          TORCH_CHECK(op == "exp" || (op == "round" && dtype == "float16"), "flash_cuda._cpu_round_row: op must be "
                      "'exp', or 'round' with dtype float16, got op ", op, " with dtype ", dtype);
          const at::Tensor xc = x.contiguous();
          const int64_t n = xc.numel();
          at::Tensor stats = at::zeros({3}, xc.options());
          float* st = stats.data_ptr<float>();
          if (dtype == "float32") {
            at::Tensor y = at::empty_like(xc);
            st[0] = cpu::exp_affine_sum(xc.data_ptr<float>(), n, float(a), float(mm), y.data_ptr<float>(), st + 1);
            return std::vector<at::Tensor>{y, stats};
          }
          at::Tensor y = at::empty(xc.sizes(), xc.options().dtype(at::kShort));
          auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<int16_t>());
          if (op == "round")
            cpu::round_fp16(xc.data_ptr<float>(), n, yp, generic);
          else if (dtype == "float16")
            st[0] = cpu::exp_affine_sum_fp16(xc.data_ptr<float>(), n, float(a), float(mm), yp, st + 1, st + 2, generic);
          else
            st[0] = cpu::exp_affine_sum_bf16(xc.data_ptr<float>(), n, float(a), float(mm), yp, st + 1, st + 2, generic);
          return std::vector<at::Tensor>{y, stats};
        });
}

TORCH_LIBRARY_IMPL(flash_cuda, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
  m.impl("kvcache_fwd", &kvcache_fwd_cpu);
}

#if defined(FLASH_CUDA_WITH_CUDA)
TORCH_LIBRARY_IMPL(flash_cuda, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
  m.impl("varlen_fwd", &varlen_fwd_cuda);
  m.impl("varlen_bwd", &varlen_bwd_cuda);
  m.impl("kvcache_fwd", &kvcache_fwd_cuda);
}
#endif

}  // namespace flash_cuda

// An importable, otherwise empty Python module: importing flash_cuda._C runs the static
// registrations above (the pattern of pytorch/extension-cpp).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
