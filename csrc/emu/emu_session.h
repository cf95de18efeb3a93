/* Whether CPU tensors currently run the CUDA kernels in the emulator (inside
 * flash_cuda.emulate()); read by the op dispatch in csrc/ops.cpp. */
#pragma once

namespace flash_cuda {
bool emu_active();
}
