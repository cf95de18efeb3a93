// Per-call temporaries of the CPU backend (GEMM operands prepared once per call, partial sums)
// from a small cache of freed blocks instead of the C heap.
//
// Why: a call of short sequences (e.g. B 32, H 12, N 32, D 32) prepares several MiB of operands
// and frees them at its end. glibc returns that memory to the system (mmap'd blocks, or trimming
// the top of the heap) and the next call faults every page in again: measured on a Zen 4 VM at
// ~2 us a 4 KiB page, 3.5-4 ms of a 7 ms fp32 backward whose GEMMs take ~2 ms. Blocks of the same
// size come back on the next call of the same shape (a training loop), already mapped.
//
// Only blocks from kScratchMinBlock to kScratchMaxBlock are kept, at most kScratchCacheBytes of
// them while idle (least recently freed evicted first): the calls whose operands are larger do
// O(N^2) work for their O(N) pages, where the faults do not show, and smaller ones glibc keeps in
// its heap anyway. Nothing from here may be returned to the caller: these tensors live for one
// call. The blocks come from c10::alloc_cpu directly: torch's memory profiler does not see them.
#pragma once
#include <ATen/ATen.h>

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace flash_cuda::cpu {

constexpr size_t kScratchMinBlock = size_t(64) << 10;    // smaller and larger temporaries go to
constexpr size_t kScratchMaxBlock = size_t(8) << 20;     // torch's CPU allocator as before
constexpr size_t kScratchCacheBytes = size_t(32) << 20;  // idle blocks kept at most

// An uninitialised CPU tensor of `sizes` (contiguous), on 64-byte boundaries like at::empty.
at::Tensor scratch_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// x converted to `dtype` with contiguous rows (unit stride in the last dimension): x itself where
// it already is, else a scratch copy.
at::Tensor scratch_rows(const at::Tensor& x, at::ScalarType dtype);

// What the cache did since the process started (the tests read it through
// torch.ops.flash_cuda._cpu_scratch_stats): requests served from it and requests it allocated
// a block for (those of kScratchMinBlock to kScratchMaxBlock bytes), bytes idle now (with the
// KeptPools' idle objects).
struct ScratchStats {
  int64_t hits = 0, misses = 0, idle_bytes = 0;
};
ScratchStats scratch_stats();
// Frees the idle blocks and the idle objects of every KeptPool (flash_cuda.empty_cpu_cache);
// returns their bytes.
int64_t scratch_release();
// A KeptPool's functions: frees its idle objects (called by scratch_release), counts their bytes
// (scratch_stats' idle bytes include them); both return those bytes.
void register_kept_pool(int64_t (*release)(), int64_t (*idle_bytes)());
// Tests: fill every block handed out from now on with 0xff bytes (NaN in every float dtype).
void scratch_poison(bool on);

// Objects kept from call to call (the KV-cache loop's buffers: decoding calls once per token),
// each used by one thread at a time: take(true) hands out an idle one (or a new one) that goes
// back to the pool when its handle dies, take(false) a new one that is deleted then. One pool
// per type T (T::bytes() is what one holds); scratch_release frees the idle ones. (They were each
// worker's thread_local buffers, which empty_cpu_cache could not reach: 40-50 MiB a dtype at
// 128 threads, an audit.) A forked child starts with an empty pool, as with the blocks.
template <typename T>
class KeptPool {
 public:
  struct Return {
    bool keep = false;
    void operator()(T* t) const {
      if (!keep) {
        delete t;
        return;
      }
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mu);
      try {
        p.idle.emplace_back(t);
      } catch (...) {  // (no memory for the list: a deleter must not throw)
        delete t;
      }
    }
  };
  using Handle = std::unique_ptr<T, Return>;

  static Handle take(bool keep) {
    if (keep) {
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mu);
      if (!p.idle.empty()) {
        T* t = p.idle.back().release();
        p.idle.pop_back();
        return Handle(t, Return{true});
      }
    }
    return Handle(new T(), Return{keep});
  }

 private:
  struct Pool {
    std::mutex mu;
    std::vector<std::unique_ptr<T>> idle;
  };
  static Pool& pool() {
    static std::atomic<Pool*> current{nullptr};
    static const bool once = [] {
      current = new Pool;
      pthread_atfork(nullptr, nullptr, [] { current = new Pool; });  // the parent's lock may be held
      register_kept_pool(&release, &idle_bytes);
      return true;
    }();
    (void)once;
    return *current;
  }
  static int64_t idle_bytes() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    int64_t bytes = 0;
    for (const auto& t : p.idle) bytes += t->bytes();
    return bytes;
  }
  static int64_t release() {
    std::vector<std::unique_ptr<T>> idle;  // freed after the lock is released
    {
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mu);
      idle.swap(p.idle);
    }
    int64_t bytes = 0;
    for (const auto& t : idle) bytes += t->bytes();
    return bytes;
  }
};

}  // namespace flash_cuda::cpu
