// The CPU backend: activations in host memory, ops split over a persistent thread pool.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../backend.h"
#include "../quants.h"
#include "../threadpool.h"
#include "kernels.h"

namespace tmill {

namespace {

// Below this many tokens, block-quantized weights use the integer kernels; from it on, the float
// 4x2 tile on dequantized rows is faster (each row's widening is amortised over more tokens).
constexpr int64_t kPreparedMaxTokens = 8;

class CpuBackend final : public Backend {
public:
    explicit CpuBackend(int n_threads) : pool_(n_threads), scratch_(static_cast<size_t>(pool_.size())) {}

    std::string name() const override { return "cpu-" + std::string(cpu::kernels().name); }
    int n_threads() const override { return pool_.size(); }

    // uninitialised: a KV cache sized for the whole context only costs the pages it touches
    float* alloc(size_t n_floats) override { return new float[n_floats]; }
    void free(float* p) override { delete[] p; }
    void upload(float* dst, const float* host, size_t n) override { std::memcpy(dst, host, n * sizeof(float)); }
    void download(float* host, const float* src, size_t n) override { std::memcpy(host, src, n * sizeof(float)); }

    void get_rows(float* out, const Weight& table, const int32_t* ids, int64_t T) override {
        const cpu::Kernels& kern = cpu::kernels();
        for (int64_t t = 0; t < T; ++t)
            kern.dequantize_row(table.type, table.data + static_cast<size_t>(ids[t]) * table.row_stride,
                           out + t * table.cols, table.cols);
    }

    void matmul(float* out, const float* x, const Weight& w, int64_t T) override {
        MatmulItem item{out, &w};
        matmul_group(&item, 1, x, T);
    }

    // Several products of the same input share one parallel region (and, for the integer kernels,
    // one preparation of x). Work is cut into units of four rows across all the weights.
    void matmul_group(const MatmulItem* items, int n_items, const float* x, int64_t T) override {
        const int64_t cols = items[0].w->cols;
        const cpu::Kernels& kern = cpu::kernels();
        const bool small_batch = T < kPreparedMaxTokens;
        bool any_prepared = false;
        std::vector<int64_t> first_unit(static_cast<size_t>(n_items) + 1, 0);
        for (int i = 0; i < n_items; ++i) {
            any_prepared |= small_batch && cpu::uses_prepared_x(kern, items[i].w->type);
            first_unit[i + 1] = first_unit[i] + (items[i].w->rows + 3) / 4;
        }
        const int64_t nb = cols / 32;
        if (any_prepared) {
            xq_.resize(static_cast<size_t>(2 * T * cols));
            xd_.resize(static_cast<size_t>(T * nb));
            xsum_.resize(static_cast<size_t>(T * nb));
            for (int64_t t = 0; t < T; ++t)
                kern.prepare_x(x + t * cols, cols, xq_.data() + 2 * t * cols, xd_.data() + t * nb, xsum_.data() + t * nb);
        }
        pool_.parallel_for(first_unit[n_items], [&](int64_t u0, int64_t u1, int thread) {
            for (int64_t u = u0; u < u1; ++u) {
                int i = static_cast<int>(std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin()) - 1;
                const Weight& w = *items[i].w;
                float* out = items[i].out;
                const int64_t rows = w.rows, r0 = 4 * (u - first_unit[i]), nr = std::min<int64_t>(4, rows - r0);
                auto row_ptr = [&](int64_t r) { return w.data + static_cast<size_t>(r) * w.row_stride; };
                auto bias = [&](int64_t r) { return w.bias ? w.bias[r] : 0.0f; };
                if (small_batch && cpu::uses_prepared_x(kern, w.type)) {
                    // integer dots; each row stays in L1 while the tokens pass, four per widening
                    for (int64_t r = r0; r < r0 + nr; ++r) {
                        int64_t t = 0;
                        for (; t + 4 <= T; t += 4) {
                            float o[4];
                            kern.dot_row_prepared_x4(w.type, row_ptr(r), xq_.data() + 2 * t * cols, xd_.data() + t * nb,
                                                     xsum_.data() + t * nb, cols, o);
                            for (int k = 0; k < 4; ++k) out[(t + k) * rows + r] = o[k] + bias(r);
                        }
                        for (; t < T; ++t)
                            out[t * rows + r] = kern.dot_row_prepared(w.type, row_ptr(r), xq_.data() + 2 * t * cols,
                                                                      xd_.data() + t * nb, xsum_.data() + t * nb, cols) +
                                                bias(r);
                    }
                } else if (T == 1) {
                    for (int64_t r = r0; r < r0 + nr; ++r)   // decode: straight from the stored type
                        out[r] = kern.dot_row(w.type, row_ptr(r), x, cols) + bias(r);
                } else {
                    // prefill: dequantize the four rows, then run the tokens past them two by two
                    float* buf = scratch(thread, 4 * cols);
                    for (int64_t k = 0; k < 4; ++k) {
                        if (k < nr) kern.dequantize_row(w.type, row_ptr(r0 + k), buf + k * cols, cols);
                        else std::fill(buf + k * cols, buf + (k + 1) * cols, 0.0f);   // padding rows
                    }
                    float o[8];
                    for (int64_t t = 0; t < T; t += 2) {
                        const float* x1 = x + std::min(t + 1, T - 1) * cols;   // an odd last token pairs with itself
                        kern.dot_f32_4x2(buf, cols, x + t * cols, x1, cols, o);
                        for (int64_t k = 0; k < nr; ++k) {
                            out[t * rows + r0 + k] = o[k] + bias(r0 + k);
                            if (t + 1 < T) out[(t + 1) * rows + r0 + k] = o[4 + k] + bias(r0 + k);
                        }
                    }
                }
            }
        });
    }

    void rms_norm(float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps) override {
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + t * n;
            float* ot = out + t * n;
            double ss = 0.0;
            for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xt[i]) * xt[i];
            float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
            for (int64_t i = 0; i < n; ++i) ot[i] = xt[i] * inv * weight[i];
        }
    }

    void layer_norm(float* out, const float* x, const float* weight, const float* bias, int64_t T, int64_t n,
                    float eps) override {
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + t * n;
            float* ot = out + t * n;
            double mean = 0.0, var = 0.0;
            for (int64_t i = 0; i < n; ++i) mean += xt[i];
            mean /= static_cast<double>(n);
            for (int64_t i = 0; i < n; ++i) var += (xt[i] - mean) * (xt[i] - mean);
            var /= static_cast<double>(n);
            float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
            for (int64_t i = 0; i < n; ++i)
                ot[i] = static_cast<float>(xt[i] - mean) * inv * weight[i] + (bias ? bias[i] : 0.0f);
        }
    }

    void rope(float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta,
              RopeStyle style) override {
        if (style == RopeStyle::none) return;
        const int half = head_dim / 2;
        std::vector<float> cs(static_cast<size_t>(head_dim));
        for (int64_t t = 0; t < T; ++t) {
            // angle_i = pos * theta^(-2i/d), computed in float like the reference implementations
            for (int i = 0; i < half; ++i) {
                float inv_freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
                float angle = static_cast<float>(pos[t]) * inv_freq;
                cs[2 * i] = static_cast<float>(std::cos(static_cast<double>(angle)));
                cs[2 * i + 1] = static_cast<float>(std::sin(static_cast<double>(angle)));
            }
            for (int h = 0; h < n_heads; ++h) {
                float* v = x + (t * n_heads + h) * head_dim;
                for (int i = 0; i < half; ++i) {
                    int a = style == RopeStyle::adjacent ? 2 * i : i;
                    int b = style == RopeStyle::adjacent ? 2 * i + 1 : i + half;
                    float c = cs[2 * i], s = cs[2 * i + 1];
                    float va = v[a], vb = v[b];
                    v[a] = va * c - vb * s;
                    v[b] = va * s + vb * c;
                }
            }
        }
    }

    void add(float* x, const float* y, int64_t n) override {
        for (int64_t i = 0; i < n; ++i) x[i] += y[i];
    }

    void swiglu(float* gate, const float* up, int64_t n) override {
        for (int64_t i = 0; i < n; ++i) {
            float g = gate[i];
            gate[i] = g / (1.0f + std::exp(-g)) * up[i];
        }
    }

    void gelu(float* x, int64_t n) override {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        for (int64_t i = 0; i < n; ++i) {
            float v = x[i];
            x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
        }
    }

    void kv_store(const float* k, const float* v, const AttentionSegment* segs, int n_segs,
                  const AttentionShape& shape) override {
        const int hd = shape.head_dim, kv_width = shape.n_kv_heads * hd;
        for (int s = 0; s < n_segs; ++s) {
            const AttentionSegment& seg = segs[s];
            for (int64_t t = 0; t < seg.n_rows; ++t) {
                int64_t row = seg.row0 + t, p = seg.n_past + t;
                for (int h = 0; h < shape.n_kv_heads; ++h) {
                    size_t dst = (static_cast<size_t>(h) * seg.capacity + p) * hd;
                    std::memcpy(seg.k_cache + dst, k + row * kv_width + h * hd, hd * sizeof(float));
                    std::memcpy(seg.v_cache + dst, v + row * kv_width + h * hd, hd * sizeof(float));
                }
            }
        }
    }

    void attention(float* out, const float* q, const AttentionSegment* segs, int n_segs,
                   const AttentionShape& shape) override {
        // One task per (segment, query row, head); prefix sums map a task index back.
        std::vector<int64_t> first_task(static_cast<size_t>(n_segs) + 1, 0);
        for (int s = 0; s < n_segs; ++s) first_task[s + 1] = first_task[s] + segs[s].n_rows * shape.n_heads;
        const int hd = shape.head_dim, group = shape.n_heads / shape.n_kv_heads;
        const cpu::Kernels& kern = cpu::kernels();
        pool_.parallel_for(first_task[n_segs], [&](int64_t task0, int64_t task1, int thread) {
            for (int64_t task = task0; task < task1; ++task) {
                int s = static_cast<int>(std::upper_bound(first_task.begin(), first_task.end(), task) -
                                         first_task.begin()) - 1;
                const AttentionSegment& seg = segs[s];
                int64_t local = task - first_task[s];
                int64_t t = local / shape.n_heads;
                int h = static_cast<int>(local % shape.n_heads), kvh = h / group;
                int64_t pos = seg.n_past + t;
                int64_t start = shape.window > 0 ? std::max<int64_t>(0, pos - shape.window + 1) : 0;
                int64_t n = pos - start + 1;
                const float* qh = q + (seg.row0 + t) * shape.n_heads * hd + h * hd;
                const float* kh = seg.k_cache + (static_cast<size_t>(kvh) * seg.capacity + start) * hd;
                const float* vh = seg.v_cache + (static_cast<size_t>(kvh) * seg.capacity + start) * hd;
                float* scores = scratch(thread, n);
                // scores_j = q . k_j * scale, softmax over j, out = sum_j p_j v_j
                float mx = -INFINITY;
                for (int64_t j = 0; j < n; ++j) {
                    scores[j] = kern.dot_f32(qh, kh + j * hd, hd) * shape.scale;
                    mx = std::max(mx, scores[j]);
                }
                float sum = 0.0f;
                for (int64_t j = 0; j < n; ++j) {
                    scores[j] = std::exp(scores[j] - mx);
                    sum += scores[j];
                }
                float* oh = out + (seg.row0 + t) * shape.n_heads * hd + h * hd;
                std::fill(oh, oh + hd, 0.0f);
                for (int64_t j = 0; j < n; ++j) kern.axpy_f32(oh, vh + j * hd, scores[j] / sum, hd);
            }
        });
    }

private:
    float* scratch(int thread, int64_t n) {
        std::vector<float>& buf = scratch_[static_cast<size_t>(thread)];
        if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
        return buf.data();
    }

    ThreadPool pool_;
    std::vector<std::vector<float>> scratch_;
    std::vector<int16_t> xq_;   // activations prepared for the integer kernels [T, 2 * cols]
    std::vector<float> xd_, xsum_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads) {
    return std::make_unique<CpuBackend>(n_threads > 0 ? n_threads : default_thread_count());
}

}  // namespace tmill
