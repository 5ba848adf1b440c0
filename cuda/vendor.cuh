// One source, two vendors (half and bfloat16 values are converted by core/block_math.h, bit for bit as on
// the CPU, so no vendor half type is needed): CUDA headers here, or HIP through hip/hip_vendor.h (TOKENMILL_HIP_BUILD).
#pragma once

#ifdef TOKENMILL_HIP_BUILD
#include "../hip/hip_vendor.h"
#else
#include <cuda_runtime.h>
#define TM_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#endif
