/* SIMT emulator runtime (see runtime.h): scheduler, warp collectives, PTX semantics, checkers
 * and counters. The semantics follow ../shared/ptx-oracle (layouts.py): mma fragment layouts,
 * ldmatrix lane/address rules, cp.async groups, shfl.sync pseudo-code and the bank model. */
#include "runtime.h"

#include "pin_options.h"  // (defined here)

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <utility>

#include "fiber.h"
#include "ptx_program.h"

namespace emu {

void Counters::add(const Counters& o) {
  global_bytes_read += o.global_bytes_read;
  global_bytes_written += o.global_bytes_written;
  global_requests += o.global_requests;
  global_sectors += o.global_sectors;
  global_sectors_ideal += o.global_sectors_ideal;
  for (int k = 0; k < 4; ++k) {
    shared_requests[k] += o.shared_requests[k];
    shared_wavefronts[k] += o.shared_wavefronts[k];
    shared_wavefronts_ideal[k] += o.shared_wavefronts_ideal[k];
  }
  mma += o.mma;
  barriers += o.barriers;
  for (int k = 0; k < 6; ++k) instructions[k] += o.instructions[k];
}

namespace {

constexpr int kWarp = 32;
constexpr size_t kSmemGuard = 64 * 1024;        // accesses this close to the arena are OOB
constexpr size_t kMaxErrors = 16;
constexpr uint8_t kPoison = 0xFF;  // NaN as f32, f16 and bf16: uninitialised data shows up

// ---------------------------------------------------------------- session state
std::mutex g_session_mutex;
Options g_options;
std::vector<LaunchRecord> g_records;
thread_local std::vector<Buffer> g_buffers;

std::string where(Site s) {
  const char* f = s.file ? s.file : "?";
  const char* base = std::strrchr(f, '/');
  return std::string(base ? base + 1 : f) + ":" + std::to_string(s.line);
}

std::string dim_str(const Dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// ---------------------------------------------------------------- per-thread state
enum class State : uint8_t { runnable, at_barrier, at_collective, done };
enum class CollKind : uint8_t { shfl, syncwarp, mma, ldmatrix };

// One lane's part of a warp collective; lives on the lane's stack while it waits.
struct Coll {
  CollKind kind;
  unsigned mask;
  Site site;
  int mode = 0, b = 0, c = 0;  // shfl
  uint32_t value = 0, out = 0;
  const uint32_t* a = nullptr;  // mma
  const uint32_t* bfrag = nullptr;
  const float* cfrag = nullptr;
  float* d = nullptr;
  bool bf16 = false;
  int mma_k = 16;                       // 16, or 8 (m16n8k8)
  MmaK8Type k8_type = MmaK8Type::f16;
  const char* addr = nullptr;  // ldmatrix
  uint32_t* r = nullptr;
  int num = 0;
  bool trans = false;
};

struct CpOp {
  char* dst;
  const char* src;
  int cp_size, src_size;
};

struct Thread {
  Dim3 idx;
  int linear = 0, warp = 0, lane = 0;
  State state = State::runnable;
  Site site{nullptr, 0};  // where it waits
  Coll* coll = nullptr;
  std::vector<CpOp> uncommitted;
  std::deque<std::vector<CpOp>> groups;
  std::vector<std::pair<uint64_t, uint32_t>> occurrences;  // per call site, since last flush
  Fiber fiber;
};

// The accesses one warp-level instruction makes (lanes of a warp executing the same call
// site for the n-th time since the warp last synchronised).
struct Request {
  bool global = false;
  SharedKind kind = SharedKind::load;
  uint32_t width = 0;
  std::array<uintptr_t, kWarp> addr{};
  std::array<uint32_t, kWarp> bytes{};  // 0 = lane inactive
};

struct Warp {
  uint32_t epoch = 1;     // bumped by __syncwarp and __syncthreads (orders lanes' shared accesses)
  unsigned arrived = 0;   // lanes waiting in a collective
  unsigned exists = 0;    // lanes that exist (a partial last warp has fewer)
  std::unordered_map<uint64_t, Request> requests;
};

// Race-checker shadow of one byte of shared memory: the last writer and up to two readers
// since the last __syncthreads (epoch), with the warp epoch of each access.
struct Cell {
  uint32_t w_epoch, w_wepoch, r_epoch, r_wepoch[2];
  uint16_t w_tid, r_tid[2];
  uint8_t readers, pending;  // pending: a cp.async by w_tid has not completed
};

// Which block of the launch stored each byte of a writable tensor (the race checker's, for global
// memory): 0 none yet, else (block + 1) << 1 | atomic. Blocks of one launch have no order
// between them (no grid-wide barrier), so two blocks' plain stores to one byte, or a plain store
// and an atomic, race: the survivor depends on the schedule. Two stores of the same value race
// too (only the schedule keeps them equal; until 2026-12-06 they were let through, for the fp32
// backward's head-dim halves, which both stored the bias gradient). Only writes are tracked (a load of another block's store races too, but loads are most of
// a kernel's accesses); tensors past kMaxWriterBytes are not tracked (the shadow is 8 bytes a
// byte), nor those past a launch's kMaxShadowBytes of shadow in all, nor any whose shadow cannot
// be allocated.
constexpr size_t kMaxWriterBytes = size_t(16) << 20;
constexpr size_t kMaxShadowBytes = size_t(256) << 20;
struct WriterShadow {
  std::once_flag made;
  std::unique_ptr<std::atomic<uint64_t>[]> owner;  // one per byte of the tensor, or none (untracked)
};

struct LaunchCtx {
  const char* name;
  Dim3 grid, block;
  size_t smem;
  Options opt;
  std::vector<Buffer> buffers;
  std::unique_ptr<WriterShadow[]> writers;  // one per buffer (opt.check)
  std::atomic<size_t> shadow_bytes{0};      // the writers' shadow allocated so far
  const std::function<void()>* body;
  std::mutex mutex;
  std::vector<std::string> errors;
  size_t error_count = 0;
  Counters counters;
  std::atomic<bool> stop{false};  // stop_launch(): no more blocks start
  uint64_t max_rounds = 0;        // a block's barrier releases at most (ptx_step_limit() / 256)

  void error(const std::string& e) {
    std::lock_guard<std::mutex> g(mutex);
    if (errors.size() < kMaxErrors) errors.push_back(e);
    ++error_count;
  }
};

// Runs blocks on one OS thread.
class BlockRunner {
 public:
  explicit BlockRunner(LaunchCtx* L);
  void run(unsigned block_linear);

  LaunchCtx* L;
  Dim3 bidx;
  Thread* cur = nullptr;
  std::unique_ptr<Thread[]> threads;
  int nthreads;
  std::vector<Warp> warps;
  std::unique_ptr<char[]> arena;  // guard | dynamic smem | guard
  char* smem;
  std::vector<Cell> shadow;
  std::unordered_map<uintptr_t, Cell> static_shadow;  // static __shared__ (thread_local storage)
  uint32_t epoch = 1;
  uint64_t rounds = 0;  // barrier releases of this block (epoch wraps at 2^32)
  bool aborted = false;
  Counters counters;

  std::string who(int tid) const {
    return "thread " + dim_str(threads[tid].idx) + " of block " + dim_str(bidx);
  }
  void error(const std::string& e, bool fatal) {
    L->error(e);
    if (fatal) aborted = true;
  }
  void wait_here(State st, Site s);
  void release_barrier();
  void stuck();
  void collective(Coll& c);
  void resolve(Warp& w, unsigned mask, CollKind kind);
  void record_request(Thread& t, Site s, bool global, SharedKind kind, const void* p, size_t n);
  void flush(Warp& w);
  bool shared_check(int tid, const char* p, size_t n, bool write, Site s);
  bool global_check(const void* p, size_t n, bool write, Site s, bool atomic = false);
  void complete(Thread& t, const std::vector<CpOp>& group);
  Cell* cell(const char* p);
  void record_writer(size_t buffer, size_t offset, size_t n, bool atomic, Site s);
  bool ordered(int tid_a, uint32_t wepoch_a, int tid_b) const {
    return threads[tid_a].warp == threads[tid_b].warp && warps[tid_b / kWarp].epoch > wepoch_a;
  }
};

thread_local BlockRunner* g_runner = nullptr;

BlockRunner& runner() { return *g_runner; }

void thread_entry(void* arg) {
  Thread* t = static_cast<Thread*>(arg);
  BlockRunner& R = runner();
  try {
    (*R.L->body)();
  } catch (const std::exception& e) {
    R.error(std::string("exception in ") + R.who(t->linear) + ": " + e.what(), true);
  }
  t->state = State::done;
  t->fiber.suspend();  // never resumed
}

BlockRunner::BlockRunner(LaunchCtx* L_) : L(L_) {
  nthreads = static_cast<int>(L->block.x * L->block.y * L->block.z);
  threads.reset(new Thread[nthreads]);
  warps.resize((nthreads + kWarp - 1) / kWarp);
  arena.reset(new char[L->smem + 2 * kSmemGuard + 16]);
  smem = arena.get() + kSmemGuard;
  smem += (16 - reinterpret_cast<uintptr_t>(smem) % 16) % 16;  // 16-byte aligned like the GPU's
  if (L->opt.check) shadow.resize(L->smem);
}

void BlockRunner::run(unsigned block_linear) {
  const Dim3 g = L->grid;
  bidx = {block_linear % g.x, (block_linear / g.x) % g.y, block_linear / (g.x * g.y)};
  epoch = 1;
  rounds = 0;
  aborted = false;
  static_shadow.clear();
  if (L->opt.check) {
    std::fill(shadow.begin(), shadow.end(), Cell{});
    std::memset(smem, kPoison, L->smem);
  }
  for (size_t w = 0; w < warps.size(); ++w) {
    warps[w] = Warp{};
    int n = std::min(kWarp, nthreads - static_cast<int>(w) * kWarp);
    warps[w].exists = n == kWarp ? ~0u : ((1u << n) - 1);
  }
  const Dim3 b = L->block;
  for (int i = 0; i < nthreads; ++i) {
    Thread& t = threads[i];
    t.idx = {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    t.linear = i;
    t.warp = i / kWarp;
    t.lane = i % kWarp;
    t.state = State::runnable;
    t.uncommitted.clear();
    t.groups.clear();
    t.occurrences.clear();
    t.fiber.start(&thread_entry, &t);
  }
  std::vector<int> order(nthreads);
  for (int i = 0; i < nthreads; ++i) order[i] = L->opt.order == Order::reverse ? nthreads - 1 - i : i;
  std::mt19937_64 rng(L->opt.seed * 0x9E3779B97F4A7C15ull + block_linear);

  for (;;) {
    if (L->opt.order == Order::random) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      Thread& t = threads[i];
      if (t.state != State::runnable) continue;
      cur = &t;
      t.fiber.resume();
      if (aborted) break;
    }
    cur = nullptr;
    if (aborted) break;
    bool all_done = true, any_runnable = false;
    for (int i = 0; i < nthreads; ++i) {
      all_done &= threads[i].state == State::done;
      any_runnable |= threads[i].state == State::runnable;
    }
    if (all_done) break;
    if (!any_runnable) stuck();
    if (aborted) break;
  }
  for (auto& w : warps) flush(w);
}

// Nothing can run: either every live thread waits at __syncthreads (release it) or the block
// can never make progress (report who waits where, instead of hanging like the GPU would).
void BlockRunner::stuck() {
  std::vector<int> at_barrier, done, at_coll;
  for (int i = 0; i < nthreads; ++i) {
    switch (threads[i].state) {
      case State::at_barrier: at_barrier.push_back(i); break;
      case State::done: done.push_back(i); break;
      case State::at_collective: at_coll.push_back(i); break;
      default: break;
    }
  }
  if (at_coll.empty() && done.empty()) {
    // A loop around bar.sync switches every thread at each round: the per-thread bound alone took
    // about 10 minutes a block (128 threads) and every block ran to it (an audit). The packaged
    // kernels release 9 (forward) to 18 (backward) barriers a block at N = 256: the default 2^19
    // rounds is millions of keys.
    if (++rounds > L->max_rounds) {
      error("bar.sync at " + where(threads[0].site) + " released more than " + std::to_string(L->max_rounds) +
                " times in block " + dim_str(bidx) + " (a loop that never ends? FLASH_CUDA_PTX_STEP_LIMIT / 256 "
                "sets the bound)", true);
      L->stop = true;
      return;
    }
    release_barrier();
    return;
  }
  std::ostringstream msg;
  if (at_coll.empty()) {
    msg << "__syncthreads at " << where(threads[at_barrier[0]].site) << " is never reached by "
        << done.size() << " thread(s) that exited, e.g. " << who(done[0]) << " (waiting: "
        << at_barrier.size() << ", e.g. " << who(at_barrier[0]) << ")";
  } else {
    const Thread& t = threads[at_coll[0]];
    unsigned missing = t.coll->mask & ~warps[t.warp].arrived;
    msg << "warp collective at " << where(t.site) << " (mask 0x" << std::hex << t.coll->mask
        << std::dec << ") is never reached by lane(s)";
    for (int l = 0; l < kWarp; ++l)
      if (missing >> l & 1) {
        msg << " " << l;
        int tid = t.warp * kWarp + l;
        if (tid >= nthreads || !(warps[t.warp].exists >> l & 1)) msg << " (does not exist)";
        else if (threads[tid].state == State::done) msg << " (exited)";
        else if (threads[tid].state == State::at_barrier) msg << " (at __syncthreads " << where(threads[tid].site) << ")";
        else if (threads[tid].state == State::at_collective) msg << " (at another collective " << where(threads[tid].site) << ")";
      }
    msg << "; waiting: " << who(at_coll[0]);
  }
  error("deadlock: " + msg.str(), true);
}

void BlockRunner::release_barrier() {
  ++epoch;
  ++counters.barriers;
  for (auto& w : warps) {
    flush(w);
    ++w.epoch;
  }
  for (int i = 0; i < nthreads; ++i) threads[i].state = State::runnable;
}

void BlockRunner::wait_here(State st, Site s) {
  Thread& t = *cur;
  t.state = st;
  t.site = s;
  t.fiber.suspend();
}

// ---------------------------------------------------------------- collectives
void BlockRunner::collective(Coll& c) {
  Thread& t = *cur;
  Warp& w = warps[t.warp];
  if (!(c.mask >> t.lane & 1)) {
    error("warp collective at " + where(c.site) + ": " + who(t.linear) + " is not in its mask", true);
    wait_here(State::at_collective, c.site);
  }
  t.coll = &c;
  t.site = c.site;
  t.state = State::at_collective;
  w.arrived |= 1u << t.lane;
  if ((w.arrived & c.mask) != c.mask) {
    t.fiber.suspend();
    return;
  }
  for (int l = 0; l < kWarp; ++l) {
    if (!(c.mask >> l & 1)) continue;
    const Coll& o = *threads[t.warp * kWarp + l].coll;
    if (o.kind != c.kind || o.mask != c.mask) {
      error("warp collective mismatch: lane " + std::to_string(t.lane) + " at " + where(c.site) +
                " and lane " + std::to_string(l) + " at " + where(o.site) + " (different instruction or mask) in warp " +
                std::to_string(t.warp) + " of block " + dim_str(bidx), true);
      t.fiber.suspend();
      return;
    }
  }
  resolve(w, c.mask, c.kind);  // the last lane to arrive does the warp's work and goes on
}

uint32_t f16_or_bf16_to_bits32(uint16_t h, bool bf16) {
  if (bf16) return static_cast<uint32_t>(h) << 16;
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0x1F) return sign | 0x7F800000 | (man << 13);
  if (exp == 0) {
    if (man == 0) return sign;
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    return sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
  }
  return sign | (exp + 127 - 15) << 23 | man << 13;
}

float half_bits_to_float(uint32_t reg, int half, bool bf16) {
  uint32_t bits = f16_or_bf16_to_bits32(static_cast<uint16_t>(reg >> (16 * half)), bf16);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Bank model (ptx-oracle smem_wavefronts/_phase_ways): lanes are served in phases of
// 128 bytes / access width (32, 16 or 8 lanes); a phase costs as many wavefronts as the most
// distinct 32-bit words any one bank is asked for. Ideal: ceil(distinct words / 32).
void count_wavefronts(const uintptr_t* addr, const uint32_t* bytes, int lanes_per_phase, int nlanes,
                      uint64_t& wavefronts, uint64_t& ideal) {
  for (int p0 = 0; p0 < nlanes; p0 += lanes_per_phase) {
    std::vector<uintptr_t> words;
    for (int l = p0; l < p0 + lanes_per_phase; ++l)
      if (bytes[l])
        for (uintptr_t wd = addr[l] / 4; wd <= (addr[l] + bytes[l] - 1) / 4; ++wd) words.push_back(wd);
    if (words.empty()) continue;
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    int per_bank[32] = {};
    int ways = 0;
    for (uintptr_t wd : words) ways = std::max(ways, ++per_bank[wd % 32]);
    wavefronts += ways;
    ideal += (words.size() + 31) / 32;
  }
}

void BlockRunner::resolve(Warp& w, unsigned mask, CollKind kind) {
  const int base = static_cast<int>(&w - warps.data()) * kWarp;
  Coll* lanes[kWarp] = {};
  for (int l = 0; l < kWarp; ++l)
    if (mask >> l & 1) lanes[l] = threads[base + l].coll;
  // __syncwarp orders the warp's earlier shared-memory accesses before its later ones (bar.warp.sync's
  // memory ordering); shfl, mma and ldmatrix do not (PTX states no memory ordering for them): a
  // lane's store read by another lane's ldmatrix row with no __syncwarp between races (a mutation
  // audit's deletion in the backward's preprocess passed every test when every collective ordered)
  if (kind == CollKind::syncwarp) ++w.epoch;
  const Site site = lanes[__builtin_ctz(mask)]->site;

  if (kind == CollKind::shfl) {
    // PTX shfl.sync pseudo-code (ptx-oracle ptx_shfl_sync).
    for (int lane = 0; lane < kWarp; ++lane) {
      Coll* c = lanes[lane];
      if (!c) continue;
      int bval = c->b & 0x1F, cval = c->c & 0x1F, segmask = (c->c >> 8) & 0x1F;
      int max_lane = (lane & segmask) | (cval & ~segmask), min_lane = lane & segmask;
      int j;
      bool p;
      switch (c->mode) {
        case 0: j = lane - bval; p = j >= max_lane; break;
        case 1: j = lane + bval; p = j <= max_lane; break;
        case 2: j = lane ^ bval; p = j <= max_lane; break;
        default: j = min_lane | (bval & ~segmask); p = j <= max_lane; break;
      }
      if (!p) j = lane;
      if (!lanes[j]) {
        error("shfl at " + where(c->site) + ": lane " + std::to_string(lane) + " reads lane " +
                  std::to_string(j) + ", which is not in the mask (undefined)", false);
        c->out = 0;
      } else {
        c->out = lanes[j]->value;
      }
    }
  } else if (kind == CollKind::mma) {
    if (mask != ~0u) error("mma.sync at " + where(site) + " needs all 32 lanes", true);
    ++counters.mma;
    // Fragments (ptx-oracle mma_m16n8k16_a/_b, mma_m16n8k8 a/b, mma_m16n8_c; tf32: PTX ISA
    // "Matrix Fragments for mma.m16n8k8", .tf32 rows): g = lane>>2, t = lane%4.
    float A[16][16], B[16][8], C[16][8];
    const int K = lanes[0]->mma_k;
    const MmaK8Type type = lanes[0]->k8_type;
    const bool bf16 = lanes[0]->bf16;
    for (int l = 1; l < kWarp; ++l)
      if (lanes[l]->mma_k != K || lanes[l]->bf16 != bf16 || (K == 8 && lanes[l]->k8_type != type))
        error("mma.sync at " + where(site) + ": lanes execute different mma shapes or types", true);
    bool bad_tf32 = false;
    for (int lane = 0; lane < kWarp; ++lane) {
      const int g = lane >> 2, t = lane & 3;
      const Coll* c = lanes[lane];
      if (K == 16) {
        for (int i = 0; i < 8; ++i)
          A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = half_bits_to_float(c->a[i / 2], i & 1, bf16);
        for (int i = 0; i < 4; ++i)
          B[2 * t + (i & 1) + 8 * (i >= 2)][g] = half_bits_to_float(c->bfrag[i / 2], i & 1, bf16);
      } else if (type != MmaK8Type::tf32) {
        for (int i = 0; i < 4; ++i) A[g + 8 * (i >= 2)][2 * t + (i & 1)] = half_bits_to_float(c->a[i / 2], i & 1, bf16);
        for (int i = 0; i < 2; ++i) B[2 * t + i][g] = half_bits_to_float(c->bfrag[0], i, bf16);
      } else {
        auto tf32 = [&](uint32_t bits) {
          bad_tf32 |= (bits & 0x1FFFu) != 0 && (bits & 0x7F800000u) != 0x7F800000u;
          float f;
          std::memcpy(&f, &bits, 4);
          return f;
        };
        for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >= 2)] = tf32(c->a[i]);
        for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32(c->bfrag[i]);
      }
      for (int i = 0; i < 4; ++i) C[g + 8 * (i >= 2)][2 * t + (i & 1)] = c->cfrag[i];
    }
    if (bad_tf32)
      error("mma.sync .tf32 at " + where(site) + ": an operand is not a tf32 value (low 13 bits set): round it with "
            "cvt.rna.tf32.f32 first", false);
    for (int lane = 0; lane < kWarp; ++lane) {
      const int g = lane >> 2, t = lane & 3;
      for (int i = 0; i < 4; ++i) {
        const int m = g + 8 * (i >= 2), n = 2 * t + (i & 1);
        // 16-bit products are exact in fp32, tf32 ones (11 x 11 significant bits) too; sum in k order
        float acc = C[m][n];
        for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
        lanes[lane]->d[i] = acc;
      }
    }
  } else if (kind == CollKind::ldmatrix) {
    if (mask != ~0u) error("ldmatrix at " + where(site) + " needs all 32 lanes", true);
    const int num = lanes[0]->num;
    const bool trans = lanes[0]->trans;
    uintptr_t addr[kWarp];
    uint32_t bytes[kWarp] = {};
    bool ok[kWarp] = {};
    for (int l = 0; l < 8 * num; ++l) {  // lanes 8m..8m+7 address the rows of matrix m
      addr[l] = reinterpret_cast<uintptr_t>(lanes[l]->addr);
      bytes[l] = 16;
      if (lanes[l]->addr == kReportedRow) continue;
      if (addr[l] % 16) {
        error("ldmatrix at " + where(site) + ": row address of lane " + std::to_string(l) +
                  " is not 16-byte aligned", false);
        continue;
      }
      ok[l] = shared_check(base + l, lanes[l]->addr, 16, false, site);
    }
    count_wavefronts(addr, bytes, 8, kWarp, counters.shared_wavefronts[0], counters.shared_wavefronts_ideal[0]);
    ++counters.shared_requests[0];
    auto u16 = [&](int row_lane, int elem) -> uint32_t {
      if (!ok[row_lane]) return 0;
      uint16_t v;
      std::memcpy(&v, lanes[row_lane]->addr + 2 * elem, 2);
      return v;
    };
    for (int lane = 0; lane < kWarp; ++lane)
      for (int m = 0; m < num; ++m) {
        const int row = lane >> 2, pair = lane & 3;  // ptx-oracle ldmatrix_frag
        lanes[lane]->r[m] = trans ? (u16(8 * m + 2 * pair, row) | u16(8 * m + 2 * pair + 1, row) << 16)
                                  : (u16(8 * m + row, 2 * pair) | u16(8 * m + row, 2 * pair + 1) << 16);
      }
  }
  if (mask == w.exists) flush(w);
  for (int l = 0; l < kWarp; ++l)
    if (mask >> l & 1) threads[base + l].state = State::runnable;
  w.arrived &= ~mask;
}

// ---------------------------------------------------------------- requests and counters
void BlockRunner::record_request(Thread& t, Site s, bool global, SharedKind kind, const void* p, size_t n) {
  const uint64_t site_key = reinterpret_cast<uintptr_t>(s.file) * 1000003u + static_cast<uint64_t>(s.line);
  uint32_t occurrence = 0;
  auto it = std::find_if(t.occurrences.begin(), t.occurrences.end(), [&](auto& e) { return e.first == site_key; });
  if (it == t.occurrences.end()) t.occurrences.emplace_back(site_key, 1);
  else occurrence = it->second++;
  Request& r = warps[t.warp].requests[site_key * 0x100000001b3ull + occurrence * 2 + global];
  r.global = global;
  r.kind = kind;
  r.width = static_cast<uint32_t>(n);
  r.addr[t.lane] = reinterpret_cast<uintptr_t>(p);
  r.bytes[t.lane] = static_cast<uint32_t>(n);
}

void BlockRunner::flush(Warp& w) {
  for (auto& kv : w.requests) {
    const Request& r = kv.second;
    if (r.global) {
      std::vector<uintptr_t> sectors;
      std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
      for (int l = 0; l < kWarp; ++l)
        if (r.bytes[l]) {
          for (uintptr_t sct = r.addr[l] / 32; sct <= (r.addr[l] + r.bytes[l] - 1) / 32; ++sct) sectors.push_back(sct);
          ranges.emplace_back(r.addr[l], r.addr[l] + r.bytes[l]);
        }
      std::sort(sectors.begin(), sectors.end());
      sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
      std::sort(ranges.begin(), ranges.end());
      uintptr_t covered = 0, end = 0;
      for (auto& rg : ranges) {
        if (rg.first > end) end = rg.first;
        if (rg.second > end) { covered += rg.second - end; end = rg.second; }
      }
      ++counters.global_requests;
      counters.global_sectors += sectors.size();
      counters.global_sectors_ideal += (covered + 31) / 32;
    } else {
      const int k = static_cast<int>(r.kind);
      const int per_phase = r.width >= 16 ? 8 : r.width == 8 ? 16 : 32;
      ++counters.shared_requests[k];
      count_wavefronts(r.addr.data(), r.bytes.data(), per_phase, kWarp, counters.shared_wavefronts[k],
                       counters.shared_wavefronts_ideal[k]);
    }
  }
  w.requests.clear();
  const int base = static_cast<int>(&w - warps.data()) * kWarp;
  for (int l = 0; l < kWarp && base + l < nthreads; ++l) threads[base + l].occurrences.clear();
}

// ---------------------------------------------------------------- checkers
Cell* BlockRunner::cell(const char* p) {
  if (p >= smem && p < smem + L->smem) return &shadow[p - smem];
  return &static_shadow[reinterpret_cast<uintptr_t>(p)];
}

bool BlockRunner::shared_check(int tid, const char* p, size_t n, bool write, Site s) {
  // (as integers, no end formed: see global_check)
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(smem);
  const bool dynamic = a >= lo && n <= L->smem && a - lo <= L->smem - n;
  const uintptr_t arena_lo = reinterpret_cast<uintptr_t>(arena.get());
  const bool near_arena = a < lo + L->smem + kSmemGuard && (a >= arena_lo || arena_lo - a < n);
  if (!dynamic && near_arena) {
    std::ostringstream m;
    m << "out-of-bounds shared " << (write ? "write" : "read") << " of " << n << " bytes at offset "
      << (p - smem) << " (dynamic shared memory is " << L->smem << " bytes) by " << who(tid) << " at " << where(s);
    error(m.str(), false);
    return false;
  }
  if (!L->opt.check) return true;
  const Thread& t = threads[tid];
  const uint32_t wep = warps[t.warp].epoch;
  bool reported = false;  // one report per access; the shadow is still updated for every byte
  for (size_t i = 0; i < n; ++i) {
    Cell& c = *cell(p + i);
    const char* what = nullptr;
    int other = -1;
    if (c.pending) {
      what = "accesses a cp.async destination before the wait that completes it; the copy was issued by";
      other = c.w_tid;
    } else if (c.w_epoch == epoch && c.w_tid != tid && !ordered(c.w_tid, c.w_wepoch, tid)) {
      what = write ? "writes a byte also written, with no __syncthreads between, by"
                   : "reads a byte written, with no __syncthreads between, by";
      other = c.w_tid;
    } else if (!write && c.w_epoch == 0) {
      what = "reads shared memory that nothing in this block has written";
    } else if (write && c.r_epoch == epoch) {
      for (int k = 0; k < c.readers; ++k)
        if (c.r_tid[k] != tid && !ordered(c.r_tid[k], c.r_wepoch[k], tid)) {
          what = "writes a byte read, with no __syncthreads between, by";
          other = c.r_tid[k];
        }
    }
    if (what && !reported) {
      std::ostringstream m;
      m << (other < 0 ? "uninitialised shared memory: " : "shared-memory race: ") << who(tid) << " at " << where(s)
        << " " << what;
      if (other >= 0) m << " " << who(other);
      m << " [byte offset " << (p + i - smem) << "]";
      error(m.str(), false);
      reported = true;  // the access itself goes ahead, as on the GPU
    }
    if (write) {
      c.w_epoch = epoch;
      c.w_tid = static_cast<uint16_t>(tid);
      c.w_wepoch = wep;
    } else {
      if (c.r_epoch != epoch) {
        c.r_epoch = epoch;
        c.readers = 0;
      }
      bool seen = false;
      for (int k = 0; k < c.readers; ++k)
        if (c.r_tid[k] == tid) { c.r_wepoch[k] = wep; seen = true; }
      if (!seen && c.readers < 2) {
        c.r_tid[c.readers] = static_cast<uint16_t>(tid);
        c.r_wepoch[c.readers++] = wep;
      } else if (!seen) {  // a third reader replaces the second: with two distinct readers kept, every
                           // writer differs from one of them, so an unordered write is still caught
        c.r_tid[1] = static_cast<uint16_t>(tid);
        c.r_wepoch[1] = wep;
      }
    }
  }
  return true;
}

bool BlockRunner::global_check(const void* p, size_t n, bool write, Site s, bool atomic) {
  // Addresses as integers, the end not formed: a wild address near 2^64 (a PTX kernel's) wrapped
  // a + n past zero, passed as inside a buffer, and was read (the executor crashed).
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (size_t i = 0; i < L->buffers.size(); ++i) {
    const Buffer& b = L->buffers[i];
    const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
    if (a >= lo && n <= b.bytes && a - lo <= b.bytes - n) {
      if (write && !b.writable) {
        error("global write to a read-only input by " + who(cur->linear) + " at " + where(s), false);
        return false;
      }
      if (write) counters.global_bytes_written += n;
      else counters.global_bytes_read += n;
      if (write && L->writers && b.bytes <= kMaxWriterBytes) record_writer(i, size_t(a - lo), n, atomic, s);
      return true;
    }
  }
  std::ostringstream m;
  m << "out-of-bounds global " << (write ? "write" : "read") << " of " << n << " bytes at " << p
    << " (outside every tensor of the launch) by " << who(cur->linear) << " at " << where(s);
  error(m.str(), false);
  return false;
}

void BlockRunner::record_writer(size_t buffer, size_t offset, size_t n, bool atomic, Site s) {
  WriterShadow& w = L->writers[buffer];
  std::call_once(w.made, [&] {  // (nothing in it throws: an exception would leave other workers waiting)
    const size_t bytes = L->buffers[buffer].bytes, shadow = bytes * sizeof(std::atomic<uint64_t>);
    if (L->shadow_bytes.fetch_add(shadow) + shadow > kMaxShadowBytes) return;
    w.owner.reset(new (std::nothrow) std::atomic<uint64_t>[bytes]);
    if (!w.owner) return;
    for (size_t i = 0; i < bytes; ++i) w.owner[i].store(0, std::memory_order_relaxed);
  });
  if (!w.owner) return;
  const Dim3 g = L->grid;
  const uint32_t block = bidx.x + g.x * (bidx.y + g.y * bidx.z);
  const uint64_t me = (uint64_t(block) + 1) << 1 | uint64_t(atomic);
  for (size_t i = offset; i < offset + n; ++i) {
    const uint64_t before = w.owner[i].exchange(me, std::memory_order_relaxed);
    const bool before_atomic = before & 1;
    if (before == 0 || before >> 1 == me >> 1 || (before_atomic && atomic)) continue;  // none, this block, atomics
    const uint32_t other = static_cast<uint32_t>(before >> 1) - 1;
    const Dim3 o{other % g.x, (other / g.x) % g.y, other / (g.x * g.y)};
    std::ostringstream m;
    m << "global-memory race: byte " << i << " of tensor " << buffer << " of the launch is written by block "
      << dim_str(o) << (before_atomic ? " (atomically)" : "") << " and by " << who(cur->linear)
      << (atomic ? " (atomically)" : "") << " at " << where(s)
      << " without an atomic on both sides (blocks of one launch are not ordered)";
    error(m.str(), false);
    return;  // one report per access
  }
}

void BlockRunner::complete(Thread& t, const std::vector<CpOp>& group) {
  for (const CpOp& op : group) {
    if (op.src) std::memcpy(op.dst, op.src, op.src_size);
    std::memset(op.dst + op.src_size, 0, op.cp_size - op.src_size);  // zero fill (src-size)
    if (!L->opt.check) continue;
    for (int i = 0; i < op.cp_size; ++i) {
      Cell& c = *cell(op.dst + i);
      c.pending = 0;
      c.w_epoch = epoch;
      c.w_tid = static_cast<uint16_t>(t.linear);
      c.w_wepoch = warps[t.warp].epoch;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- public API
void set_options(const Options& o) {
  {
    std::lock_guard<std::mutex> g(g_session_mutex);
    g_options = o;
  }
  ptx::clear_cache();  // a new session may replace kernels' PTX
}

namespace {
thread_local std::optional<Options> g_pinned;  // the calling op's options (PinOptions)
}

Options options() {
  if (g_pinned) return *g_pinned;
  std::lock_guard<std::mutex> g(g_session_mutex);
  return g_options;
}

PinOptions::PinOptions() : outer_(!g_pinned) {
  if (outer_) g_pinned = options();
}
PinOptions::~PinOptions() {
  if (outer_) g_pinned.reset();
}

std::vector<LaunchRecord> take_records() {
  std::lock_guard<std::mutex> g(g_session_mutex);
  return std::exchange(g_records, {});
}

void set_buffers(std::vector<Buffer> buffers) { g_buffers = std::move(buffers); }

namespace {
thread_local bool g_dense_batch = false;
}
DenseBatch::DenseBatch(bool dense) : prev_(g_dense_batch) { g_dense_batch = dense; }
DenseBatch::~DenseBatch() { g_dense_batch = prev_; }

void launch(const char* name, Dim3 grid, Dim3 block, size_t dynamic_smem, int max_regs_per_thread,
            const std::function<void()>& source_body, const void* kernel_fn, const void* params, size_t params_bytes) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const Options opt = options();
  const Device& dev = opt.device;
  // What the driver rejects at launch ("too many resources requested", "invalid argument"),
  // against the emulated card's limits.
  auto refuse = [&](const std::string& why) {
    throw std::runtime_error(std::string(name) + ": launch exceeds the " + dev.name + "'s limits: " + why);
  };
  if (nthreads == 0 || nthreads > uint64_t(dev.threads_per_block))
    refuse("a block of " + std::to_string(nthreads) + " threads (1.." + std::to_string(dev.threads_per_block) + ")");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error(std::string(name) + ": grid.y and grid.z must be <= 65535");
  if (dynamic_smem > dev.smem_per_block)
    refuse(std::to_string(dynamic_smem) + " bytes of dynamic shared memory per block (at most " +
           std::to_string(dev.smem_per_block) + ")");
  if (nthreads * uint64_t(max_regs_per_thread) > uint64_t(dev.regs_per_block))
    refuse(std::to_string(nthreads) + " threads x up to " + std::to_string(max_regs_per_thread) + " registers (at most " +
           std::to_string(dev.regs_per_block) + " registers per block)");

  // The PTX executor runs the kernel's PTX entry (for a dense batch the dense kernel's, see
  // DenseBatch), found (and parsed, once) before any block runs.
  std::string entry = ptx::symbol_name(kernel_fn);
  std::function<void()> ptx_body;
  if (opt.executor == Executor::ptx) {
    if (kernel_fn == nullptr) throw std::runtime_error(std::string(name) + ": the PTX executor needs the kernel function of the launch");
    if (entry.empty()) throw std::runtime_error(std::string(name) + ": the kernel function has no exported symbol to name its PTX entry");
    if (g_dense_batch) entry = ptx::dense_entry(entry);
    std::shared_ptr<const ptx::Program> program = ptx::program_for(entry);
    if (program->param_bytes != params_bytes)
      throw std::runtime_error(std::string(name) + ": PTX entry takes " + std::to_string(program->param_bytes) +
                               " bytes of parameters, the launch passes " + std::to_string(params_bytes));
    ptx_body = [program, params, params_bytes] { ptx::run(*program, params, params_bytes); };
  }
  const std::function<void()>& body = opt.executor == Executor::ptx ? ptx_body : source_body;

  LaunchCtx L;
  // read here, in the caller's thread: a bad FLASH_CUDA_PTX_STEP_LIMIT is its error, not an
  // exception in a worker thread (std::terminate; a review)
  L.max_rounds = std::max<uint64_t>(1, ptx_step_limit() / 256);
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.smem = dynamic_smem;
  L.opt = opt;
  L.buffers = g_buffers;
  if (opt.check) L.writers.reset(new WriterShadow[L.buffers.size()]);
  L.body = &body;

  std::vector<unsigned> blocks(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = static_cast<unsigned>(L.opt.order == Order::reverse ? nblocks - 1 - i : i);
  if (L.opt.order == Order::random) std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(L.opt.seed));
  std::atomic<uint64_t> next{0};
  auto worker = [&] {
    BlockRunner R(&L);
    g_runner = &R;
    for (uint64_t i; !L.stop && (i = next.fetch_add(1)) < nblocks;) R.run(blocks[i]);
    g_runner = nullptr;
    std::lock_guard<std::mutex> g(L.mutex);
    L.counters.add(R.counters);
  };
  const int workers = static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(L.opt.workers, nblocks)));
  if (workers == 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < workers; ++i) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }

  LaunchRecord rec{name, entry, opt.executor == Executor::ptx ? "ptx" : "source", dev.name, grid, block, dynamic_smem,
                   L.counters, L.errors};
  if (L.error_count > L.errors.size())
    rec.errors.push_back("... and " + std::to_string(L.error_count - L.errors.size()) + " more");
  {
    std::lock_guard<std::mutex> g(g_session_mutex);
    g_records.push_back(rec);
  }
  if (!rec.errors.empty()) {
    std::string msg = std::string("emulated kernel ") + name + " failed its checks:";
    for (auto& e : rec.errors) msg += "\n  " + e;
    throw std::runtime_error(msg);
  }
}

const Dim3& thread_idx() { return runner().cur->idx; }
const Dim3& block_idx() { return runner().bidx; }
const Dim3& block_dim() { return runner().L->block; }
const Dim3& grid_dim() { return runner().L->grid; }
void* dynamic_shared() { return runner().smem; }
size_t dynamic_shared_bytes() { return runner().L->smem; }
int lane_id() { return runner().cur->lane; }

uint64_t ptx_step_limit() {
  static const uint64_t limit = [] {
    const char* env = std::getenv("FLASH_CUDA_PTX_STEP_LIMIT");
    if (env == nullptr || *env == '\0') return uint64_t{1} << 27;
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = std::isdigit(static_cast<unsigned char>(*env)) ? std::strtoull(env, &end, 10) : 0;
    if (v == 0 || *end != '\0' || errno == ERANGE)  // (strtoull took "-1" as 2^64 - 1)
      throw std::invalid_argument("FLASH_CUDA_PTX_STEP_LIMIT must be a positive integer");
    return static_cast<uint64_t>(v);
  }();
  return limit;
}

void stop_launch() { runner().L->stop = true; }

void thread_error(const std::string& what, bool fatal) {
  BlockRunner& R = runner();
  R.error(what + " (" + R.who(R.cur->linear) + ")", fatal);
}

void syncthreads(Site s) { runner().wait_here(State::at_barrier, s); }

void add_instructions(const uint64_t (&per_class)[6]) {
  for (int k = 0; k < 6; ++k) runner().counters.instructions[k] += per_class[k];
}

void syncwarp(unsigned mask, Site s) {
  Coll c{CollKind::syncwarp, mask, s};
  runner().collective(c);
}

uint32_t shfl(int mode, unsigned mask, uint32_t value, int b, int c, Site s) {
  Coll k{CollKind::shfl, mask, s};
  k.mode = mode;
  k.value = value;
  k.b = b;
  k.c = c;
  runner().collective(k);
  return k.out;
}

bool global_access(const void* p, size_t bytes, bool write, Site s) {
  BlockRunner& R = runner();
  R.record_request(*R.cur, s, true, SharedKind::load, p, bytes);
  return R.global_check(p, bytes, write, s);
}

bool shared_access(const void* p, size_t bytes, bool write, SharedKind kind, Site s) {
  BlockRunner& R = runner();
  R.record_request(*R.cur, s, false, kind, p, bytes);
  return R.shared_check(R.cur->linear, static_cast<const char*>(p), bytes, write, s);
}

void global_load(void* dst, const void* src, size_t bytes, Site s) {
  if (global_access(src, bytes, false, s)) std::memcpy(dst, src, bytes);
  else std::memset(dst, 0, bytes);
}

void global_store(void* dst, const void* src, size_t bytes, Site s) {
  if (global_access(dst, bytes, true, s)) std::memcpy(dst, src, bytes);
}

void shared_load(void* dst, const void* src, size_t bytes, Site s) {
  if (shared_access(src, bytes, false, SharedKind::load, s)) std::memcpy(dst, src, bytes);
  else std::memset(dst, 0, bytes);
}

void shared_store(void* dst, const void* src, size_t bytes, Site s) {
  if (shared_access(dst, bytes, true, SharedKind::store, s)) std::memcpy(dst, src, bytes);
}

float atomic_add_f32(float* p, float v, Site s) {
  BlockRunner& R = runner();
  R.record_request(*R.cur, s, true, SharedKind::load, p, 4);
  if (!R.global_check(p, 4, true, s, true)) return 0.0f;
  R.counters.global_bytes_read += 4;
  uint32_t* word = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(word, __ATOMIC_RELAXED), upd;
  do {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&upd, &f, 4);
  } while (!__atomic_compare_exchange_n(word, &old, upd, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  float previous;
  std::memcpy(&previous, &old, 4);
  return previous;
}

int device_cc() { return runner().L->opt.device.cc; }

void trap(Site s) { throw std::runtime_error("trap at " + where(s)); }  // ends the thread; the block aborts

namespace {
// An instruction sm_75 does not have, on a device below sm_80: an error (ptxas would refuse it).
bool sm80_instruction(const char* what, Site s) {
  BlockRunner& R = runner();
  if (R.L->opt.device.cc >= 80) return true;
  R.error(std::string(what) + " at " + where(s) + " needs sm_80; the emulated " + R.L->opt.device.name + " is sm_" +
              std::to_string(R.L->opt.device.cc),
          true);
  return false;
}

// One warp-wide mma of shape m16n8k{k}: the collective computes every lane's d from all lanes'
// fragments.
void mma_collective(float d[4], const uint32_t* a, const uint32_t* b, const float c[4], int k, bool bf16,
                    MmaK8Type k8_type, Site s) {
  if (k == 16 && !sm80_instruction("mma.m16n8k16", s)) return;
  if (k == 8 && k8_type != MmaK8Type::f16 &&
      !sm80_instruction(k8_type == MmaK8Type::tf32 ? "mma.m16n8k8.tf32" : "mma.m16n8k8.bf16", s))
    return;
  Coll coll{CollKind::mma, ~0u, s};
  float out[4];
  coll.a = a;
  coll.bfrag = b;
  coll.cfrag = c;
  coll.d = out;  // c and d may alias: write d only after every lane's c has been read
  coll.bf16 = bf16;
  coll.mma_k = k;
  coll.k8_type = k8_type;
  runner().collective(coll);
  std::memcpy(d, out, sizeof(out));
}
}  // namespace

void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], bool bf16, Site s) {
  mma_collective(d, a, b, c, 16, bf16, MmaK8Type::f16, s);
}

void mma_m16n8k8(float d[4], const uint32_t* a, const uint32_t* b, const float c[4], MmaK8Type type, Site s) {
  mma_collective(d, a, b, c, 8, type == MmaK8Type::bf16, type, s);
}

uint32_t cvt_rna_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7F800000u) == 0x7F800000u) return bits;  // NaN, infinity: as they are
  // nearest, ties away from zero: add half of the dropped unit to the magnitude, then truncate
  // (a carry into the exponent is the correct rounding, to infinity included)
  return (bits + 0x1000u) & ~0x1FFFu;
}

alignas(16) const char kReportedRow[16] = {};

void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr, Site s) {
  Coll k{CollKind::ldmatrix, ~0u, s};
  k.addr = static_cast<const char*>(row_addr);
  k.r = r;
  k.num = num;
  k.trans = trans;
  runner().collective(k);
}

void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cg, Site s) {
  BlockRunner& R = runner();
  Thread& t = *R.cur;
  if (!sm80_instruction("cp.async", s)) return;
  if ((cp_size != 4 && cp_size != 8 && cp_size != 16) || (cg && cp_size != 16) || src_size < 0 || src_size > cp_size) {
    R.error("cp.async at " + where(s) + ": cp-size " + std::to_string(cp_size) + " / src-size " +
                std::to_string(src_size) + (cg ? " with .cg" : "") + " is not allowed", false);
    return;
  }
  if (reinterpret_cast<uintptr_t>(dst) % cp_size || (src_size > 0 && reinterpret_cast<uintptr_t>(src) % cp_size)) {
    R.error("cp.async at " + where(s) + ": address not aligned to cp-size by " + R.who(t.linear), false);
    return;
  }
  const char* from = static_cast<const char*>(src);
  if (src_size > 0) {
    R.record_request(t, s, true, SharedKind::load, src, src_size);
    if (!R.global_check(src, src_size, false, s)) from = nullptr;
  }
  char* to = static_cast<char*>(dst);
  if (!shared_access(to, cp_size, true, SharedKind::cp_async, s)) return;
  if (R.L->opt.check) {  // in flight: poison, and any access before the wait is a race
    std::memset(to, kPoison, cp_size);
    for (int i = 0; i < cp_size; ++i) {
      Cell& c = *R.cell(to + i);
      c.pending = 1;
      c.w_tid = static_cast<uint16_t>(t.linear);
    }
  }
  t.uncommitted.push_back({to, from, cp_size, from ? src_size : 0});
}

void cp_async_commit() {
  Thread& t = *runner().cur;
  t.groups.push_back(std::move(t.uncommitted));  // an empty group is allowed (trivially complete)
  t.uncommitted.clear();
}

void cp_async_wait_group(int n, Site) {
  BlockRunner& R = runner();
  Thread& t = *R.cur;
  // Complete as late as PTX allows: only the groups older than the n most recent.
  while (static_cast<int>(t.groups.size()) > n) {
    R.complete(t, t.groups.front());
    t.groups.pop_front();
  }
}

void cp_async_wait_all(Site s) {
  cp_async_commit();  // wait_all also covers copies that were never committed
  cp_async_wait_group(0, s);
}

std::string records_json(const std::vector<LaunchRecord>& records) {
  std::ostringstream o;
  auto dim = [&](const Dim3& d) { o << "[" << d.x << "," << d.y << "," << d.z << "]"; };
  auto str = [&](const std::string& s) {
    o << '"';
    for (char ch : s) {
      if (ch == '"' || ch == '\\') o << '\\' << ch;
      else if (static_cast<unsigned char>(ch) < 0x20) o << "\\u00" << "0123456789abcdef"[ch >> 4] << "0123456789abcdef"[ch & 15];
      else o << ch;  // (UTF-8 bytes pass through: JSON text is UTF-8)
    }
    o << '"';
  };
  o << "[";
  for (size_t i = 0; i < records.size(); ++i) {
    const LaunchRecord& r = records[i];
    const Counters& c = r.counters;
    o << (i ? "," : "") << "{\"kernel\":";
    str(r.kernel);
    o << ",\"entry\":";
    str(r.entry);
    o << ",\"executor\":";
    str(r.executor);
    o << ",\"device\":";
    str(r.device);
    o << ",\"grid\":";
    dim(r.grid);
    o << ",\"block\":";
    dim(r.block);
    o << ",\"threads_per_block\":" << r.block.x * r.block.y * r.block.z << ",\"dynamic_smem\":" << r.dynamic_smem
      << ",\"global_bytes_read\":" << c.global_bytes_read << ",\"global_bytes_written\":" << c.global_bytes_written
      << ",\"global_requests\":" << c.global_requests << ",\"global_sectors\":" << c.global_sectors
      << ",\"global_sectors_ideal\":" << c.global_sectors_ideal << ",\"mma\":" << c.mma << ",\"barriers\":" << c.barriers
      << ",\"shared\":{";
    for (int k = 0; k < 4; ++k)
      o << (k ? "," : "") << "\"" << shared_kind_name(k) << "\":{\"requests\":" << c.shared_requests[k]
        << ",\"wavefronts\":" << c.shared_wavefronts[k] << ",\"ideal\":" << c.shared_wavefronts_ideal[k] << "}";
    o << "},\"instructions\":{";
    for (int k = 0; k < 6; ++k) o << (k ? "," : "") << "\"" << instr_class_name(k) << "\":" << c.instructions[k];
    o << "},\"errors\":[";
    for (size_t e = 0; e < r.errors.size(); ++e) {
      if (e) o << ",";
      str(r.errors[e]);
    }
    o << "]}";
  }
  o << "]";
  return o.str();
}

}  // namespace emu
