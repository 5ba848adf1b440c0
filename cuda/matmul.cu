#include "cuda/matmul.cuh"

namespace tmill::TM_GPU_NS {

namespace {
constexpr int kMatvecWarps = 4;   // rows per block of the matvec kernel
constexpr int kTile = 64;         // output tile of the tiled kernel: 64 rows x 64 tokens ...
constexpr int kTileThreads = 256; // ... each thread 4 x 4 of it
constexpr int kPad = 1;           // shared rows padded against bank conflicts

// out[t, r] for rows r of this block's warps and tokens t0..t0 + nt: lane l takes the 32-value
// chunks l, l + 32, ... of the row, dots each with every token's x, then the warp sums the lanes
template <DType T>
__global__ void matvec_rows(float* out, const float* x, const uint8_t* w, size_t row_stride, const float* bias,
                            int64_t rows, int64_t cols, int64_t t0, int nt) {
    const int lane = threadIdx.x % kWarp;
    const int64_t r = static_cast<int64_t>(blockIdx.x) * kMatvecWarps + threadIdx.x / kWarp;
    if (r >= rows) return;
    const uint8_t* row = w + static_cast<size_t>(r) * row_stride;
    float acc[kMatvecTokens];
#pragma unroll
    for (int k = 0; k < kMatvecTokens; ++k) acc[k] = 0.0f;
    const int64_t chunks = (cols + 31) / 32;
    for (int64_t c = lane; c < chunks; c += kWarp) {
        float v[32];
        chunk_values<T>(row, c, cols, v);
        const int64_t n = cols - 32 * c < 32 ? cols - 32 * c : 32;
        for (int k = 0; k < nt; ++k) {
            const float* xk = x + (t0 + k) * cols + 32 * c;
            float sum = 0.0f;
            for (int j = 0; j < n; ++j) sum = fmaf(v[j], xk[j], sum);
            acc[k] += sum;
        }
    }
    for (int k = 0; k < nt; ++k) {
        const float total = warp_sum(acc[k]);
        if (lane == 0) out[(t0 + k) * rows + r] = total + (bias ? bias[r] : 0.0f);
    }
}

// One 64 x 64 tile of out: weight rows r0.., tokens t0..; per 32-column block, the block's weight
// values and x values go to shared memory (transposed: [column][row]) and every thread adds its
// 4 x 4 products in column order.
template <DType T>
__global__ void matmul_tile(float* out, const float* x, const uint8_t* w, size_t row_stride, const float* bias,
                            int64_t rows, int64_t cols, int64_t n_tokens) {
    __shared__ float ws[32][kTile + kPad];
    __shared__ float xs[32][kTile + kPad];
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile, t0 = static_cast<int64_t>(blockIdx.y) * kTile;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    // loaders: thread -> (tile row, 8 consecutive columns of the block)
    const int lr = threadIdx.x / 4, lc = (threadIdx.x % 4) * 8;
    const int64_t chunks = (cols + 31) / 32;
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t wr = r0 + lr, xt = t0 + lr;
        for (int j = 0; j < 8; ++j) {
            const int64_t col = 32 * c + lc + j;
            ws[lc + j][lr] = wr < rows && col < cols ? value_at<T>(w + static_cast<size_t>(wr) * row_stride, col) : 0.0f;
            xs[lc + j][lr] = xt < n_tokens && col < cols ? x[xt * cols + col] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < 32; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = ws[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = xs[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const int64_t r = r0 + ty + 16 * i, t = t0 + tx + 16 * j;
            if (r < rows && t < n_tokens) out[t * rows + r] = acc[i][j] + (bias ? bias[r] : 0.0f);
        }
}

template <DType T>
__global__ void gather_rows(float* out, const uint8_t* table, size_t row_stride, int64_t cols, const int32_t* ids,
                            int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int64_t t = i / cols, c = i % cols;
    out[i] = value_at<T>(table + static_cast<size_t>(ids[t]) * row_stride, c);
}
}  // namespace

void matvec(cudaStream_t s, float* out, const float* x, const Weight& w, int64_t T) {
    with_type(w.type, [&](auto tag) {
        for (int64_t t0 = 0; t0 < T; t0 += kMatvecTokens) {
            const int nt = static_cast<int>(T - t0 < kMatvecTokens ? T - t0 : kMatvecTokens);
            matvec_rows<decltype(tag)::value><<<blocks_for(w.rows, kMatvecWarps), kMatvecWarps * kWarp, 0, s>>>(
                out, x, w.data, w.row_stride, w.bias, w.rows, w.cols, t0, nt);
            TM_CHECK_LAUNCH("matvec");
        }
    });
}

void matmul_tiled(cudaStream_t s, float* out, const float* x, const Weight& w, int64_t T) {
    if (T <= 0) return;
    with_type(w.type, [&](auto tag) {
        const dim3 grid(blocks_for(w.rows, kTile), blocks_for(T, kTile));
        matmul_tile<decltype(tag)::value><<<grid, kTileThreads, 0, s>>>(out, x, w.data, w.row_stride, w.bias, w.rows, w.cols, T);
        TM_CHECK_LAUNCH("matmul_tiled");
    });
}

void get_rows(cudaStream_t s, float* out, const Weight& table, const int32_t* ids, int64_t T) {
    const int64_t n = T * table.cols;
    if (n <= 0) return;
    with_type(table.type, [&](auto tag) {
        gather_rows<decltype(tag)::value><<<blocks_for(n, 256), 256, 0, s>>>(out, table.data, table.row_stride, table.cols, ids, n);
        TM_CHECK_LAUNCH("get_rows");
    });
}

}  // namespace tmill::TM_GPU_NS
