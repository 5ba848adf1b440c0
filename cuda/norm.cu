#include "cuda/norm.cuh"

namespace tmill::TM_GPU_NS {

namespace {
constexpr int kThreads = 256;

// the sum over the block in double (each thread's part, then the warps' parts in a fixed order)
__device__ double block_sum_double(double v, double* shared) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    for (int m = kWarp / 2; m > 0; m >>= 1) v += TM_SHFL_XOR(v, m);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < kThreads / kWarp; ++w) total += shared[w];
    __syncthreads();
    return total;
}

__global__ void rms_norm_rows(float* out, const float* x, const float* weight, int64_t n, float eps) {
    __shared__ double shared[kThreads / kWarp];
    const float* xt = x + blockIdx.x * n;
    float* ot = out + blockIdx.x * n;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) ss += static_cast<double>(xt[i]) * xt[i];
    ss = block_sum_double(ss, shared);
    const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = threadIdx.x; i < n; i += kThreads) ot[i] = xt[i] * inv * weight[i];
}

__global__ void layer_norm_rows(float* out, const float* x, const float* weight, const float* bias, int64_t n, float eps) {
    __shared__ double shared[kThreads / kWarp];
    const float* xt = x + blockIdx.x * n;
    float* ot = out + blockIdx.x * n;
    double mean = 0.0, var = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) mean += xt[i];
    mean = block_sum_double(mean, shared) / static_cast<double>(n);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) var += (xt[i] - mean) * (xt[i] - mean);
    var = block_sum_double(var, shared) / static_cast<double>(n);
    const float inv = static_cast<float>(1.0 / sqrt(var + eps));
    for (int64_t i = threadIdx.x; i < n; i += kThreads)
        ot[i] = static_cast<float>(xt[i] - mean) * inv * weight[i] + (bias ? bias[i] : 0.0f);
}
}  // namespace

void rms_norm(cudaStream_t s, float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps) {
    if (T <= 0) return;
    rms_norm_rows<<<static_cast<unsigned>(T), kThreads, 0, s>>>(out, x, weight, n, eps);
    TM_CHECK_LAUNCH("rms_norm");
}

void layer_norm(cudaStream_t s, float* out, const float* x, const float* weight, const float* bias, int64_t T, int64_t n,
                float eps) {
    if (T <= 0) return;
    layer_norm_rows<<<static_cast<unsigned>(T), kThreads, 0, s>>>(out, x, weight, bias, n, eps);
    TM_CHECK_LAUNCH("layer_norm");
}

}  // namespace tmill::TM_GPU_NS
