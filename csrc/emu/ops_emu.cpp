/* Torch side of the emulator: the session switch and launch records that flash_cuda.emulate
 * uses, and the self-test kernels as ops (torch.ops.flash_cuda._emu_*), for tests. Every op
 * registers its tensors' footprints as the global memory its launch may touch. */
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <atomic>
#include <stdexcept>

#include "../kernel_launch.h"
#include "emu_session.h"
#include "ptx_program.h"
#include "runtime.h"
#include "selftest_kernels.h"

namespace flash_cuda {
namespace {

std::atomic<bool> g_active{false};

void configure(bool active, std::string order, int64_t seed, bool check, int64_t workers, std::string device, int64_t cc,
               int64_t sm_count, int64_t smem_per_block, int64_t threads_per_block, int64_t regs_per_block,
               std::string executor) {
  emu::Options o;
  TORCH_CHECK(cc > 0 && sm_count > 0 && smem_per_block >= 0 && threads_per_block > 0 && regs_per_block > 0,
              "emulate: device limits must be positive");
  o.device = {device, static_cast<int>(cc), static_cast<int>(sm_count), static_cast<size_t>(smem_per_block),
              static_cast<int>(threads_per_block), static_cast<int>(regs_per_block)};
  if (order == "forward") o.order = emu::Order::forward;
  else if (order == "reverse") o.order = emu::Order::reverse;
  else if (order == "random") o.order = emu::Order::random;
  else TORCH_CHECK(false, "emulate: order must be 'forward', 'reverse' or 'random', got '", order, "'");
  TORCH_CHECK(workers >= 1, "emulate: workers must be >= 1, got ", workers);
  o.seed = static_cast<uint64_t>(seed);
  o.check = check;
  o.workers = static_cast<int>(workers);
  if (executor == "source") o.executor = emu::Executor::source;
  else if (executor == "ptx") o.executor = emu::Executor::ptx;
  else TORCH_CHECK_VALUE(false, "emulate: executor must be 'source' or 'ptx', got '", executor, "'");
  emu::set_options(o);
  g_active = active;
}

std::string records() { return emu::records_json(emu::take_records()); }

// The PTX executor's source of kernels' PTX: flash_cuda.emulate._ptx_source(entry), which reads
// what the build packaged and applies emulate(ptx={...}) replacements. Called on the launching
// thread, once per kernel and session.
std::string ptx_source(const std::string& entry) {
  namespace py = pybind11;
  py::gil_scoped_acquire gil;
  try {
    return py::module_::import("flash_cuda.emulate").attr("_ptx_source")(entry).cast<std::string>();
  } catch (py::error_already_set& e) {
    throw std::runtime_error(std::string("PTX executor: reading the PTX of ") + entry + " failed: " + e.what());
  }
}

const bool g_provider_set = [] {
  emu::ptx::set_source_provider(&ptx_source);
  return true;
}();

// Parses a PTX module's entry as the executor would; a ValueError naming the line if it cannot.
void ptx_check(std::string text, std::string entry) {
  try {
    emu::ptx::parse(text, entry);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

std::vector<std::string> ptx_entries(std::string text) { return emu::ptx::entries(text); }

// CUDA's launch limits (a grid of 2^31 - 1 x 65535 x 65535 blocks of at most 1024 threads, 1024
// x 1024 x 64): sizes beyond them were truncated to 32 bits or sized a host allocation (audit).
void check_launch(const std::vector<int64_t>& grid, const std::vector<int64_t>& block, int64_t smem) {
  const int64_t grid_max[3] = {(int64_t{1} << 31) - 1, 65535, 65535}, block_max[3] = {1024, 1024, 64};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(grid[i] >= 1 && grid[i] <= grid_max[i], "grid: each size in [1, ", grid_max[i], "], got ", grid[i]);
    TORCH_CHECK_VALUE(block[i] >= 1 && block[i] <= block_max[i], "block: each size in [1, ", block_max[i], "], got ",
                      block[i]);
  }
  TORCH_CHECK_VALUE(block[0] * block[1] * block[2] <= 1024, "block: at most 1024 threads, got ",
                    block[0] * block[1] * block[2]);
  TORCH_CHECK_VALUE(smem >= 0 && smem <= 228 * 1024, "smem: in [0, 228 KiB], got ", smem);
}

// Runs entry of a PTX module on (blocks) x (threads) with one parameter, the address of buf: for
// the executor's per-instruction tests, whose kernels read inputs from and write results to buf.
void ptx_run(std::string text, std::string entry, const at::Tensor& buf, int64_t threads, int64_t blocks, int64_t smem) {
  TORCH_CHECK(buf.is_contiguous(), "buf: contiguous");
  check_launch({blocks, 1, 1}, {threads, 1, 1}, smem);
  std::shared_ptr<emu::ptx::Program> program;
  try {
    program = emu::ptx::parse(text, entry);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  TORCH_CHECK_VALUE(program->param_bytes == 8, "the test kernel takes one .u64 parameter, has ", program->param_bytes, " bytes");
  void* const param = buf.data_ptr();
  emu::set_buffers({tensor_footprint(buf, true)});
  emu::launch(entry.c_str(), {static_cast<unsigned>(blocks), 1, 1}, {static_cast<unsigned>(threads), 1, 1},
              static_cast<size_t>(smem), 255, [&] { emu::ptx::run(*program, &param, sizeof(param)); });
}

// Runs entry of a PTX module on grid x block with params (a uint8 tensor: the bytes of its
// .param space) and buffers as the global memory it may touch: for kernels of the CUDA build
// the emulator's launcher does not launch (the dropout mask and Philox state kernels).
void ptx_launch(std::string text, std::string entry, std::vector<at::Tensor> buffers, const at::Tensor& params,
                std::vector<int64_t> grid, std::vector<int64_t> block, int64_t smem) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid, block: three sizes each");
  check_launch(grid, block, smem);
  TORCH_CHECK(params.scalar_type() == at::kByte && params.is_contiguous(), "params: contiguous uint8");
  std::shared_ptr<emu::ptx::Program> program;
  try {
    program = emu::ptx::parse(text, entry);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  TORCH_CHECK_VALUE(program->param_bytes == static_cast<size_t>(params.numel()), "params: ", entry, " takes ",
                    program->param_bytes, " bytes of parameters, got ", params.numel());
  std::vector<emu::Buffer> footprints;
  for (const auto& b : buffers) {
    TORCH_CHECK(b.is_contiguous(), "buffers: contiguous");
    footprints.push_back(tensor_footprint(b, true));
  }
  emu::set_buffers(std::move(footprints));
  const void* bytes = params.data_ptr();
  const size_t n = static_cast<size_t>(params.numel());
  emu::launch(entry.c_str(), {static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]), static_cast<unsigned>(grid[2])},
              {static_cast<unsigned>(block[0]), static_cast<unsigned>(block[1]), static_cast<unsigned>(block[2])},
              static_cast<size_t>(smem), 255, [&] { emu::ptx::run(*program, bytes, n); });
}

at::Tensor checked(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.numel() == numel,
              name, ": expected a CPU ", dtype, " tensor of ", numel, " elements");
  return t.contiguous();
}

at::Tensor ldmatrix_probe(const at::Tensor& tile, const at::Tensor& row_offset, int64_t num, bool trans) {
  TORCH_CHECK(num == 1 || num == 2 || num == 4, "num must be 1, 2 or 4");
  auto t = checked(tile, at::kShort, tile.numel(), "tile");
  auto r = checked(row_offset, at::kInt, 32, "row_offset");
  auto out = at::zeros({32, num}, tile.options().dtype(at::kInt));
  emu::set_buffers({tensor_footprint(t, false), tensor_footprint(r, false), tensor_footprint(out, true)});
  selftest::ldmatrix_probe(reinterpret_cast<const uint16_t*>(t.data_ptr()), static_cast<int>(t.numel()),
                           r.data_ptr<int32_t>(), static_cast<int>(num), trans,
                           reinterpret_cast<uint32_t*>(out.data_ptr()));
  return out;
}

at::Tensor mma_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16) {
  auto a_ = checked(a, at::kInt, 128, "a"), b_ = checked(b, at::kInt, 64, "b"), c_ = checked(c, at::kFloat, 128, "c");
  auto d = at::empty({32, 4}, c.options());
  emu::set_buffers({tensor_footprint(a_, false), tensor_footprint(b_, false), tensor_footprint(c_, false), tensor_footprint(d, true)});
  selftest::mma_probe(reinterpret_cast<const uint32_t*>(a_.data_ptr()), reinterpret_cast<const uint32_t*>(b_.data_ptr()),
                      c_.data_ptr<float>(), bf16, d.data_ptr<float>());
  return d;
}

at::Tensor mma_k8_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, std::string type) {
  const int t = type == "f16" ? 0 : type == "bf16" ? 1 : type == "tf32" ? 2 : -1;
  TORCH_CHECK(t >= 0, "type must be 'f16', 'bf16' or 'tf32', got '", type, "'");
  auto a_ = checked(a, at::kInt, 128, "a"), b_ = checked(b, at::kInt, 64, "b"), c_ = checked(c, at::kFloat, 128, "c");
  auto d = at::empty({32, 4}, c.options());
  emu::set_buffers({tensor_footprint(a_, false), tensor_footprint(b_, false), tensor_footprint(c_, false), tensor_footprint(d, true)});
  selftest::mma_k8_probe(reinterpret_cast<const uint32_t*>(a_.data_ptr()), reinterpret_cast<const uint32_t*>(b_.data_ptr()),
                         c_.data_ptr<float>(), t, d.data_ptr<float>());
  return d;
}

at::Tensor tf32_probe(const at::Tensor& x) {
  auto x_ = checked(x, at::kFloat, x.numel(), "x");
  auto out = at::empty({x.numel()}, x.options().dtype(at::kInt));
  emu::set_buffers({tensor_footprint(x_, false), tensor_footprint(out, true)});
  selftest::tf32_probe(x_.data_ptr<float>(), static_cast<int>(x_.numel()), reinterpret_cast<uint32_t*>(out.data_ptr()));
  return out;
}

at::Tensor shfl_probe(const at::Tensor& values, int64_t mode, int64_t b, int64_t width, int64_t mask, bool wide) {
  auto v = checked(values, at::kInt, 32, "values");
  auto out = at::empty({32}, v.options().dtype(at::kLong));
  emu::set_buffers({tensor_footprint(v, false), tensor_footprint(out, true)});
  selftest::shfl_probe(reinterpret_cast<const uint32_t*>(v.data_ptr()), static_cast<int>(mode), static_cast<int>(b),
                       static_cast<int>(width), static_cast<unsigned>(mask), wide,
                       reinterpret_cast<uint64_t*>(out.data_ptr()));
  return out;
}

void shared_load_probe(const at::Tensor& offsets, int64_t width, int64_t smem_bytes) {
  auto o = checked(offsets, at::kInt, 32, "offsets");
  auto sink = at::empty({32}, o.options());
  emu::set_buffers({tensor_footprint(o, false), tensor_footprint(sink, true)});
  selftest::shared_load_probe(o.data_ptr<int32_t>(), static_cast<int>(width), static_cast<int>(smem_bytes),
                              reinterpret_cast<uint32_t*>(sink.data_ptr()));
}

at::Tensor convert_probe(const at::Tensor& x) {
  auto x_ = checked(x, at::kFloat, x.numel(), "x");
  auto out = at::empty({x.numel(), 4}, x.options().dtype(at::kInt));
  emu::set_buffers({tensor_footprint(x_, false), tensor_footprint(out, true)});
  selftest::convert_probe(x_.data_ptr<float>(), static_cast<int>(x_.numel()), reinterpret_cast<uint32_t*>(out.data_ptr()));
  return out;
}

at::Tensor pair_math_probe(const at::Tensor& a, const at::Tensor& b, bool bf16) {
  auto a_ = checked(a, at::kInt, a.numel(), "a");
  auto b_ = checked(b, at::kInt, a.numel(), "b");
  auto out = at::empty({a.numel(), 3}, a.options());
  emu::set_buffers({tensor_footprint(a_, false), tensor_footprint(b_, false), tensor_footprint(out, true)});
  selftest::pair_math_probe(reinterpret_cast<const uint32_t*>(a_.data_ptr()), reinterpret_cast<const uint32_t*>(b_.data_ptr()),
                            static_cast<int>(a_.numel()), bf16, reinterpret_cast<uint32_t*>(out.data_ptr()));
  return out;
}

at::Tensor cp_async_trace(const at::Tensor& src) {
  auto s = checked(src, at::kByte, 256, "src");
  auto out = at::zeros({40}, s.options());
  emu::set_buffers({tensor_footprint(s, false), tensor_footprint(out, true)});
  selftest::cp_async_trace(s.data_ptr<uint8_t>(), out.data_ptr<uint8_t>());
  return out;
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool swizzle) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "gemm: a [M,K] and b [N,K]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16),
              "gemm: fp16 or bf16 inputs of one dtype");
  TORCH_CHECK(a.size(1) % 8 == 0, "gemm: K must be a multiple of 8 (16-byte rows for cp.async)");
  auto a_ = a.contiguous(), b_ = b.contiguous();
  auto c = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kFloat));
  emu::set_buffers({tensor_footprint(a_, false), tensor_footprint(b_, false), tensor_footprint(c, true)});
  selftest::gemm(a_.data_ptr(), b_.data_ptr(), c.data_ptr<float>(), static_cast<int>(a.size(0)),
                 static_cast<int>(b.size(0)), static_cast<int>(a.size(1)), a.scalar_type() == at::kBFloat16, swizzle);
  return c;
}

at::Tensor block_reduce(const at::Tensor& x) {
  auto x_ = checked(x, at::kFloat, x.numel(), "x");
  auto out = at::zeros({1}, x.options());
  emu::set_buffers({tensor_footprint(x_, false), tensor_footprint(out, true)});
  selftest::block_reduce(x_.data_ptr<float>(), static_cast<int>(x_.numel()), out.data_ptr<float>());
  return out;
}

void planted_bug(std::string name, const at::Tensor& buf) {
  const int which = selftest::bug_index(name.c_str());
  TORCH_CHECK(which >= 0, "unknown planted bug '", name, "'");
  TORCH_CHECK(buf.is_contiguous() && buf.scalar_type() == at::kFloat, "buf: contiguous float32");
  emu::set_buffers({tensor_footprint(buf, true)});
  selftest::planted_bug(which, buf.data_ptr<float>(), static_cast<int>(buf.numel()));
}

}  // namespace

bool emu_active() { return g_active; }

}  // namespace flash_cuda

TORCH_LIBRARY_FRAGMENT(flash_cuda, m) {
  using namespace flash_cuda;
  m.def("_emu_configure(bool active, str order, int seed, bool check, int workers, str device, int cc, int sm_count, "
        "int smem_per_block, int threads_per_block, int regs_per_block, str executor) -> ()", &configure);
  m.def("_emu_ptx_check(str text, str entry) -> ()", &ptx_check);
  m.def("_emu_ptx_entries(str text) -> str[]", &ptx_entries);
  m.def("_emu_ptx_run(str text, str entry, Tensor(a!) buf, int threads, int blocks, int smem) -> ()", &ptx_run);
  m.def("_emu_ptx_launch(str text, str entry, Tensor(a!)[] buffers, Tensor params, int[] grid, int[] block, int smem) -> ()",
        &ptx_launch);
  m.def("_emu_records() -> str", &records);
  m.def("_emu_ldmatrix_probe(Tensor tile, Tensor row_offset, int num, bool trans) -> Tensor", &ldmatrix_probe);
  m.def("_emu_mma_probe(Tensor a, Tensor b, Tensor c, bool bf16) -> Tensor", &mma_probe);
  m.def("_emu_mma_k8_probe(Tensor a, Tensor b, Tensor c, str type) -> Tensor", &mma_k8_probe);
  m.def("_emu_tf32_probe(Tensor x) -> Tensor", &tf32_probe);
  m.def("_emu_shfl_probe(Tensor values, int mode, int b, int width, int mask, bool wide) -> Tensor", &shfl_probe);
  m.def("_emu_shared_load_probe(Tensor offsets, int width, int smem_bytes) -> ()", &shared_load_probe);
  m.def("_emu_convert_probe(Tensor x) -> Tensor", &convert_probe);
  m.def("_emu_pair_math_probe(Tensor a, Tensor b, bool bf16) -> Tensor", &pair_math_probe);
  m.def("_emu_cp_async_trace(Tensor src) -> Tensor", &cp_async_trace);
  m.def("_emu_gemm(Tensor a, Tensor b, bool swizzle) -> Tensor", &gemm);
  m.def("_emu_block_reduce(Tensor x) -> Tensor", &block_reduce);
  m.def("_emu_planted_bug(str name, Tensor(a!) buf) -> ()", &planted_bug);
}
