// Host side of the attention kernels, shared by the CUDA build and the emulator: tensors to
// FwdParams (strides, GQA, causal alignment, alignment of the vector path), output
// allocation, and the call into one backend's dispatch (csrc/kernels/dispatch.h).
#include "kernel_launch.h"

#include <ATen/ATen.h>

#include "emu/runtime.h"
#include "kernels/api.h"

#if defined(FLASH_CUDA_WITH_CUDA)
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace flash_cuda {
namespace {

bool row_starts_aligned(const at::Tensor& x) {  // every (b, h, n) row 16-byte aligned
  constexpr int64_t kElems = 16 / 2;
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % kElems == 0 &&
         x.stride(1) % kElems == 0 && x.stride(2) % kElems == 0;
}

void check_kernel_inputs(const at::Tensor& q, Executor executor) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "flash_cuda: the CUDA kernels",
              executor == Executor::emu ? " (emulated)" : "", " take float16 or bfloat16 inputs, got ", q.scalar_type());
}

TensorRef ref(const at::Tensor& x) {
  TORCH_CHECK(x.stride(-1) == 1, "flash_cuda: the kernels need unit stride in the head dim");
  return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)};
}

// Sizes, scale, mask and the vector-path flag shared by the forward and backward params.
AttnShape attn_shape(const at::Tensor& q, const at::Tensor& k, double scale, bool causal, bool bottom_right,
                     std::initializer_list<const at::Tensor*> all) {
  const int64_t Nq = q.size(2), Nk = k.size(2);
  TORCH_CHECK(Nq < (int64_t(1) << 31) && Nk < (int64_t(1) << 31) && q.size(0) <= 65535 && q.size(1) <= 65535,
              "flash_cuda: sequence lengths must be < 2^31 and B, H <= 65535 for the CUDA kernels");
  AttnShape s{};
  s.b = static_cast<int>(q.size(0));
  s.hq = static_cast<int>(q.size(1));
  s.hkv = static_cast<int>(k.size(1));
  s.nq = static_cast<int>(Nq);
  s.nk = static_cast<int>(Nk);
  s.d = static_cast<int>(q.size(3));
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  s.mask = CausalMask::make(causal, bottom_right, Nq, Nk);
  s.vec_aligned = true;
  for (const at::Tensor* x : all) s.vec_aligned = s.vec_aligned && row_starts_aligned(*x);
  return s;
}

}  // namespace

emu::Buffer tensor_footprint(const at::Tensor& t, bool writable) {
  size_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 0) last += static_cast<size_t>(t.size(d) - 1) * static_cast<size_t>(t.stride(d));
  return {t.data_ptr(), t.numel() == 0 ? 0 : (last + 1) * t.element_size(), writable};
}

std::tuple<at::Tensor, at::Tensor> fwd_kernels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale, bool causal, bool bottom_right, Executor executor) {
  check_kernel_inputs(q, executor);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  auto out = at::empty({B, Hq, Nq, D}, q.options());
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no key at all: every row is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  FwdParams p{};
  static_cast<AttnShape&>(p) = attn_shape(q, k, scale, causal, bottom_right, {&q, &k, &v, &out});
  p.q = ref(q);
  p.k = ref(k);
  p.v = ref(v);
  p.o = ref(out);
  p.lse = lse.data_ptr<float>();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const char* err = nullptr;
  if (executor == Executor::emu) {
    emu::set_buffers({tensor_footprint(q, false), tensor_footprint(k, false), tensor_footprint(v, false),
                      tensor_footprint(out, true), tensor_footprint(lse, true)});
    err = emu_backend::fwd(p, bf16, causal, nullptr);
  } else {
#if defined(FLASH_CUDA_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(q.device());
    err = cuda_backend::fwd(p, bf16, causal, c10::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "flash_cuda: this build has no CUDA kernels");
#endif
  }
  TORCH_CHECK(err == nullptr, "flash_cuda: forward kernel launch failed: ", err);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_kernels(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           const std::optional<at::Tensor>& dlse, double scale,
                                                           bool causal, bool bottom_right, bool deterministic,
                                                           Executor executor) {
  check_kernel_inputs(q, executor);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {  // nothing to propagate through
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  BwdParams p{};
  static_cast<AttnShape&>(p) = attn_shape(q, k, scale, causal, bottom_right, {&q, &k, &v, &out, &dout, &dq, &dk, &dv});
  p.q = ref(q);
  p.k = ref(k);
  p.v = ref(v);
  p.o = ref(out);
  p.dout = ref(dout);
  p.dq = ref(dq);
  p.dk = ref(dk);
  p.dv = ref(dv);
  const auto lse_c = lse.contiguous();
  const auto dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  p.lse = lse_c.data_ptr<float>();
  p.dlse = dlse_c.defined() ? dlse_c.data_ptr<float>() : nullptr;
  auto di = at::empty(lse.sizes(), lse.options());
  p.di = di.data_ptr<float>();
  const bool emulated = executor == Executor::emu;
  const size_t accum_floats = deterministic ? 0 : (emulated ? emu_backend::bwd_dq_accum_floats(p)
#if defined(FLASH_CUDA_WITH_CUDA)
                                                             : cuda_backend::bwd_dq_accum_floats(p));
#else
                                                             : 0);
#endif
  auto dq_accum = at::empty({static_cast<int64_t>(accum_floats)}, lse.options());
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const char* err = nullptr;
  if (emulated) {
    std::vector<emu::Buffer> buffers;
    for (const at::Tensor* x : {&dout, &q, &k, &v, &out, &lse_c}) buffers.push_back(tensor_footprint(*x, false));
    for (const at::Tensor* x : {&dq, &dk, &dv, &di, &dq_accum}) buffers.push_back(tensor_footprint(*x, true));
    if (p.dlse) buffers.push_back(tensor_footprint(dlse_c, false));
    emu::set_buffers(std::move(buffers));
    err = emu_backend::bwd(p, bf16, causal, deterministic, nullptr);
  } else {
#if defined(FLASH_CUDA_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(q.device());
    err = cuda_backend::bwd(p, bf16, causal, deterministic, c10::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "flash_cuda: this build has no CUDA kernels");
#endif
  }
  TORCH_CHECK(err == nullptr, "flash_cuda: backward kernel launch failed: ", err);
  return {dq, dk, dv};
}

}  // namespace flash_cuda
