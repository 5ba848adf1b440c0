#include "cuda/attention.cuh"

namespace tmill::TM_GPU_NS {

namespace {
constexpr int kThreads = 128;                           // one block per part; also the positions per chunk
constexpr int kDimsPerThread = kMaxHeadDim / kThreads;  // output dimensions each thread accumulates

// value d of a stored K/V row of type t (a uniform branch: every thread of a block reads one store)
__device__ inline float stored_value(DType t, const uint8_t* row, int d) {
    switch (t) {
        case DType::f32: return value_at<DType::f32>(row, d);
        case DType::f16: return value_at<DType::f16>(row, d);
        case DType::bf16: return value_at<DType::bf16>(row, d);
        case DType::q8_0: return value_at<DType::q8_0>(row, d);
        case DType::q4_0: return value_at<DType::q4_0>(row, d);
        default: return value_at<DType::nf4>(row, d);
    }
}

// 32 values (chunk c of a head) of src into a stored row of type t
__device__ inline void store_chunk(DType t, const float* src, uint8_t* row, int c, int hd) {
    switch (t) {
        case DType::q8_0: return quantize_block(src + 32 * c, reinterpret_cast<BlockQ8_0*>(row)[c]);
        case DType::q4_0: return quantize_block(src + 32 * c, reinterpret_cast<BlockQ4_0*>(row)[c]);
        case DType::nf4: return quantize_block(src + 32 * c, reinterpret_cast<BlockNF4*>(row)[c]);
        default:
            for (int d = 32 * c; d < 32 * c + 32 && d < hd; ++d) {
                if (t == DType::f32) reinterpret_cast<float*>(row)[d] = src[d];
                else if (t == DType::f16) reinterpret_cast<uint16_t*>(row)[d] = float_to_half(src[d]);
                else reinterpret_cast<uint16_t*>(row)[d] = float_to_bfloat(src[d]);
            }
    }
}

// thread per (row, kv head, 32-value chunk), K and V
__global__ void store_rows(const float* k, const float* v, const AttentionSegment* segs, const RowRef* rows, int64_t n_rows,
                           int n_kv_heads, int hd) {
    const int chunks = (hd + 31) / 32;
    const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (id >= n_rows * n_kv_heads * chunks) return;
    const int c = static_cast<int>(id % chunks), h = static_cast<int>(id / chunks % n_kv_heads);
    const int64_t r = id / chunks / n_kv_heads;
    const AttentionSegment& seg = segs[rows[r].seg];
    const KVLayerView& kv = seg.kv;
    const int64_t p = seg.n_past + rows[r].t, src_row = seg.row0 + rows[r].t;
    const float* kr = k + (src_row * n_kv_heads + h) * hd;
    const float* vr = v + (src_row * n_kv_heads + h) * hd;
    store_chunk(kv.k.type, kr, kv.k.data + kv.k.index(h, p) * kv.k.row_bytes, c, hd);
    store_chunk(kv.v.type, vr, kv.v.data + kv.v.index(h, p) * kv.v.row_bytes, c, hd);
    // the ring only needs the positions that will still have their slot after this call
    if (kv.has_ring() && p >= seg.n_past + seg.n_rows - kv.k_ring.capacity) {
        store_chunk(DType::f16, kr, kv.k_ring.data + kv.k_ring.index(h, p % kv.k_ring.capacity) * kv.k_ring.row_bytes, c, hd);
        store_chunk(DType::f16, vr, kv.v_ring.data + kv.v_ring.index(h, p % kv.v_ring.capacity) * kv.v_ring.row_bytes, c, hd);
    }
}

// Softmax attention state of one block over a run of positions, chunk by chunk (kThreads
// positions each): running max m, sum l, and the unnormalised output acc[i] of dimension
// threadIdx.x + i * kThreads. key(j, d) / value(j, d): element d of position j's K / V row;
// weight(j): a factor on position j's score and on its value (a memory chapter's routing weight).
struct SoftmaxState {
    float m = -INFINITY, l = 0.0f;
    float acc[kDimsPerThread] = {};
};

template <typename Key, typename Value, typename Weight>
__device__ void attend(SoftmaxState& st, const float* qs, int hd, int64_t n, const Key& key, const Value& value,
                       const Weight& weight, float* scores, float* reduce) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    for (int64_t c0 = 0; c0 < n; c0 += kThreads) {
        const int cn = static_cast<int>(n - c0 < kThreads ? n - c0 : kThreads);
        for (int j = warp; j < cn; j += kThreads / kWarp) {   // a warp per position: its lanes split the dot
            float part = 0.0f;
            for (int d = lane; d < hd; d += kWarp) part = fmaf(qs[d], key(c0 + j, d), part);
            part = warp_sum(part);
            if (lane == 0) scores[j] = part * weight(c0 + j);
        }
        __syncthreads();
        const int j = threadIdx.x;
        const float top = fmaxf(st.m, block_max(j < cn ? scores[j] : -INFINITY, reduce));
        const float keep = expf(st.m - top);   // rescales what came before (0 for the first chunk)
        const float p = j < cn ? expf(scores[j] - top) : 0.0f;
        if (j < cn) scores[j] = p;
        st.l = st.l * keep + block_sum(p, reduce);   // also publishes every p
        for (int i = 0; i < kDimsPerThread; ++i) {
            const int d = threadIdx.x + i * kThreads;
            if (d >= hd) break;
            float sum = 0.0f;
            for (int jj = 0; jj < cn; ++jj) sum = fmaf(scores[jj] * weight(c0 + jj), value(c0 + jj, d), sum);
            st.acc[i] = st.acc[i] * keep + sum;
        }
        st.m = top;
        __syncthreads();
    }
}

__global__ void attention_parts(float* partials, const float* q, const AttentionSegment* segs, const AttentionPart* parts,
                                int n_heads, int n_kv_heads, int hd, float scale) {
    __shared__ float qs[kMaxHeadDim];
    __shared__ float scores[kThreads];
    __shared__ float reduce[32];
    const AttentionPart part = parts[blockIdx.x];
    const AttentionSegment& seg = segs[part.seg];
    const KVLayerView& kv = seg.kv;
    const int kvh = part.head / (n_heads / n_kv_heads);
    const int64_t row = seg.row0 + part.t;
    for (int d = threadIdx.x; d < hd; d += kThreads) qs[d] = q[(row * n_heads + part.head) * hd + d] * scale;
    __syncthreads();
    const int64_t ring_from = kv.ring_from(seg.n_past + part.t, seg.n_past + seg.n_rows);
    auto stored = [&](const KVStore& main, const KVStore& ring, int64_t j, int d) {
        const int64_t p = part.j0 + j;
        if (p >= ring_from) return value_at<DType::f16>(ring.data + ring.index(kvh, p % ring.capacity) * ring.row_bytes, d);
        return stored_value(main.type, main.data + main.index(kvh, p) * main.row_bytes, d);
    };
    SoftmaxState st;
    attend(st, qs, hd, part.j1 - part.j0, [&](int64_t j, int d) { return stored(kv.k, kv.k_ring, j, d); },
           [&](int64_t j, int d) { return stored(kv.v, kv.v_ring, j, d); }, [](int64_t) { return 1.0f; }, scores, reduce);
    float* dst = partials + static_cast<int64_t>(blockIdx.x) * (hd + 2);
    if (threadIdx.x == 0) {
        dst[0] = st.m;
        dst[1] = st.l;
    }
    for (int i = 0; i < kDimsPerThread && static_cast<int>(threadIdx.x) + i * kThreads < hd; ++i) dst[2 + threadIdx.x + i * kThreads] = st.acc[i];
}

// out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M), M = max_c m_c, over the pair's parts
__global__ void merge_parts(float* out, const float* partials, const AttentionSegment* segs, const AttentionPart* parts,
                            const int64_t* pair_first, int n_heads, int hd) {
    const int64_t c0 = pair_first[blockIdx.x], c1 = pair_first[blockIdx.x + 1];
    const AttentionPart& first = parts[c0];
    const int64_t row = segs[first.seg].row0 + first.t;
    float top = -INFINITY;
    for (int64_t c = c0; c < c1; ++c) top = fmaxf(top, partials[c * (hd + 2)]);
    float total = 0.0f;
    for (int64_t c = c0; c < c1; ++c) total += partials[c * (hd + 2) + 1] * expf(partials[c * (hd + 2)] - top);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
        for (int64_t c = c0; c < c1; ++c) sum += partials[c * (hd + 2) + 2 + d] * expf(partials[c * (hd + 2)] - top);
        out[(row * n_heads + first.head) * hd + d] = sum / total;
    }
}

// value d of memory row `row` (f32, or int8 / int4 times the row's scale)
__device__ inline float memory_value(const MemoryTable& t, const uint8_t* store, const float* scales, int64_t row, int d) {
    const uint8_t* src = store + static_cast<size_t>(row) * t.row_bytes();
    if (t.quant == MemoryQuant::f32) return reinterpret_cast<const float*>(src)[d];
    if (t.quant == MemoryQuant::int8) return static_cast<float>(reinterpret_cast<const int8_t*>(src)[d]) * scales[row];
    const int nib = (src[d / 2] >> ((d & 1) * 4)) & 0xF;
    return static_cast<float>(nib - 8) * scales[row];
}

// one block per (row, head): per group, one softmax over the slots of its spans (the state runs on
// from span to span), its output added with the group's weight
__global__ void memory_rows(float* out, const float* q, const MemoryRoute* routes, const MemoryGroup* groups,
                            const MemorySpan* spans, MemoryTable table, int n_heads, int n_kv_heads, float scale) {
    __shared__ float qs[kMaxHeadDim];
    __shared__ float scores[kThreads];
    __shared__ float reduce[32];
    const int64_t t = blockIdx.x / n_heads;
    const int h = static_cast<int>(blockIdx.x % n_heads), kvh = h / (n_heads / n_kv_heads), hd = table.head_dim;
    for (int d = threadIdx.x; d < hd; d += kThreads) qs[d] = q[(t * n_heads + h) * hd + d] * scale;
    __syncthreads();
    float result[kDimsPerThread] = {};
    const MemoryRoute route = routes[t];
    for (int32_t g = 0; g < route.n_groups; ++g) {
        const MemoryGroup G = groups[route.group0 + g];
        SoftmaxState st;
        for (int32_t s = 0; s < G.n_spans; ++s) {
            const MemorySpan sp = spans[G.span0 + s];
            const int64_t first = kvh * table.n_slots + sp.slot0;
            attend(st, qs, hd, sp.n_slots, [&](int64_t j, int d) { return memory_value(table, table.k, table.k_scale, first + j, d); },
                   [&](int64_t j, int d) { return memory_value(table, table.v, table.v_scale, first + j, d); },
                   [&](int64_t) { return sp.kv_scale; }, scores, reduce);
        }
        if (st.l == 0.0f) continue;   // a group without slots adds nothing
        for (int i = 0; i < kDimsPerThread; ++i) result[i] += G.weight * st.acc[i] / st.l;
    }
    for (int i = 0; i < kDimsPerThread && static_cast<int>(threadIdx.x) + i * kThreads < hd; ++i)
        out[(t * n_heads + h) * hd + threadIdx.x + i * kThreads] = result[i];
}
}  // namespace

void kv_store(cudaStream_t s, const float* k, const float* v, const AttentionSegment* segs, const RowRef* rows, int64_t n_rows,
              const AttentionShape& shape) {
    const int64_t n = n_rows * shape.n_kv_heads * ((shape.head_dim + 31) / 32);
    if (n <= 0) return;
    store_rows<<<blocks_for(n, 128), 128, 0, s>>>(k, v, segs, rows, n_rows, shape.n_kv_heads, shape.head_dim);
    TM_CHECK_LAUNCH("kv_store");
}

void attention(cudaStream_t s, float* out, const float* q, const AttentionSegment* segs, const AttentionPart* parts,
               int64_t n_parts, const int64_t* pair_first, int64_t n_pairs, float* partials, const AttentionShape& shape) {
    if (n_parts <= 0) return;
    attention_parts<<<static_cast<unsigned>(n_parts), kThreads, 0, s>>>(partials, q, segs, parts, shape.n_heads, shape.n_kv_heads,
                                                                         shape.head_dim, shape.scale);
    TM_CHECK_LAUNCH("attention");
    merge_parts<<<static_cast<unsigned>(n_pairs), 128, 0, s>>>(out, partials, segs, parts, pair_first, shape.n_heads, shape.head_dim);
    TM_CHECK_LAUNCH("attention merge");
}

void memory_attention(cudaStream_t s, float* out, const float* q, int64_t T, const MemoryRoute* routes,
                      const MemoryGroup* groups, const MemorySpan* spans, const MemoryTable& table, const AttentionShape& shape) {
    if (T <= 0) return;
    memory_rows<<<static_cast<unsigned>(T * shape.n_heads), kThreads, 0, s>>>(out, q, routes, groups, spans, table, shape.n_heads,
                                                                              shape.n_kv_heads, shape.scale);
    TM_CHECK_LAUNCH("memory_attention");
}

}  // namespace tmill::TM_GPU_NS
