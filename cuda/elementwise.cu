#include "cuda/elementwise.cuh"

namespace tmill::TM_GPU_NS {

namespace {
constexpr int kThreads = 256;

__device__ inline float gelu_tanh(float v) {
    const float k = 0.7978845608028654f;   // sqrt(2 / pi)
    return 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
}

// one thread per element; Op(i) does element i
template <typename Op>
__global__ void each(int64_t n, Op op) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) op(i);
}

template <typename Op>
void launch(cudaStream_t s, int64_t n, const Op& op, const char* what) {
    if (n <= 0) return;
    each<<<blocks_for(n, kThreads), kThreads, 0, s>>>(n, op);
    check(cudaGetLastError(), what);
}
}  // namespace

void add(cudaStream_t s, float* x, const float* y, int64_t n) {
    launch(s, n, [=] __device__(int64_t i) { x[i] += y[i]; }, "add");
}

void swiglu(cudaStream_t s, float* gate, const float* up, int64_t n) {
    launch(s, n, [=] __device__(int64_t i) { gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i]; }, "swiglu");
}

void gelu(cudaStream_t s, float* x, int64_t n) {
    launch(s, n, [=] __device__(int64_t i) { x[i] = gelu_tanh(x[i]); }, "gelu");
}

void geglu(cudaStream_t s, float* gate, const float* up, int64_t n) {
    launch(s, n, [=] __device__(int64_t i) { gate[i] = gelu_tanh(gate[i]) * up[i]; }, "geglu");
}

void scale(cudaStream_t s, float* x, float factor, int64_t n) {
    launch(s, n, [=] __device__(int64_t i) { x[i] *= factor; }, "scale");
}

void gelu_erf(cudaStream_t s, float* x, int64_t n) {
    launch(s, n, [=] __device__(int64_t i) { x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.7071067811865476f)); }, "gelu_erf");
}

}  // namespace tmill::TM_GPU_NS
