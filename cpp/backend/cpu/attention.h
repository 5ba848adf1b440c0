// Attention over the KV cache on the CPU (Backend::attention): per-row work units for decode rows
// (positions split into parts when there are few rows), blocks of query rows for prompts.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "core/threadpool.h"

namespace tmill::cpu {

// What the attention calls keep between passes: one scratch buffer per pool thread, the split
// decode parts' partial sums and the blocked path's transposed keys (each resized as needed).
struct AttentionBuffers {
    std::vector<std::vector<float>> per_thread;
    std::vector<float> partials;   // split attention: per part and query head, (max, sum, acc[hd])
    std::vector<float> kt;         // blocked attention: per (segment, KV head), K transposed [hd, n]

    float* scratch(int thread, int64_t n);   // per_thread[thread], at least n floats (attention sizes per_thread)
};

// out[row, head, :] = softmax(q K^T * scale) V over each row's positions (segs: the sequences of
// the pass), with the arithmetic the rows mode asks for (backend.h).
void attention(ThreadPool& pool, AttentionBuffers& buf, RowsMode mode, float* out, const float* q,
               const AttentionSegment* segs, int n_segs, const AttentionShape& shape);

}  // namespace tmill::cpu
