/* Pinning the emulator's session options for one op (kernel_launch.cpp): apart from runtime.h,
 * which every emulated kernel includes, so that the host side's use of it rebuilds no kernel. */
#pragma once

namespace emu {

// The session's options pinned for the calling thread while it lives (nested: the outermost
// wins): every launch of one op (several kernels) and its tile choice run under the options
// the op started with, even if another thread enters or leaves flash_cuda.emulate() meanwhile
// (a call in flight then picked a tile for one device and was checked against another's limits).
class PinOptions {
 public:
  PinOptions();
  ~PinOptions();
  PinOptions(const PinOptions&) = delete;
  PinOptions& operator=(const PinOptions&) = delete;

 private:
  bool outer_;
};

}  // namespace emu
