/* fp32 inputs on the tensor cores: TF32 (one m16n8k8.tf32 per product: 11 significant bits,
 * torch's allow_tf32 precision) or 3xTF32 (three: fp32-level accuracy), and what a kernel
 * needs to treat fp16, bf16 and fp32 tiles alike.
 *
 * The shared tiles hold fp32 values as pairs of 16-bit units in the 16-bit kernels' swizzled
 * layouts (layout.h) with twice the columns, so the cp.async tile copies are theirs, and so are
 * the non-transposed ldmatrix loads of Q and K: in a 16-bit x4 load each lane receives one
 * 32-bit word of each 8x8 matrix (row lane / 4, word lane % 4), which over a 16 x 8 fp32 tile
 * is exactly the m16n8k8.tf32 A fragment (a_i at row g + 8 (i % 2), column t + 4 (i / 2)), and
 * over an 8 x 8 one stored [n][k] the B fragment (b_i at k = t + 4 i, n = g). One k-step of 16
 * units is then one m16n8k16 for 16-bit inputs and one m16n8k8.tf32 (8 values) for fp32.
 *
 * Each fp32 value is rounded to tf32 in registers (cvt.rna) before its mma: the tensor cores'
 * tf32 operands must be tf32 values. 3xTF32 also keeps the rest, lo = tf32(x - hi), and forms
 * each product as lo*hi + hi*lo + hi*hi (the lo*lo term lies below fp32 rounding): about 22
 * significant bits of every operand instead of 11, at three times the mma (the split of NVIDIA
 * CUTLASS's 3xTF32 GEMMs).
 *
 * P V needs one more step. P's accumulator registers hold keys 2t and 2t + 1 of each 8-key
 * n-tile where the tf32 A fragment wants columns t and t + 4. A k-step sums over its 8 keys in
 * any order, so the A fragment takes the accumulators as they lie, {c0, c2, c1, c3}, and the B
 * fragment the matching V rows, keys 2t and 2t + 1 (two 32-bit shared loads per lane:
 * ldmatrix.trans transposes 16-bit values and cannot move fp32 ones).
 */
#pragma once
#include <type_traits>

#include "ptx.h"

namespace flash_cuda {

// How the kernels hold an input dtype: as itself in 16-bit units, or (fp32) as two units each.
template <class T>
struct Elem {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value ||
                    std::is_same<T, float>::value,
                "fp16, bf16 or fp32 inputs");
  static constexpr bool kTf32 = std::is_same<T, float>::value;
  static constexpr int kUnits = sizeof(T) / 2;                     // 16-bit units per value
  using Unit = std::conditional_t<kTf32, uint16_t, T>;            // what the shared tiles are made of
  static constexpr const char* kName = kTf32 ? "fp32" : (std::is_same<T, __half>::value ? "fp16" : "bf16");
};

// A global pointer to T values as 16-bit units (fp32: two per value; 16-bit types: themselves).
template <class U, class T>
FC_DEVICE const U* units(const T* g_p) {
  return reinterpret_cast<const U*>(g_p);
}
template <class U, class T>
FC_DEVICE U* units(T* g_p) {
  return reinterpret_cast<U*>(g_p);
}

// An mma operand of N registers as the tensor cores take it: 16-bit pairs as loaded; for fp32,
// tf32(x) (hi) and, with 3xTF32, tf32(x - hi) (lo).
template <class T, int N>
struct Operand {
  uint32_t r[N];
};
template <int N>
struct Operand<float, N> {
  uint32_t hi[N], lo[N];
};

// raw: N registers as loaded from a shared tile (16-bit pairs, or one fp32 value each).
// kTf32x3 is a compile-time choice: a kernel holding both paths behind a branch at every mma
// makes ptxas keep both paths' values live (255 registers and spills at head dim 64 instead of
// about 150), so kernels branch once, around their main loop.
template <class T, bool kTf32x3, int N>
FC_DEVICE Operand<T, N> operand(const uint32_t (&raw)[N]) {
  Operand<T, N> o;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (Elem<T>::kTf32) {
      const float x = __uint_as_float(raw[i]);
      o.hi[i] = to_tf32(x);
      o.lo[i] = kTf32x3 ? to_tf32(x - __uint_as_float(o.hi[i])) : 0u;
    } else {
      o.r[i] = raw[i];
    }
  }
  return o;
}

// d = a b + c over one k-step of 16 units: a 16 x 16 16-bit values (m16n8k16) or 16 x 8 fp32
// ones (m16n8k8.tf32; three with 3xTF32, the small terms first), b the matching 16 x 8 or 8 x 8.
template <class T, bool kTf32x3>
FC_DEVICE void mma(float (&d)[4], const Operand<T, 4>& a, const Operand<T, 2>& b, const float (&c)[4]) {
  if constexpr (Elem<T>::kTf32) {
    if constexpr (kTf32x3) {
      mma_m16n8k8_tf32(d, a.lo, b.hi, c);
      mma_m16n8k8_tf32(d, a.hi, b.lo, d);
      mma_m16n8k8_tf32(d, a.hi, b.hi, d);
    } else {
      mma_m16n8k8_tf32(d, a.hi, b.hi, c);
    }
  } else {
    mma_m16n8k16<T>(d, a.r, b.r, c);
  }
}

// fp32: the A operand of P V for the 8 keys of one accumulator n-tile s (16 rows x 8 keys of P,
// mma C layout), in the key order described above.
template <bool kTf32x3>
FC_DEVICE Operand<float, 4> p_operand_tf32(const float (&s)[4]) {
  const uint32_t raw[4] = {__float_as_uint(s[0]), __float_as_uint(s[2]), __float_as_uint(s[1]),
                           __float_as_uint(s[3])};
  return operand<float, kTf32x3>(raw);
}

// fp32: the matching B operand, keys k0 + 2t and k0 + 2t + 1 at column n0 + g of a [k][n] fp32
// tile (V) held in 16-bit units; k0 a multiple of 8, n0 of 8. Conflict-free: a warp reads 4
// rows (2t: four swizzle chunks apart) x 8 consecutive values, 128 distinct bytes. The
// addresses go through SmemLayout::offset_from: the lane's part is loop-invariant, so the
// swizzle is not recomputed (nor, worse, every tile's address hoisted into registers).
template <class Layout>
FC_DEVICE void load_b_frag_kn_tf32(uint32_t (&raw)[2], const uint16_t* s_tile, int k0, int n0, int lane) {
  const int t2 = 2 * (lane % 4), g2 = 2 * (lane / 4);
  raw[0] = ld_shared(reinterpret_cast<const uint32_t*>(
      s_tile + Layout::offset_from(Layout::offset(t2, g2), k0, 2 * n0)));
  raw[1] = ld_shared(reinterpret_cast<const uint32_t*>(
      s_tile + Layout::offset_from(Layout::offset(t2 + 1, g2), k0, 2 * n0)));
}

}  // namespace flash_cuda
