/* SIMT emulator runtime: runs CUDA kernel source on the CPU.
 *
 * A launch runs a grid of blocks. Each block's threads are cooperatively scheduled fibers on
 * one OS thread; blocks run in parallel on a few OS threads. A fiber runs until it reaches a
 * synchronisation point (__syncthreads, a warp collective, a wait it cannot pass), so the
 * order of the fibers between two such points is the emulator's choice: forward, reverse or
 * random, selected per launch, which is how tests show a kernel does not depend on it.
 *
 * Everything a kernel does to memory goes through hooks here (the PTX wrappers in
 * csrc/kernels/ptx.h call them), which is how the emulator
 *   - checks: shared-memory races, out-of-bounds global and shared accesses, cp.async
 *     destinations read before their wait, collectives and barriers not reached by all;
 *   - counts: global bytes and 32-byte sectors per warp request, shared-memory wavefronts per
 *     warp request by the bank model of ../shared/ptx-oracle, mma instructions, barriers.
 *
 * This header is torch-free; csrc/emu/cuda_host.h builds the CUDA device API on top of it.
 */
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class Order { forward, reverse, random };

// What runs a kernel launch: its source compiled by the host compiler (the kernel body
// function), or the PTX that nvcc produced for it in the sm_80 build (ptx_exec.h), looked up by
// the kernel function's mangled name, which is the PTX entry's name.
enum class Executor { source, ptx };

// The GPU a session emulates (flash_cuda.emulate(device=...)): the limits a launch must keep
// (a launch past them fails as it would on that card) and what the dispatcher picks from.
// Default: an A100.
struct Device {
  std::string name = "a100";
  int cc = 80;                     // compute capability, major x 10 + minor
  int sm_count = 108;
  size_t smem_per_block = 166912;  // opt-in maximum of dynamic shared memory per block, bytes
  int threads_per_block = 1024;
  int regs_per_block = 65536;      // 32-bit registers
};

struct Options {
  Order order = Order::forward;
  uint64_t seed = 0;   // for Order::random
  bool check = true;   // race checker and poisoning of uninitialised/in-flight shared memory
  int workers = 1;     // OS threads running blocks in parallel
  Device device;
  Executor executor = Executor::source;
};

// A global-memory range a launch may touch (a tensor's footprint).
struct Buffer {
  const void* ptr;
  size_t bytes;
  bool writable;
};

// Where in the kernel source an access or collective comes from. Wrappers take a defaulted
// `Site site = {}` argument: the builtins in the constructor's default arguments then name
// the wrapper's caller (written as Site{__builtin_FILE(), ...} instead, g++ 12 gives the
// wrapper's own line inside templates).
struct Site {
  const char* file;
  int line;
  constexpr Site(const char* f = __builtin_FILE(), int l = __builtin_LINE()) : file(f), line(l) {}
};

// Per-launch counters (what Nsight Compute would report).
struct Counters {
  uint64_t global_bytes_read = 0, global_bytes_written = 0;
  // Warp-level global requests (one per instruction per warp) and the 32-byte sectors they
  // touch; ideal = ceil(distinct bytes / 32) per request, so sectors == ideal means coalesced.
  uint64_t global_requests = 0, global_sectors = 0, global_sectors_ideal = 0;
  // Shared-memory requests and wavefronts, split by instruction kind (see SharedKind).
  uint64_t shared_requests[4] = {}, shared_wavefronts[4] = {}, shared_wavefronts_ideal[4] = {};
  uint64_t mma = 0;        // warp-level mma.sync instructions
  uint64_t barriers = 0;   // __syncthreads completed, summed over blocks
  // PTX executor only: thread instructions executed (predicated-off ones included, as on the
  // hardware they issue), by class (InstrClass); the source executor leaves them 0.
  uint64_t instructions[6] = {};
  void add(const Counters& o);
};

enum class SharedKind { ldmatrix = 0, cp_async = 1, load = 2, store = 3 };
inline const char* shared_kind_name(int k) {
  static const char* names[] = {"ldmatrix", "cp_async", "load", "store"};
  return names[k];
}

// Classes of PTX instructions for Counters::instructions: tensor (mma), fp (arithmetic, compare,
// select and conversion on floating-point types, including ex2/lg2/rcp), integer (the rest of the
// arithmetic, logic, moves and address conversion), memory (ld/st/atom/red, ldmatrix, cp.async),
// control (bra, ret, exit) and sync (bar, bar.warp.sync, shfl, vote, cp.async commit/wait, membar).
enum class InstrClass { tensor = 0, fp = 1, integer = 2, memory = 3, control = 4, sync = 5 };
inline const char* instr_class_name(int k) {
  static const char* names[] = {"tensor", "fp", "integer", "memory", "control", "sync"};
  return names[k];
}

struct LaunchRecord {
  std::string kernel;
  std::string entry;   // the kernel function's mangled name (the PTX entry), where known
  std::string executor;  // "source" or "ptx"
  std::string device;  // the profile's name
  Dim3 grid, block;
  size_t dynamic_smem = 0;
  Counters counters;
  std::vector<std::string> errors;  // empty for a clean launch
};

// ---- session (set from Python by flash_cuda.emulate) ----
void set_options(const Options& o);
Options options();
std::vector<LaunchRecord> take_records();  // records since the last call
std::string records_json(const std::vector<LaunchRecord>& records);

// Global-memory ranges for the launches that follow on this OS thread (set by the launcher
// from the tensors it passes; a launch with none registered cannot touch global memory).
void set_buffers(std::vector<Buffer> buffers);

// Run kernel_body once per thread of every block. Throws std::runtime_error before it starts
// when the launch exceeds the session's device (threads, dynamic shared memory, or registers:
// max_regs_per_thread is the most the kernel may use, which __launch_bounds__ makes ptxas
// keep to), and after it completes listing the problems found (races, out-of-bounds accesses,
// deadlocks).
// kernel_fn and params (the kernel function and its one parameter's bytes) identify the kernel
// for the PTX executor: under Executor::ptx the launch runs the PTX entry named as kernel_fn's
// symbol instead of kernel_body; without them such a launch is refused.
void launch(const char* name, Dim3 grid, Dim3 block, size_t dynamic_smem, int max_regs_per_thread,
            const std::function<void()>& kernel_body, const void* kernel_fn = nullptr,
            const void* params = nullptr, size_t params_bytes = 0);

// The emulator's host build instantiates only the kVarlen = true forward, backward and dQ
// kernels and runs dense batches on them too (launch.h's with_varlen); a GPU runs a dense batch
// on the kVarlen = false kernel. While a DenseBatch(true) lives on this thread, the PTX executor
// runs that kernel's PTX: the entry with the last true template flag of the launched kernel
// (kVarlen: the last true flag of every kernel with_varlen launches) set to false.
class DenseBatch {
 public:
  explicit DenseBatch(bool dense);
  ~DenseBatch();
  DenseBatch(const DenseBatch&) = delete;
  DenseBatch& operator=(const DenseBatch&) = delete;

 private:
  bool prev_;
};

// ---- the device side, called from kernel code through cuda_host.h and ptx.h ----
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
void* dynamic_shared();
size_t dynamic_shared_bytes();
int lane_id();
// The PTX executor's per-thread instruction counts (by InstrClass), added to the launch's
// counters when the thread finishes.
void add_instructions(const uint64_t (&per_class)[6]);
void syncthreads(Site s);
void syncwarp(unsigned mask, Site s);
// The launch's device's compute capability (major x 10 + minor): what nvcc's __CUDA_ARCH__ / 10
// is in the device code a GPU runs (ptx.h's wrappers take sm_75's instructions below 80).
int device_cc();
// An error of the calling thread ("<what> (thread (x,y,z) of block (x,y,z))"); a fatal one ends
// its block, as a trap does.
void thread_error(const std::string& what, bool fatal);
// __trap(): the launch fails with an error naming the site.
void trap(Site s);
// The PTX executor's bound on the instructions one thread issues in a launch, and every
// launch's on the barrier rounds of a block (1/256 of it): past either, a loop that never ends
// (edited PTX) is an error naming its line. FLASH_CUDA_PTX_STEP_LIMIT sets it (default 2^27).
uint64_t ptx_step_limit();
// The launch ends after the blocks running now: an error every block would repeat (an endless
// loop, each to the bound) is reported once.
void stop_launch();

// Shuffle of one 32-bit word: mode 0 up, 1 down, 2 bfly (xor), 3 idx; c as in PTX shfl.sync.
uint32_t shfl(int mode, unsigned mask, uint32_t value, int b, int c, Site s);

// Memory accesses by the calling thread. Each returns false (and records an error) when the
// access must not happen (out of bounds); the caller then skips it.
bool global_access(const void* p, size_t bytes, bool write, Site s);
bool shared_access(const void* p, size_t bytes, bool write, SharedKind kind, Site s);
void global_load(void* dst, const void* src, size_t bytes, Site s);
void global_store(void* dst, const void* src, size_t bytes, Site s);
void shared_load(void* dst, const void* src, size_t bytes, Site s);
void shared_store(void* dst, const void* src, size_t bytes, Site s);
float atomic_add_f32(float* p, float v, Site s);  // returns the old value

// Warp-level matrix instructions (all 32 lanes must execute them together).
// mma.m16n8k16 row.col, f32 accumulate: a[4], b[2] packed 16-bit pairs, c/d[4] floats.
void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                  bool bf16, Site s);
// mma.m16n8k8 row.col, f32 accumulate (sm_75's f16 shape; tf32 on sm_80+): A 16x8, B 8x8.
// .f16/.bf16: a[2], b[1] packed 16-bit pairs; .tf32: a[4], b[2] tf32 values in 32-bit registers,
// which must be tf32 (low 13 bits zero: cvt.rna.tf32.f32 output), else an error is recorded
// (what the tensor cores do with the other bits is not specified).
enum class MmaK8Type { f16, bf16, tf32 };
void mma_m16n8k8(float d[4], const uint32_t* a, const uint32_t* b, const float c[4], MmaK8Type type, Site s);
// cvt.rna.tf32.f32: x rounded to tf32 (10 mantissa bits), nearest with ties away from zero;
// NaN and infinities kept (PTX ISA, cvt).
uint32_t cvt_rna_tf32(float x);
// ldmatrix.m8n8.x{num}[.trans].b16: lanes 8m..8m+7 give the row addresses of matrix m.
// kReportedRow as a row address: one the caller has reported as bad already (the PTX executor's
// out-of-bounds shared addresses, which it names as the kernel computed them); the row reads zeros.
extern const char kReportedRow[16];
void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr, Site s);

// The instructions of sm_80 and later (cp.async, mma.m16n8k16, bf16 and tf32 mma) record an
// error on a device below sm_80, where ptxas would refuse them.
// cp.async.{ca,cg}.shared.global, cp_size 4/8/16 (cg: 16 only), src_size 0..cp_size.
void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cg, Site s);
void cp_async_commit();
void cp_async_wait_group(int n, Site s);
void cp_async_wait_all(Site s);

}  // namespace emu
