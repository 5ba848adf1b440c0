// Two parallel regions per projection group: (1) u[row, r] = scale * A x_row for every item's rows,
// in units of 16 rows of A (each unit writes whole cache lines of u, so the threads never share
// one); (2) out_row += u_row BT in units of 256 output columns. Each value is computed alone (a row
// of A against one x; a column of BT summed over r in order), so how the work is split, and which
// rows share the call, change nothing: a row gets a one-token pass's arithmetic in every rows mode.
// Calls too small to pay for a parallel region's hand-off run on the calling thread.
#include "backend/cpu/lora.h"

#include <algorithm>
#include <functional>

#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {
constexpr int64_t kRowsPerUnit = 16;            // rows of A per unit of region 1
constexpr int64_t kColumnsPerUnit = 256;        // output columns per unit of region 2 (a multiple of 64)
constexpr int64_t kMinParallelMacs = 1 << 14;   // smaller calls stay on the calling thread

const float* floats(const Weight& w) { return reinterpret_cast<const float*>(w.data); }

// index of the item that holds unit u, given each item's first unit
int item_of(const std::vector<int64_t>& first, int64_t u) {
    return static_cast<int>(std::upper_bound(first.begin(), first.end(), u) - first.begin()) - 1;
}
}  // namespace

void lora_add(ThreadPool& pool, std::vector<float>& u, const LoraItem* items, int n_items) {
    const Kernels& kern = kernels();
    const size_t n = static_cast<size_t>(n_items);
    std::vector<int64_t> u_offset(n + 1, 0), first_a(n + 1, 0), first_b(n + 1, 0);
    int64_t macs = 0;
    for (size_t i = 0; i < n; ++i) {
        const LoraItem& it = items[i];
        const int64_t r = it.a->rows;
        u_offset[i + 1] = u_offset[i] + (it.n_rows * r + 15) / 16 * 16;   // own cache lines
        first_a[i + 1] = first_a[i] + it.n_rows * ((r + kRowsPerUnit - 1) / kRowsPerUnit);
        first_b[i + 1] = first_b[i] + it.n_rows * ((it.bt->cols + kColumnsPerUnit - 1) / kColumnsPerUnit);
        macs += it.n_rows * r * (it.a->cols + it.bt->cols);
    }
    if (static_cast<int64_t>(u.size()) < u_offset[n]) u.resize(static_cast<size_t>(u_offset[n]));
    auto region = [&](int64_t units, const std::function<void(int64_t, int64_t, int)>& fn) {
        if (macs < kMinParallelMacs) fn(0, units, 0);
        else pool.parallel_for(units, fn);
    };

    region(first_a[n], [&](int64_t u0, int64_t u1, int) {
        for (int64_t unit = u0; unit < u1; ++unit) {
            const int i = item_of(first_a, unit);
            const LoraItem& it = items[i];
            const int64_t r = it.a->rows, n_in = it.a->cols, groups = (r + kRowsPerUnit - 1) / kRowsPerUnit;
            const int64_t local = unit - first_a[static_cast<size_t>(i)], t = local / groups;
            const int64_t j0 = (local % groups) * kRowsPerUnit, nj = std::min(kRowsPerUnit, r - j0);
            float* ut = u.data() + u_offset[static_cast<size_t>(i)] + t * r + j0;
            kern.rows_dot_f32(floats(*it.a) + j0 * n_in, nj, n_in, it.x + t * n_in, ut);
            for (int64_t j = 0; j < nj; ++j) ut[j] *= it.scale;
        }
    });
    region(first_b[n], [&](int64_t u0, int64_t u1, int) {
        for (int64_t unit = u0; unit < u1; ++unit) {
            const int i = item_of(first_b, unit);
            const LoraItem& it = items[i];
            const int64_t r = it.a->rows, n_out = it.bt->cols, chunks = (n_out + kColumnsPerUnit - 1) / kColumnsPerUnit;
            const int64_t local = unit - first_b[static_cast<size_t>(i)], t = local / chunks;
            const int64_t c0 = (local % chunks) * kColumnsPerUnit, nc = std::min(kColumnsPerUnit, n_out - c0);
            kern.rows_axpy_f32(it.out + t * n_out + c0, floats(*it.bt) + c0, r, nc, n_out,
                               u.data() + u_offset[static_cast<size_t>(i)] + t * r);
        }
    });
}

}  // namespace tmill::cpu
