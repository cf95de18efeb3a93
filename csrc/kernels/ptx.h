/* Thin wrappers around the PTX the kernels use: inline asm under nvcc, the emulator on the
 * host (csrc/emu/runtime.h). Kernel code calls only these for tensor-core math, shared-memory
 * matrix loads, async copies, atomics and every global/shared memory access, so the emulator sees
 * (and checks, and counts) everything the kernel does. Semantics and layouts:
 * ../shared/ptx-oracle/README.md; links to the PTX ISA at each wrapper.
 *
 * In the emulator build each wrapper takes the caller's source location as a last, defaulted
 * argument (FC_SITE), which is how race and bounds reports point into the kernel.
 */
#pragma once
#include <type_traits>

#include "device.h"
#include "platform.h"

#if defined(__CUDACC__)
#define FC_SITE
#define FC_SITE_ONLY
#define FC_PASS_SITE
#else
#define FC_SITE , ::emu::Site site = EMU_HERE
#define FC_SITE_ONLY ::emu::Site site = EMU_HERE
#define FC_PASS_SITE , site
#endif

// sm_75 (Turing) code: nvcc's device pass for an sm_75 target defines FC_SM75_PASS; the
// emulator asks the launch's device (::emu::device_cc(), the emulated __CUDA_ARCH__ / 10).
// Below sm_80 the wrappers take sm_75's instructions: mma.m16n8k16 as two m16n8k8,
// cp.async as a copy through registers; bf16 and tf32 ones trap (the dispatcher runs only fp16
// there; sm_80 kernels are not compiled for sm_75: kernel_arch_matches).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FC_SM75_PASS 1
#endif

namespace flash_cuda {

// Whether a kernel built for sm_75 (kSm75) or for sm_80+ is in code compiled for the device it
// runs on: the kernels trap where not (the dispatcher never launches one there; an sm_80
// kernel's instructions do not exist in an sm_75 pass, a Turing kernel's are dead weight in an
// sm_80 one).
template <bool kSm75>
FC_DEVICE bool kernel_arch_matches() {
#if defined(__CUDA_ARCH__)
  return kSm75 == (__CUDA_ARCH__ < 800);
#elif defined(__CUDACC__)
  return true;
#else
  return kSm75 == (::emu::device_cc() < kSm80);
#endif
}

#if defined(__CUDACC__)
FC_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// D = A*B + C, one warp, the k = 8 shape: A 16x8 (row), B 8x8 (col), C/D 16x8 in fp32. sm_75's
// f16 tensor-core shape (a[2], b[1]: 16-bit pairs; a_i at row g + 8 (i / 2), column 2t + i % 2),
// and, on sm_80+, the tf32 one (mma_m16n8k8_tf32: a[4], b[2] tf32 values, a_i at row
// g + 8 (i % 2), column t + 4 (i / 2); b_i at row t + 4 i, column g).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#warp-level-matrix-fragment-mma-1688
template <class T>  // __half or __nv_bfloat16
FC_DEVICE void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1],
                           const float (&c)[4] FC_SITE) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16 inputs");
#if defined(FC_SM75_PASS)
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  else
    __trap();  // no bf16 tensor cores before sm_80 (the dispatcher never gets here)
#elif defined(__CUDACC__)
#define FC_MMA_OPERANDS                                                                                    \
  : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                                         \
  : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3])
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n" FC_MMA_OPERANDS);
  else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n" FC_MMA_OPERANDS);
#undef FC_MMA_OPERANDS
#else
  ::emu::mma_m16n8k8(d, a, b, c, std::is_same<T, __half>::value ? ::emu::MmaK8Type::f16 : ::emu::MmaK8Type::bf16,
                     site);
#endif
}

// D = A*B + C on tensor cores, one warp: A 16x16 (row), B 16x8 (col), C/D 16x8 in fp32.
// Fragments per lane (g = lane/4, t = lane%4): a[4] and b[2] hold 16-bit pairs, c/d[4] floats.
// sm_75 has no k16 shape: there it is two m16n8k8, k 0..7 then 8..15 (a0 a1 are the A columns
// 2t, 2t + 1 of rows g and g + 8, a2 a3 the same + 8; b0 and b1 likewise: the k8 fragments
// exactly), the same products summed in fp32 in a fixed order.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#warp-level-matrix-fragment-mma-16816-float
template <class T>  // __half or __nv_bfloat16
FC_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const float (&c)[4] FC_SITE) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16 inputs");
  auto as_two_k8 = [&] {
    mma_m16n8k8<T>(d, {a[0], a[1]}, {b[0]}, c FC_PASS_SITE);
    mma_m16n8k8<T>(d, {a[2], a[3]}, {b[1]}, d FC_PASS_SITE);
  };
#if defined(FC_SM75_PASS)
  as_two_k8();
#elif defined(__CUDACC__)
#define FC_MMA_OPERANDS                                                                      \
  : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                           \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
    "f"(c[2]), "f"(c[3])
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n" FC_MMA_OPERANDS);
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n" FC_MMA_OPERANDS);
#undef FC_MMA_OPERANDS
#else
  if (::emu::device_cc() < kSm80) as_two_k8();
  else ::emu::mma_m16n8k16(d, a, b, c, std::is_same<T, __nv_bfloat16>::value, site);
#endif
}

// D = A B + C on tf32 tensor cores (sm_80+), the m16n8k8 fragments of the .tf32 type:
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#warp-level-matrix-fragment-mma-1688
FC_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                const float (&c)[4] FC_SITE) {
#if defined(FC_SM75_PASS)
  __trap();  // no tf32 tensor cores before sm_80 (the dispatcher never gets here)
#elif defined(__CUDACC__)
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                 "f"(c[2]), "f"(c[3]));
#else
  ::emu::mma_m16n8k8(d, a, b, c, ::emu::MmaK8Type::tf32, site);
#endif
}

// fp32 rounded to tf32 in a 32-bit register (nearest, ties away from zero), the mma's operand.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cvt
FC_DEVICE uint32_t to_tf32(float x) {
#if defined(FC_SM75_PASS)
  __trap();  // (sm_80)
  return 0;
#elif defined(__CUDACC__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return ::emu::cvt_rna_tf32(x);
#endif
}

// Two fp32 values rounded to one register of two 16-bit values, lo in bits 15:0 (the mma
// fragment order; cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32 underneath).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cvt
template <class T>
FC_DEVICE uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, 4);
  }
  return r;
}

// One 16-bit value to fp32 (explicit: torch builds with __CUDA_NO_HALF_CONVERSIONS__).
FC_DEVICE float to_float(__half x) { return __half2float(x); }
FC_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The inverse of pack2: both 16-bit values of a register, exactly, as fp32.
template <class T>
FC_DEVICE void unpack2(uint32_t r, float& lo, float& hi) {
  T h[2];
  memcpy(h, &r, 4);
  lo = to_float(h[0]);
  hi = to_float(h[1]);
}

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16: N 8x8 matrices of 16-bit values; lanes
// 8m..8m+7 pass the (16-byte aligned) row addresses of matrix m, register m of every lane
// receives its part of matrix m (the mma A/B fragment shape; .trans gives the transpose).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#warp-level-matrix-instructions-ldmatrix
template <int N, bool Trans = false>
FC_DEVICE void ldmatrix(uint32_t (&r)[N], const void* s_row FC_SITE) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(__CUDACC__)
  const uint32_t addr = smem_u32(s_row);
  if constexpr (N == 1 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  else if constexpr (N == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  else if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  else if constexpr (!Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
  ::emu::ldmatrix(r, N, Trans, s_row, site);
#endif
}

// Plain loads and stores. On the GPU they compile to ld/st.{global,shared} of sizeof(T)
// (T of 16 bytes, e.g. uint4, gives the 128-bit access); in the emulator they are checked
// for bounds and races and counted.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-ld
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-st
template <class T>
FC_DEVICE T ld_global(const T* g_p FC_SITE) {
#if defined(__CUDACC__)
  return *g_p;
#else
  T v;
  ::emu::global_load(&v, g_p, sizeof(T), site);
  return v;
#endif
}

template <class T>
FC_DEVICE void st_global(T* g_p, const T& v FC_SITE) {
#if defined(__CUDACC__)
  if constexpr (sizeof(T) == 16) {  // a struct assignment would be split into 32-bit stores
    uint32_t w[4];
    memcpy(w, &v, 16);
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(g_p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    *g_p = v;
  }
#else
  ::emu::global_store(g_p, &v, sizeof(T), site);
#endif
}

// A global load the compiler may not merge with an earlier load of the same address (a
// volatile load: ld.volatile.global); in the emulator a checked load like ld_global.
template <class T>
FC_DEVICE T ld_global_volatile(const T* g_p FC_SITE) {
#if defined(__CUDACC__)
  return *static_cast<const volatile T*>(g_p);
#else
  return ld_global(g_p FC_PASS_SITE);
#endif
}

// *g_p += v atomically, the result unused (red.global.add.f32: the backward's dQ accumulator).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#parallel-synchronization-and-communication-instructions-red
FC_DEVICE void red_add_global(float* g_p, float v FC_SITE) {
#if defined(__CUDACC__)
  atomicAdd(g_p, v);
#else
  atomicAdd(g_p, v, site);
#endif
}

template <class T>
FC_DEVICE T ld_shared(const T* s_p FC_SITE) {
#if defined(__CUDACC__)
  return *s_p;
#else
  T v;
  ::emu::shared_load(&v, s_p, sizeof(T), site);
  return v;
#endif
}

template <class T>
FC_DEVICE void st_shared(T* s_p, const T& v FC_SITE) {
#if defined(__CUDACC__)
  *s_p = v;
#else
  ::emu::shared_store(s_p, &v, sizeof(T), site);
#endif
}

// st.shared.v4.b32: one 128-bit store, whatever nvcc makes of the plain 16-byte store above
// (it split the backward preprocess's staging of O into four st.shared.u32 of 32 bits: four
// store wavefronts for one; the PTX executor's counters show it). The memory clobber keeps
// the compiler's other shared accesses on their side of it.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-st
FC_DEVICE void st_shared_v4(uint4* s_p, const uint4& v FC_SITE) {
#if defined(__CUDACC__)
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_u32(s_p)), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#else
  ::emu::shared_store(s_p, &v, sizeof(uint4), site);
#endif
}

// sm_75's cp.async: the same copy through registers, at once: src_bytes (0..Bytes) from global,
// the rest zero. Kernels issue a cp.async where its destination is already free and wait before
// reading it, so a copy that lands at once keeps their contract (copy.h's TileStage overlaps
// the main loops' tile loads with the math instead).
template <int Bytes>
FC_DEVICE void copy_through_registers(void* s_dst, const void* g_src, int src_bytes FC_SITE) {
  uint32_t w[Bytes / 4];
  if (Bytes == 16 && src_bytes == 16) {
    const uint4 v = ld_global(static_cast<const uint4*>(g_src) FC_PASS_SITE);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {  // whole words, then the bytes of a partial one (reads never pass src_bytes)
#pragma unroll
    for (int i = 0; i < Bytes / 4; ++i) {
      w[i] = 0u;
      if (4 * i + 4 <= src_bytes) {
        w[i] = ld_global(static_cast<const uint32_t*>(g_src) + i FC_PASS_SITE);
      } else {
        for (int j = 0; 4 * i + j < src_bytes; ++j)
          w[i] |= uint32_t(ld_global(static_cast<const uint8_t*>(g_src) + 4 * i + j FC_PASS_SITE)) << (8 * j);
      }
    }
  }
  if constexpr (Bytes == 16) st_shared(static_cast<uint4*>(s_dst), make_uint4(w[0], w[1], w[2], w[3]) FC_PASS_SITE);
  else if constexpr (Bytes == 8) st_shared(static_cast<uint2*>(s_dst), make_uint2(w[0], w[1]) FC_PASS_SITE);
  else st_shared(static_cast<uint32_t*>(s_dst), w[0] FC_PASS_SITE);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: an asynchronous 16-byte copy that
// bypasses L1; only the first src_bytes (0..16) are read, the rest of dst is zero-filled, so
// a tile edge is a predicate, not a branch. 16-byte aligned dst and src.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cp-async
FC_DEVICE void cp_async_cg16(void* s_dst, const void* g_src, int src_bytes FC_SITE) {
#if defined(FC_SM75_PASS)
  copy_through_registers<16>(s_dst, g_src, src_bytes);
#elif defined(__CUDACC__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(s_dst)), "l"(g_src), "r"(src_bytes));
#else
  if (::emu::device_cc() < kSm80) copy_through_registers<16>(s_dst, g_src, src_bytes, site);
  else ::emu::cp_async(s_dst, g_src, 16, src_bytes, true, site);
#endif
}

// cp.async.cg.shared.global [dst], [src], 16, ignore-src: 16 bytes when `fill`, else 16 zero
// bytes without reading src. The all-or-nothing form compiles to one predicated LDGSTS.ZFILL;
// a register src-size (above) costs a dozen instructions of byte-count arithmetic per copy.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cp-async
FC_DEVICE void cp_async_cg16_zfill(void* s_dst, const void* g_src, bool fill FC_SITE) {
#if defined(FC_SM75_PASS)
  copy_through_registers<16>(s_dst, g_src, fill ? 16 : 0);
#elif defined(__CUDACC__)
  asm volatile(
      "{\n .reg .pred p;\n setp.eq.u32 p, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, p;\n}\n" ::"r"(
          smem_u32(s_dst)),
      "l"(g_src), "r"(uint32_t(fill)));
#else
  if (::emu::device_cc() < kSm80) copy_through_registers<16>(s_dst, g_src, fill ? 16 : 0, site);
  else ::emu::cp_async(s_dst, g_src, 16, fill ? 16 : 0, true, site);
#endif
}

// cp.async.ca.shared.global [dst], [src], Bytes, src_bytes (Bytes 4, 8 or 16; cached in L1).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cp-async
template <int Bytes>
FC_DEVICE void cp_async_ca(void* s_dst, const void* g_src, int src_bytes FC_SITE) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(FC_SM75_PASS)
  copy_through_registers<Bytes>(s_dst, g_src, src_bytes);
#elif defined(__CUDACC__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(s_dst)), "l"(g_src), "n"(Bytes),
               "r"(src_bytes));
#else
  if (::emu::device_cc() < kSm80) copy_through_registers<Bytes>(s_dst, g_src, src_bytes, site);
  else ::emu::cp_async(s_dst, g_src, Bytes, src_bytes, false, site);
#endif
}

// cp.async.commit_group: this thread's uncommitted copies become one group (sm_75: nothing).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cp-async-commit-group
FC_DEVICE void cp_async_commit() {
#if defined(FC_SM75_PASS)
#elif defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  if (::emu::device_cc() >= kSm80) ::emu::cp_async_commit();
#endif
}

// cp.async.wait_group N: all but the N most recent committed groups are complete (and visible
// to this thread; other threads need a __syncthreads after their own waits). sm_75: nothing
// (its copies are complete when issued).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cp-async-wait-group
template <int N>
FC_DEVICE void cp_async_wait(FC_SITE_ONLY) {
#if defined(FC_SM75_PASS)
#elif defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#else
  if (::emu::device_cc() >= kSm80) ::emu::cp_async_wait_group(N, site);
#endif
}

// cp.async.wait_all = commit_group + wait_group 0: unlike wait_group 0 it also waits for
// copies that were never committed.
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#data-movement-and-conversion-instructions-cp-async-wait-group
FC_DEVICE void cp_async_wait_all(FC_SITE_ONLY) {
#if defined(FC_SM75_PASS)
#elif defined(__CUDACC__)
  asm volatile("cp.async.wait_all;\n" ::);
#else
  if (::emu::device_cc() >= kSm80) ::emu::cp_async_wait_all(site);
#endif
}

// ex2.approx.ftz.f32: 2^x in one MUFU instruction (max 2 ulp error); ex2(-inf) = +0, which is
// what masked scores rely on. The emulator uses exp2f (correctly rounded or within 1 ulp).
// https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#floating-point-instructions-ex2
FC_DEVICE float ex2_approx(float x) {
#if defined(__CUDACC__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// The block's dynamic shared memory (the launch's third <<<>>> argument), 16-byte aligned.
template <class T>
FC_DEVICE T* dynamic_smem() {
#if defined(__CUDACC__)
  extern __shared__ __align__(16) char fc_dynamic_smem[];
  return reinterpret_cast<T*>(fc_dynamic_smem);
#else
  return static_cast<T*>(::emu::dynamic_shared());
#endif
}

}  // namespace flash_cuda
