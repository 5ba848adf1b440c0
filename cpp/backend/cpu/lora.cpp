// Each value is computed alone (a row of A against one x; a column of BT summed over r in order),
// so how the work is split, and which rows share the call, change nothing: a row gets a one-token
// pass's arithmetic in every rows mode. Each item's u rows start on cache lines of their own. Items
// that add to the same output (a mixture of adapters on one sequence) share each up unit and add in
// item order: split across threads they would race on out, and even without a lost update the order
// of the two additions would change its rounding from run to run.
#include "backend/cpu/lora.h"

#include <algorithm>
#include <atomic>

#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {
constexpr int64_t kRowsPerUnit = 4;             // rows of A per down unit (threads take fixed shares: small, to balance)
constexpr int64_t kColumnsPerUnit = 256;        // output columns per up unit (a multiple of 64)
constexpr int64_t kMinParallelMacs = 1 << 14;   // smaller calls stay on the calling thread

// r rows of A (f32 or f16) against x -> out[r]
void rows_dot(const Kernels& kern, const Weight& w, int64_t j0, int64_t nj, const float* x, float* out) {
    if (w.type == DType::f16)
        kern.rows_dot_f16(reinterpret_cast<const uint16_t*>(w.data) + j0 * w.cols, nj, w.cols, x, out);
    else
        kern.rows_dot_f32(reinterpret_cast<const float*>(w.data) + j0 * w.cols, nj, w.cols, x, out);
}
// y[nc] += sum_j u[j] BT[j, c0..c0 + nc) (f32 or f16)
void rows_axpy(const Kernels& kern, const Weight& bt, int64_t c0, int64_t nc, const float* u, float* y) {
    if (bt.type == DType::f16)
        kern.rows_axpy_f16(y, reinterpret_cast<const uint16_t*>(bt.data) + c0, bt.rows, nc, bt.cols, u);
    else
        kern.rows_axpy_f32(y, reinterpret_cast<const float*>(bt.data) + c0, bt.rows, nc, bt.cols, u);
}

// Where a unit of one kind falls: item i, row t of it, and the unit's index k within that row, given
// each item's first unit and units per row (per_row(item)).
struct Unit {
    size_t i;
    int64_t t, k;
};
template <typename PerRow>
Unit unit_at(const std::vector<int64_t>& first, int64_t unit, const PerRow& per_row) {
    const size_t i = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), unit) - first.begin()) - 1;
    const int64_t local = unit - first[i], n = per_row(i);
    return {i, local / n, local % n};
}
}  // namespace

void LoraPlan::reset(const LoraItem* items, int n_items) {
    const size_t n = static_cast<size_t>(n_items);
    items_ = items;
    macs_ = 0;
    u_offset_.assign(n + 1, 0);
    first_down_.assign(n + 1, 0);
    first_up_.assign(1, 0);
    output_first_.assign(1, 0);
    for (size_t i = 0; i < n; ++i) {
        const LoraItem& it = items[i];
        const int64_t r = it.a->rows;
        u_offset_[i + 1] = u_offset_[i] + (it.n_rows * r + 15) / 16 * 16;
        first_down_[i + 1] = first_down_[i] + it.n_rows * ((r + kRowsPerUnit - 1) / kRowsPerUnit);
        macs_ += it.n_rows * r * (it.a->cols + it.bt->cols);
        if (i + 1 == n || items[i + 1].out != it.out) {   // the last item of its output
            output_first_.push_back(i + 1);
            first_up_.push_back(first_up_.back() + it.n_rows * ((it.bt->cols + kColumnsPerUnit - 1) / kColumnsPerUnit));
        }
    }
    if (u_.size() < static_cast<size_t>(u_offset_[n])) u_.resize(static_cast<size_t>(u_offset_[n]));
}

// u = scale * A x for kRowsPerUnit rows of A of one item's row
void LoraPlan::down(int64_t unit) {
    const Unit at = unit_at(first_down_, unit, [&](size_t i) { return (items_[i].a->rows + kRowsPerUnit - 1) / kRowsPerUnit; });
    const LoraItem& it = items_[at.i];
    const int64_t r = it.a->rows, n_in = it.a->cols;
    const int64_t j0 = at.k * kRowsPerUnit, nj = std::min(kRowsPerUnit, r - j0);
    float* ut = u_.data() + u_offset_[at.i] + at.t * r + j0;
    rows_dot(kernels(), *it.a, j0, nj, it.x + at.t * n_in, ut);
    for (int64_t j = 0; j < nj; ++j) ut[j] *= it.scale;
}

// out += u BT over kColumnsPerUnit columns of one output's row, its items in item order
void LoraPlan::up(int64_t unit) const {
    const Unit at = unit_at(first_up_, unit, [&](size_t o) {
        return (items_[output_first_[o]].bt->cols + kColumnsPerUnit - 1) / kColumnsPerUnit;
    });
    for (size_t i = output_first_[at.i]; i < output_first_[at.i + 1]; ++i) {
        const LoraItem& it = items_[i];
        const int64_t r = it.a->rows, n_out = it.bt->cols;
        const int64_t c0 = at.k * kColumnsPerUnit, nc = std::min(kColumnsPerUnit, n_out - c0);
        rows_axpy(kernels(), *it.bt, c0, nc, u_.data() + u_offset_[i] + at.t * r, it.out + at.t * n_out + c0);
    }
}

void run_lora(ThreadPool& pool, LoraPlan& plan, const std::function<void(int, int)>& before) {
    const int n_threads = pool.size();
    const int64_t n_down = plan.n_down(), n_up = plan.n_up();
    std::atomic<int> arrived{0};
    pool.run([&](int t) {
        try {
            if (before) before(t, n_threads);
            const auto [d0, d1] = fixed_share(n_down, t, n_threads);
            for (int64_t unit = d0; unit < d1; ++unit) plan.down(unit);
        } catch (...) {
            arrived.fetch_add(n_threads, std::memory_order_acq_rel);   // nobody waits for this thread
            throw;                                                     // pool.run rethrows it
        }
        arrived.fetch_add(1, std::memory_order_acq_rel);
        while (arrived.load(std::memory_order_acquire) < n_threads) tmill::cpu_relax();
        const auto [u0, u1] = fixed_share(n_up, t, n_threads);
        for (int64_t unit = u0; unit < u1; ++unit) plan.up(unit);
    });
}

void lora_add(ThreadPool& pool, LoraPlan& plan, const LoraItem* items, int n_items) {
    plan.reset(items, n_items);
    if (plan.macs() >= kMinParallelMacs && pool.size() > 1) return run_lora(pool, plan, nullptr);
    for (int64_t unit = 0; unit < plan.n_down(); ++unit) plan.down(unit);
    for (int64_t unit = 0; unit < plan.n_up(); ++unit) plan.up(unit);
}

}  // namespace tmill::cpu
