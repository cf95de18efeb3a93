// Host side of the attention kernels, shared by the CUDA build and the emulator: tensors to
// FwdParams (strides, GQA, causal alignment), row alignment, output allocation, and the call
// into one backend's dispatch (csrc/kernels/dispatch.h).
#include "kernel_launch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <utility>

#include "empty_like.h"
#include "emu/pin_options.h"
#include "emu/runtime.h"
#include "kernels/api.h"

#if defined(FLASH_CUDA_WITH_CUDA)
#include <cuda_runtime_api.h>
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

// The kernels move every tile in whole 16-byte chunks (cp.async, 128-bit loads and stores), so
// every (b, h, n) row must start 16-byte aligned and the head dim they see is d rounded up to a
// multiple of 8. A tensor that is not like that (a head dim that is not a multiple of 8, such
// strides, an offset view) is copied into rows padded to a multiple of 8 elements with zeros,
// as FlashAttention-2 pads head dims: zero columns add nothing to Q K^T, dO V^T or rowsum(dO O),
// and the outputs' padding columns are computed in a scratch copy and dropped. Aligned tensors
// with a head dim that is a multiple of 8 (the usual case) are used as they are, with no copy.
bool kernel_ready(const at::Tensor& x) { return x.size(3) % 8 == 0 && x.stride(3) == 1 && row_starts_aligned(x); }

at::Tensor padded_rows(const at::Tensor& x) {
  const int64_t d = x.size(3);
  return at::empty({x.size(0), x.size(1), x.size(2), (d + 7) / 8 * 8}, x.options());
}

at::Tensor aligned_input(const at::Tensor& x) {
  if (kernel_ready(x)) return x;
  auto padded = padded_rows(x);
  const int64_t d = x.size(3);
  padded.narrow(3, d, padded.size(3) - d).zero_();
  return padded.narrow(3, 0, d).copy_(x);
}

at::Tensor aligned_output(const at::Tensor& x) {
  return kernel_ready(x) ? x : padded_rows(x).narrow(3, 0, x.size(3));
}

void copy_back(const at::Tensor& dst, const at::Tensor& src) {
  if (!src.is_same(dst)) dst.copy_(src);
}

// The kernels' dtype for q; fp32 (TF32 tensor cores) where the caller has an fp32 kernel.
Dtype check_kernel_inputs(const at::Tensor& q, Executor executor, bool fp32 = false) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || (fp32 && t == at::kFloat), "flash_cuda: the CUDA kernels",
              executor == Executor::emu ? " (emulated)" : "", " take float16 or bfloat16 inputs",
              fp32 ? " (or float32)" : "", ", got ", t);
  return t == at::kFloat ? Dtype::f32 : (t == at::kBFloat16 ? Dtype::bf16 : Dtype::f16);
}

// The device q's kernels run on (kernels/device.h): the current GPU's properties, or the
// emulated profile. A device older than the kernels, or a GPU this build has no code for, is
// refused here, before any allocation, with what to do about it.
DeviceLimits device_limits(const at::Tensor& q, Executor executor) {
  const auto dtype = q.scalar_type();
  DeviceLimits dev;
  std::string name;
  if (executor == Executor::emu) {
    const emu::Device d = emu::options().device;
    dev.cc = d.cc;
    dev.sm_count = d.sm_count;
    dev.smem_per_block = d.smem_per_block;
    name = "the emulated " + d.name;
  } else {
#if defined(FLASH_CUDA_WITH_CUDA)
    const int index = q.device().index();
    int major = 0, minor = 0, sms = 0, smem = 0;
    for (auto [attr, value] : {std::pair{cudaDevAttrComputeCapabilityMajor, &major},
                               {cudaDevAttrComputeCapabilityMinor, &minor}, {cudaDevAttrMultiProcessorCount, &sms},
                               {cudaDevAttrMaxSharedMemoryPerBlockOptin, &smem}})
      TORCH_CHECK(cudaDeviceGetAttribute(value, attr, index) == cudaSuccess,
                  "flash_cuda: could not read the properties of cuda:", index);
    dev.cc = major * 10 + minor;
    dev.sm_count = sms;
    dev.smem_per_block = static_cast<size_t>(smem);
    name = "cuda:" + std::to_string(index);
#endif
  }
  // FLASH_CUDA_SMEM_PER_BLOCK=<bytes> lowers the shared memory the dispatcher may use: the
  // compact configurations then run on a larger GPU (how the GPU tests cover them).
  if (const char* cap = std::getenv("FLASH_CUDA_SMEM_PER_BLOCK")) {
    char* end = nullptr;
    const long long bytes = std::strtoll(cap, &end, 10);
    TORCH_CHECK(end != cap && *end == '\0' && bytes > 0, "flash_cuda: FLASH_CUDA_SMEM_PER_BLOCK must be a positive "
                "number of bytes, got '", cap, "'");
    dev.smem_per_block = std::min(dev.smem_per_block, static_cast<size_t>(bytes));
  }
  TORCH_CHECK_NOT_IMPLEMENTED(dev.cc >= kMinComputeCapability, "flash_cuda: the CUDA kernels need compute capability ",
                              kMinComputeCapability / 10, ".", kMinComputeCapability % 10, " or newer (mma.sync "
                              "m16n8k8, ldmatrix); ", name, " has ", dev.cc / 10, ".", dev.cc % 10);
  // sm_75's tensor cores multiply fp16 only (device.h)
  TORCH_CHECK_NOT_IMPLEMENTED(dev.cc >= kSm80 || dtype == at::kHalf, "flash_cuda: ", dtype == at::kBFloat16 ? "bfloat16" : "float32",
                              " inputs need compute capability 8.0 or newer (bf16 and tf32 tensor cores); ", name, " has ",
                              dev.cc / 10, ".", dev.cc % 10, ": pass float16 q, k, v there");
  // (the emulator runs the kernels' source, whatever the build's list)
  const char* archs = executor == Executor::emu ? nullptr : cuda_arch_list();
  TORCH_CHECK(archs == nullptr || arch_list_covers(archs, dev.cc), "flash_cuda: this build has no kernels for ", name,
              " (compute capability ", dev.cc / 10, ".", dev.cc % 10, "): it was built for TORCH_CUDA_ARCH_LIST=\"",
              archs, "\"; reinstall with TORCH_CUDA_ARCH_LIST including ", dev.cc / 10, ".", dev.cc % 10,
              " (or an older one of the same major version, or a +PTX entry of an older one)");
  return dev;
}

// A tensor as the kernels address it; a packed sequence's rows start at its cu_seqlens entry,
// whatever the batch index: batch stride 0.
TensorRef ref(const at::Tensor& x, const std::optional<Packed>& packed) {
  TORCH_CHECK(x.stride(-1) == 1, "flash_cuda: the kernels need unit stride in the head dim, got a tensor of shape ",
              x.sizes(), " and strides ", x.strides());
  return {x.data_ptr(), packed ? 0 : x.stride(0), x.stride(1), x.stride(2)};
}

// An output like x, in x's memory layout with unit stride in D (empty_like.h), as on the CPU
// backend; packed: a (1, H, total, D) view of (total, H, D).
at::Tensor empty_output(const at::Tensor& x, const std::optional<Packed>& packed) {
  if (!packed) return empty_like_unit_stride(x);
  return at::empty({x.size(2), x.size(1), x.size(3)}, x.options()).permute({1, 0, 2}).unsqueeze(0);
}

// The band for a launch over nq x nk (the longest sequences), whose diagonals the kernels compare
// in 32 bits (mask.h): past 2^30 keys a window can leave that range.
BandMask kernel_band(const AttnOptions& o, int64_t nq, int64_t nk) {
  const BandMask m = o.band(nq, nk);
  TORCH_CHECK(m.fits_32_bits(nq, nk), "flash_cuda: window (", o.window_left, ", ", o.window_right, ") with ", nq,
              " queries and ", nk, " keys leaves the CUDA kernels' 32-bit diagonal offsets: max(Nq, Nk) + ",
              "the bound + 256 must be < 2^31");
  return m;
}

// What the grids and the kernels' 32-bit tile arithmetic take, checked before a call allocates or
// writes anything (a refused KV-cache call leaves its cache as it was): lengths, and a packed
// batch's token totals, below 2^31 - 256 (the kernels round them up to whole tiles in 32 bits); at
// most 65535 batch entries (sequences) and heads (the grids' y and z). q, k: (B, H, N, D), packed
// ones (1, H, total, D).
void check_launch_limits(const at::Tensor& q, const at::Tensor& k, const std::optional<Packed>& packed) {
  constexpr int64_t kMaxLen = (int64_t(1) << 31) - 256;
  if (packed) {
    TORCH_CHECK(packed->max_q < kMaxLen && packed->max_k < kMaxLen && q.size(2) < kMaxLen && k.size(2) < kMaxLen,
                "flash_cuda: the CUDA kernels need sequence lengths and a packed batch's token totals below "
                "2^31 - 256, got max_seqlen_q ", packed->max_q, " and max_seqlen_k ", packed->max_k, ", total_q ",
                q.size(2), " and total_k ", k.size(2));
  } else {
    TORCH_CHECK(q.size(2) < kMaxLen && k.size(2) < kMaxLen,
                "flash_cuda: the CUDA kernels need sequence lengths below 2^31 - 256, got Nq ", q.size(2), " and Nk ",
                k.size(2));
  }
  const int64_t B = packed ? packed->batch() : q.size(0);
  TORCH_CHECK(B <= 65535 && q.size(1) <= 65535 && k.size(1) <= 65535, "flash_cuda: the CUDA kernels need at most "
              "65535 ", packed ? "sequences" : "batch entries", " and heads, got ", B, ", ", q.size(1),
              " query heads and ", k.size(1), " key/value heads");
}

// Sizes, scale, band and modifiers shared by the forward and backward params (the tensors in
// `o` and `packed` stay alive for the call: the params point into them).
AttnShape attn_shape(const at::Tensor& q, const at::Tensor& k, double scale, const AttnOptions& o,
                     const std::optional<Packed>& packed) {
  // Packed: the grid covers the longest sequence (at least one tile: blocks past their
  // sequence's end exit), the batch is the number of sequences.
  const int64_t Nq = packed ? std::max<int64_t>(packed->max_q, 1) : q.size(2);
  const int64_t Nk = packed ? std::max<int64_t>(packed->max_k, 1) : k.size(2);
  const int64_t B = packed ? packed->batch() : q.size(0);  // (check_launch_limits: the callers, first)
  AttnShape s{};
  s.b = static_cast<int>(B);
  s.hq = static_cast<int>(q.size(1));
  s.hkv = static_cast<int>(k.size(1));
  s.nq = static_cast<int>(Nq);
  s.nk = static_cast<int>(Nk);
  s.total_q = static_cast<int>(q.size(2));
  s.total_k = static_cast<int>(k.size(2));
  if (packed) {
    s.cu_seqlens_q = packed->cu_q.data_ptr<int>();
    s.cu_seqlens_k = packed->cu_k.data_ptr<int>();
  }
  s.lse_batch_stride = packed ? 0 : s.hq * Nq;  // lse: (B, Hq, Nq), packed (Hq, total_q)
  s.lse_head_stride = packed ? q.size(2) : Nq;
  s.d = static_cast<int>((q.size(3) + 7) / 8 * 8);  // aligned_input/aligned_output pad to it
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  s.mask = kernel_band(o, Nq, Nk);
  s.mod.softcap = static_cast<float>(o.softcap);
  if (o.alibi) {
    s.mod.alibi = o.alibi->data_ptr<float>();
    s.mod.alibi_bstride = o.alibi->size(0) == 1 ? 0 : o.alibi->size(1);
  }
  if (o.bias) {
    s.mod.bias = o.bias->data_ptr<float>();
    for (int d = 0; d < 4; ++d) s.mod.bias_stride[d] = o.bias->stride(d);
  }
  s.drop = o.kernel_dropout();
  // fp32: TF32 products where torch allows them for matmuls (torch.backends.cuda.matmul.allow_tf32),
  // else 3xTF32 (kernels/tf32.h)
  s.tf32x3 = !at::globalContext().allowTF32CuBLAS();
  return s;
}

// The bias as the kernels read it (bias_tile.h: 16-byte cp.async chunks along the keys): unit key
// stride and every row 16-byte aligned. Anything else (a mask broadcast over keys, a transposed
// or offset view, Nk not a multiple of 4 with rows packed) is copied once into rows padded to a
// multiple of 4 floats, keeping its broadcast batch, head and query dims at size 1 (stride 0).
at::Tensor kernel_bias(const at::Tensor& b) {
  bool ready = reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0 && b.stride(3) == 1;
  for (int d = 0; d < 3; ++d) ready = ready && b.stride(d) % 4 == 0;
  if (ready) return b;
  at::Tensor src = b;
  for (int d = 0; d < 3; ++d)
    if (b.stride(d) == 0) src = src.narrow(d, 0, 1);
  const int64_t nk = b.size(3), nk_pad = (nk + 3) / 4 * 4;
  at::Tensor rows = at::zeros({src.size(0), src.size(1), src.size(2), nk_pad}, b.options());
  rows.narrow(3, 0, nk).copy_(src);
  return rows.narrow(3, 0, nk).expand(b.sizes());
}

AttnOptions kernel_options(const AttnOptions& o) {
  AttnOptions k = o;
  if (k.bias) k.bias = kernel_bias(*k.bias);
  return k;
}

// The modifier tensors an emulated launch may read.
void add_mod_buffers(std::vector<emu::Buffer>& buffers, const AttnOptions& o, const std::optional<Packed>& packed) {
  if (o.alibi) buffers.push_back(tensor_footprint(*o.alibi, false));
  if (o.bias) buffers.push_back(tensor_footprint(*o.bias, false));
  if (o.dropout()) buffers.push_back(tensor_footprint(*o.rng_state, false));
  if (packed) {
    buffers.push_back(tensor_footprint(packed->cu_q, false));
    buffers.push_back(tensor_footprint(packed->cu_k, false));
  }
}

}  // namespace

#define FC_STRINGIFY2(x) #x
#define FC_STRINGIFY(x) FC_STRINGIFY2(x)
const char* cuda_arch_list() {
#if defined(FLASH_CUDA_ARCH_LIST)
  return FC_STRINGIFY(FLASH_CUDA_ARCH_LIST);  // setup.py: the entries joined by ':'
#else
  return nullptr;
#endif
}

// Entries "M.m", "M.m+PTX" (and the arch-specific "M.ma" / "M.mf"), separated by ';', ':' or
// spaces.
// SASS for M.m runs on M.m' with m' >= m (not the arch-specific kind: on M.m alone); PTX for
// M.m is compiled by the driver for any later device, but below 8.0 only for devices below 8.0:
// a compute_75 PTX holds the Turing kernels alone (the sm_80+ ones are empty there, ptx.h's
// kernel_arch_matches), and the dispatcher picks sm_80 configurations on an sm_80+ device. A
// name torch also accepts ("Ampere") is not judged here: the launch will say.
bool arch_list_covers(const std::string& list, int cc) {
  size_t pos = 0;
  while (pos < list.size()) {
    size_t end = list.find_first_of(";: ", pos);
    if (end == std::string::npos) end = list.size();
    std::string entry = list.substr(pos, end - pos);
    pos = end + 1;
    if (entry.empty()) continue;
    const bool ptx = entry.size() > 4 && entry.compare(entry.size() - 4, 4, "+PTX") == 0;
    if (ptx) entry.resize(entry.size() - 4);
    const bool specific = !entry.empty() && (entry.back() == 'a' || entry.back() == 'f');
    if (specific) entry.pop_back();
    const size_t dot = entry.find('.');
    if (dot == std::string::npos || dot == 0 || dot + 2 != entry.size() || !isdigit(entry[dot + 1])) return true;
    for (size_t i = 0; i < dot; ++i)
      if (!isdigit(entry[i])) return true;
    const int arch = std::stoi(entry.substr(0, dot)) * 10 + (entry[dot + 1] - '0');
    if (arch == cc || (!specific && arch / 10 == cc / 10 && arch < cc) || (ptx && arch < cc && (arch >= kSm80) == (cc >= kSm80)))
      return true;
  }
  return false;
}

emu::Buffer tensor_footprint(const at::Tensor& t, bool writable) {
  size_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 0) last += static_cast<size_t>(t.size(d) - 1) * static_cast<size_t>(t.stride(d));
  return {t.data_ptr(), t.numel() == 0 ? 0 : (last + 1) * t.element_size(), writable};
}

// What the kernels may touch of a tensor they get: its rows with the head dim rounded up to a
// multiple of 8 (inside the storage: aligned_input / aligned_output made it so).
emu::Buffer kernel_footprint(const at::Tensor& x, bool writable) {
  if (x.dim() != 4 || x.size(3) % 8 == 0) return tensor_footprint(x, writable);
  return tensor_footprint(x.as_strided({x.size(0), x.size(1), x.size(2), (x.size(3) + 7) / 8 * 8}, x.strides()),
                          writable);
}

std::tuple<at::Tensor, at::Tensor> fwd_kernels(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, const AttnOptions& opt_in, Executor executor,
                                               const std::optional<Packed>& packed) {
  const emu::PinOptions pin;  // (emulated: one device profile for the whole call)
  const Dtype dtype = check_kernel_inputs(q_in, executor, /*fp32=*/true);
  if (q_in.numel() > 0 && k_in.size(2) > 0) check_launch_limits(q_in, k_in, packed);  // (else no launch)
  const AttnOptions opt = kernel_options(opt_in);
  const double scale = opt.scale;
  const DeviceLimits dev = device_limits(q_in, executor);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2);
  auto out = empty_output(q_in, packed);
  auto lse = at::empty({B, Hq, Nq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k_in.size(2) == 0) {  // no key at all: every row is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  // The forward's softmax needs a positive scale (csrc/kernels/softmax.h: the row max is taken
  // on the raw scores). scale * (q . k) = |scale| * (-q . k) exactly, and scale 0 is uniform
  // attention, which zero scores give at any scale: a copy of q in these rare cases.
  const at::Tensor q_pos = scale > 0 ? q_in : (scale < 0 ? q_in.neg() : at::zeros_like(q_in));
  const double scale_pos = scale > 0 ? scale : (scale < 0 ? -scale : 1.0);
  const at::Tensor q = aligned_input(q_pos), k = aligned_input(k_in), v = aligned_input(v_in);
  at::Tensor o = aligned_output(out);
  if (packed) {  // rows past cu_seqlens_q[B] (a buffer with room to spare) belong to no launch
    o.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  FwdParams p{};
  static_cast<AttnShape&>(p) = attn_shape(q, k, scale_pos, opt, packed);
  p.q = ref(q, packed);
  p.k = ref(k, packed);
  p.v = ref(v, packed);
  p.o = ref(o, packed);
  p.lse = lse.data_ptr<float>();
  const char* err = nullptr;
  if (executor == Executor::emu) {
    std::vector<emu::Buffer> buffers{kernel_footprint(q, false), kernel_footprint(k, false),
                                     kernel_footprint(v, false), kernel_footprint(o, true), tensor_footprint(lse, true)};
    add_mod_buffers(buffers, opt, packed);
    emu::set_buffers(std::move(buffers));
    err = emu_backend::fwd(p, dtype, dev, nullptr);
  } else {
#if defined(FLASH_CUDA_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(q.device());
    err = cuda_backend::fwd(p, dtype, dev, c10::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "flash_cuda: this build has no CUDA kernels");
#endif
  }
  TORCH_CHECK(err == nullptr, "flash_cuda: forward kernel launch failed: ", err);
  copy_back(out, o);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_kernels(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const AttnOptions& opt_in,
    bool deterministic_in, Executor executor, const std::optional<Packed>& packed) {
  const emu::PinOptions pin;  // (emulated: one device profile for the whole call)
  const Dtype dtype = check_kernel_inputs(q_in, executor, /*fp32=*/true);
  if (q_in.numel() > 0 && k_in.numel() > 0) check_launch_limits(q_in, k_in, packed);  // (else no launch)
  const AttnOptions opt = kernel_options(opt_in);
  // fp32: dQ always from the deterministic pass (kernels/traits.h), no accumulator
  const bool deterministic = deterministic_in || dtype == Dtype::f32;
  const DeviceLimits dev = device_limits(q_in, executor);
  const double scale = opt.scale;
  auto dq_out = empty_output(q_in, packed);
  auto dk_out = empty_output(k_in, packed);
  auto dv_out = empty_output(v_in, packed);
  // dL/d bias, dense and transposed as the kernels write it ([B][Hq][Nk][Nq rounded up to 8]:
  // ScoreMod::dbias), returned as a (B, Hq, Nq, Nk) view; elements in tiles the band skips are
  // never written: zeros
  const int64_t nq_pad = (q_in.size(2) + 7) / 8 * 8;
  at::Tensor dbias_t = opt.bias_grad ? at::zeros({q_in.size(0), q_in.size(1), k_in.size(2), nq_pad}, lse.options())
                                     : at::Tensor();
  at::Tensor dbias = opt.bias_grad ? dbias_t.narrow(3, 0, q_in.size(2)).transpose(2, 3) : at::Tensor();
  if (q_in.numel() == 0 || k_in.numel() == 0) {  // nothing to propagate through
    dq_out.zero_();
    dk_out.zero_();
    dv_out.zero_();
    return {dq_out, dk_out, dv_out, dbias};
  }
  const at::Tensor q = aligned_input(q_in), k = aligned_input(k_in), v = aligned_input(v_in);
  const at::Tensor out = aligned_input(out_in), dout = aligned_input(dout_in);
  const at::Tensor dq = aligned_output(dq_out), dk = aligned_output(dk_out), dv = aligned_output(dv_out);
  if (packed) {  // nor in the backward: rows past cu_seqlens[B] get zero gradients
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  BwdParams p{};
  static_cast<AttnShape&>(p) = attn_shape(q, k, scale, opt, packed);
  p.mod.dbias = dbias_t.defined() ? dbias_t.data_ptr<float>() : nullptr;
  p.mod.dbias_stride = nq_pad;
  p.q = ref(q, packed);
  p.k = ref(k, packed);
  p.v = ref(v, packed);
  p.o = ref(out, packed);
  p.dout = ref(dout, packed);
  p.dq = ref(dq, packed);
  p.dk = ref(dk, packed);
  p.dv = ref(dv, packed);
  const auto lse_c = lse.contiguous();
  const auto dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  p.lse = lse_c.data_ptr<float>();
  p.dlse = dlse_c.defined() ? dlse_c.data_ptr<float>() : nullptr;
  auto row_stats = at::empty({2 * p.scratch_rows_total()}, lse.options());
  p.row_stats = row_stats.data_ptr<float>();
  const bool emulated = executor == Executor::emu;
  const size_t accum_floats = deterministic ? 0 : (emulated ? emu_backend::bwd_dq_accum_floats(p)
#if defined(FLASH_CUDA_WITH_CUDA)
                                                             : cuda_backend::bwd_dq_accum_floats(p));
#else
                                                             : 0);
#endif
  auto dq_accum = at::empty({static_cast<int64_t>(accum_floats)}, lse.options());
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  const char* err = nullptr;
  if (emulated) {
    std::vector<emu::Buffer> buffers;
    for (const at::Tensor* x : {&dout, &q, &k, &v, &out, &lse_c}) buffers.push_back(kernel_footprint(*x, false));
    for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&dq, &dk, &dv, &row_stats, &dq_accum})
      buffers.push_back(kernel_footprint(*x, true));
    if (p.dlse) buffers.push_back(tensor_footprint(dlse_c, false));
    if (dbias_t.defined()) buffers.push_back(tensor_footprint(dbias_t, true));
    add_mod_buffers(buffers, opt, packed);
    emu::set_buffers(std::move(buffers));
    err = emu_backend::bwd(p, dtype, deterministic, dev, nullptr);
  } else {
#if defined(FLASH_CUDA_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(q.device());
    err = cuda_backend::bwd(p, dtype, deterministic, dev, c10::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "flash_cuda: this build has no CUDA kernels");
#endif
  }
  TORCH_CHECK(err == nullptr, "flash_cuda: backward kernel launch failed: ", err);
  copy_back(dq_out, dq);
  copy_back(dk_out, dk);
  copy_back(dv_out, dv);
  return {dq_out, dk_out, dv_out, dbias};
}

// GQA on a KV cache: when nothing in the scores depends on the query head or position (no
// ALiBi, no window, causal only with one query, where it is the identity), the query heads of
// a kv group are packed into one query tile, rows (head in group, query), so that one read of
// the cache serves the whole group: decoding is memory-bound (FlashAttention-2 packs the same
// way for one query). Otherwise each query head is its own tile.
namespace {
bool pack_kv_groups(const at::Tensor& q, int64_t hkv, const AttnOptions& o) {
  return q.size(1) > hkv && !o.alibi && o.window_left < 0 && o.window_right < 0 && (!o.causal || q.size(2) == 1);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_kernels(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new_in,
                                                   const std::optional<at::Tensor>& v_new_in,
                                                   const at::Tensor& cache_seqlens,
                                                   const std::optional<at::Tensor>& cache_leftpad,
                                                   const std::optional<at::Tensor>& block_table,
                                                   const AttnOptions& opt_in, int64_t num_splits, Executor executor) {
  const emu::PinOptions pin;  // (emulated: one device profile for the whole call)
  const Dtype dtype = check_kernel_inputs(q_in, executor);
  const DeviceLimits dev = device_limits(q_in, executor);
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->size(3) % 8 == 0 && c->stride(3) == 1 && row_starts_aligned(*c),
                "flash_cuda: the CUDA kernels need k_cache and v_cache with a head dim that is a multiple of 8, unit "
                "stride in it and 16-byte aligned rows (the cache is written in place and cannot be copied), got "
                "shape ", c->sizes(), " strides ", c->strides(), " storage offset ", c->storage_offset(), " at address ",
                c->data_ptr());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3), Hkv = k_cache.size(1);
  const bool paged = block_table.has_value();
  const int64_t capacity = paged ? block_table->size(1) * k_cache.size(2) : k_cache.size(2);
  TORCH_CHECK(capacity < (int64_t(1) << 31) - 256, "flash_cuda: a KV cache must hold fewer than 2^31 - 256 keys per sequence");
  const int64_t n_new = k_new_in && k_new_in->numel() > 0 ? k_new_in->size(2) : 0;
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const at::Tensor leftpad = cache_leftpad ? cache_leftpad->contiguous() : at::Tensor();
  const at::Tensor table = paged ? block_table->contiguous() : at::Tensor();
  KvCache cache{};
  if (paged) {
    cache.block_table = table.data_ptr<int>();
    cache.block_table_stride = table.stride(0);
    cache.page_size = static_cast<int>(k_cache.size(2));
    cache.num_pages = static_cast<int>(k_cache.size(0));
  }
  const bool emulated = executor == Executor::emu;
#if defined(FLASH_CUDA_WITH_CUDA)
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!emulated) guard.emplace(q_in.device());
  const cudaStream_t stream = emulated ? nullptr : c10::cuda::getCurrentCUDAStream().stream();
#else
  TORCH_CHECK(emulated, "flash_cuda: this build has no CUDA kernels");
  [[maybe_unused]] void* const stream = nullptr;  // (the emulator takes none)
#endif
  auto check = [](const char* err) { TORCH_CHECK(err == nullptr, "flash_cuda: KV-cache kernel launch failed: ", err); };
  // The global memory a launch may touch (emulator); the caches writable when appending.
  auto buffers = [&](std::vector<emu::Buffer> more) {
    more.push_back(tensor_footprint(k_cache, n_new > 0));
    more.push_back(tensor_footprint(v_cache, n_new > 0));
    more.push_back(tensor_footprint(seqlens, false));
    if (leftpad.defined()) more.push_back(tensor_footprint(leftpad, false));
    if (paged) more.push_back(tensor_footprint(table, false));
    emu::set_buffers(std::move(more));
  };

  // Every check of the call, and its allocations, before the append, so that a refused call leaves
  // the cache as it was (only the attention's own launch can fail after it).
  auto out = at::empty({B, Hq, Nq, D}, q_in.options());
  auto lse = at::empty({B, Hq, Nq}, q_in.options().dtype(at::kFloat));
  AttnOptions opt = opt_in;
  const bool pack = pack_kv_groups(q_in, Hkv, opt);
  if (pack) opt.causal = false;  // only with one query, where causal (bottom-right) hides nothing
  const int64_t group = pack ? Hq / Hkv : 1;
  const double scale = opt.scale;  // a positive scale for the softmax: see fwd_kernels
  const at::Tensor q_pos = scale > 0 ? q_in : (scale < 0 ? q_in.neg() : at::zeros_like(q_in));
  // packed: (B, Hkv, group Nq, D), rows (head in group, query); contiguous, so they are uniformly strided
  // (and aligned: a contiguous view at an odd offset stays at it, audit)
  const at::Tensor q = aligned_input(pack ? q_pos.contiguous().view({B, Hkv, group * Nq, D}) : q_pos);
  const at::Tensor o = pack ? out.view({B, Hkv, group * Nq, D}) : out;
  const at::Tensor lse_k = pack ? lse.view({B, Hkv, group * Nq}) : lse;
  // the grids of the append (B x Hkv) and the attention (B x query tiles' heads: Hkv when packed)
  if (out.numel() > 0 || n_new > 0) check_launch_limits(q, k_cache, std::nullopt);

  FwdParams p{};
  at::Tensor o_partial, lse_partial;
  if (out.numel() > 0) {
    const double scale_pos = scale > 0 ? scale : (scale < 0 ? -scale : 1.0);
    static_cast<AttnShape&>(p) = attn_shape(q, k_cache, scale_pos, opt, std::nullopt);
    p.nk = static_cast<int>(capacity);  // narrowed per sequence to cache_seqlens[b] + Nnew - leftpad (seqlen.h)
    p.total_k = p.nk;
    p.mask = kernel_band(opt, p.nq, p.nk);
    p.seqused_k = seqlens.data_ptr<int>();
    p.leftpad_k = leftpad.defined() ? leftpad.data_ptr<int>() : nullptr;
    p.seqused_k_add = static_cast<int>(n_new);
    p.q = ref(q, std::nullopt);
    p.k = ref(k_cache, std::nullopt);
    p.v = ref(v_cache, std::nullopt);
    p.o = ref(o, std::nullopt);
    p.lse = lse_k.data_ptr<float>();
    p.cache = cache;
    if (num_splits == 0)
      num_splits = emulated ? emu_backend::kvcache_num_splits(p, dev)
#if defined(FLASH_CUDA_WITH_CUDA)
                            : cuda_backend::kvcache_num_splits(p, dev);
#else
                            : 1;
#endif
    // (query tiles have 64 rows or more: the grid's x is at most num_splits x that many tiles)
    TORCH_CHECK(num_splits * ((p.nq + 63) / 64) < (int64_t(1) << 31), "flash_cuda: num_splits ", num_splits,
                " is too large for the grid");
    p.cache.num_splits = static_cast<int>(num_splits);
    if (num_splits > 1) {
      o_partial = at::empty({num_splits, B, p.hq, p.nq, p.d}, lse.options());
      lse_partial = at::empty({num_splits, B, p.hq, p.nq}, lse.options());
      p.cache.o_partial = o_partial.data_ptr<float>();
      p.cache.lse_partial = lse_partial.data_ptr<float>();
    }
  }

  if (n_new > 0) {  // the append, on the stream of the attention after it
    const at::Tensor k_new = aligned_input(*k_new_in), v_new = aligned_input(*v_new_in);
    KvAppendParams a{};
    a.k_new = ref(k_new, std::nullopt);
    a.v_new = ref(v_new, std::nullopt);
    a.k_cache = ref(k_cache, std::nullopt);
    a.v_cache = ref(v_cache, std::nullopt);
    a.cache = cache;
    a.seqlens = seqlens.data_ptr<int>();
    a.b = static_cast<int>(B);
    a.hkv = static_cast<int>(Hkv);
    a.n_new = static_cast<int>(n_new);
    a.d = static_cast<int>(D);
    a.capacity = static_cast<int>(capacity);
    if (emulated) {
      buffers({kernel_footprint(k_new, false), kernel_footprint(v_new, false)});
      check(emu_backend::kv_append(a, nullptr));
    } else {
#if defined(FLASH_CUDA_WITH_CUDA)
      check(cuda_backend::kv_append(a, stream));
#endif
    }
  }

  if (out.numel() == 0) return {out, lse};
  if (emulated) {
    std::vector<emu::Buffer> more{kernel_footprint(q, false), tensor_footprint(o, true), tensor_footprint(lse_k, true)};
    if (num_splits > 1) more.push_back(tensor_footprint(o_partial, true)), more.push_back(tensor_footprint(lse_partial, true));
    add_mod_buffers(more, opt, std::nullopt);
    buffers(std::move(more));
    check(emu_backend::fwd_kvcache(p, dtype, dev, nullptr));
  } else {
#if defined(FLASH_CUDA_WITH_CUDA)
    check(cuda_backend::fwd_kvcache(p, dtype, dev, stream));
#endif
  }
  return {out, lse};
}

}  // namespace flash_cuda
