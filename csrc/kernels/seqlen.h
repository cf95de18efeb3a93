/* Packed variable-length batches (varlen_attention): every kernel's first step narrows its
 * params to the sequence of its block, so the rest of the kernel reads one sequence as if it
 * were a dense batch of one (FlashAttention-2 reads its cu_seqlens the same way, per block).
 *
 * Sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q, o, dout, dq and of lse, and
 * rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k, v, dk, dv. The entries are clamped to the
 * tensors' rows (a start into [0, total], an end into [start, total]): cu_seqlens on the GPU
 * are never validated on the host (that would need a synchronising copy), so wrong entries may
 * give wrong values but every access stays inside the tensors and the scratch. The grid covers
 * the longest sequence (max_seqlen, not trusted either); blocks past their sequence's end exit
 * at once (their rows do not exist). Causal and windows are bottom-right aligned per sequence.
 *
 * A KV-cache launch (seqused_k, kv_cache.h) narrows the keys alone: sequence b attends to rows
 * [leftpad_k[b], seqused_k[b] + seqused_k_add) of its cache, clamped to the capacity
 * (cache_first_row: the first, which kv_cache.h adds to every cache row it reads).
 *
 * Only scalars change (lengths, diagonal offset, first rows): the pointers stay the params'
 * own and the first rows enter the addresses where they are formed (head_ptr,
 * packed_scratch_row).
 * Those scalars live in registers all through a kernel, which the largest kernels cannot
 * spare: code after a long loop may narrow again (with volatile loads, never merged with the
 * first ones, so nothing derived from them is held through the loop), and the forward,
 * backward and dQ kernels are instantiated with kVarlen (packed batches)
 * and without it (dense batches: the narrowing and the first rows compile away, and the kernel
 * is what it was before packed batches existed). launch.h's with_varlen picks one per launch.
 */
#pragma once
#include <type_traits>

#include "params.h"
#include "ptx.h"

namespace flash_cuda {

FC_DEVICE int clamp_index(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// A load of a sequence's boundary; kVolatile: one the compiler may not merge with an earlier
// load of the same entry, so a kernel that reads the boundaries again after a long loop (an L1
// hit) holds nothing derived from them in registers through the loop. Which kernels take it is
// measured (ptxas -v): it moves the register allocation both ways (traits.h).
template <bool kVolatile>
FC_DEVICE int ld_boundary(const int* g_p) {
  if constexpr (kVolatile) return ld_global_volatile(g_p);
  else return ld_global(g_p);
}

// The cache row of sequence `batch`'s first key in a KV-cache launch: its left pad clamped to the
// capacity (params.nk before narrowing), 0 without one. The forward reads it again where it loads
// a key tile and folds it into the tile's row arguments (fwd_kernel.h load_kv) rather than hold it
// through the loop or add it to each row: held, it took the sm_75 KV-cache kernel at head dim 256
// from 40 to 60 bytes of spill stores, added per row to 48 (ptxas -v); folded, 40 as before.
template <bool kVolatile>
FC_DEVICE int cache_first_row(const AttnShape& params, int batch) {
  return params.leftpad_k == nullptr ? 0 : clamp_index(ld_boundary<kVolatile>(&params.leftpad_k[batch]), 0, params.nk);
}

// p narrowed to sequence `batch` of a packed batch; a dense batch's p as it is (kVarlen
// instantiations take both: the emulator runs them for dense batches too). Without kVarlen it
// returns p itself, not a copy: a copy of the whole struct costs the largest kernels spills.
// Bind the result to a const reference (a copy's lifetime is extended). kCache: the KV-cache
// forward, the one kernel that reads a left pad (the others compile without it: its code in the
// packed backward at head dims 64 and 256 made ptxas spill 4 to 16 bytes).
template <bool kVarlen, bool kVolatile = false, bool kCache = false, class P>
FC_DEVICE std::conditional_t<kVarlen, P, const P&> for_sequence(const P& params, int batch) {
  if constexpr (!kVarlen) {
    return params;
  } else {
    P p = params;
    if (p.seqused_k != nullptr) {  // a KV cache: dense queries, this sequence's valid keys
      const int64_t used = int64_t(ld_boundary<kVolatile>(&p.seqused_k[batch])) + p.seqused_k_add;
      const int first = kCache ? cache_first_row<kVolatile>(p, batch) : 0;
      p.nk = int(used < first ? 0 : (used > p.nk ? p.nk - first : used - first));
      p.mask.offset = p.nk - p.nq;  // bottom-right, per sequence (and ALiBi's origin)
      return p;
    }
    if (p.cu_seqlens_q == nullptr) return p;
    const int q_begin = clamp_index(ld_boundary<kVolatile>(&p.cu_seqlens_q[batch]), 0, p.total_q);
    const int q_end = clamp_index(ld_boundary<kVolatile>(&p.cu_seqlens_q[batch + 1]), q_begin, p.total_q);
    const int k_begin = clamp_index(ld_boundary<kVolatile>(&p.cu_seqlens_k[batch]), 0, p.total_k);
    const int k_end = clamp_index(ld_boundary<kVolatile>(&p.cu_seqlens_k[batch + 1]), k_begin, p.total_k);
    p.nq = q_end - q_begin;
    p.nk = k_end - k_begin;
    p.mask.offset = p.nk - p.nq;  // bottom-right, per sequence (also ALiBi's distance origin)
    p.q_row0 = q_begin;
    p.k_row0 = k_begin;
    return p;
  }
}

// The params for code after a long loop: p itself, or with kAgain the sequence narrowed again
// from params (ld_boundary: new loads), so that nothing derived from the narrowing is held in
// registers through the loop for that code.
template <bool kAgain, bool kVarlen, bool kCache = false, class P>
FC_DEVICE std::conditional_t<kAgain && kVarlen, P, const P&> narrowed_again(const P& p, const P& params, int batch) {
  if constexpr (kAgain && kVarlen) return for_sequence<true, true, kCache>(params, batch);
  else return p;
}

// The first query / key row of the narrowed sequence: a compile-time 0 without kVarlen.
template <bool kVarlen>
FC_DEVICE int q_row0(const AttnShape& p) { return kVarlen ? p.q_row0 : 0; }
template <bool kVarlen>
FC_DEVICE int k_row0(const AttnShape& p) { return kVarlen ? p.k_row0 : 0; }

// The first key row of sequence `batch` read again from cu_seqlens_k, for code after a long
// loop, where holding it in a register all through the loop would cost more than the load.
template <bool kVarlen, bool kVolatile = false>
FC_DEVICE int first_key_row(const AttnShape& params, int batch) {
  if (!kVarlen || params.cu_seqlens_k == nullptr) return 0;
  return clamp_index(ld_boundary<kVolatile>(&params.cu_seqlens_k[batch]), 0, params.total_k);
}

}  // namespace flash_cuda
