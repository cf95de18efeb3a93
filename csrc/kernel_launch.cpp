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

// [data_ptr, last element reached by the strides]: the global memory a launch may touch.
emu::Buffer footprint(const at::Tensor& t, bool writable) {
  size_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 0) last += static_cast<size_t>(t.size(d) - 1) * static_cast<size_t>(t.stride(d));
  return {t.data_ptr(), t.numel() == 0 ? 0 : (last + 1) * t.element_size(), writable};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fwd_kernels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale, bool causal, bool bottom_right, Executor executor) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == at::kHalf, "flash_cuda: the CUDA kernels", executor == Executor::emu ? " (emulated)" : "",
              " take float16 or bfloat16 inputs, got ", q.scalar_type());
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1, "flash_cuda: unit stride in the head dim");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(Nq < (int64_t(1) << 31) && Nk < (int64_t(1) << 31) && B <= 65535 && Hq <= 65535,
              "flash_cuda: sequence lengths must be < 2^31 and B, H <= 65535 for the CUDA kernels");
  auto out = at::empty({B, Hq, Nq, D}, q.options());
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Nk == 0) {  // no key at all: every row is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const at::Tensor* views[] = {&q, &k, &v, &out};
  int64_t* strides[] = {&p.q_batch_stride, &p.k_batch_stride, &p.v_batch_stride, &p.o_batch_stride};
  for (int i = 0; i < 4; ++i) {
    strides[i][0] = views[i]->stride(0);
    strides[i][1] = views[i]->stride(1);
    strides[i][2] = views[i]->stride(2);
  }
  p.b = static_cast<int>(B);
  p.hq = static_cast<int>(Hq);
  p.hkv = static_cast<int>(Hkv);
  p.nq = static_cast<int>(Nq);
  p.nk = static_cast<int>(Nk);
  p.d = static_cast<int>(D);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.mask = CausalMask::make(causal, bottom_right, Nq, Nk);
  p.vec_aligned = row_starts_aligned(q) && row_starts_aligned(k) && row_starts_aligned(v) && row_starts_aligned(out);

  const char* err = nullptr;
  if (executor == Executor::emu) {
    emu::set_buffers({footprint(q, false), footprint(k, false), footprint(v, false), footprint(out, true),
                      footprint(lse, true)});
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

}  // namespace flash_cuda
