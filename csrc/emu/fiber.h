/* Cooperative fibers for the SIMT emulator: one fiber per emulated CUDA thread.
 *
 * A fiber is a stack plus a saved stack pointer; switching saves the callee-saved registers
 * on the current stack and restores them from the other one. On x86-64 this is a dozen
 * instructions of assembly (fiber.cpp), the technique of Boost.Context's fcontext, without a
 * system package to install. Measured here (2-core Zen 4, resume/suspend ping-pong): 11 ns per
 * switch; the issue quotes about 7 ns for Boost.Context and 240 ns for ucontext, whose
 * swapcontext makes a sigprocmask syscall. Other architectures fall back to ucontext.
 *
 * Fibers never migrate between OS threads: a block's fibers are created, run and finished
 * by the one OS thread that runs the block, so thread_local data stays valid inside them.
 */
#pragma once
#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

class Fiber {
 public:
  using Entry = void (*)(void* arg);
  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber();

  // (Re)start this fiber at entry(arg) on its own stack; it first runs at the next resume().
  void start(Entry entry, void* arg);
  // Run this fiber from the scheduler until it calls suspend().
  void resume();
  // Called from inside the fiber: go back to the scheduler that resumed it.
  void suspend();

 private:
  static constexpr size_t kStackBytes = 256 * 1024;  // kernel frames are small; mmap'ed lazily
  static constexpr size_t kGuardBytes = 4096;        // an overflow faults instead of corrupting
  char* stack_ = nullptr;  // mapping base (guard page first)
#if defined(__x86_64__)
  void* sp_ = nullptr;        // saved stack pointer of the suspended fiber
  void* caller_sp_ = nullptr; // saved stack pointer of the scheduler while the fiber runs
#else
  ucontext_t ctx_, caller_;
  Entry entry_ = nullptr;
  void* arg_ = nullptr;
  static void ucontext_entry();
#endif
};

}  // namespace emu
