#include "cuda/rope.cuh"

namespace tmill::TM_GPU_NS {

namespace {
constexpr int kThreads = 256;

// one thread per (row, head, pair); angle_i = pos * theta^(-2i/d) / factor_i in float, its cosine
// and sine in double then rounded, as the CPU backend computes them
__global__ void rope_pairs(float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta, bool adjacent,
                           const float* freq_factors) {
    const int half = head_dim / 2;
    const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (id >= T * n_heads * half) return;
    const int i = static_cast<int>(id % half);
    const int64_t th = id / half, t = th / n_heads;
    float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    if (freq_factors) inv_freq /= freq_factors[i];
    const float angle = static_cast<float>(pos[t]) * inv_freq;
    const float c = static_cast<float>(cos(static_cast<double>(angle))), s = static_cast<float>(sin(static_cast<double>(angle)));
    float* v = x + th * head_dim;
    const int a = adjacent ? 2 * i : i, b = adjacent ? 2 * i + 1 : i + half;
    const float va = v[a], vb = v[b];
    v[a] = va * c - vb * s;
    v[b] = va * s + vb * c;
}
}  // namespace

void rope(cudaStream_t s, float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta, RopeStyle style,
          const float* freq_factors) {
    if (style == RopeStyle::none || T <= 0) return;
    const int64_t n = T * n_heads * (head_dim / 2);
    rope_pairs<<<blocks_for(n, kThreads), kThreads, 0, s>>>(x, T, n_heads, head_dim, pos, theta, style == RopeStyle::adjacent,
                                                            freq_factors);
    TM_CHECK_LAUNCH("rope");
}

}  // namespace tmill::TM_GPU_NS
