// Rotary position embedding in place on x [T, n_heads * head_dim], both pair layouts.
#pragma once

#include <cstdint>

#include "backend/backend.h"
#include "cuda/common.cuh"

namespace tmill::TM_GPU_NS {

// pos [T] and freq_factors [head_dim / 2] (or null) are device memory
void rope(cudaStream_t s, float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta, RopeStyle style,
          const float* freq_factors);

}  // namespace tmill::TM_GPU_NS
