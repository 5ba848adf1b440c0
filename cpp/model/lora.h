// LoRA adapters at run time: out += s * B (A x) after the projections an adapter targets, for the
// sequences whose adapter slot asks for it. A slot is a mix of adapters, each with its own scale
// ({"a": 1.0, "b": 0.5}); the base weights and their packed copies are never modified, so any mix
// costs only its low-rank products, and one batch may hold sequences on different slots.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "model/extension.h"
#include "model/model.h"

namespace tmill {

// One adapter's weights: for each (layer, projection) it targets, A [r, n_in] and B^T [r, n_out]
// (fp16 where that holds the pair's values exactly, else f32; handed to the backend) and its scale
// (lora_alpha / r, or / sqrt(r) with rsLoRA).
class LoraAdapter {
public:
    struct Pair {
        Weight a, bt;
        float scale = 1.0f;
    };
    // holds the model weakly: the model's LoraSet holds its adapters, so a strong reference would be a cycle
    explicit LoraAdapter(const std::shared_ptr<const Model>& model);
    // b is B [n_out, r] as PEFT stores it; shapes are checked against the model's projection
    void add(int64_t layer, Projection p, const float* a, int64_t r, int64_t n_in, const float* b, int64_t n_out,
             float scale);
    // After the last add: every pair moves into one arena in the order a forward pass reads them
    // (layer by layer, projection by projection), on huge pages where the kernel gives them, and is
    // handed to the backend once (a device backend uploads one block).
    void seal();
    bool sealed() const { return sealed_; }
    const Pair* find(int64_t layer, Projection p) const { return pairs_[index(layer, p)].get(); }
    int64_t n_pairs() const { return n_pairs_; }
    int64_t n_params() const { return n_params_; }
    // bytes of the stored pairs once sealed (a decode step reads each once)
    size_t bytes() const { return bytes_; }

private:
    struct Staged {
        int64_t r, n_in, n_out;
        float scale;
        std::vector<float> a, bt;   // A [r, n_in] and B^T [r, n_out]
    };
    size_t index(int64_t layer, Projection p) const { return static_cast<size_t>(layer) * 7 + static_cast<size_t>(p); }

    std::weak_ptr<const Model> model_;
    std::vector<std::unique_ptr<Staged>> staged_;   // [n_layer * 7] until sealed
    std::vector<std::unique_ptr<Pair>> pairs_;      // [n_layer * 7] once sealed
    std::unique_ptr<uint8_t, void (*)(void*)> arena_{nullptr, std::free};
    bool sealed_ = false;
    int64_t n_pairs_ = 0, n_params_ = 0;
    size_t bytes_ = 0;
};

// The model's adapters and slots, joined to its forward passes as an extension.
class LoraSet final : public ForwardExtension {
public:
    using Mix = std::vector<std::pair<std::shared_ptr<const LoraAdapter>, float>>;   // adapter, user scale
    // slot >= 0; an empty mix clears it
    void set_slot(int32_t slot, Mix mix);

    void low_rank_additions(const ForwardContext& ctx, int64_t layer, const ProjectionOutput* outs, int n,
                            const float* x, int64_t n_in, std::vector<LoraItem>& add) override;

private:
    std::mutex mutex_;                 // slots change from other threads while passes run
    std::map<int32_t, Mix> slots_;
};

}  // namespace tmill
