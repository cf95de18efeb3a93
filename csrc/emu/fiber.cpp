/* Fiber context switch (see fiber.h). x86-64 System V: rbx, rbp, r12-r15, the MXCSR and the
 * x87 control word are callee-saved, so they are all a switch has to save. */
#include "fiber.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__x86_64__)
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline();
asm(R"(
  .text
  .globl emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch

  .globl emu_fiber_trampoline
  .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
#endif

namespace emu {

Fiber::~Fiber() {
  if (stack_) munmap(stack_, kStackBytes + kGuardBytes);
}

void Fiber::start(Entry entry, void* arg) {
  if (!stack_) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    stack_ = static_cast<char*>(p);
    mprotect(stack_, kGuardBytes, PROT_NONE);
  }
  char* top = stack_ + kStackBytes + kGuardBytes;
#if defined(__x86_64__)
  // Initial frame, popped by emu_fiber_switch: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp ret.
  // The trampoline is entered by that ret with rsp 16-byte aligned, so its call is ABI-aligned.
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 2;  // 16 bytes of headroom, keeps alignment
  *--sp = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
  *--sp = 0;                                   // rbp
  *--sp = 0;                                   // rbx
  *--sp = reinterpret_cast<uint64_t>(arg);     // r12 -> rdi
  *--sp = reinterpret_cast<uint64_t>(entry);   // r13 -> call target
  *--sp = 0;                                   // r14
  *--sp = 0;                                   // r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp_ = sp;
#else
  getcontext(&ctx_);
  ctx_.uc_stack.ss_sp = stack_ + kGuardBytes;
  ctx_.uc_stack.ss_size = kStackBytes;
  ctx_.uc_link = nullptr;
  entry_ = entry;
  arg_ = arg;
  makecontext(&ctx_, &Fiber::ucontext_entry, 0);
#endif
}

#if !defined(__x86_64__)
// makecontext passes only int arguments, so the fiber being started is handed over here.
static thread_local Fiber* g_starting = nullptr;
void Fiber::ucontext_entry() { Fiber* f = g_starting; f->entry_(f->arg_); }
#endif

void Fiber::resume() {
#if defined(__x86_64__)
  emu_fiber_switch(&caller_sp_, sp_);
#else
  g_starting = this;
  swapcontext(&caller_, &ctx_);
#endif
}

void Fiber::suspend() {
#if defined(__x86_64__)
  emu_fiber_switch(&sp_, caller_sp_);
#else
  swapcontext(&ctx_, &caller_);
#endif
}

}  // namespace emu
