// Two kernels, each value computed alone in a fixed order (a row of A against one x; a column of
// B^T summed over r in order), so a row's result does not depend on the rows sharing the call.
#include "cuda/lora.cuh"

namespace tmill::TM_GPU_NS {

namespace {
constexpr int kWarpsPerBlock = 4;

__device__ inline float weight_at(const void* w, bool half, int64_t i) {
    return half ? half_to_float(static_cast<const uint16_t*>(w)[i]) : static_cast<const float*>(w)[i];
}

__device__ inline int item_of(const int64_t* first, int n_items, int64_t i) {
    int lo = 0, hi = n_items;   // the last item whose first entry is <= i
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (first[mid] <= i) lo = mid;
        else hi = mid;
    }
    return lo;
}

// a warp per u entry: u[item][row][k] = scale * A_k . x_row
__global__ void down(const DeviceLoraItem* items, int n_items, const int64_t* u_first, int64_t total_u, float* u) {
    const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
    if (e >= total_u) return;
    const int lane = threadIdx.x % kWarp;
    const int i = item_of(u_first, n_items, e);
    const DeviceLoraItem& it = items[i];
    const int64_t r = it.r, n_in = it.n_in, local = e - u_first[i], row = local / r, k = local % r;
    const float* x = it.x + row * n_in;
    float part = 0.0f;
    for (int64_t c = lane; c < n_in; c += kWarp) part = fmaf(weight_at(it.a, it.a_half, k * n_in + c), x[c], part);
    part = warp_sum(part);
    if (lane == 0) u[e] = it.scale * part;
}

// a thread per output element of (item, row): out[row, c] += sum_k u[row][k] BT[k, c]
__global__ void up(const DeviceLoraItem* items, int n_items, const int64_t* u_first, const int64_t* row_first, int64_t max_out,
                   const float* u) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, global_row = blockIdx.y;
    const int i = item_of(row_first, n_items, global_row);
    const DeviceLoraItem& it = items[i];
    const int64_t n_out = it.n_out, r = it.r, row = global_row - row_first[i];
    if (c >= n_out || c >= max_out) return;
    const float* ur = u + u_first[i] + row * r;
    float sum = 0.0f;
    for (int64_t k = 0; k < r; ++k) sum = fmaf(ur[k], weight_at(it.bt, it.bt_half, k * n_out + c), sum);
    it.out[row * n_out + c] += sum;
}
}  // namespace

void lora_add(cudaStream_t s, const DeviceLoraItem* items, int n_items, const int64_t* u_first, const int64_t* row_first,
              int64_t total_u, int64_t total_rows, int64_t max_out, float* u) {
    if (n_items <= 0 || total_rows <= 0) return;
    down<<<blocks_for(total_u, kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, s>>>(items, n_items, u_first, total_u, u);
    TM_CHECK_LAUNCH("lora_add (A x)");
    up<<<dim3(blocks_for(max_out, 256), static_cast<unsigned>(total_rows)), 256, 0, s>>>(items, n_items, u_first, row_first,
                                                                                         max_out, u);
    TM_CHECK_LAUNCH("lora_add (B u)");
}

}  // namespace tmill::TM_GPU_NS
