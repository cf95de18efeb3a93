/* The one dispatch point: dtype, then head dim, then the variant, to an instantiation of
 * run_fwd / run_bwd. Variants (kBand, kMod): dense (false, false); band (true, false): causal
 * and sliding windows, the mask applied only on the tiles at the band's edges; modifiers (true,
 * true): softcap, ALiBi and bias, each a runtime branch, with any band; dropout is a runtime branch
 * of both the band and the modifier variants. Three instantiations
 * instead of one per feature combination: the features inside a variant are uniform branches
 * over a whole launch, and what each costs is measured in the README. Then the shared-memory
 * budget the device allows (device.h). Included once per backend (csrc/cuda/dispatch.cu, csrc/emu/dispatch.cpp); the
 * instantiations themselves are compiled in their own generated files. */
#pragma once
#include <string>
#include <type_traits>

#include "api.h"
#include "kv_append.h"
#include "platform.h"
#include "traits.h"

// 16-bit dtypes (the caller handles Dtype::f32)
#define FC_DTYPE_SWITCH(DTYPE, T, ...)      \
  [&] {                                     \
    if ((DTYPE) == Dtype::bf16) {           \
      using T = __nv_bfloat16;              \
      return __VA_ARGS__();                 \
    } else {                                \
      using T = __half;                     \
      return __VA_ARGS__();                 \
    }                                       \
  }()
// and fp32 (tf32.h)
#define FC_DTYPE_SWITCH_F32(DTYPE, T, ...)                                   \
  [&] {                                                                      \
    if ((DTYPE) == Dtype::f32) { using T = float; return __VA_ARGS__(); }    \
    return FC_DTYPE_SWITCH(DTYPE, T, __VA_ARGS__);                           \
  }()

// (kBand, kMod) from the params: modifiers imply the band variant (any band, open included);
// dropout runs in the band variant (or the modifier one, with modifiers).
#define FC_VARIANT_SWITCH(P, BAND, MOD, ...)                                       \
  [&] {                                                                            \
    if ((P).mod.any()) { constexpr bool BAND = true, MOD = true; return __VA_ARGS__(); }      \
    else if ((P).mask.banded() || (P).drop.enabled) { constexpr bool BAND = true, MOD = false; return __VA_ARGS__(); } \
    else { constexpr bool BAND = false, MOD = false; return __VA_ARGS__(); }                 \
  }()

// The head dims instantiated (tools/generate_kernels.py HEAD_DIMS): d runs in the smallest that fits.
#define FC_HEADDIM_SWITCH(D, NAME, ...)                                   \
  [&] {                                                                   \
    if (D <= 32) { constexpr int NAME = 32; return __VA_ARGS__(); }       \
    else if (D <= 64) { constexpr int NAME = 64; return __VA_ARGS__(); }  \
    else if (D <= 96) { constexpr int NAME = 96; return __VA_ARGS__(); }  \
    else if (D <= 128) { constexpr int NAME = 128; return __VA_ARGS__(); } \
    else if (D <= 192) { constexpr int NAME = 192; return __VA_ARGS__(); } \
    else { constexpr int NAME = 256; return __VA_ARGS__(); }              \
  }()

namespace flash_cuda {
namespace FC_BACKEND {

// Generated instantiations (csrc/cuda/*_hdim*.cu, csrc/emu/generated/*.cpp).
template <class T, int kHeadDim, bool kBand, bool kMod, int kSmemKiB>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream);
template <class T, int kHeadDim, bool kBand, bool kMod, int kSmemKiB>
cudaError_t run_bwd(const BwdParams& p, bool deterministic, cudaStream_t stream);
template <class T, int kHeadDim, int kSmemKiB>
cudaError_t run_fwd_kvcache(const FwdParams& p, cudaStream_t stream);

inline const char* error_text(cudaError_t e) {
#if defined(__CUDACC__)
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
#else
  return e == cudaSuccess ? nullptr : "emulated launch failed";
#endif
}

// Turing's instantiations are in the build (csrc/cuda/*_sm75.cu) unless its arch list has nothing
// below sm_80: setup.py then leaves them out and defines FLASH_CUDA_NO_SM75 for nvcc (the emulator
// keeps them); the launcher refuses such a GPU before it gets here.
#if defined(FLASH_CUDA_NO_SM75)
constexpr bool kBuiltSm75 = false;
#else
constexpr bool kBuiltSm75 = true;
#endif

// Calls f(std::integral_constant<int, budget>) with the budget whose configuration runs on dev:
// below sm_80 the sm_75 one (kSmemSm75 bytes; kHasSm75: the dtype has one, fp16); else the large
// one where the kernel has one (kSmemLarge bytes, 0: none; traits.h kBwdLargeConfig) and the
// device allows it, else the wide one where the device allows its kSmemWide bytes of shared
// memory per block, else the compact one (kSmemCompact), which is instantiated only where the
// wide one needs more than kSmemKiBCompact; none(bytes the smallest needs) when none fits.
template <size_t kSmemWide, size_t kSmemCompact, bool kHasSm75, size_t kSmemSm75, size_t kSmemLarge = 0, class F,
          class None>
auto with_smem_budget(const DeviceLimits& dev, F&& f, None&& none) {
  if (dev.cc < kSm80) {  // (the launcher refuses bf16 and fp32 there first)
    if constexpr (kHasSm75 && kBuiltSm75)
      if (kSmemSm75 <= dev.smem_per_block) return f(std::integral_constant<int, kSmemKiBSm75>{});
    return none(kSmemSm75);
  }
  if constexpr (kSmemLarge > 0)
    if (kSmemLarge <= dev.smem_per_block) return f(std::integral_constant<int, kSmemKiBLarge>{});
  if (kSmemWide <= dev.smem_per_block) return f(std::integral_constant<int, kSmemKiBWide>{});
  constexpr bool kHasCompact = kSmemWide > size_t(kSmemKiBCompact) * 1024;
  if constexpr (kHasCompact)
    if (kSmemCompact <= dev.smem_per_block) return f(std::integral_constant<int, kSmemKiBCompact>{});
  return none(kHasCompact ? kSmemCompact : kSmemWide);
}

template <class T>
constexpr bool kIsHalf = std::is_same<T, __half>::value;  // sm_75's one dtype

// A launch's none: the error naming what does not fit.
inline auto no_configuration_fits(const char* kernel, const DeviceLimits& dev) {
  return [kernel, &dev](size_t smallest) -> const char* {
    thread_local std::string message;
    message = std::string("no configuration of ") + kernel + " fits the device's " +
              std::to_string(dev.smem_per_block) + " bytes of shared memory per block (the smallest needs " +
              std::to_string(smallest) + ")";
    return message.c_str();
  };
}

const char* fwd(const FwdParams& p, Dtype dtype, const DeviceLimits& dev, void* stream) {
  return FC_DTYPE_SWITCH_F32(dtype, T, [&] {
    return FC_HEADDIM_SWITCH(p.d, kHeadDim, [&] {
      return FC_VARIANT_SWITCH(p, kBand, kMod, [&] {
        return with_smem_budget<fwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBWide>(),
                                fwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBCompact>(), kIsHalf<T>,
                                fwd_smem_bytes<__half, kHeadDim, kMod, kSmemKiBSm75>()>(
            dev,
            [&](auto kib) {
              return error_text(
                  run_fwd<T, kHeadDim, kBand, kMod, decltype(kib)::value>(p, static_cast<cudaStream_t>(stream)));
            },
            no_configuration_fits("the forward", dev));
      });
    });
  });
}

// (the KV cache holds 16-bit values)
constexpr const char* kNoFp32 = "the KV-cache kernels take 16-bit inputs";

const char* bwd(const BwdParams& p, Dtype dtype, bool deterministic, const DeviceLimits& dev, void* stream) {
  return FC_DTYPE_SWITCH_F32(dtype, T, [&] {
    return FC_HEADDIM_SWITCH(p.d, kHeadDim, [&] {
      return FC_VARIANT_SWITCH(p, kBand, kMod, [&] {
        return with_smem_budget<bwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBWide>(),
                                bwd_smem_bytes<T, kHeadDim, kMod, kSmemKiBCompact>(),
                                kIsHalf<T> && BwdTraits<__half, kHeadDim, kMod, kSmemKiBSm75>::kFits,  // (not 256)
                                bwd_smem_bytes<__half, kHeadDim, kMod, kSmemKiBSm75>(),
                                bwd_large_smem_bytes<T, kHeadDim, kMod>()>(
            dev,
            [&](auto kib) {
              return error_text(run_bwd<T, kHeadDim, kBand, kMod, decltype(kib)::value>(
                  p, deterministic, static_cast<cudaStream_t>(stream)));
            },
            no_configuration_fits("the backward", dev));
      });
    });
  });
}

const char* fwd_kvcache(const FwdParams& p, Dtype dtype, const DeviceLimits& dev, void* stream) {
  if (dtype == Dtype::f32) return kNoFp32;
  return FC_DTYPE_SWITCH(dtype, T, [&] {
    return FC_HEADDIM_SWITCH(p.d, kHeadDim, [&] {
      return with_smem_budget<kvcache_smem_bytes<T, kHeadDim, kSmemKiBWide>(),
                              kvcache_smem_bytes<T, kHeadDim, kSmemKiBCompact>(), kIsHalf<T>,
                              kvcache_smem_bytes<__half, kHeadDim, kSmemKiBSm75>()>(
          dev,
          [&](auto kib) {
            return error_text(run_fwd_kvcache<T, kHeadDim, decltype(kib)::value>(p, static_cast<cudaStream_t>(stream)));
          },
          no_configuration_fits("the KV-cache forward", dev));
    });
  });
}

const char* kv_append(const KvAppendParams& p, void* stream) {
  return error_text(run_kv_append(p, static_cast<cudaStream_t>(stream)));
}

int kvcache_num_splits(const FwdParams& p, const DeviceLimits& dev) {
  return FC_HEADDIM_SWITCH(p.d, kHeadDim, [&] {
    // the tiles of the configuration fwd_kvcache runs on dev (either dtype's: they are the same);
    // where none fits, fwd_kvcache says so
    return with_smem_budget<kvcache_smem_bytes<__half, kHeadDim, kSmemKiBWide>(),
                            kvcache_smem_bytes<__half, kHeadDim, kSmemKiBCompact>(), true,
                            kvcache_smem_bytes<__half, kHeadDim, kSmemKiBSm75>()>(
        dev,
        [&](auto kib) {
          using Kt = KvCacheTraits<__half, kHeadDim, decltype(kib)::value>;
          const int64_t blocks = int64_t((p.nq + Kt::kBlockM - 1) / Kt::kBlockM) * p.hq * p.b;
          return choose_num_splits(blocks, (p.nk + Kt::kBlockN - 1) / Kt::kBlockN, dev.sm_count);
        },
        [](size_t) { return 1; });
  });
}

size_t bwd_dq_accum_floats(const BwdParams& p) {  // size of the dQ accumulator the kernels expect
  return FC_HEADDIM_SWITCH(p.d, kHeadDim, [&] {
    return static_cast<size_t>(p.scratch_rows_total() * kHeadDim);
  });
}

}  // namespace FC_BACKEND
}  // namespace flash_cuda
