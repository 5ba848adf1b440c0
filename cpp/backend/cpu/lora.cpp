// Two parallel regions per projection group: (1) u[row, r] = scale * A x_row for every item's rows,
// in units of 16 rows of A (each unit writes whole cache lines of u, so the threads never share
// one); (2) out_row += u_row BT in units of 256 output columns. Each value is computed alone (a row
// of A against one x; a column of BT summed over r in order), so how the work is split, and which
// rows share the call, change nothing: a row gets a one-token pass's arithmetic in every rows mode.
// Items that add to the same output (a mixture of adapters on one sequence) share each unit of
// region 2 and add in item order: split across threads they would race on out, and even without a
// lost update the order of the two additions would change its rounding from run to run.
// Calls too small to pay for a parallel region's hand-off run on the calling thread.
#include "backend/cpu/lora.h"

#include <algorithm>
#include <functional>
#include <unordered_map>

#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {
constexpr int64_t kRowsPerUnit = 16;            // rows of A per unit of region 1
constexpr int64_t kColumnsPerUnit = 256;        // output columns per unit of region 2 (a multiple of 64)
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

// Where a unit of a region falls: item i, row t of it, and the unit's index k within that row, given
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

void lora_add(ThreadPool& pool, std::vector<float>& u, const LoraItem* items, int n_items) {
    const Kernels& kern = kernels();
    const size_t n = static_cast<size_t>(n_items);
    auto row_groups = [&](size_t i) { return (items[i].a->rows + kRowsPerUnit - 1) / kRowsPerUnit; };
    auto column_chunks = [&](size_t i) { return (items[i].bt->cols + kColumnsPerUnit - 1) / kColumnsPerUnit; };
    std::vector<int64_t> u_offset(n + 1, 0), first_a(n + 1, 0);
    // region 2 runs per output: outputs[o] lists the items adding to it, in item order
    std::vector<std::vector<size_t>> outputs;
    std::unordered_map<const float*, size_t> output_of;
    int64_t macs = 0;
    for (size_t i = 0; i < n; ++i) {
        const LoraItem& it = items[i];
        const int64_t r = it.a->rows;
        u_offset[i + 1] = u_offset[i] + (it.n_rows * r + 15) / 16 * 16;   // own cache lines
        first_a[i + 1] = first_a[i] + it.n_rows * row_groups(i);
        macs += it.n_rows * r * (it.a->cols + it.bt->cols);
        const auto [at, added] = output_of.try_emplace(it.out, outputs.size());
        if (added) outputs.emplace_back();
        outputs[at->second].push_back(i);
    }
    std::vector<int64_t> first_b(outputs.size() + 1, 0);
    for (size_t o = 0; o < outputs.size(); ++o)
        first_b[o + 1] = first_b[o] + items[outputs[o][0]].n_rows * column_chunks(outputs[o][0]);
    if (static_cast<int64_t>(u.size()) < u_offset[n]) u.resize(static_cast<size_t>(u_offset[n]));
    auto region = [&](int64_t units, const std::function<void(int64_t, int64_t, int)>& fn) {
        if (macs < kMinParallelMacs) fn(0, units, 0);
        else pool.parallel_for(units, fn);
    };

    region(first_a[n], [&](int64_t u0, int64_t u1, int) {
        for (int64_t unit = u0; unit < u1; ++unit) {
            const Unit at = unit_at(first_a, unit, row_groups);
            const LoraItem& it = items[at.i];
            const int64_t r = it.a->rows, n_in = it.a->cols, t = at.t;
            const int64_t j0 = at.k * kRowsPerUnit, nj = std::min(kRowsPerUnit, r - j0);
            float* ut = u.data() + u_offset[at.i] + t * r + j0;
            rows_dot(kern, *it.a, j0, nj, it.x + t * n_in, ut);
            for (int64_t j = 0; j < nj; ++j) ut[j] *= it.scale;
        }
    });
    region(first_b.back(), [&](int64_t u0, int64_t u1, int) {
        for (int64_t unit = u0; unit < u1; ++unit) {
            const Unit at = unit_at(first_b, unit, [&](size_t o) { return column_chunks(outputs[o][0]); });
            for (size_t i : outputs[at.i]) {
                const LoraItem& it = items[i];
                const int64_t r = it.a->rows, n_out = it.bt->cols, t = at.t;
                const int64_t c0 = at.k * kColumnsPerUnit, nc = std::min(kColumnsPerUnit, n_out - c0);
                rows_axpy(kern, *it.bt, c0, nc, u.data() + u_offset[i] + t * r, it.out + t * n_out + c0);
            }
        }
    });
}

}  // namespace tmill::cpu
