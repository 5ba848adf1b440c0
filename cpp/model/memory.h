// Memory-augmented models (the memory-transformer trainer's adapter mode over a frozen base model):
// after chosen decoder layers L, a memory layer reads and changes the residual stream,
//   x += o( MemXAttn( q(rms_norm(x)), the memory slots a router chose ) ),
// attention over a learned bank of N slots (no mask, no RoPE, GQA heads, scale head_dim^-0.5). The
// bank may be split into chapters of N / C slots; a router softmax(W x + b) over the C chapters picks
// the top k (renormalised) and the first n_shared chapters are always used. The bank is fixed at
// inference, so its keys and values (M W_k^T, M W_v^T) are computed once at load; a chapter's routing
// weight w scales its rows before the projections, which is w times their keys and values.
//
// Routing strategies (what the router is given, per row at position p):
//   sequence  the mean over the sequence's first pass (its prompt), decided there and kept while
//             decoding (the trainer's model re-routes from the newest token alone at each cached step)
//   rolling   the mean over positions (p - window, p]: causal, so a prompt and its token-by-token
//             decode route alike (the trainer routes a whole pass by the window ending at its last row)
//   token     the row alone; one softmax per chosen chapter, their outputs mixed by the weights
//   hybrid    sequence for the rows of the first pass, rolling after it
// The router is affine, so the mean of hidden states routes as the mean of their router logits: each
// sequence keeps [positions, C] logits per memory layer with its cache (cut back by rollback).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "model/extension.h"
#include "model/model.h"

namespace tmill {

enum class RoutingStrategy { sequence, rolling, token, hybrid };
RoutingStrategy routing_from_name(const std::string& name);
const char* routing_name(RoutingStrategy s);

struct MemoryOptions {
    int n_heads = 0, n_kv_heads = 0, head_dim = 0;   // the memory attention's heads
    int64_t n_slots = 0;      // N, slots of every bank
    int64_t n_chapters = 0;   // C; 0: no chapters (every slot, no router)
    int64_t n_shared = 0;     // the first chapters, always used
    int64_t top_k = 1;        // routed chapters per decision
    float routed_scale = 1.0f;   // routed chapters' weights relative to shared ones (routed_scaling_factor)
    float norm_eps = 1e-6f;
    RoutingStrategy strategy = RoutingStrategy::sequence;
    int64_t window = 128;
};

// A host matrix [rows, cols], row-major.
struct HostMatrix {
    int64_t rows = 0, cols = 0;
    std::vector<float> data;
};

class MemoryLayers final : public ForwardExtension {
public:
    MemoryLayers(const std::shared_ptr<const Model>& model, const MemoryOptions& options);
    ~MemoryLayers() override;

    // The memory layer after decoder layer `layer`: its RMSNorm weight [E]; q: W_q [H hd, E] or the
    // low-rank pair (down [r, E], up [H hd, r]); o likewise into [E]; k, v: the bank's keys and values
    // [N, n_kv_heads hd]; with chapters the router's weight [C, E] and bias [C].
    void add_layer(int64_t layer, std::vector<float> norm, std::vector<HostMatrix> q, std::vector<HostMatrix> o,
                   const HostMatrix& k, const HostMatrix& v, HostMatrix router, std::vector<float> router_bias);
    void set_routing(RoutingStrategy strategy, int64_t top_k, int64_t window);
    // how the tables of keys and values are stored and read: f32, or int8 / int4 with a scale per row
    void set_quant(MemoryQuant quant);
    const MemoryOptions& options() const { return options_; }
    std::vector<int64_t> layers() const;
    size_t table_bytes() const;   // keys, values and scales of every layer
    // The (chapter, weight) pairs the newest position of a cache was routed to at `layer`, shared
    // chapters first; empty before any pass.
    std::vector<std::pair<int64_t, float>> last_route(const KVCache& cache, int64_t layer) const;

    void after_layer(const ForwardContext& ctx, int64_t layer, float* x) override;

private:
    struct Layer;
    struct State;
    void build_table(Layer& L) const;
    State& state_of(const KVCache& cache) const;
    // appends one row's groups and spans to the route lists for router logits `logits` [C]
    void route_row(const float* logits, std::vector<MemoryGroup>& groups, std::vector<MemorySpan>& spans,
                   std::vector<std::pair<int64_t, float>>* chosen) const;
    void apply(const ForwardContext& ctx, Layer& L, int64_t index, float* x);

    std::weak_ptr<const Model> model_;
    std::shared_ptr<Backend> backend_holder_;   // the buffers below are freed through it, maybe after the model
    Backend& backend_;
    MemoryOptions options_;
    uint64_t id_;                    // key of this extension's state in caches
    mutable std::mutex mutex_;       // routing and tables change from other threads while passes run
    std::vector<std::unique_ptr<Layer>> layers_;
    BackendBuffer h_, q_, att_, mid_, out_, logits_;   // [T, E], [T, H hd], [T, H hd], [T, r], [T, E], [T, C]
    int64_t rows_ = 0, mid_cols_ = 0;
};

}  // namespace tmill
