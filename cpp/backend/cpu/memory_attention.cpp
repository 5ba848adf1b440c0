// For one (row, head): per group, scores of the query against every slot of its spans (a span's rows
// are contiguous within a KV head, so one rows_dot per span; quantized rows are expanded a chunk at a
// time first), a softmax, and the weighted sum of the values, added with the group's weight. Each
// (row, head) is computed alone in a fixed order, so batching and threading change no value.
#include "backend/cpu/memory_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {
constexpr int64_t kChunk = 64;                  // quantized rows expanded at a time
constexpr int64_t kMinParallelMacs = 1 << 15;   // smaller calls stay on the calling thread

// rows [n, hd] of a table's store from row `first` on, as f32: in place, or expanded into buf
const float* rows_f32(const MemoryTable& t, const uint8_t* store, const float* scales, int64_t first, int64_t n, float* buf) {
    const int64_t hd = t.head_dim;
    const size_t rb = t.row_bytes();
    if (t.quant == MemoryQuant::f32) return reinterpret_cast<const float*>(store + static_cast<size_t>(first) * rb);
    for (int64_t j = 0; j < n; ++j) {
        const uint8_t* src = store + static_cast<size_t>(first + j) * rb;
        const float s = scales[first + j];
        float* dst = buf + j * hd;
        if (t.quant == MemoryQuant::int8) {
            const int8_t* v = reinterpret_cast<const int8_t*>(src);
            for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(v[d]) * s;
        } else {
            for (int64_t d = 0; d < hd; ++d) {
                const int nib = (src[d / 2] >> ((d & 1) * 4)) & 0xF;
                dst[d] = static_cast<float>(nib - 8) * s;
            }
        }
    }
    return buf;
}
}  // namespace

void memory_attention(ThreadPool& pool, std::vector<std::vector<float>>& scratch, float* out, const float* q, int64_t T,
                      const MemoryRoute* routes, const MemoryGroup* groups, const MemorySpan* spans,
                      const MemoryTable& table, const AttentionShape& shape) {
    const Kernels& kern = kernels();
    const int64_t H = shape.n_heads, hd = shape.head_dim, group_size = H / shape.n_kv_heads;
    int64_t max_slots = 0, macs = 0;
    for (int64_t t = 0; t < T; ++t)
        for (int32_t g = 0; g < routes[t].n_groups; ++g) {
            const MemoryGroup& G = groups[routes[t].group0 + g];
            int64_t n = 0;
            for (int32_t s = 0; s < G.n_spans; ++s) n += spans[G.span0 + s].n_slots;
            max_slots = std::max(max_slots, n);
            macs += 2 * n * hd * H;
        }
    // per thread: scores / weights [max_slots], the head's output [hd], expanded rows [kChunk, hd]
    const size_t need = static_cast<size_t>(2 * max_slots + hd + kChunk * hd);
    scratch.resize(static_cast<size_t>(pool.size()));
    for (auto& s : scratch)
        if (s.size() < need) s.resize(need);

    auto run = [&](int64_t u0, int64_t u1, int thread) {
        float* scores = scratch[static_cast<size_t>(thread)].data();
        float* weights = scores + max_slots;
        float* acc = weights + max_slots;
        float* buf = acc + hd;
        for (int64_t unit = u0; unit < u1; ++unit) {
            const int64_t t = unit / H, h = unit % H, kvh = h / group_size;
            const float* qh = q + t * H * hd + h * hd;
            float* oh = out + t * H * hd + h * hd;
            std::fill(oh, oh + hd, 0.0f);
            for (int32_t g = 0; g < routes[t].n_groups; ++g) {
                const MemoryGroup& G = groups[routes[t].group0 + g];
                int64_t n = 0;
                for (int32_t s = 0; s < G.n_spans; ++s) {   // scores = scale * s_j * q . K_j
                    const MemorySpan& sp = spans[G.span0 + s];
                    for (int64_t j0 = 0; j0 < sp.n_slots; j0 += kChunk) {
                        const int64_t m = std::min(kChunk, sp.n_slots - j0), first = kvh * table.n_slots + sp.slot0 + j0;
                        kern.rows_dot_f32(rows_f32(table, table.k, table.k_scale, first, m, buf), m, hd, qh, scores + n);
                        for (int64_t j = 0; j < m; ++j) scores[n + j] *= shape.scale * sp.kv_scale;
                        n += m;
                    }
                }
                if (n == 0) continue;
                const float top = *std::max_element(scores, scores + n);
                const float total = kern.exp_sum(scores, n, top);
                std::fill(acc, acc + hd, 0.0f);
                n = 0;
                for (int32_t s = 0; s < G.n_spans; ++s) {   // acc = sum_j p_j * s_j * V_j
                    const MemorySpan& sp = spans[G.span0 + s];
                    for (int64_t j0 = 0; j0 < sp.n_slots; j0 += kChunk) {
                        const int64_t m = std::min(kChunk, sp.n_slots - j0), first = kvh * table.n_slots + sp.slot0 + j0;
                        for (int64_t j = 0; j < m; ++j) weights[j] = scores[n + j] / total * sp.kv_scale;
                        kern.rows_axpy_f32(acc, rows_f32(table, table.v, table.v_scale, first, m, buf), m, hd, hd, weights);
                        n += m;
                    }
                }
                for (int64_t d = 0; d < hd; ++d) oh[d] += G.weight * acc[d];
            }
        }
    };
    if (macs < kMinParallelMacs) run(0, T * H, 0);
    else pool.parallel_for(T * H, run);
}

}  // namespace tmill::cpu
