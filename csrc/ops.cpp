// flash_cuda operator library: schemas, the argument checks every backend relies on, and
// registration of the backends. The Python layer (flash_cuda/api.py) checks arguments
// first with user-facing messages; the checks here keep a direct torch.ops call from ever
// reaching a kernel with inconsistent shapes.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "cpu/attention_cpu.h"
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
              "flash_cuda: q, k, v must be on one device");
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

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale, bool causal,
                                           bool bottom_right, bool /*deterministic: for bwd*/) {
  check_qkv(q, k, v);
  if (emu_active())  // inside flash_cuda.emulate(): the CUDA kernels, run by the emulator
    return fwd_kernels(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), scale, causal, bottom_right,
                       Executor::emu);
  return cpu::attention_fwd(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                            scale, causal, bottom_right);
}

void check_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse) {
  check_qkv(q, k, v);
  check_like(dout, q, "dout");
  check_like(out, q, "out");
  check_lse(lse, q, "lse");
  if (dlse.has_value()) check_lse(*dlse, q, "dlse");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    double scale, bool causal, bool bottom_right, bool deterministic) {
  check_bwd(dout, q, k, v, out, lse, dlse);
  if (emu_active())
    return bwd_kernels(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                       unit_last_stride(out), lse, dlse, scale, causal, bottom_right, deterministic, Executor::emu);
  // The CPU backend is deterministic for a fixed thread count either way.
  return cpu::attention_bwd(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k),
                            unit_last_stride(v), unit_last_stride(out), lse, dlse, scale,
                            causal, bottom_right);
}

#if defined(FLASH_CUDA_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale, bool causal, bool bottom_right, bool /*deterministic*/) {
  check_qkv(q, k, v);
  return fwd_kernels(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), scale, causal, bottom_right,
                     Executor::cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    double scale, bool causal, bool bottom_right, bool deterministic) {
  check_bwd(dout, q, k, v, out, lse, dlse);
  return bwd_kernels(unit_last_stride(dout), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                     unit_last_stride(out), lse, dlse, scale, causal, bottom_right, deterministic, Executor::cuda);
}
#endif

}  // namespace

TORCH_LIBRARY(flash_cuda, m) {
  // causal: key j is visible to query i iff j <= i + (bottom_right ? Nk - Nq : 0).
  // deterministic: for the backward of this call (a bitwise repeatable dQ on CUDA).
  m.def("fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, bool bottom_right,"
        " bool deterministic=False) -> (Tensor out, Tensor lse)");
  // dlse: optional gradient flowing into lse (None when lse was not used).
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse,"
        " float scale, bool causal, bool bottom_right, bool deterministic=False)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(flash_cuda, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
}

#if defined(FLASH_CUDA_WITH_CUDA)
TORCH_LIBRARY_IMPL(flash_cuda, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
}
#endif

}  // namespace flash_cuda

// An importable, otherwise empty Python module: importing flash_cuda._C runs the static
// registrations above (the pattern of pytorch/extension-cpp).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
