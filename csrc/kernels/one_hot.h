/* One-hot rows in the backward's dS = P (dP - D).
 *
 * A row whose softmax puts all its mass on one key j (the only key it sees, or the others'
 * exponentials 0) has P_ij = 1 and, exactly, D_i = sum_k P_ik dP_ik - dlse_i = dP_ij - dlse_i,
 * so dS_ij = dlse_i: without a gradient into lse nothing reaches Q_i or K_j (plain torch's
 * softmax backward gives exactly 0). The kernels' dP_ij (the mma's fp32 sum) and D_i
 * (rowsum(dO o O) in the preprocess, bwd_preprocess.h, with O_i = V_j) are two roundings of one
 * dot product, so P (dP - D) would leave their difference, scaled into dQ_i and summed over the
 * query rows into dK_j: up to a few 1e-5 at scale 3 in fp16, over the FA rule where plain
 * torch's error is 0 (tests/test_devices.py::test_one_key_rows). The CPU backend takes
 * D_i = dP_ij there too (csrc/cpu/attention_cpu.cpp, row_delta).
 *
 * Which rows: those whose P_ij, rounded to the input's 16-bit type as dV sees it, is exactly 1
 * (the other keys' mass below half a unit in the last place under 1: 2^-12 in fp16, 2^-9 in
 * bf16). Plain torch's fp16/bf16 softmax rounds that P to 1 as well, and its backward loses the
 * same mass on that element. Tested on the pairs of P the kernels round anyway, so no fp32 P has
 * to live through the dP product (where the registers are tightest). Where: the masked tiles,
 * where a row that sees one key finds it (the tile holding its key holds the sequence's end or
 * hidden keys of the row); the unmasked loop does not test (more instructions per score in the
 * main loop), so a row one-hot because the others' exponentials underflow in an unmasked tile
 * keeps the difference. Not with a gradient into lse (dS = dlse there: the kernels hold D_i,
 * not dlse_i, and plain torch's gradient is not 0 then), nor for fp32 inputs (whose bound, a few
 * times plain fp32's error, would not absorb the mass below the test).
 */
#pragma once
#include <type_traits>

#include "platform.h"
#include "ptx.h"

namespace flash_cuda {

// The bits of 1.0 in T.
template <class T>
constexpr uint32_t kOneBits = std::is_same<T, __half>::value ? 0x3C00u : 0x3F80u;

// Whether 16-bit value e (0: bits 15:0, 1: bits 31:16) of a pair of P (pack2) is exactly 1.
template <class T>
FC_DEVICE bool one_hot(uint32_t rP_pair, int e) {
  return ((rP_pair >> (16 * e)) & 0xFFFFu) == kOneBits<T>;
}

// The same of an fp32 P before its rounding.
template <class T>
FC_DEVICE bool one_hot(float pe) {
  return one_hot<T>(pack2<T>(pe, 0.0f), 0);
}

}  // namespace flash_cuda
