// Products with weight matrices kept in their file types (f32, f16, bf16, q8_0, q4_0, q4_1), and
// embedding-row lookups. out[T, rows] = x[T, cols] W^T + bias.
#pragma once

#include <cstdint>

#include "backend/backend.h"
#include "cuda/common.cuh"

namespace tmill::TM_GPU_NS {

// Few tokens (decode): a warp per weight row streams the row once for up to kMatvecTokens tokens at
// a time; each token's dot is summed in the same order whatever the others, so a row of a batch has
// exactly its one-token value (rows as decode).
constexpr int kMatvecTokens = 8;
void matvec(cudaStream_t s, float* out, const float* x, const Weight& w, int64_t T);
// Many tokens (prefill): 64 x 64 output tiles over shared-memory tiles of dequantized weights and x,
// one 32-column block at a time; each output's sum runs over the columns in order, so a row's value
// does not depend on the other rows of the call (rows invariant).
void matmul_tiled(cudaStream_t s, float* out, const float* x, const Weight& w, int64_t T);
// out[T, cols] = table[ids[t], :] (ids device memory)
void get_rows(cudaStream_t s, float* out, const Weight& table, const int32_t* ids, int64_t T);

}  // namespace tmill::TM_GPU_NS
