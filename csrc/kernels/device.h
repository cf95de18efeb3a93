/* The device a launch runs on, as the dispatcher sees it: what picks a kernel's tile
 * configuration (shared memory per block), the KV-cache split count (SMs) and whether the
 * kernels run at all (compute capability). On a GPU the host reads them from the device's
 * properties; in the emulator they come from the profile of flash_cuda.emulate(device=...).
 *
 * The configurations come in shared-memory budgets (traits.h): the wide one, sized for the
 * 163 KiB per block of sm_80 and sm_87 (A100, Orin); the large one for the 227 KiB of sm_90 and
 * sm_100 (H100, H200, B200), instantiated only where it differs from the wide one (the backward
 * at head dim 128: padded tiles, traits.h); and the compact one for the 99 KiB of sm_86, sm_89
 * and sm_120 (A10, RTX 3090/4090, L4, L40S, RTX 5090), instantiated only where the wide one needs
 * more than 99 KiB. sm_75 (T4, RTX 20xx: 64 KiB per
 * block, no cp.async, no bf16 or tf32 tensor cores) runs fp16 only, in configurations of its own
 * within 64 KiB whose code differs too (ptx.h: mma.m16n8k8 pairs; copy.h: copies staged in
 * registers). Limits per compute capability: CUDA C++ Programming Guide, "Technical
 * Specifications per Compute Capability".
 */
#pragma once
#include <stddef.h>

namespace flash_cuda {

struct DeviceLimits {
  int cc = 80;                      // compute capability, major x 10 + minor
  int sm_count = 108;               // streaming multiprocessors
  size_t smem_per_block = 166912;   // opt-in maximum of shared memory per block, bytes
};

constexpr int kSmemKiBLarge = 227;    // sm_90, sm_100
constexpr int kSmemKiBWide = 163;     // sm_80, sm_87
constexpr int kSmemKiBCompact = 99;   // sm_86, sm_89, sm_120
constexpr int kSmemKiBSm75 = 64;      // sm_75: the Turing configurations (fp16)
// mma.sync m16n8k8 and ldmatrix (sm_75); older GPUs have no configuration. bf16 and fp32 inputs
// need sm_80 (kSm80).
constexpr int kMinComputeCapability = 75;
constexpr int kSm80 = 80;  // cp.async, mma.m16n8k16, bf16 and tf32 tensor cores

// The launch-name suffix of a configuration's budget: "" (wide), ",227KiB", ",99KiB" or ",sm75".
inline const char* budget_suffix(int smem_kib) {
  return smem_kib == kSmemKiBWide    ? ""
         : smem_kib == kSmemKiBLarge ? ",227KiB"
         : smem_kib == kSmemKiBSm75  ? ",sm75"
                                     : ",99KiB";
}

}  // namespace flash_cuda
