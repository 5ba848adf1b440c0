// Row norms of x [T, n]: one block per row, sums in double as the CPU backend takes them.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace tmill::TM_GPU_NS {

// out = x / rms(x) * weight
void rms_norm(cudaStream_t s, float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps);
// out = (x - mean) / std * weight + bias (bias may be null)
void layer_norm(cudaStream_t s, float* out, const float* x, const float* weight, const float* bias, int64_t T, int64_t n,
                float eps);

}  // namespace tmill::TM_GPU_NS
