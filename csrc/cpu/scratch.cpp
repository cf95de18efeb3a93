// The CPU backend's cache of temporaries (scratch.h).
#include "scratch.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace flash_cuda::cpu {
namespace {

struct Block {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// Tests: every block handed out filled with 0xff bytes (NaN as fp32, fp16 and bf16), so a result
// that read memory no one wrote comes out NaN (flash_cuda._C _cpu_scratch_poison).
std::atomic<bool> g_poison{false};
Block poisoned(Block b) {
  if (g_poison.load(std::memory_order_relaxed)) std::memset(b.ptr, 0xff, b.bytes);
  return b;
}

// Idle blocks, most recently freed first. Shared by every thread (a block freed on a worker
// thread serves the next call on any), under one lock held only to search and splice the list.
class BlockCache {
 public:
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest idle block that fits, at most 1/8 larger: a request does not keep a much
      // larger block from the request it was freed by.
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it)
        if (it->bytes >= bytes && it->bytes - bytes <= bytes / 8 && (best == idle_.end() || it->bytes < best->bytes)) {
          best = it;
          if (it->bytes == bytes) break;
        }
      if (best != idle_.end()) {
        const Block b = *best;
        idle_.erase(best);
        idle_bytes_ -= b.bytes;
        ++hits_;
        return poisoned(b);
      }
      ++misses_;
    }
    return poisoned(Block{c10::alloc_cpu(bytes), bytes});
  }

  void give_back(Block b) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle_.push_front(b);
      idle_bytes_ += b.bytes;
      while (idle_bytes_ > kScratchCacheBytes) {
        evicted.push_back(idle_.back());
        idle_bytes_ -= idle_.back().bytes;
        idle_.pop_back();
      }
    }
    for (const Block& e : evicted) c10::free_cpu(e.ptr);  // outside the lock
  }

  int64_t release_all() {
    std::list<Block> idle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t bytes = 0;
    for (const Block& b : idle) bytes += static_cast<int64_t>(b.bytes), c10::free_cpu(b.ptr);
    return bytes;
  }

  ScratchStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {hits_, misses_, static_cast<int64_t>(idle_bytes_)};
  }

 private:
  std::mutex mu_;
  std::list<Block> idle_;
  size_t idle_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may be freed while the process exits, after static destructors ran.
// A child process (fork) starts with a new, empty cache: the parent's lock may have been held by
// one of its other threads at the fork, which the child does not have; its idle blocks stay
// allocated, unused.
std::atomic<BlockCache*> g_cache{nullptr};
BlockCache& block_cache() {
  static const bool once = [] {
    g_cache = new BlockCache;
    pthread_atfork(nullptr, nullptr, [] { g_cache = new BlockCache; });
    return true;
  }();
  (void)once;
  return *g_cache;
}

void give_back(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  block_cache().give_back(*b);
  delete b;
}

class ScratchAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kScratchMinBlock || n > kScratchMaxBlock) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + 4095) / 4096 * 4096;  // whole pages: sizes a few bytes apart share blocks
    Block* b = new Block(block_cache().take(bytes));
    return {b->ptr, b, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

c10::Allocator* scratch_allocator() {
  static ScratchAllocator* allocator = new ScratchAllocator;
  return allocator;
}

}  // namespace

at::Tensor scratch_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, scratch_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

at::Tensor scratch_rows(const at::Tensor& x, at::ScalarType dtype) {
  if (x.scalar_type() == dtype && x.stride(-1) == 1) return x;
  at::Tensor y = scratch_empty(x.sizes(), dtype);
  y.copy_(x);
  return y;
}

void scratch_poison(bool on) { g_poison = on; }
namespace {
struct KeptPoolFns {
  int64_t (*release)();
  int64_t (*idle_bytes)();
};
// The pools' functions, under a lock that a forked child replaces (as the block cache's: another
// thread may have held it at the fork); the list itself stays valid in the child.
std::atomic<std::mutex*> g_kept_mu{nullptr};
std::mutex& kept_mu() {
  static const bool once = [] {
    g_kept_mu = new std::mutex;
    pthread_atfork(nullptr, nullptr, [] { g_kept_mu = new std::mutex; });
    return true;
  }();
  (void)once;
  return *g_kept_mu;
}
std::vector<KeptPoolFns>& kept_pools() {
  static auto* pools = new std::vector<KeptPoolFns>;
  return *pools;
}
std::vector<KeptPoolFns> kept_pools_now() {
  std::lock_guard<std::mutex> lock(kept_mu());
  return kept_pools();
}
}  // namespace

void register_kept_pool(int64_t (*release)(), int64_t (*idle_bytes)()) {
  std::lock_guard<std::mutex> lock(kept_mu());
  kept_pools().push_back({release, idle_bytes});
}

ScratchStats scratch_stats() {
  ScratchStats stats = block_cache().stats();
  for (const auto& pool : kept_pools_now()) stats.idle_bytes += pool.idle_bytes();
  return stats;
}

int64_t scratch_release() {
  int64_t bytes = block_cache().release_all();
  for (const auto& pool : kept_pools_now()) bytes += pool.release();
  return bytes;
}

}  // namespace flash_cuda::cpu
