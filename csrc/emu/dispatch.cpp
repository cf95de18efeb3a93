// The emulator build's dispatch point (see csrc/kernels/dispatch.h).
#include "../kernels/dispatch.h"
