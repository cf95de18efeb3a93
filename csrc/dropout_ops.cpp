// Dropout's two helper ops (schemas in ops.cpp): philox_state, the (seed, offset) of one call
// taken from torch's generator, and dropout_mask, the keep mask a call used, materialised.
//
// CPU (the CPU backend and the emulator): the seed is a fresh 64-bit draw of the CPU generator
// and the offset 0, so torch.manual_seed makes a step repeatable and every call gets new bits.
// CUDA: the generator's philox state, whose offset advances by what the call draws
// (dropout_offset_increment of its keys per row) as torch's fused
// kernels advance it; the values are resolved on the device (under CUDA graph capture they are
// read from the generator's device memory at replay), never copied to the host.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <utility>

#include "cpu/dropout_cpu.h"
#include "kernels/philox.h"

#if defined(FLASH_CUDA_WITH_CUDA)
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/philox_kernels.h"
#endif

namespace flash_cuda {
namespace {

void check_nk(int64_t nk) { TORCH_CHECK(nk >= 0, "flash_cuda: philox_state nk must be >= 0, got ", nk); }

// A call with no query or no key draws nothing: its state is zeros and the generator is left as
// it is, as torch's SDPA leaves it on empty inputs (before, every later mask of a run moved by one
// draw against the same code on SDPA: an audit).
bool draws_nothing(const at::Tensor& like, int64_t nk) { return like.numel() == 0 || nk == 0; }

at::Tensor philox_state_cpu(const at::Tensor& like, int64_t nk, at::TensorList /*inputs: for vmap rules*/,
                              std::optional<at::Generator> generator) {
  check_nk(nk);
  if (draws_nothing(like, nk)) return at::zeros({2}, like.options().dtype(at::kLong));
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  at::Tensor state = at::empty({2}, like.options().dtype(at::kLong));
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  state.data_ptr<int64_t>()[1] = 0;
  return state;
}

void check_mask_args(const at::Tensor& rng_state, double p, int64_t batch, int64_t heads, int64_t nq, int64_t nk,
                     const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
              "flash_cuda: rng_state must be an int64 tensor of 2 entries, got ", rng_state.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "flash_cuda: dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(batch >= 0 && heads >= 0 && nq >= 0 && nk >= 0, "flash_cuda: dropout_mask sizes must be >= 0");
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "flash_cuda: give both cu_seqlens or neither");
  for (const auto& [cu, name] : {std::pair{&cu_q, "cu_seqlens_q"}, std::pair{&cu_k, "cu_seqlens_k"}})
    if (cu->has_value())
      TORCH_CHECK((*cu)->scalar_type() == at::kInt && (*cu)->dim() == 1 && (*cu)->numel() == batch + 1 &&
                      (*cu)->device() == rng_state.device(),
                  "flash_cuda: ", name, " must be int32 (batch + 1,) = (", batch + 1, ",) on rng_state's device (",
                  rng_state.device(), "), got ", (*cu)->scalar_type(), " of shape ", (*cu)->sizes(), " on ",
                  (*cu)->device());
}

at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, double p, int64_t batch, int64_t heads, int64_t nq, int64_t nk,
                            const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  check_mask_args(rng_state, p, batch, heads, nq, nk, cu_q, cu_k);
  const at::Tensor st = rng_state.contiguous();
  const uint64_t seed = uint64_t(st.data_ptr<int64_t>()[0]), offset = uint64_t(st.data_ptr<int64_t>()[1]);
  const uint32_t threshold = dropout_threshold(p);
  at::Tensor z = at::empty({batch, heads, nq, nk}, rng_state.options().dtype(at::kFloat));
  const at::Tensor cq = cu_q ? cu_q->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor ck = cu_k ? cu_k->to(at::kLong).contiguous() : at::Tensor();
  float* zp = z.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      float* zbh = zp + (b * heads + h) * nq * nk;
      cpu::dropout_tile(zbh, nk, nq, nk, 0, 0, PhiloxStream::make(seed, offset, b * heads + h, threshold), 1.0f);
      if (cq.defined()) {  // past the sequence's lengths: not part of it
        const int64_t lq = cq.data_ptr<int64_t>()[b + 1] - cq.data_ptr<int64_t>()[b];
        const int64_t lk = ck.data_ptr<int64_t>()[b + 1] - ck.data_ptr<int64_t>()[b];
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t j = 0; j < nk; ++j)
            if (i >= lq || j >= lk) zbh[i * nk + j] = 0.0f;
      }
    }
  return z > 0.0f;
}

#if defined(FLASH_CUDA_WITH_CUDA)
at::Tensor philox_state_cuda(const at::Tensor& like, int64_t nk, at::TensorList /*inputs: for vmap rules*/,
                               std::optional<at::Generator> generator) {
  check_nk(nk);
  const c10::cuda::CUDAGuard guard(like.device());
  if (draws_nothing(like, nk)) return at::zeros({2}, like.options().dtype(at::kLong));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(static_cast<uint64_t>(dropout_offset_increment(nk)));
  }
  cuda_backend::PhiloxSource src{};
  if (st.captured_) {
    src.seed_ptr = st.seed_.ptr;
    src.offset_ptr = st.offset_.ptr;
    src.offset_intragraph = st.offset_intragraph_;
  } else {
    src.seed = st.seed_.val;
    src.offset = st.offset_.val;
  }
  at::Tensor state = at::empty({2}, like.options().dtype(at::kLong));
  const char* err =
      cuda_backend::write_philox_state(state.data_ptr<int64_t>(), src, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "flash_cuda: philox_state launch failed: ", err);
  return state;
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng_state, double p, int64_t batch, int64_t heads, int64_t nq,
                             int64_t nk, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  check_mask_args(rng_state, p, batch, heads, nq, nk, cu_q, cu_k);
  const c10::cuda::CUDAGuard guard(rng_state.device());
  const at::Tensor st = rng_state.contiguous();
  const at::Tensor cq = cu_q ? cu_q->contiguous() : at::Tensor(), ck = cu_k ? cu_k->contiguous() : at::Tensor();
  at::Tensor out = at::empty({batch, heads, nq, nk}, rng_state.options().dtype(at::kBool));
  const char* err = cuda_backend::write_dropout_mask(
      out.data_ptr<bool>(), st.data_ptr<int64_t>(), dropout_threshold(p), batch, heads, nq, nk,
      cq.defined() ? cq.data_ptr<int>() : nullptr, ck.defined() ? ck.data_ptr<int>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "flash_cuda: dropout_mask launch failed: ", err);
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(flash_cuda, CPU, m) {
  m.impl("philox_state", &philox_state_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

#if defined(FLASH_CUDA_WITH_CUDA)
TORCH_LIBRARY_IMPL(flash_cuda, CUDA, m) {
  m.impl("philox_state", &philox_state_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}
#endif

}  // namespace flash_cuda
