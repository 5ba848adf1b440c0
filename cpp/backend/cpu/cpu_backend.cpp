// The CPU backend: activations in host memory, ops split over a persistent thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <optional>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/lora.h"
#include "backend/cpu/matmul.h"
#include "backend/cpu/memory_attention.h"
#include "core/error.h"
#include "core/quants.h"
#include "core/threadpool.h"

namespace tmill {

namespace {

// Element-wise ops split across threads only from this many elements on, in chunks of kElementChunk
// (a multiple of every vector width).
constexpr int64_t kMinParallelElements = 1 << 15;
constexpr int64_t kElementChunk = 1 << 12;
// RoPE handles head dimensions up to twice this (the model loader accepts up to 1024)
constexpr int kMaxRopeHalf = 512;

// sum x_i^2 in double, eight lanes at a time: a shape the compiler vectorizes (one running sum is a
// chain of dependent additions, ~1 us per 576-wide row, on the thread that hands out a step's work)
double sum_of_squares(const float* x, int64_t n) {
    double lane[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) lane[k] += static_cast<double>(x[i + k]) * x[i + k];
    double ss = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    return ss;
}

class CpuBackend final : public Backend {
public:
    CpuBackend(int n_threads, bool int8_prefill, bool int8_decode)
        : pool_(n_threads), matmul_(pool_, int8_prefill, int8_decode) {}

    std::string name() const override { return "cpu-" + std::string(cpu::kernels().name); }
    int n_threads() const override { return pool_.size(); }

    // uninitialised: a KV cache sized for the whole context only costs the pages it touches
    float* alloc(size_t n_floats) override { return new float[n_floats]; }
    void free(float* p) override { delete[] p; }
    void upload(float* dst, const float* host, size_t n) override { std::memcpy(dst, host, n * sizeof(float)); }
    void download(float* host, const float* src, size_t n) override { std::memcpy(host, src, n * sizeof(float)); }
    uint8_t* alloc_bytes(size_t n) override { return new uint8_t[n]; }
    void free_bytes(uint8_t* p) override { delete[] p; }
    void copy_bytes(uint8_t* dst, const uint8_t* src, size_t n) override { std::memcpy(dst, src, n); }

    // The map is used in place; only biases are copied (and matrices into the copies their kernels
    // read: Matmul::pack).
    Weight upload_weight(DType type, int64_t rows, int64_t cols, const uint8_t* data, const float* bias,
                         WeightUse use) override {
        Weight w;
        w.type = type;
        w.rows = rows;
        w.cols = cols;
        w.data = data;
        w.row_stride = row_bytes(type, cols);
        w.bias = bias ? upload_vector(bias, static_cast<size_t>(rows)) : nullptr;
        if (use == WeightUse::matmul) matmul_.pack(w);
        return w;
    }

    const float* upload_vector(const float* host, size_t n) override {
        vectors_.push_back(std::make_unique<float[]>(n));
        std::memcpy(vectors_.back().get(), host, n * sizeof(float));
        return vectors_.back().get();
    }

    void begin_pass() override {
        level_.emplace();
        set_rows_mode(RowsMode::fast);
    }
    void end_pass() override {
        set_rows_mode(RowsMode::fast);
        level_.reset();
    }
    void set_rows_mode(RowsMode mode) override {
        rows_mode_ = mode;
    }

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

    void matmul_group(const MatmulItem* items, int n_items, const float* x, int64_t T) override {
        matmul_.run(items, n_items, x, T, nullptr, 0, lora_plan_, rows_mode_);
    }

    // LoRA additions of a pass whose product runs in one region (decode steps, small batches) join
    // that region: each thread goes on from a fixed share of the weights' units to its share of the
    // additions, instead of a region of their own -- per projection group one hand-off to the
    // workers and one wait for the slowest thread fewer.
    void matmul_group_lora(const MatmulItem* items, int n_items, const float* x, int64_t T, const LoraItem* lora,
                           int n_lora) override {
        matmul_.run(items, n_items, x, T, lora, n_lora, lora_plan_, rows_mode_);
    }

    void rms_norm(float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps) override {
        for_rows(T, n, [&](int64_t t) {
            const float* xt = x + t * n;
            float* ot = out + t * n;
            float inv = static_cast<float>(1.0 / std::sqrt(sum_of_squares(xt, n) / static_cast<double>(n) + eps));
            for (int64_t i = 0; i < n; ++i) ot[i] = xt[i] * inv * weight[i];
        });
    }

    void layer_norm(float* out, const float* x, const float* weight, const float* bias, int64_t T, int64_t n,
                    float eps) override {
        for_rows(T, n, [&](int64_t t) {
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
        });
    }

    void rope(float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta,
              RopeStyle style, const float* freq_factors) override {
        if (style == RopeStyle::none) return;
        const int half = head_dim / 2;
        const float* table = rope_table(pos, T, head_dim, theta, freq_factors);
        for_rows(T, int64_t{n_heads} * head_dim, [&](int64_t t) {
            const float* cs = table + t * 2 * half;   // cos, sin of each pair's angle
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
        });
    }

    void add(float* x, const float* y, int64_t n) override {
        for_elements(n, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) x[i] += y[i];
        });
    }

    void swiglu(float* gate, const float* up, int64_t n) override {
        const cpu::Kernels& kern = cpu::kernels();
        for_elements(n, [&](int64_t i0, int64_t i1) { kern.swiglu(gate + i0, up + i0, i1 - i0); });
    }

    void gelu(float* x, int64_t n) override {
        const cpu::Kernels& kern = cpu::kernels();
        for_elements(n, [&](int64_t i0, int64_t i1) { kern.gelu_tanh(x + i0, nullptr, i1 - i0); });
    }

    void geglu(float* gate, const float* up, int64_t n) override {
        const cpu::Kernels& kern = cpu::kernels();
        for_elements(n, [&](int64_t i0, int64_t i1) { kern.gelu_tanh(gate + i0, up + i0, i1 - i0); });
    }

    void scale(float* x, float s, int64_t n) override {
        for_elements(n, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) x[i] *= s;
        });
    }

    void gelu_erf(float* x, int64_t n) override {
        const cpu::Kernels& kern = cpu::kernels();
        for_elements(n, [&](int64_t i0, int64_t i1) { kern.gelu_erf(x + i0, i1 - i0); });
    }

    void kv_store(const float* k, const float* v, const AttentionSegment* segs, int n_segs,
                  const AttentionShape& shape) override {
        const int64_t hd = shape.head_dim, kv_width = shape.n_kv_heads * hd;
        std::vector<int64_t> first_row(static_cast<size_t>(n_segs) + 1, 0);
        for (int s = 0; s < n_segs; ++s) first_row[s + 1] = first_row[s] + segs[s].n_rows;
        pool_.parallel_for(first_row[n_segs], [&](int64_t r0, int64_t r1, int) {
            for (int64_t row = r0; row < r1; ++row) {
                int s = static_cast<int>(std::upper_bound(first_row.begin(), first_row.end(), row) - first_row.begin()) - 1;
                const AttentionSegment& seg = segs[s];
                KVLayerView kv = seg.kv;
                const int64_t p = seg.n_past + (row - first_row[s]);
                const float* kr = k + (seg.row0 + row - first_row[s]) * kv_width;
                const float* vr = v + (seg.row0 + row - first_row[s]) * kv_width;
                // the ring only needs the positions that will still have their slot after this call
                const bool to_ring = kv.has_ring() && p >= seg.n_past + seg.n_rows - kv.k_ring.capacity;
                for (int h = 0; h < shape.n_kv_heads; ++h) {
                    quantize_row(kv.k.type, kr + h * hd, kv.k.row(h, p), hd);
                    quantize_row(kv.v.type, vr + h * hd, kv.v.row(h, p), hd);
                    if (to_ring) {
                        quantize_row(DType::f16, kr + h * hd, kv.k_ring.row(h, p % kv.k_ring.capacity), hd);
                        quantize_row(DType::f16, vr + h * hd, kv.v_ring.row(h, p % kv.v_ring.capacity), hd);
                    }
                }
            }
        });
    }

    void attention(float* out, const float* q, const AttentionSegment* segs, int n_segs,
                   const AttentionShape& shape) override {
        cpu::attention(pool_, attention_buffers_, rows_mode_, out, q, segs, n_segs, shape);
    }

    void lora_add(const LoraItem* items, int n_items) override { cpu::lora_add(pool_, lora_plan_, items, n_items); }
    void memory_attention(float* out, const float* q, int64_t T, const MemoryRoute* routes, const MemoryGroup* groups,
                          const MemorySpan* spans, const MemoryTable& table, const AttentionShape& shape) override {
        cpu::memory_attention(pool_, memory_scratch_, out, q, T, routes, groups, spans, table, shape);
    }

private:
    // cos and sin of every pair's angle for rows at positions pos [T]: angle_i = pos * theta^(-2i/d)
    // (/ freq_factors[i]), computed in float like the reference implementations, the trigonometry in
    // double. Kept for the next calls with the same positions and frequencies -- every layer's q and
    // k of a pass (two tables: Gemma 3 alternates two thetas); recomputing them took ~4 % of the main
    // thread's time in a sixteen-sequence decode step, while the other thread waited.
    const float* rope_table(const int32_t* pos, int64_t T, int head_dim, float theta, const float* freq_factors) {
        for (RopeTable& tab : rope_tables_)
            if (tab.theta == theta && tab.head_dim == head_dim && tab.factors == freq_factors &&
                tab.pos.size() == static_cast<size_t>(T) && std::equal(pos, pos + T, tab.pos.begin()))
                return tab.cs.data();
        RopeTable& tab = rope_tables_[rope_next_];
        rope_next_ = (rope_next_ + 1) % static_cast<int>(std::size(rope_tables_));
        const int half = head_dim / 2;
        tab.theta = theta;
        tab.head_dim = head_dim;
        tab.factors = freq_factors;
        tab.pos.assign(pos, pos + T);
        tab.cs.resize(static_cast<size_t>(T * 2 * half));
        float inv_freq[kMaxRopeHalf];
        for (int i = 0; i < half; ++i) {
            inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
            if (freq_factors) inv_freq[i] /= freq_factors[i];
        }
        for_rows(T, 2 * half, [&](int64_t t) {
            float* cs = tab.cs.data() + t * 2 * half;
            for (int i = 0; i < half; ++i) {
                const float angle = static_cast<float>(pos[t]) * inv_freq[i];
                cs[2 * i] = static_cast<float>(std::cos(static_cast<double>(angle)));
                cs[2 * i + 1] = static_cast<float>(std::sin(static_cast<double>(angle)));
            }
        });
        return tab.cs.data();
    }

    // fn(i0, i1) over [0, n) in chunks of kElementChunk across the threads once there is enough work,
    // else fn(0, n) in this one
    template <typename Fn>
    void for_elements(int64_t n, const Fn& fn) {
        if (n < kMinParallelElements) return fn(0, n);
        pool_.parallel_for((n + kElementChunk - 1) / kElementChunk, [&](int64_t c0, int64_t c1, int) {
            fn(c0 * kElementChunk, std::min(n, c1 * kElementChunk));
        });
    }

    // fn(t) for rows t of [T, n]: across the threads once there is enough work, else in this one
    template <typename Fn>
    void for_rows(int64_t T, int64_t n, const Fn& fn) {
        if (T < 2 || T * n < kMinParallelElements) {
            for (int64_t t = 0; t < T; ++t) fn(t);
            return;
        }
        pool_.parallel_for(T, [&](int64_t t0, int64_t t1, int) {
            for (int64_t t = t0; t < t1; ++t) fn(t);
        });
    }

    ThreadPool pool_;
    cpu::Matmul matmul_;   // products of weights (holds a reference to pool_)
    std::vector<std::unique_ptr<float[]>> vectors_;    // uploaded norm weights and biases
    std::optional<cpu::LevelPin> level_;               // held during a pass
    RowsMode rows_mode_ = RowsMode::fast;              // of the ops now running
    cpu::AttentionBuffers attention_buffers_;
    struct RopeTable {
        std::vector<int32_t> pos;
        float theta = 0.0f;
        int head_dim = 0;
        const float* factors = nullptr;
        std::vector<float> cs;   // [T, head_dim / 2, 2]
    };
    RopeTable rope_tables_[2];
    int rope_next_ = 0;   // the table the next new one replaces
    cpu::LoraPlan lora_plan_;       // LoRA: the units of a projection group's additions and their scratch
    std::vector<std::vector<float>> memory_scratch_;   // memory attention: one buffer per thread
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads, bool int8_prefill, bool int8_decode) {
    const int cpus = available_cpus();
    if (n_threads < 0 || n_threads > cpus)
        fail(ErrorKind::invalid_arg, "n_threads must be in [1, " + std::to_string(cpus) + "] (the CPUs this process may use), got " +
                                         std::to_string(n_threads));
    return std::make_unique<CpuBackend>(n_threads > 0 ? n_threads : default_thread_count(), int8_prefill, int8_decode);
}

}  // namespace tmill
