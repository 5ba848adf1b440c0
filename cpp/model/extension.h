// The places where something beyond the base weights joins a forward pass: a run-time adapter adds
// to a projection's output (LoRA: out += s * B (A x)), a module reads and changes the residual
// stream after a chosen layer (memory cross-attention). Extensions are registered on a Model and run
// inside its forward passes, through the model's backend, in registration order.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "backend/backend.h"

namespace tmill {

class KVCache;

// The projections of a decoder layer, by role.
enum class Projection { q, k, v, o, gate, up, down };
const char* projection_name(Projection p);

// One sequence of the running batch, as extensions see it: its rows of the activations
// [row0, row0 + n_rows), its cache (identity and per-sequence state), and its adapter slot.
struct BatchSegment {
    int64_t row0;
    int64_t n_rows;
    int64_t n_past;     // positions cached before this pass
    const KVCache* cache;
    int32_t adapter;    // the adapter slot the sequence asked for; -1: none
};

// One output of a projection group: out[T, n_out] = W x + b of projection `role`.
struct ProjectionOutput {
    Projection role;
    float* out;
    int64_t n_out;
};

struct ForwardContext {
    Backend& backend;
    const std::vector<BatchSegment>& segments;
    int64_t n_rows;     // T, all sequences together
    // items[i].out[T, rows] = x[T, cols] W_i^T + b for all T rows, with the arithmetic the model uses
    // for its own projections in this pass (decode rows as decode steps, prompt rows batch-invariant)
    std::function<void(const MatmulItem* items, int n, const float* x)> matmul;
};

class ForwardExtension {
public:
    virtual ~ForwardExtension() = default;
    // Before a group of `layer`'s projections that share the input x[T, n_in] (Q/K/V, gate/up, or one
    // alone; backend memory) is computed: low-rank additions to its outputs outs[i].out[T, n_out],
    // appended to `add`. The backend runs them with the projections (Backend::matmul_group_lora),
    // before any extension's after_projections.
    virtual void low_rank_additions(const ForwardContext& ctx, int64_t layer, const ProjectionOutput* outs, int n,
                                    const float* x, int64_t n_in, std::vector<LoraItem>& add) {
        (void)ctx, (void)layer, (void)outs, (void)n, (void)x, (void)n_in, (void)add;
    }
    // outs[i].out[T, n_out] hold W x + b (and the low-rank additions) of a group of `layer`'s
    // projections that share the input x[T, n_in] (backend memory)
    virtual void after_projections(const ForwardContext& ctx, int64_t layer, const ProjectionOutput* outs, int n,
                                   const float* x, int64_t n_in) {
        (void)ctx, (void)layer, (void)outs, (void)n, (void)x, (void)n_in;
    }
    // x[T, n_embd] is the residual stream after `layer` (its attention and MLP added)
    virtual void after_layer(const ForwardContext& ctx, int64_t layer, float* x) { (void)ctx, (void)layer, (void)x; }
};

}  // namespace tmill
