// Portable CPU kernels on contiguous float rows. Later SIMD levels replace these behind the same
// signatures; the scalar versions stay as the reference every level is tested against.
#pragma once

#include <cstdint>

namespace tmill::cpu {

// sum_i a[i] * b[i]
float dot_f32(const float* a, const float* b, int64_t n);
// y[i] += alpha * x[i]
void axpy_f32(float* y, const float* x, float alpha, int64_t n);

}  // namespace tmill::cpu
