#include "backend/cpu/attention.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {

// Attention reads K and V in tiles of this many positions (f32 and f16 in place, other kinds
// converted into a per-thread buffer) ...
constexpr int64_t kAttentionTile = 64;
// ... and splits the positions of a query into parts of at least this many when it splits them.
constexpr int64_t kMinAttentionPart = 128;
// Prefill of a sequence with at least this many new rows (and no fp16 ring) takes its attention in
// blocks of up to kQueryBlock query vectors that share their scores' key loads (attention_blocks);
// so do all prompt rows of a batch-invariant pass, whatever their number.
constexpr int64_t kBlockMinRows = 8;
constexpr int64_t kQueryBlock = 16;

// The positions row t of a segment attends to: first_position .. last_position
int64_t last_position(const AttentionSegment& seg, int64_t t) {
    return seg.causal ? seg.n_past + t : seg.n_past + seg.n_rows - 1;
}
int64_t first_position(const AttentionSegment& seg, int64_t t) {
    return seg.window > 0 ? std::max<int64_t>(0, last_position(seg, t) - seg.window + 1) : 0;
}

// The largest of n > 0 scores, eight lanes at a time: a shape the compiler vectorizes, which
// std::max_element's loop is not (the maximum is the same in any order).
float max_of(const float* x, int64_t n) {
    float lane[8];
    std::fill(lane, lane + 8, x[0]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) lane[k] = lane[k] > x[i + k] ? lane[k] : x[i + k];
    float m = *std::max_element(lane, lane + 8);
    for (; i < n; ++i) m = std::max(m, x[i]);
    return m;
}

// A tile of K or V rows [m, hd] as the kernels read them: fp16 rows in place (main store or ring),
// f32 rows in place, any other kind converted to f32 in a buffer.
struct TileRows {
    const float* f32 = nullptr;
    const uint16_t* f16 = nullptr;
};

// How many rows from p0 (before end) one attention tile takes: up to kAttentionTile, but rows read
// in place (f32 and f16, and the fp16 ring) stop at the end of their run of contiguous slots, so a
// paged cache is not copied and every fp16 row is always read in place (the per-row dots and the
// running sums are the same however the rows are tiled).
int64_t tile_rows(const KVStore& main, const KVStore& ring, int64_t p0, int64_t end, int64_t ring_from) {
    const int64_t m = std::min(kAttentionTile, end - p0);
    if (ring.data && p0 >= ring_from) return std::min(m, ring.capacity - p0 % ring.capacity);
    const int64_t main_end = ring.data ? std::min(p0 + m, ring_from) : p0 + m;
    return main.type == DType::f32 || main.type == DType::f16 ? main.contiguous(p0, main_end) : main_end - p0;
}

// Rows [p0, p1) of one KV head (a tile_rows run): positions from ring_from on come from the fp16
// ring, the others from the main store.
TileRows load_rows(const Kernels& kern, const KVStore& main, const KVStore& ring, int kvh,
                   int64_t p0, int64_t p1, int64_t ring_from, int64_t hd, float* buf) {
    if (ring.data && p0 >= ring_from)
        return {nullptr, reinterpret_cast<const uint16_t*>(ring.row(kvh, p0 % ring.capacity))};
    if (main.type == DType::f32) return {reinterpret_cast<const float*>(main.row(kvh, p0)), nullptr};
    if (main.type == DType::f16) return {nullptr, reinterpret_cast<const uint16_t*>(main.row(kvh, p0))};
    for (int64_t p = p0; p < p1;) {   // runs of contiguous rows (a pool's blocks)
        const int64_t run = main.contiguous(p, p1);
        kern.dequantize_row(main.type, main.row(kvh, p), buf + (p - p0) * hd, run * hd);
        p += run;
    }
    return {buf, nullptr};
}

// Attention of the blocked segments' rows. (1) Per (segment, KV head), K over every position its
// rows see, transposed once: buf.kt [hd, n]. (2) Per block of rows whose query vectors (rows x GQA
// group, at most kQueryBlock) share a KV head: scores[nq, positions] = (q * scale) Kt in one
// product, then per query softmax over its own positions and the weighted V rows, each V tile
// read once for the whole block. Scores beyond a query's positions are computed and ignored.
void attention_blocks(ThreadPool& pool, AttentionBuffers& buf, float* out, const float* q, const AttentionSegment* segs,
                      int n_segs, const std::vector<char>& blocked, const AttentionShape& shape) {
    const int64_t hd = shape.head_dim, group = shape.n_heads / shape.n_kv_heads;
    const int64_t rows_per_block = std::max<int64_t>(1, kQueryBlock / group);
    struct Keys { int seg; int kvh; int64_t lo, n; size_t offset; };   // buf.kt + offset: [hd, n] from position lo
    struct Block { size_t keys; int64_t t0, t1; };
    std::vector<Keys> keys;
    std::vector<Block> blocks;
    size_t kt_floats = 0;
    for (int s = 0; s < n_segs; ++s) {
        if (!blocked[s]) continue;
        const AttentionSegment& seg = segs[s];
        const int64_t lo = first_position(seg, 0), n = last_position(seg, seg.n_rows - 1) + 1 - lo;
        for (int h = 0; h < shape.n_kv_heads; ++h) {
            for (int64_t t0 = 0; t0 < seg.n_rows; t0 += rows_per_block)
                blocks.push_back({keys.size(), t0, std::min(seg.n_rows, t0 + rows_per_block)});
            keys.push_back({s, h, lo, n, kt_floats});
            kt_floats += static_cast<size_t>(hd * n);
        }
    }
    if (keys.empty()) return;
    if (buf.kt.size() < kt_floats) buf.kt.resize(kt_floats);
    const Kernels& kern = kernels();

    pool.parallel_for(static_cast<int64_t>(keys.size()), [&](int64_t i0, int64_t i1, int thread) {
        float* tile_buf = buf.scratch(thread, kAttentionTile * hd);
        for (int64_t i = i0; i < i1; ++i) {
            const Keys& ks = keys[static_cast<size_t>(i)];
            const KVLayerView& kv = segs[ks.seg].kv;
            float* kt = buf.kt.data() + ks.offset;
            const int64_t end = ks.lo + ks.n;
            for (int64_t j = ks.lo, m; j < end; j += m) {
                m = tile_rows(kv.k, kv.k_ring, j, end, end);
                const TileRows rows = load_rows(kern, kv.k, kv.k_ring, ks.kvh, j, j + m, end, hd, tile_buf);
                const float* src = rows.f32;
                if (rows.f16) {
                    kern.dequantize_row(DType::f16, rows.f16, tile_buf, m * hd);
                    src = tile_buf;
                }
                for (int64_t d = 0; d < hd; ++d) {
                    float* dst = kt + d * ks.n + (j - ks.lo);
                    for (int64_t r = 0; r < m; ++r) dst[r] = src[r * hd + d];
                }
            }
        }
    });

    pool.parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t b0, int64_t b1, int thread) {
        for (int64_t b = b0; b < b1; ++b) {
            const Block& blk = blocks[static_cast<size_t>(b)];
            const Keys& ks = keys[blk.keys];
            const AttentionSegment& seg = segs[ks.seg];
            const KVLayerView& kv = seg.kv;
            const int64_t nq = (blk.t1 - blk.t0) * group;
            const int64_t lo = first_position(seg, blk.t0), end = last_position(seg, blk.t1 - 1) + 1, n = end - lo;
            // scratch: scaled queries [nq, hd] | acc [nq, hd] | sum [nq] | scores [nq, n] | rows [tile, hd]
            float* qs = buf.scratch(thread, nq * (2 * hd + 1 + n) + kAttentionTile * hd);
            float* acc = qs + nq * hd;
            float* sum = acc + nq * hd;
            float* scores = sum + nq;
            float* tile_buf = scores + nq * n;
            for (int64_t t = blk.t0; t < blk.t1; ++t)
                for (int64_t g = 0; g < group; ++g) {
                    const float* qh = q + ((seg.row0 + t) * shape.n_heads + ks.kvh * group + g) * hd;
                    float* dst = qs + ((t - blk.t0) * group + g) * hd;
                    for (int64_t d = 0; d < hd; ++d) dst[d] = qh[d] * shape.scale;
                }
            // scores[i, j] = (q_i * scale) . k_(lo + j)
            kern.scores_block(qs, static_cast<int>(nq), hd, buf.kt.data() + ks.offset + (lo - ks.lo), ks.n, n, scores, n);
            // per query, over its own positions [first, last]: p = exp(score - max), and their sum
            for (int64_t i = 0; i < nq; ++i) {
                const int64_t t = blk.t0 + i / group;
                float* si = scores + i * n + (first_position(seg, t) - lo);
                const int64_t len = last_position(seg, t) + 1 - first_position(seg, t);
                sum[i] = kern.exp_sum(si, len, max_of(si, len));
            }
            // acc[i] = sum_j p[i, j] v_j, a tile of V rows at a time for every query of the block
            std::fill(acc, acc + nq * hd, 0.0f);
            for (int64_t j = lo, m; j < end; j += m) {
                m = tile_rows(kv.v, kv.v_ring, j, end, end);
                const TileRows rows = load_rows(kern, kv.v, kv.v_ring, ks.kvh, j, j + m, end, hd, tile_buf);
                for (int64_t i = 0; i < nq; ++i) {
                    const int64_t t = blk.t0 + i / group;
                    const int64_t a = std::max(j, first_position(seg, t)), z = std::min(j + m, last_position(seg, t) + 1);
                    if (a >= z) continue;
                    const float* pi = scores + i * n + (a - lo);
                    if (rows.f16) kern.rows_axpy_f16(acc + i * hd, rows.f16 + (a - j) * hd, z - a, hd, hd, pi);
                    else kern.rows_axpy_f32(acc + i * hd, rows.f32 + (a - j) * hd, z - a, hd, hd, pi);
                }
            }
            for (int64_t i = 0; i < nq; ++i) {
                const int64_t t = blk.t0 + i / group, g = i % group;
                float* oh = out + ((seg.row0 + t) * shape.n_heads + ks.kvh * group + g) * hd;
                for (int64_t d = 0; d < hd; ++d) oh[d] = acc[i * hd + d] / sum[i];
            }
        }
    });
}

}  // namespace

// Work unit: one (sequence row, KV head) and a range of cached positions; its query heads (the
// GQA group) share every K and V row read. Few such pairs (decode) split the positions into
// parts whose partial softmax sums are merged afterwards, so every thread has work.
void attention(ThreadPool& pool, AttentionBuffers& buf, RowsMode mode, float* out, const float* q,
               const AttentionSegment* segs, int n_segs, const AttentionShape& shape) {
    const bool as_decode = mode == RowsMode::as_decode, invariant = mode == RowsMode::invariant;
    if (buf.per_thread.size() < static_cast<size_t>(pool.size())) buf.per_thread.resize(static_cast<size_t>(pool.size()));
    struct Part { int seg; int64_t t; int kvh; int64_t j0, j1; };   // positions [j0, j1)
    const int64_t hd = shape.head_dim, group = shape.n_heads / shape.n_kv_heads;
    const Kernels& kern = kernels();
    // prefill rows go by blocks (a ring's source depends on the query row, so not those): in fast
    // mode from kBlockMinRows rows on; batch-invariant prompt rows always, as each row's result
    // in a block is independent of the block (its scores and sums in a fixed order over its own
    // positions), hence of how the prompt was chunked and batched
    std::vector<char> blocked(static_cast<size_t>(n_segs), 0);
    for (int s = 0; s < n_segs; ++s) {
        const bool prompt = invariant ? !segs[s].decode : !as_decode && segs[s].n_rows >= kBlockMinRows;
        blocked[s] = prompt && segs[s].n_rows > 0 && kern.scores_block && !segs[s].kv.has_ring();
    }
    attention_blocks(pool, buf, out, q, segs, n_segs, blocked, shape);
    int64_t pairs = 0;
    for (int s = 0; s < n_segs; ++s)
        if (!blocked[s]) pairs += segs[s].n_rows * shape.n_kv_heads;
    if (pairs == 0) return;
    // as decode: each row splits as it would alone (its KV heads are all the pairs)
    const int64_t split_pairs = as_decode || invariant ? shape.n_kv_heads : pairs;
    const int64_t parts_wanted =
        split_pairs >= 4 * pool.size() ? 1 : (8 * pool.size() + split_pairs - 1) / split_pairs;
    std::vector<Part> parts;
    std::vector<int64_t> first_part;   // per (row, kv head) pair, into parts
    for (int s = 0; s < n_segs; ++s) {
        const AttentionSegment& seg = segs[s];
        if (blocked[s]) continue;
        for (int64_t t = 0; t < seg.n_rows; ++t) {
            const int64_t pos = last_position(seg, t), start = first_position(seg, t);
            const int64_t n = pos + 1 - start;
            const int64_t len = std::max<int64_t>(kMinAttentionPart, (n + parts_wanted - 1) / parts_wanted);
            for (int h = 0; h < shape.n_kv_heads; ++h) {
                first_part.push_back(static_cast<int64_t>(parts.size()));
                for (int64_t j = start; j <= pos; j += len) parts.push_back({s, t, h, j, std::min(j + len, pos + 1)});
            }
        }
    }
    first_part.push_back(static_cast<int64_t>(parts.size()));
    const bool split = parts.size() > static_cast<size_t>(pairs);
    // per part and query head of the group: running max m, sum l, and unnormalised output acc[hd]
    const int64_t stride = group * (hd + 2);
    if (split) buf.partials.resize(parts.size() * static_cast<size_t>(stride));

    pool.parallel_for(static_cast<int64_t>(parts.size()), [&](int64_t i0, int64_t i1, int thread) {
        for (int64_t i = i0; i < i1; ++i) {
            const Part& part = parts[static_cast<size_t>(i)];
            const AttentionSegment& seg = segs[part.seg];
            const KVLayerView& kv = seg.kv;
            const int64_t ring_from = kv.ring_from(seg.n_past + part.t, seg.n_past + seg.n_rows);
            const int64_t n = part.j1 - part.j0, row = seg.row0 + part.t;
            // scratch: scaled queries [group, hd] | acc [group, hd] | max, sum [group] | scores [group, n]
            //          | rows [tile, hd]
            float* qs = buf.scratch(thread, group * (2 * hd + 2 + n) + kAttentionTile * hd);
            float* acc = qs + group * hd;
            float* mx = acc + group * hd;
            float* sum = mx + group;
            float* scores = sum + group;
            float* tile_buf = scores + group * n;
            for (int64_t g = 0; g < group; ++g) {
                const float* qh = q + (row * shape.n_heads + part.kvh * group + g) * hd;
                for (int64_t d = 0; d < hd; ++d) qs[g * hd + d] = qh[d] * shape.scale;
            }
            // scores[g, j] = (q_g * scale) . k_j
            for (int64_t j = part.j0, m; j < part.j1; j += m) {
                m = tile_rows(kv.k, kv.k_ring, j, part.j1, ring_from);
                const TileRows rows = load_rows(kern, kv.k, kv.k_ring, part.kvh, j, j + m, ring_from, hd, tile_buf);
                float* sj = scores + (j - part.j0);
                if (kern.group_dot_f32) {
                    if (rows.f16) kern.group_dot_f16(rows.f16, m, hd, qs, static_cast<int>(group), sj, n);
                    else kern.group_dot_f32(rows.f32, m, hd, qs, static_cast<int>(group), sj, n);
                    continue;
                }
                for (int64_t g = 0; g < group; ++g) {
                    if (rows.f16) kern.rows_dot_f16(rows.f16, m, hd, qs + g * hd, sj + g * n);
                    else kern.rows_dot_f32(rows.f32, m, hd, qs + g * hd, sj + g * n);
                }
            }
            // p[g, j] = exp(scores - max): softmax numerators and their sums
            for (int64_t g = 0; g < group; ++g) {
                const float* sg = scores + g * n;
                mx[g] = max_of(sg, n);
                sum[g] = kern.exp_sum(scores + g * n, n, mx[g]);
            }
            // acc[g] = sum_j p[g, j] v_j
            std::fill(acc, acc + group * hd, 0.0f);
            for (int64_t j = part.j0, m; j < part.j1; j += m) {
                m = tile_rows(kv.v, kv.v_ring, j, part.j1, ring_from);
                const TileRows rows = load_rows(kern, kv.v, kv.v_ring, part.kvh, j, j + m, ring_from, hd, tile_buf);
                const float* pj = scores + (j - part.j0);
                if (kern.group_axpy_f32) {
                    if (rows.f16) kern.group_axpy_f16(acc, rows.f16, m, hd, hd, pj, static_cast<int>(group), n);
                    else kern.group_axpy_f32(acc, rows.f32, m, hd, hd, pj, static_cast<int>(group), n);
                    continue;
                }
                for (int64_t g = 0; g < group; ++g) {
                    if (rows.f16) kern.rows_axpy_f16(acc + g * hd, rows.f16, m, hd, hd, pj + g * n);
                    else kern.rows_axpy_f32(acc + g * hd, rows.f32, m, hd, hd, pj + g * n);
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                if (split) {
                    float* dst = buf.partials.data() + i * stride + g * (hd + 2);
                    dst[0] = mx[g];
                    dst[1] = sum[g];
                    std::copy(acc + g * hd, acc + (g + 1) * hd, dst + 2);
                } else {
                    float* oh = out + (row * shape.n_heads + part.kvh * group + g) * hd;
                    for (int64_t d = 0; d < hd; ++d) oh[d] = acc[g * hd + d] / sum[g];
                }
            }
        }
    });
    if (!split) return;
    // out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M), M = max_c m_c
    pool.parallel_for(pairs, [&](int64_t p0, int64_t p1, int) {
        for (int64_t pair = p0; pair < p1; ++pair) {
            const Part& first = parts[static_cast<size_t>(first_part[pair])];
            const int64_t row = segs[first.seg].row0 + first.t;
            for (int64_t g = 0; g < group; ++g) {
                float* oh = out + (row * shape.n_heads + first.kvh * group + g) * hd;
                float big = -INFINITY, total = 0.0f;
                for (int64_t c = first_part[pair]; c < first_part[pair + 1]; ++c)
                    big = std::max(big, buf.partials[c * stride + g * (hd + 2)]);
                std::fill(oh, oh + hd, 0.0f);
                for (int64_t c = first_part[pair]; c < first_part[pair + 1]; ++c) {
                    const float* src = buf.partials.data() + c * stride + g * (hd + 2);
                    const float w = std::exp(src[0] - big);
                    total += src[1] * w;
                    for (int64_t d = 0; d < hd; ++d) oh[d] += src[2 + d] * w;
                }
                for (int64_t d = 0; d < hd; ++d) oh[d] /= total;
            }
        }
    });
}

float* AttentionBuffers::scratch(int thread, int64_t n) {
    std::vector<float>& b = per_thread[static_cast<size_t>(thread)];
    if (static_cast<int64_t>(b.size()) < n) b.resize(static_cast<size_t>(n));
    return b.data();
}

}  // namespace tmill::cpu
