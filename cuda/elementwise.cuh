// Element-wise ops on device vectors of n floats (the CPU backend's formulas, in float).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace tmill::TM_GPU_NS {

void add(cudaStream_t s, float* x, const float* y, int64_t n);             // x += y
void swiglu(cudaStream_t s, float* gate, const float* up, int64_t n);      // gate = silu(gate) * up
void gelu(cudaStream_t s, float* x, int64_t n);                            // tanh approximation
void geglu(cudaStream_t s, float* gate, const float* up, int64_t n);       // gate = gelu(gate) * up
void scale(cudaStream_t s, float* x, float factor, int64_t n);             // x *= factor
void gelu_erf(cudaStream_t s, float* x, int64_t n);                        // 0.5 x (1 + erf(x / sqrt 2))

}  // namespace tmill::TM_GPU_NS
