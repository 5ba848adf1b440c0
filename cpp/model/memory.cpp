#include "model/memory.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace tmill {

RoutingStrategy routing_from_name(const std::string& name) {
    for (RoutingStrategy s : {RoutingStrategy::sequence, RoutingStrategy::rolling, RoutingStrategy::token, RoutingStrategy::hybrid})
        if (name == routing_name(s)) return s;
    fail(ErrorKind::invalid_arg, "unknown routing strategy '" + name + "' (sequence, rolling, token, hybrid)");
}

const char* routing_name(RoutingStrategy s) {
    switch (s) {
        case RoutingStrategy::sequence: return "sequence";
        case RoutingStrategy::rolling: return "rolling";
        case RoutingStrategy::token: return "token";
        case RoutingStrategy::hybrid: return "hybrid";
    }
    return "?";
}

struct MemoryLayers::Layer {
    int64_t layer = 0;
    std::vector<float> norm_host;
    const float* norm = nullptr;
    std::vector<HostMatrix> q_host, o_host, router_host;   // router_host: one matrix, or none
    std::vector<float> router_bias;
    std::vector<Weight> q, o;
    Weight router;
    std::vector<float> k, v;   // the table in f32, [n_kv_heads][N][head_dim]
    BackendBuffer k_data, v_data, k_scale, v_scale;
    MemoryTable table;
};

// Per sequence and memory layer: router logits of every cached position [positions, C], the first
// pass's length and mean logits, and the newest position's route.
struct MemoryLayers::State final : SequenceState {
    struct PerLayer {
        std::vector<float> logits;
        int64_t prompt_len = 0;
        std::vector<float> prompt_mean;
        std::vector<std::pair<int64_t, float>> last;
    };
    explicit State(int64_t c) : C(c) {}
    void truncate(int64_t n) override {
        for (PerLayer& p : per) {
            if (static_cast<int64_t>(p.logits.size()) > n * C) p.logits.resize(static_cast<size_t>(n * C));
            if (n == 0) {   // an emptied sequence decides afresh
                p.prompt_len = 0;
                p.last.clear();
            }
        }
    }
    int64_t C;
    std::vector<PerLayer> per;   // by memory layer index
};

namespace {
std::atomic<uint64_t> next_id{1};

void check_finite(const std::vector<float>& v, const std::string& what) {
    for (float f : v)
        if (!std::isfinite(f)) fail(ErrorKind::numeric, "memory " + what + " contains NaN or infinity");
}

// a chain of matrices x -> M_1 x -> M_2 (M_1 x): checks it maps n_in to n_out
void check_chain(const std::vector<HostMatrix>& chain, int64_t n_in, int64_t n_out, const std::string& what) {
    if (chain.empty() || chain.size() > 2) fail(ErrorKind::invalid_arg, "memory " + what + ": one matrix or a low-rank pair");
    int64_t cols = n_in;
    for (const HostMatrix& m : chain) {
        if (m.cols != cols || m.rows <= 0 || static_cast<int64_t>(m.data.size()) != m.rows * m.cols)
            fail(ErrorKind::invalid_arg, "memory " + what + ": a matrix of [" + std::to_string(m.rows) + ", " +
                                             std::to_string(m.cols) + "] does not take " + std::to_string(cols) + " inputs");
        check_finite(m.data, what);
        cols = m.rows;
    }
    if (cols != n_out)
        fail(ErrorKind::invalid_arg, "memory " + what + " gives " + std::to_string(cols) + " outputs, expected " + std::to_string(n_out));
}
}  // namespace

MemoryLayers::MemoryLayers(const std::shared_ptr<const Model>& model, const MemoryOptions& o)
    : model_(model), backend_holder_(model->shared_backend()), backend_(*backend_holder_), options_(o), id_(next_id++) {
    if (o.n_heads <= 0 || o.n_kv_heads <= 0 || o.head_dim <= 0 || o.n_heads % o.n_kv_heads != 0)
        fail(ErrorKind::invalid_arg, "memory heads: " + std::to_string(o.n_heads) + " query and " + std::to_string(o.n_kv_heads) +
                                         " KV heads of " + std::to_string(o.head_dim) + " (query heads a multiple of KV heads)");
    if (o.n_slots <= 0) fail(ErrorKind::invalid_arg, "the memory bank needs at least one slot");
    if (o.n_chapters < 0 || (o.n_chapters > 0 && o.n_slots % o.n_chapters != 0))
        fail(ErrorKind::invalid_arg, std::to_string(o.n_slots) + " memory slots do not split into " + std::to_string(o.n_chapters) +
                                         " chapters");
    if (o.n_shared < 0 || o.n_shared > o.n_chapters)
        fail(ErrorKind::invalid_arg, "shared chapters must be in [0, " + std::to_string(o.n_chapters) + "]");
    if (!std::isfinite(o.routed_scale) || o.routed_scale < 0) fail(ErrorKind::invalid_arg, "routed_scaling_factor must be >= 0");
    if (!(o.norm_eps > 0)) fail(ErrorKind::invalid_arg, "the memory norm's eps must be positive");
    set_routing(o.strategy, o.top_k, o.window);
}

MemoryLayers::~MemoryLayers() = default;

void MemoryLayers::set_routing(RoutingStrategy strategy, int64_t top_k, int64_t window) {
    if (options_.n_chapters > 0) {
        const int64_t routed = options_.n_chapters - options_.n_shared;
        if (top_k < 0 || top_k > routed)
            fail(ErrorKind::invalid_arg, "top_k must be in [0, " + std::to_string(routed) + "] (the routed chapters), got " +
                                             std::to_string(top_k));
        if (top_k == 0 && options_.n_shared == 0) fail(ErrorKind::invalid_arg, "top_k 0 with no shared chapters selects no memory");
    }
    if (window <= 0) fail(ErrorKind::invalid_arg, "window_size must be positive, got " + std::to_string(window));
    std::lock_guard<std::mutex> lock(mutex_);
    options_.strategy = strategy;
    options_.top_k = top_k;
    options_.window = window;
}

void MemoryLayers::add_layer(int64_t layer, std::vector<float> norm, std::vector<HostMatrix> q, std::vector<HostMatrix> o,
                             const HostMatrix& k, const HostMatrix& v, HostMatrix router, std::vector<float> router_bias) {
    const std::shared_ptr<const Model> model = model_.lock();
    if (!model) fail(ErrorKind::invalid_arg, "the memory's model is gone");
    const HParams& hp = model->hparams();
    const int64_t E = hp.n_embd, QD = int64_t{options_.n_heads} * options_.head_dim,
                  KD = int64_t{options_.n_kv_heads} * options_.head_dim, N = options_.n_slots, C = options_.n_chapters;
    const std::string at = "layer " + std::to_string(layer);
    if (layer < 0 || layer >= hp.n_layer)
        fail(ErrorKind::invalid_arg, "memory " + at + ": the model has " + std::to_string(hp.n_layer) + " layers");
    if (static_cast<int64_t>(norm.size()) != E)
        fail(ErrorKind::invalid_arg, "memory " + at + ": the norm weight has " + std::to_string(norm.size()) + " values, expected " +
                                         std::to_string(E));
    check_finite(norm, at + " norm");
    check_chain(q, E, QD, at + " query projection");
    check_chain(o, QD, E, at + " output projection");
    for (const HostMatrix* m : {&k, &v}) {
        if (m->rows != N || m->cols != KD || static_cast<int64_t>(m->data.size()) != N * KD)
            fail(ErrorKind::invalid_arg, "memory " + at + ": keys and values must be [" + std::to_string(N) + ", " + std::to_string(KD) +
                                             "], got [" + std::to_string(m->rows) + ", " + std::to_string(m->cols) + "]");
        check_finite(m->data, at + " keys / values");
    }
    if (C > 0) {
        if (router.rows != C || router.cols != E || static_cast<int64_t>(router.data.size()) != C * E ||
            static_cast<int64_t>(router_bias.size()) != C)
            fail(ErrorKind::invalid_arg, "memory " + at + ": the router must be [" + std::to_string(C) + ", " + std::to_string(E) +
                                             "] with a bias of " + std::to_string(C));
        check_finite(router.data, at + " router");
        check_finite(router_bias, at + " router bias");
    }

    auto L = std::make_unique<Layer>();
    L->layer = layer;
    L->norm_host = std::move(norm);
    L->q_host = std::move(q);
    L->o_host = std::move(o);
    if (C > 0) {
        L->router_host.push_back(std::move(router));
        L->router_bias = std::move(router_bias);
    }
    // [N, KD] -> [n_kv_heads][N][head_dim]: one head's slots contiguous, as the kernel reads them
    const int64_t hd = options_.head_dim;
    auto relayout = [&](const HostMatrix& m, std::vector<float>& dst) {
        dst.resize(static_cast<size_t>(N * KD));
        for (int64_t j = 0; j < N; ++j)
            for (int64_t h = 0; h < options_.n_kv_heads; ++h)
                std::memcpy(&dst[static_cast<size_t>((h * N + j) * hd)], &m.data[static_cast<size_t>(j * KD + h * hd)],
                            static_cast<size_t>(hd) * sizeof(float));
    };
    relayout(k, L->k);
    relayout(v, L->v);

    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& other : layers_)
        if (other->layer == layer) fail(ErrorKind::invalid_arg, "memory " + at + " is given twice");
    L->norm = backend_.upload_vector(L->norm_host.data(), L->norm_host.size());
    auto upload = [&](const HostMatrix& m) {
        return backend_.upload_weight(DType::f32, m.rows, m.cols, reinterpret_cast<const uint8_t*>(m.data.data()), nullptr,
                                      WeightUse::matmul);
    };
    for (const HostMatrix& m : L->q_host) L->q.push_back(upload(m));
    for (const HostMatrix& m : L->o_host) L->o.push_back(upload(m));
    if (C > 0)
        L->router = backend_.upload_weight(DType::f32, C, E, reinterpret_cast<const uint8_t*>(L->router_host[0].data.data()),
                                           L->router_bias.data(), WeightUse::matmul);
    for (const auto* chain : {&L->q_host, &L->o_host})
        if (chain->size() == 2) mid_cols_ = std::max(mid_cols_, (*chain)[0].rows);
    L->table.quant = layers_.empty() ? MemoryQuant::f32 : layers_[0]->table.quant;
    build_table(*L);
    layers_.push_back(std::move(L));
    rows_ = 0;   // the workspace is rebuilt with the new widths
}

// The table in its storage: f32 as is, or per row (head_dim values) int8 (scale absmax / 127) or
// int4 (absmax / 7, stored + 8 in a nibble).
void MemoryLayers::build_table(Layer& L) const {
    MemoryTable& t = L.table;
    t.n_slots = options_.n_slots;
    t.n_kv_heads = options_.n_kv_heads;
    t.head_dim = options_.head_dim;
    const int64_t hd = t.head_dim, rows = t.n_kv_heads * t.n_slots;
    const size_t rb = t.row_bytes();
    auto to_backend = [&](const void* bytes, size_t n, BackendBuffer& dst) {   // raw bytes through the float upload
        const size_t floats = (n + 3) / 4;
        std::vector<float> staging(floats, 0.0f);
        std::memcpy(staging.data(), bytes, n);
        dst = BackendBuffer(backend_, floats);
        backend_.upload(dst.get(), staging.data(), floats);
        return reinterpret_cast<const uint8_t*>(dst.get());
    };
    auto encode = [&](const std::vector<float>& src, BackendBuffer& data, BackendBuffer& scale, const uint8_t*& out,
                      const float*& out_scale) {
        if (t.quant == MemoryQuant::f32) {
            out = to_backend(src.data(), src.size() * sizeof(float), data);
            out_scale = nullptr;
            scale = BackendBuffer();
            return;
        }
        const float qmax = t.quant == MemoryQuant::int8 ? 127.0f : 7.0f;
        std::vector<uint8_t> bytes(static_cast<size_t>(rows) * rb, 0);
        std::vector<float> scales(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) {
            const float* x = &src[static_cast<size_t>(r * hd)];
            float amax = 0.0f;
            for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(x[d]));
            const float s = amax / qmax, inv = s > 0 ? 1.0f / s : 0.0f;
            scales[static_cast<size_t>(r)] = s;
            uint8_t* row = &bytes[static_cast<size_t>(r) * rb];
            for (int64_t d = 0; d < hd; ++d) {
                const int qv = static_cast<int>(std::lround(std::clamp(x[d] * inv, -qmax, qmax)));
                if (t.quant == MemoryQuant::int8) row[d] = static_cast<uint8_t>(static_cast<int8_t>(qv));
                else row[d / 2] |= static_cast<uint8_t>((qv + 8) << ((d & 1) * 4));
            }
        }
        out = to_backend(bytes.data(), bytes.size(), data);
        out_scale = reinterpret_cast<const float*>(to_backend(scales.data(), scales.size() * sizeof(float), scale));
    };
    encode(L.k, L.k_data, L.k_scale, t.k, t.k_scale);
    encode(L.v, L.v_data, L.v_scale, t.v, t.v_scale);
}

void MemoryLayers::set_quant(MemoryQuant quant) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& L : layers_) {
        L->table.quant = quant;
        build_table(*L);
    }
}

std::vector<int64_t> MemoryLayers::layers() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int64_t> out;
    for (const auto& L : layers_) out.push_back(L->layer);
    return out;
}

size_t MemoryLayers::table_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t total = 0;
    for (const auto& L : layers_) {
        const size_t rows = static_cast<size_t>(L->table.n_kv_heads * L->table.n_slots);
        total += 2 * rows * (L->table.row_bytes() + (L->table.quant == MemoryQuant::f32 ? 0 : sizeof(float)));
    }
    return total;
}

std::vector<std::pair<int64_t, float>> MemoryLayers::last_route(const KVCache& cache, int64_t layer) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto* st = static_cast<const State*>(cache.sequence_state(id_));
    for (size_t i = 0; i < layers_.size(); ++i)
        if (layers_[i]->layer == layer) {
            if (!st || i >= st->per.size()) return {};
            return st->per[i].last;
        }
    fail(ErrorKind::invalid_arg, "no memory layer after layer " + std::to_string(layer));
}

MemoryLayers::State& MemoryLayers::state_of(const KVCache& cache) const {
    auto* st = static_cast<State*>(cache.sequence_state(id_));
    if (!st) {
        auto fresh = std::make_unique<State>(options_.n_chapters);
        st = fresh.get();
        cache.set_sequence_state(id_, std::move(fresh));
    }
    if (st->per.size() < layers_.size()) st->per.resize(layers_.size());
    return *st;
}

// softmax over the chapters; the shared ones masked out and the rest renormalised; the top k of
// those, renormalised (sums clamped at 1e-12, as the trainer does). Joint strategies: one softmax
// over every chosen slot, a chapter's keys and values scaled by its weight (shared chapters weigh 1
// before all weights are normalised). Token: shared chapters one group, each routed chapter its own
// group weighted by routed_scale * w.
void MemoryLayers::route_row(const float* logits, std::vector<MemoryGroup>& groups, std::vector<MemorySpan>& spans,
                             std::vector<std::pair<int64_t, float>>* chosen) const {
    const int64_t C = options_.n_chapters, S = options_.n_shared, k = options_.top_k, tpc = options_.n_slots / C;
    std::vector<double> p(static_cast<size_t>(C));
    const double top = *std::max_element(logits, logits + C);
    double total = 0;
    for (int64_t c = 0; c < C; ++c) total += p[static_cast<size_t>(c)] = std::exp(static_cast<double>(logits[c]) - top);
    double routed_total = 0;
    for (int64_t c = 0; c < C; ++c) {
        p[static_cast<size_t>(c)] = c < S ? 0.0 : p[static_cast<size_t>(c)] / total;
        routed_total += p[static_cast<size_t>(c)];
    }
    for (double& x : p) x /= std::max(routed_total, 1e-12);
    std::vector<int64_t> order(static_cast<size_t>(C - S));
    for (int64_t i = 0; i < C - S; ++i) order[static_cast<size_t>(i)] = S + i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)]; });
    order.resize(static_cast<size_t>(k));
    double top_total = 0;
    for (int64_t c : order) top_total += p[static_cast<size_t>(c)];

    std::vector<std::pair<int64_t, double>> pick;   // (chapter, weight)
    const bool token = options_.strategy == RoutingStrategy::token;
    for (int64_t c = 0; c < S; ++c) pick.emplace_back(c, 1.0);
    for (int64_t c : order) {
        const double w = p[static_cast<size_t>(c)] / std::max(top_total, 1e-12);
        pick.emplace_back(c, token || S > 0 ? w * options_.routed_scale : w);
    }
    if (!token && S > 0) {
        double sum = 0;
        for (auto& [c, w] : pick) sum += w;
        for (auto& [c, w] : pick) w /= std::max(sum, 1e-12);
    }
    if (chosen) {
        chosen->clear();
        for (auto& [c, w] : pick) chosen->emplace_back(c, static_cast<float>(w));
    }
    auto span = [&](int64_t c, double kv) { spans.push_back({c * tpc, tpc, static_cast<float>(kv)}); };
    if (!token) {
        groups.push_back({static_cast<int32_t>(spans.size()), static_cast<int32_t>(pick.size()), 1.0f});
        for (auto& [c, w] : pick) span(c, w);
        return;
    }
    if (S > 0) {
        groups.push_back({static_cast<int32_t>(spans.size()), static_cast<int32_t>(S), 1.0f});
        for (int64_t c = 0; c < S; ++c) span(c, 1.0);
    }
    for (size_t i = static_cast<size_t>(S); i < pick.size(); ++i) {
        groups.push_back({static_cast<int32_t>(spans.size()), 1, static_cast<float>(pick[i].second)});
        span(pick[i].first, 1.0);
    }
}

void MemoryLayers::after_layer(const ForwardContext& ctx, int64_t layer, float* x) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < layers_.size(); ++i)
        if (layers_[i]->layer == layer) apply(ctx, *layers_[i], static_cast<int64_t>(i), x);
}

// x[T, E] += o(MemXAttn(q(rms_norm(x)))) for memory layer `index`, routed per row.
void MemoryLayers::apply(const ForwardContext& ctx, Layer& L, int64_t index, float* x) {
    const std::shared_ptr<const Model> model = model_.lock();
    if (!model) fail(ErrorKind::invalid_arg, "the memory's model is gone");
    Backend& be = ctx.backend;
    const int64_t T = ctx.n_rows, E = model->hparams().n_embd, C = options_.n_chapters;
    const int64_t QD = int64_t{options_.n_heads} * options_.head_dim;
    if (T > rows_) {   // workspace; complete before the old one goes
        auto n = [](int64_t v) { return static_cast<size_t>(std::max<int64_t>(v, 1)); };
        BackendBuffer h(be, n(T * E)), q(be, n(T * QD)), att(be, n(T * QD)), mid(be, n(T * mid_cols_)), out(be, n(T * E)),
            lg(be, n(T * C));
        h_ = std::move(h), q_ = std::move(q), att_ = std::move(att), mid_ = std::move(mid), out_ = std::move(out), logits_ = std::move(lg);
        rows_ = T;
    }

    // 1. routes: per row, the groups and spans of slots it attends to
    std::vector<MemoryRoute> routes(static_cast<size_t>(T));
    std::vector<MemoryGroup> groups;
    std::vector<MemorySpan> spans;
    if (C == 0) {   // one bank, every slot
        groups.push_back({0, 1, 1.0f});
        spans.push_back({0, options_.n_slots, 1.0f});
        std::fill(routes.begin(), routes.end(), MemoryRoute{0, 1});
    } else {
        const MatmulItem item{logits_.get(), &L.router};
        ctx.matmul(&item, 1, x);   // z[T, C] = W_r x + b
        std::vector<float> z(static_cast<size_t>(T * C));
        be.download(z.data(), logits_.get(), z.size());
        const int64_t W = options_.window;
        std::vector<float> mean(static_cast<size_t>(C));
        for (const BatchSegment& seg : ctx.segments) {
            State::PerLayer& st = state_of(*seg.cache).per[static_cast<size_t>(index)];
            if (static_cast<int64_t>(st.logits.size()) != seg.n_past * C)
                fail(ErrorKind::invalid_arg, "this cache holds " + std::to_string(seg.n_past) + " positions without the routing state "
                     "of the model's memory layers (a prefix adopted from another cache, or tokens cached before the memory was attached)");
            const float* zs = &z[static_cast<size_t>(seg.row0 * C)];
            st.logits.insert(st.logits.end(), zs, zs + seg.n_rows * C);
            if (seg.n_past == 0) {   // the first pass: its mean decides sequence routing
                st.prompt_len = seg.n_rows;
                st.prompt_mean.assign(static_cast<size_t>(C), 0.0f);
                for (int64_t c = 0; c < C; ++c) {
                    double s = 0;
                    for (int64_t i = 0; i < seg.n_rows; ++i) s += zs[i * C + c];
                    st.prompt_mean[static_cast<size_t>(c)] = static_cast<float>(s / static_cast<double>(seg.n_rows));
                }
            }
            bool prompt_route = false;   // the previous row used the prompt's route (rows share it)
            for (int64_t i = 0; i < seg.n_rows; ++i) {
                const int64_t t = seg.row0 + i, pos = seg.n_past + i;
                const RoutingStrategy s = options_.strategy;
                const bool by_prompt = s == RoutingStrategy::sequence || (s == RoutingStrategy::hybrid && pos < st.prompt_len);
                const bool newest = i == seg.n_rows - 1;
                if (by_prompt && prompt_route) {
                    routes[static_cast<size_t>(t)] = routes[static_cast<size_t>(t - 1)];
                    continue;
                }
                const float* lg = nullptr;
                if (by_prompt) {
                    lg = st.prompt_mean.data();
                } else if (s == RoutingStrategy::token) {
                    lg = zs + i * C;
                } else {   // rolling: the mean over the window ending at this position
                    const int64_t from = std::max<int64_t>(0, pos - W + 1);
                    for (int64_t c = 0; c < C; ++c) {
                        double acc = 0;
                        for (int64_t j = from; j <= pos; ++j) acc += st.logits[static_cast<size_t>(j * C + c)];
                        mean[static_cast<size_t>(c)] = static_cast<float>(acc / static_cast<double>(pos - from + 1));
                    }
                    lg = mean.data();
                }
                routes[static_cast<size_t>(t)].group0 = static_cast<int32_t>(groups.size());
                route_row(lg, groups, spans, newest || by_prompt ? &st.last : nullptr);
                routes[static_cast<size_t>(t)].n_groups = static_cast<int32_t>(groups.size()) - routes[static_cast<size_t>(t)].group0;
                prompt_route = by_prompt;
            }
        }
    }

    // 2. h = rms_norm(x); q = W_q h; att = memory attention; out = W_o att; x += out
    auto chain = [&](const std::vector<Weight>& ws, const float* in, float* dst) {
        if (ws.size() == 1) {
            const MatmulItem it{dst, &ws[0]};
            ctx.matmul(&it, 1, in);
            return;
        }
        const MatmulItem down{mid_.get(), &ws[0]}, up{dst, &ws[1]};
        ctx.matmul(&down, 1, in);
        ctx.matmul(&up, 1, mid_.get());
    };
    be.rms_norm(h_.get(), x, L.norm, T, E, options_.norm_eps);
    chain(L.q, h_.get(), q_.get());
    const AttentionShape shape{options_.n_heads, options_.n_kv_heads, options_.head_dim,
                               1.0f / std::sqrt(static_cast<float>(options_.head_dim))};
    be.memory_attention(att_.get(), q_.get(), T, routes.data(), groups.data(), spans.data(), L.table, shape);
    chain(L.o, att_.get(), out_.get());
    be.add(x, out_.get(), T * E);
}

}  // namespace tmill
