// Buffers on 64-byte (cache line, AVX-512 vector) boundaries, as torch's CPU tensors are (c10's
// allocator aligns to 64). Torch-free, so the standalone harnesses (benchmarks/cpu_harness) keep
// their operands in them too: a plain std::vector starts 16 bytes off a line under glibc (16 bytes
// into a page above its mmap threshold, 128 KiB at first), splitting every 64-byte load of its
// rows across two lines, which slowed some of the library's loops there but never in the library
// (a Zen 5: P V's register tiles 5.0-5.3 G vdpbf16ps/s with V so placed, 6.4 aligned).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace flash_cuda::cpu {

// The BLAS's no-copy kernels read and write the scratch tiles in place, and a C tile at malloc's
// 16-byte alignment splits every vector access across two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
template <typename T>
using TileVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace flash_cuda::cpu
