// K/V stores into every cache kind, attention over them (split over the context, flash-decoding
// style), and memory cross-attention. Segments, parts and routes are device copies of the host's
// (the backend uploads them, with block tables, per call).
#pragma once

#include <cstdint>

#include "backend/backend.h"
#include "cuda/common.cuh"

namespace tmill::TM_GPU_NS {

// A row of a batch: its segment and its index in it.
struct RowRef {
    int32_t seg, t;
};
// One block of the attention kernel: query head `head` of a segment's row t over positions
// [j0, j1); `pair` numbers the (row, head) it belongs to.
struct AttentionPart {
    int32_t seg, t, head, pair;
    int64_t j0, j1;
};
// Positions per part: fixed, so how a row is split depends only on its own length -- a row of a
// batch gets its lone decode step's bits.
constexpr int64_t kAttentionPart = 256;
// head dimensions up to this many
constexpr int kMaxHeadDim = 1024;

// k, v [rows, n_kv_heads * head_dim] into each row's segment cache at n_past + t (and the ring)
void kv_store(cudaStream_t s, const float* k, const float* v, const AttentionSegment* segs, const RowRef* rows, int64_t n_rows,
              const AttentionShape& shape);
// out[row, head] = softmax(q k^T scale) v: every part into partials [n_parts, head_dim + 2] (max,
// sum, unnormalised output), then each pair's parts merged (pair_first [n_pairs + 1] indexes parts)
void attention(cudaStream_t s, float* out, const float* q, const AttentionSegment* segs, const AttentionPart* parts,
               int64_t n_parts, const int64_t* pair_first, int64_t n_pairs, float* partials, const AttentionShape& shape);
// memory cross-attention, one block per (row, head) (routes, groups, spans device copies)
void memory_attention(cudaStream_t s, float* out, const float* q, int64_t T, const MemoryRoute* routes,
                      const MemoryGroup* groups, const MemorySpan* spans, const MemoryTable& table, const AttentionShape& shape);

}  // namespace tmill::TM_GPU_NS
