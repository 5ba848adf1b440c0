// LoRA additions on the CPU (Backend::lora_add, and inside a projection group's pass).
#pragma once

#include <functional>
#include <vector>

#include "backend/backend.h"
#include "core/threadpool.h"

namespace tmill::cpu {

// The work of out += scale * (x A^T) BT for every item, cut into units of two kinds: a down unit
// computes u = scale * A x for some rows of A of one item's row; an up unit adds u BT to some
// columns of one output's row, summing the items that share that output in item order. Every up
// unit reads the u of down units, so all down units finish before any up unit starts; units of one
// kind are independent.
class LoraPlan {
public:
    // Lays out the units of items (items adding to the same output adjacent, as Backend::lora_add
    // asks), reusing the plan's buffers from call to call.
    void reset(const LoraItem* items, int n_items);
    int64_t n_down() const { return first_down_.back(); }
    int64_t n_up() const { return first_up_.back(); }
    int64_t macs() const { return macs_; }
    void down(int64_t unit);
    void up(int64_t unit) const;

private:
    const LoraItem* items_ = nullptr;
    int64_t macs_ = 0;
    std::vector<float> u_;               // scale * A x of every item's rows, each item's on cache lines of its own
    std::vector<int64_t> u_offset_;      // [n_items + 1]
    std::vector<int64_t> first_down_;    // [n_items + 1]: each item's first down unit
    std::vector<int64_t> first_up_;      // [n_outputs + 1]: each output's first up unit
    std::vector<size_t> output_first_;   // [n_outputs + 1]: the items of output o, [output_first_[o], output_first_[o + 1])
};

// A plan's units in one parallel region, each thread taking a fixed share: first its share of other
// work (before(thread, n_threads), e.g. the units of the projections the additions add to), then of
// the down units, then, once every thread has got that far, of the up units. Fixed shares because
// a decode step's regions last a few microseconds, and every cache line a shared work counter or a
// second region's hand-off passes between the cores costs a noticeable part of that.
void run_lora(ThreadPool& pool, LoraPlan& plan, const std::function<void(int, int)>& before);

// out += scale * B (A x) for every item: on the pool unless the call is too small to pay for it.
void lora_add(ThreadPool& pool, LoraPlan& plan, const LoraItem* items, int n_items);

}  // namespace tmill::cpu
