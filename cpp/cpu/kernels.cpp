#include "kernels.h"

namespace tmill::cpu {

float dot_f32(const float* a, const float* b, int64_t n) {
    // Eight independent partial sums let the compiler keep a vector register busy per lane.
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

void axpy_f32(float* y, const float* x, float alpha, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace tmill::cpu
