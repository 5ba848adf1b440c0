// Memory cross-attention on the CPU (Backend::memory_attention).
#pragma once

#include <vector>

#include "backend/backend.h"
#include "core/threadpool.h"

namespace tmill::cpu {

// One unit of work per (row, head); scratch: one buffer per pool thread, which the call resizes.
void memory_attention(ThreadPool& pool, std::vector<std::vector<float>>& scratch, float* out, const float* q, int64_t T,
                      const MemoryRoute* routes, const MemoryGroup* groups, const MemorySpan* spans,
                      const MemoryTable& table, const AttentionShape& shape);

}  // namespace tmill::cpu
