// The matmul dispatch of the CPU backend: units of rows across a group's weights, each run on the
// kernel its product takes (chosen in matmul_choice.cpp), and the activations each kernel family
// needs prepared once per call.
#include "backend/cpu/matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include <sys/mman.h>

#include "backend/cpu/kernels.h"
#include "core/error.h"
#include "core/quants.h"

namespace tmill::cpu {

namespace {

// Prefill reads weights in column chunks of at most this many values: a tile's dequantized rows
// (8 x 960 floats, 30 KiB) stay in L1 and the chunk of x (128 tokens: 480 KiB of floats, 120 KiB as
// int8) in L2. Chunks are the outer loop, so every row tile of a chunk finds that part of x already
// there. (Not 1024: 4 KiB row strides ran ~5 % slower; 1,024 columns go as 2 x 512, 2,048 as 3 x 704.)
constexpr int64_t kPrefillColumnChunk = 960;
// ... and more tokens than this go through a matmul in (near-equal) blocks of at most this many, so
// that chunk of x (256 x 960 floats, 960 KiB) is still in L2 when the next row tile reads it: an
// encoder batch of 4,096 rows otherwise streams x from memory once per row tile (MiniLM, 2 cores:
// 5.8k -> 10.7k tokens/s). Each token's arithmetic is the same in any block.
constexpr int64_t kTokenBlock = 256;
// A product on the decode kernels (decode steps, small batches: regions of a few to some tens of
// microseconds) is cut into this many chunks per thread, not parallel_for's usual 8: every chunk
// taken from the shared counter passes its cache line between the cores, and with units this uniform
// the balance that finer chunks buy costs more than it saves (SmolLM2 Q4_1 decode, 2 threads: 1
// chunk 1.04-1.10x the speed of 8; 16 sequences int8 1.02-1.13x).
constexpr int kOnePassChunksPerThread = 1;
// Rows-as-decode passes run float weight rows against this many tokens per call
constexpr int kMaxExactTokens = 32;

// the bias of row r (0 without one)
float bias_at(const Weight& w, int64_t r) { return w.bias ? w.bias[r] : 0.0f; }
const uint8_t* q8_0_strip(const Weight& w, int64_t r0) { return w.packed + static_cast<size_t>(r0 / 16) * q8_0_strip_bytes(w.cols); }
// the eight-row group of a packed weight that holds row r, from block column k0 / 32 on
const uint8_t* packed_group(const Weight& w, int64_t r, int64_t k0 = 0) {
    return w.packed + static_cast<size_t>(r / 8 * (w.cols / 32) + k0 / 32) * packed8_column_bytes(w.type);
}

// One token's results for rows r0.. of a column chunk: the first chunk writes them (plus the
// bias), later ones add.
void store_chunk(float* dst, const float* o, int64_t nr, const Weight& w, int64_t r0, int64_t k0) {
    if (k0 == 0)
        for (int64_t r = 0; r < nr; ++r) dst[r] = o[r] + bias_at(w, r0 + r);
    else
        for (int64_t r = 0; r < nr; ++r) dst[r] += o[r];
}

}  // namespace

Matmul::Matmul(ThreadPool& pool, bool int8_prefill, bool int8_decode)
    : pool_(pool), scratch_(static_cast<size_t>(pool.size())), int8_prefill_(int8_prefill), int8_decode_(int8_decode) {}

// q4_0 / q4_1 / q4_k / q5_* matrices get the eight-row layout where the level has a kernel for it;
// decode then reads only that copy, prefill dequantizes (or, with int8 prefill, repacks) rows from
// it. Q8_0 matrices get strips of sixteen rows for decode where the level has those kernels;
// prefill and other levels read the original. The other block-quantized matrices are copied as
// they are into the same huge-page chunks, which decode streams faster than the file's map (a
// 1B-shape Q6_K +9 %, Gemma 3 Q4_K_M with its q8_0 output matrix +23-27 %). Either way the mapped
// original goes cold (the model releases it).
void Matmul::pack(Weight& w) {
    const Kernels& kern = kernels();
    if (w.type == DType::q8_0 && kern.dot_q8_0_strip && kern.dot_q8_0_strip_int8 && kern.prepare_x8 && w.cols % 32 == 0) {
        const int64_t strips = (w.rows + 15) / 16;
        const size_t bytes = q8_0_strip_bytes(w.cols);
        uint8_t* dst = pack_space(bytes * static_cast<size_t>(strips));
        pool_.parallel_for(strips, [&](int64_t s0, int64_t s1, int) {
            for (int64_t s = s0; s < s1; ++s)
                pack_q8_0_strip(w.data + static_cast<size_t>(16 * s) * w.row_stride, w.row_stride,
                                static_cast<int>(std::min<int64_t>(16, w.rows - 16 * s)), w.cols, dst + s * bytes);
        });
        w.packed = dst;
        return;
    }
    if (!kern.dot_packed8 || !packable8(w.type) || w.rows % 8 != 0 || w.cols % 32 != 0) {
        if (uses_prepared_x(kern, w.type)) {
            const size_t stride = w.row_stride;
            uint8_t* dst = pack_space(static_cast<size_t>(w.rows) * stride);
            const uint8_t* src = w.data;
            pool_.parallel_for(w.rows, [&](int64_t r0, int64_t r1, int) {
                std::memcpy(dst + r0 * stride, src + r0 * stride, static_cast<size_t>(r1 - r0) * stride);
            });
            w.data = dst;
        }
        return;
    }
    const size_t group_bytes = static_cast<size_t>(w.cols / 32) * packed8_column_bytes(w.type);
    uint8_t* dst = pack_space(group_bytes * static_cast<size_t>(w.rows / 8));
    pool_.parallel_for(w.rows / 8, [&](int64_t g0, int64_t g1, int) {
        for (int64_t g = g0; g < g1; ++g)
            pack_rows8(w.type, w.data + static_cast<size_t>(8 * g) * w.row_stride, w.row_stride, w.cols,
                            dst + static_cast<size_t>(g) * group_bytes);
    });
    w.packed = dst;
}

// Room for a weight's copy: copies follow each other in chunks of at least 64 MB, 2 MB-aligned
// and advised as huge pages -- decode streams every copy once per token, and on 4 KB pages the
// TLB misses cost 5-15 % of decode (SmolLM2 Q4_1 174-178 -> 184-191 tok/s, a 1B-shape Q4_K
// 25.4-26.1 -> 27.6-27.8, 2 threads). Huge pages of their own would triple SmolLM2's memory.
uint8_t* Matmul::pack_space(size_t bytes) {
    constexpr size_t kHuge = size_t{2} << 20, kChunk = size_t{64} << 20;
    bytes = (bytes + 63) / 64 * 64;
    if (packed_.empty() || pack_used_ + bytes > pack_size_) {
        const size_t size = std::max(kChunk, (bytes + kHuge - 1) / kHuge * kHuge);
        packed_.emplace_back(static_cast<uint8_t*>(std::aligned_alloc(kHuge, size)), std::free);
        if (!packed_.back()) {
            packed_.pop_back();
            fail(ErrorKind::resource, "no memory for the copies of the weights (" + std::to_string(size) + " bytes)");
        }
#ifdef MADV_HUGEPAGE
        madvise(packed_.back().get(), size, MADV_HUGEPAGE);   // a hint: without huge pages all still works
#endif
        pack_used_ = 0;
        pack_size_ = size;
    }
    uint8_t* at = packed_.back().get() + pack_used_;
    pack_used_ += bytes;
    return at;
}

// Several products of the same input share parallel regions (and, for the integer kernels, one
// preparation of x). Work is cut into units of rows across all the weights: 16 for the int8
// prefill kernel and AMX decode, 8 for packed decode, the level's tile height for the float tile,
// else 4. LoRA additions of a pass whose product runs in one region (decode steps, small batches)
// join that region: each thread goes on from a fixed share of the weights' units to its share of
// the additions, instead of a region of their own -- per projection group one hand-off to the
// workers and one wait for the slowest thread fewer.
void Matmul::run(const MatmulItem* items, int n_items, const float* x, int64_t T, const LoraItem* lora, int n_lora,
                 LoraPlan& lora_plan, RowsMode mode) {
    mode_ = mode;
    int8_rows_ = decode_sized(T) ? int8_decode_ : int8_prefill_;
    const int64_t cols = items[0].w->cols;
    if (T > kTokenBlock) {   // activations meet the weights a block of tokens at a time
        const int64_t n_blocks = (T + kTokenBlock - 1) / kTokenBlock, block = (T + n_blocks - 1) / n_blocks;
        std::vector<MatmulItem> part(items, items + n_items);
        for (int64_t t0 = 0; t0 < T; t0 += block) {
            for (int i = 0; i < n_items; ++i) part[i].out = items[i].out + t0 * items[i].w->rows;
            run(part.data(), n_items, x + t0 * cols, std::min(block, T - t0), nullptr, 0, lora_plan, mode);
        }
        if (n_lora > 0) lora_add(pool_, lora_plan, lora, n_lora);
        return;
    }
    const Kernels& kern = kernels();
    const bool small_batch = decode_sized(T);
    bool any_prepared = false, any_prepared_k = false, any_packed = false, any_tile16 = false, any_tile = false,
         any_int8 = false, any_packed_exact = false, any_strips = false;
    std::vector<int64_t> first_unit(static_cast<size_t>(n_items) + 1, 0);
    for (int i = 0; i < n_items; ++i) {
        const Weight& w = *items[i].w;
        const bool packed = uses_packed(kern, w, T), tile16 = uses_tile16(kern, w, T), tile = uses_tile(kern, w, T);
        const bool strips = uses_q8_0_strips(kern, w, T);
        any_packed |= packed || strips;
        any_strips |= strips;
        // the readers of prepare_x8's parts 2..4, and of x rounded to int8
        any_packed_exact |= (packed && !uses_int8_x(kern)) || (strips && !int8_rows_);
        any_int8 |= (packed && uses_int8_x(kern)) || (strips && int8_rows_) || (small_batch && uses_int8_q8_0(kern, w));
        any_tile16 |= tile16;
        any_tile |= tile;
        const bool prepared = !packed && !strips && small_batch && uses_prepared_x(kern, w.type) && !uses_int8_q8_0(kern, w);
        (superblock_x(w.type) ? any_prepared_k : any_prepared) |= prepared;
        const int64_t unit_rows =
            tile16 || strips || uses_amx(kern, w, T) ? 16 : packed ? packed_unit_rows(kern) : tile ? tile_unit_rows(kern, w) : 4;
        first_unit[i + 1] = first_unit[i] + (w.rows + unit_rows - 1) / unit_rows;
    }
    const int64_t nb = cols / 32;
    auto prepare = [&](PreparedX& p, auto prepare_fn) {
        p.q.resize(static_cast<size_t>(2 * T * cols));
        p.d.resize(static_cast<size_t>(T * nb));
        p.sum.resize(static_cast<size_t>(T * nb));
        for (int64_t t = 0; t < T; ++t)
            prepare_fn(x + t * cols, cols, p.q.data() + 2 * t * cols, p.d.data() + t * nb, p.sum.data() + t * nb);
    };
    if (any_prepared) prepare(x32_, kern.prepare_x);
    if (any_prepared_k) prepare(x256_, kern.prepare_x_k);
    if (any_packed || any_tile16 || any_int8) {
        xq8_.resize(static_cast<size_t>(4 * T * cols));
        xd8_.resize(static_cast<size_t>(T * nb));
        xsum8_.resize(static_cast<size_t>(T * nb));
        const bool rounded = any_tile16 || any_int8;
        if (any_strips) xpart_sums_.resize(static_cast<size_t>(2 * T * nb));
        if (rounded) {
            xa_.resize(static_cast<size_t>(T * cols));
            xsum_rounded_.resize(static_cast<size_t>(T * nb));
        }
        pool_.parallel_for(T, [&](int64_t t0, int64_t t1, int) {
            for (int64_t t = t0; t < t1; ++t) {
                int8_t* q = xq8_.data() + 4 * t * cols;
                kern.prepare_x8(x + t * cols, cols, q, xd8_.data() + t * nb, xsum8_.data() + t * nb, any_packed_exact ? 4 : 1);
                if (any_strips && !int8_rows_) q8_0_part_sums(q, cols, xpart_sums_.data() + 2 * t * nb);
                if (rounded)   // (with int8 decode's strips, their offsets' integer block sums too)
                    first_part(q, xd8_.data() + t * nb, cols, xa_.data() + t * cols, xsum_rounded_.data() + t * nb,
                               any_strips && int8_rows_ ? xpart_sums_.data() + 2 * t * nb : nullptr);
            }
        });
    }
    // column chunks [k0, k0 + chunk) for the tile paths, whole blocks of every weight's type (256
    // values for the K-quants); the other paths run in the first pass
    int64_t block = 32;
    for (int i = 0; i < n_items; ++i) block = std::max<int64_t>(block, dtype_info(items[i].w->type).block_size);
    const int64_t n_chunks = any_tile ? (cols + kPrefillColumnChunk - 1) / kPrefillColumnChunk : 1;
    if (n_chunks == 1 && n_lora > 0) {
        lora_plan.reset(lora, n_lora);
        run_lora(pool_, lora_plan, [&](int thread, int n_threads) {
            const auto [u0, u1] = fixed_share(first_unit[n_items], thread, n_threads);
            if (u0 < u1) matmul_units(items, first_unit, x, T, u0, u1, thread, 0, cols);
        });
        return;
    }
    const int64_t chunk = (cols / n_chunks + block - 1) / block * block;
    const int chunks_per_thread = any_tile ? 8 : kOnePassChunksPerThread;
    for (int64_t k0 = 0; k0 < cols; k0 += chunk)
        pool_.parallel_for(first_unit[n_items], [&](int64_t u0, int64_t u1, int thread) {
            matmul_units(items, first_unit, x, T, u0, u1, thread, k0, std::min(chunk, cols - k0));
        }, chunks_per_thread);
    if (n_lora > 0) lora_add(pool_, lora_plan, lora, n_lora);
}

// Units [u0, u1) of a matmul_group; tile-path units cover columns [k0, k0 + kn) and add to out
// after the first chunk, the others run whole when k0 = 0.
void Matmul::matmul_units(const MatmulItem* items, const std::vector<int64_t>& first_unit, const float* x, int64_t T,
                  int64_t u0, int64_t u1, int thread, int64_t k0, int64_t kn) {
    const int64_t cols = items[0].w->cols, nb = cols / 32;
    const Kernels& kern = kernels();
    for (int64_t u = u0; u < u1; ++u) {
        int i = static_cast<int>(std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin()) - 1;
        const Weight& w = *items[i].w;
        float* out = items[i].out;
        if (!uses_tile(kern, w, T) && k0 > 0) continue;
        if (uses_amx(kern, w, T)) {
            amx_unit(w, out, T, 16 * (u - first_unit[i]), thread);
            continue;
        }
        if (uses_q8_0_strips(kern, w, T)) {
            q8_0_strip_unit(w, out, 16 * (u - first_unit[i]), 0, T);
            continue;
        }
        if (uses_packed(kern, w, T)) {   // the unit's groups against every token, sharing the unpacking
            packed_tokens(w, out, packed_unit_rows(kern) * (u - first_unit[i]), 0, T);
            continue;
        }
        const int64_t rows = w.rows;
        auto row_ptr = [&](int64_t r) { return w.data + static_cast<size_t>(r) * w.row_stride; };
        if (!uses_tile(kern, w, T)) {
            const int64_t r0 = 4 * (u - first_unit[i]), r1 = std::min<int64_t>(r0 + 4, rows);
            if (uses_int8_q8_0(kern, w)) {   // int8 decode: the unit's rows against four tokens at a time
                q8_0_int8_rows(w, out, r0, r1, 0, T);
                continue;
            }
            if (!uses_prepared_x(kern, w.type) && T == 1) {   // decode: straight from the stored type
                for (int64_t r = r0; r < r1; ++r) out[r] = kern.dot_row(w.type, row_ptr(r), x, cols) + bias_at(w, r);
                continue;
            }
            if (!uses_prepared_x(kern, w.type)) {   // rows as decode: the same arithmetic, per tile
                // the unit's rows against every token, in register tiles with dot_row's arithmetic
                const void* unit_rows[4];
                const float* xs[kMaxExactTokens];
                float o[4 * kMaxExactTokens];
                for (int64_t r = r0; r < r1; ++r) unit_rows[r - r0] = row_ptr(r);
                for (int64_t t0 = 0; t0 < T; t0 += kMaxExactTokens) {
                    const int nt = static_cast<int>(std::min<int64_t>(kMaxExactTokens, T - t0));
                    for (int k = 0; k < nt; ++k) xs[k] = x + (t0 + k) * cols;
                    kern.dot_rows_tokens(w.type, unit_rows, static_cast<int>(r1 - r0), xs, nt, cols, o);
                    for (int64_t r = r0; r < r1; ++r)
                        for (int k = 0; k < nt; ++k) out[(t0 + k) * rows + r] = o[(r - r0) * nt + k] + bias_at(w, r);
                }
                continue;
            }
            // integer dots; each row stays in L1 while the tokens pass, four per widening (the same
            // arithmetic per token as one at a time, so rows as decode take this path too)
            const PreparedX& px = superblock_x(w.type) ? x256_ : x32_;
            for (int64_t r = r0; r < r1; ++r) {
                int64_t t = 0;
                for (; t + 4 <= T; t += 4) {
                    float o[4];
                    kern.dot_row_prepared_x4(w.type, row_ptr(r), px.q.data() + 2 * t * cols, px.d.data() + t * nb,
                                             px.sum.data() + t * nb, cols, o);
                    for (int k = 0; k < 4; ++k) out[(t + k) * rows + r] = o[k] + bias_at(w, r);
                }
                for (; t < T; ++t)
                    out[t * rows + r] = kern.dot_row_prepared(w.type, row_ptr(r), px.q.data() + 2 * t * cols,
                                                              px.d.data() + t * nb, px.sum.data() + t * nb, cols) +
                                        bias_at(w, r);
            }
            continue;
        }
        if (uses_tile16(kern, w, T)) {
            tile16_unit(w, out, T, u - first_unit[i], thread, k0, kn);
            continue;
        }
        // prefill: dequantize the unit's rows (columns k0..k0 + kn), then run the tokens past them a
        // tile (tr rows) at a time
        const int64_t tr = kern.tile_rows, unit = tile_unit_rows(kern, w), r0 = unit * (u - first_unit[i]);
        const int64_t nr_unit = std::min(unit, rows - r0);
        float* buf = scratch(thread, (unit + 1) * kn);   // the rows, then room for one packed row's bytes
        if (packed8(w) && kern.dequantize_packed8) {   // r0 is a group's first row
            kern.dequantize_packed8(w.type, packed_group(w, r0, k0), kn, buf, kn);
        } else {
            for (int64_t k = 0; k < unit; ++k) {
                float* dst = buf + k * kn;
                const int64_t r = r0 + k;
                if (k >= nr_unit) {
                    std::fill(dst, dst + kn, 0.0f);   // padding rows
                } else if (packed8(w)) {   // a level without the packed kernels, after the load
                    uint8_t* row = reinterpret_cast<uint8_t*>(buf + unit * kn);
                    unpack_row8(w.type, packed_group(w, r, k0), kn, static_cast<int>(r % 8), row);
                    kern.dequantize_row(w.type, row, dst, kn);
                } else {
                    kern.dequantize_row(w.type, row_ptr(r) + row_bytes(w.type, k0), dst, kn);
                }
            }
        }
        const int64_t width = kern.tile_tokens;
        const float* xs[kMaxTileTokens];
        float o[kMaxTileRows * kMaxTileTokens];
        for (int64_t sub = 0; sub < nr_unit; sub += tr) {
            const int64_t nr = std::min(tr, nr_unit - sub);
            for (int64_t t = 0; t < T; t += width) {
                for (int64_t k = 0; k < width; ++k)   // a short last tile repeats the last token
                    xs[k] = x + std::min(t + k, T - 1) * cols + k0;
                kern.dot_f32_tile(buf + sub * kn, kn, xs, kn, o);
                for (int64_t k = 0; k < width && t + k < T; ++k)
                    store_chunk(out + (t + k) * rows + r0 + sub, o + tr * k, nr, w, r0 + sub, k0);
            }
        }
    }
}

// The packed unit at r0 (one or two groups: packed_unit_rows) against tokens [t0, t1),
// kPackedTokens per call of the tokens kernel (exact, or int8 decode's): both groups at once where
// the sixteen-row kernel pays for this many tokens (packed_as_sixteen), else group by group (the
// same bits either way)
void Matmul::packed_tokens(const Weight& w, float* out, int64_t r0, int64_t t0, int64_t t1) {
    const Kernels& kern = kernels();
    const int64_t cols = w.cols, nb = cols / 32, unit_rows = std::min(packed_unit_rows(kern), w.rows - r0);
    const bool int8 = uses_int8_x(kern), sixteen = unit_rows == 16 && packed_as_sixteen(kern, t1 - t0);
    const int rows = sixteen ? 16 : 8;
    constexpr int NT = kPackedTokens;
    const int8_t* a[NT];
    const float *d[NT], *sum[NT];
    float o[16 * NT];
    for (int64_t t = t0; t < t1; t += NT) {
        const int nt = static_cast<int>(std::min<int64_t>(NT, t1 - t));
        for (int k = 0; k < nt; ++k) {
            a[k] = int8 ? xa_.data() + (t + k) * cols : xq8_.data() + 4 * (t + k) * cols;
            d[k] = xd8_.data() + (t + k) * nb;
            sum[k] = (int8 ? xsum_rounded_.data() : xsum8_.data()) + (t + k) * nb;
        }
        for (int64_t g0 = r0; g0 < r0 + unit_rows; g0 += rows) {
            if (sixteen)
                (int8 ? kern.dot_packed16_int8_tokens : kern.dot_packed16_tokens)(
                    w.type, packed_group(w, g0), packed_group(w, g0 + 8), a, d, sum, nt, cols, o);
            else
                (int8 ? kern.dot_packed8_int8_tokens : kern.dot_packed8_tokens)(w.type, packed_group(w, g0), a, d, sum,
                                                                                nt, cols, o);
            for (int k = 0; k < nt; ++k)
                for (int j = 0; j < rows; ++j) out[(t + k) * w.rows + g0 + j] = o[rows * k + j] + bias_at(w, g0 + j);
        }
    }
}

// The Q8_0 strip of sixteen rows from r0 against tokens [t0, t1), kPackedTokens per call (exact
// decode, or int8 decode's)
void Matmul::q8_0_strip_unit(const Weight& w, float* out, int64_t r0, int64_t t0, int64_t t1) {
    const Kernels& kern = kernels();
    const int64_t cols = w.cols, nb = cols / 32, rows = std::min<int64_t>(16, w.rows - r0);
    const int8_t* q[kPackedTokens];
    const float* d[kPackedTokens];
    const int32_t* s[kPackedTokens];
    float o[16 * kPackedTokens];
    for (int64_t t = t0; t < t1; t += kPackedTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kPackedTokens, t1 - t));
        for (int k = 0; k < nt; ++k) {
            q[k] = int8_rows_ ? xa_.data() + (t + k) * cols : xq8_.data() + 4 * (t + k) * cols;
            d[k] = xd8_.data() + (t + k) * nb;
            s[k] = xpart_sums_.data() + 2 * (t + k) * nb;
        }
        (int8_rows_ ? kern.dot_q8_0_strip_int8 : kern.dot_q8_0_strip)(q8_0_strip(w, r0), q, d, s, nt, cols, o);
        for (int k = 0; k < nt; ++k)
            for (int64_t r = 0; r < rows; ++r) out[(t + k) * w.rows + r0 + r] = o[16 * k + r] + bias_at(w, r0 + r);
    }
}

// int8 decode's Q8_0 rows [r0, r1) against tokens [t0, t1), four rows and four tokens per call
void Matmul::q8_0_int8_rows(const Weight& w, float* out, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const Kernels& kern = kernels();
    const int64_t cols = w.cols, nb = cols / 32;
    const void* unit_rows[4];
    const int8_t* a[kPackedTokens];
    const float* d[kPackedTokens];
    float o[4 * kPackedTokens];
    for (int64_t q0 = r0; q0 < r1; q0 += 4) {
        const int nr = static_cast<int>(std::min<int64_t>(4, r1 - q0));
        for (int r = 0; r < nr; ++r) unit_rows[r] = w.data + static_cast<size_t>(q0 + r) * w.row_stride;
        for (int64_t t = t0; t < t1; t += kPackedTokens) {
            const int nt = static_cast<int>(std::min<int64_t>(kPackedTokens, t1 - t));
            for (int k = 0; k < nt; ++k) {
                a[k] = xa_.data() + (t + k) * cols;
                d[k] = xd8_.data() + (t + k) * nb;
            }
            kern.dot_q8_0_int8(unit_rows, nr, a, d, nt, cols, o);
            for (int r = 0; r < nr; ++r)
                for (int k = 0; k < nt; ++k) out[(t + k) * w.rows + q0 + r] = o[r * nt + k] + bias_at(w, q0 + r);
        }
    }
}

// Decode rows on AMX, the unit of sixteen rows from r0 (two packed groups, or a Q8_0 strip) against
// the tokens, kAmxTokens at a time, x read as prepared (rounded, or prepare_x8's four parts); a last
// chunk of fewer than amx_min_tokens takes the VNNI kernels, whose bits are the same. Packed groups
// met by more than one chunk are laid out as B tiles once, in the thread's scratch, not per chunk
// (the lay-out is a fifth of the exact kernel's vector work and more of int8's).
void Matmul::amx_unit(const Weight& w, float* out, int64_t T, int64_t r0, int thread) {
    const Kernels& kern = kernels();
    const int64_t nb = w.cols / 32;
    const bool int8 = uses_int8_x(kern), strips = q8_0_strips(w);
    const uint8_t* b = !strips && r0 + 8 < w.rows ? packed_group(w, r0 + 8) : nullptr;
    const int rows = strips ? static_cast<int>(std::min<int64_t>(16, w.rows - r0)) : b ? 16 : 8;
    uint8_t* laid = nullptr;
    if (!strips && T > kAmxTokens) {
        const int64_t bytes = nb * kAmxLaidColumnBytes + 64;
        auto at = reinterpret_cast<uintptr_t>(scratch(thread, (bytes + 3) / 4));
        laid = reinterpret_cast<uint8_t*>((at + 63) / 64 * 64);
        kern.lay_out_packed16(w.type, packed_group(w, r0), b, w.cols, laid);
    }
    float o[16 * kAmxTokens];
    for (int64_t t0 = 0; t0 < T; t0 += kAmxTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kAmxTokens, T - t0));
        if (nt < amx_min_tokens(kern, w)) {
            if (strips)
                q8_0_strip_unit(w, out, r0, t0, T);
            else   // (AMX implies the AVX-512 level, whose packed units are sixteen rows)
                packed_tokens(w, out, r0, t0, T);
            break;
        }
        const float *d[kAmxTokens], *sum[kAmxTokens];
        const int32_t* s[kAmxTokens];
        for (int k = 0; k < nt; ++k) {
            d[k] = xd8_.data() + (t0 + k) * nb;
            sum[k] = (int8 ? xsum_rounded_.data() : xsum8_.data()) + (t0 + k) * nb;
            s[k] = xpart_sums_.data() + 2 * (t0 + k) * nb;
        }
        if (strips && int8_rows_)
            kern.dot_q8_0_strip_int8_amx(q8_0_strip(w, r0), xa_.data() + t0 * w.cols, w.cols, d, s, nt, w.cols, o);
        else if (strips)
            kern.dot_q8_0_strip_amx(q8_0_strip(w, r0), xq8_.data() + 4 * t0 * w.cols, 4 * w.cols, d, s, nt, w.cols, o);
        else if (int8)
            kern.dot_packed8_int8_amx(w.type, packed_group(w, r0), b, laid, xa_.data() + t0 * w.cols, w.cols, d, sum, nt,
                                      w.cols, o);
        else
            kern.dot_packed8_amx(w.type, packed_group(w, r0), b, laid, xq8_.data() + 4 * t0 * w.cols, 4 * w.cols, d, sum,
                                 nt, w.cols, o);
        for (int k = 0; k < nt; ++k)
            for (int r = 0; r < rows; ++r) out[(t0 + k) * w.rows + r0 + r] = o[16 * k + r] + bias_at(w, r0 + r);
    }
}

// Opt-in int8 prefill, unit u of a packed 4-bit, q5_* or K-quant weight: sixteen rows, columns k0..k0 + kn,
// repacked (per call: a kept copy would take twice the 4-bit weights' memory) and run against the
// tokens eight at a time (x rounded to int8 in xa_, xd8_, xsum_rounded_).
void Matmul::tile16_unit(const Weight& w, float* out, int64_t T, int64_t u, int thread, int64_t k0, int64_t kn) {
    const Kernels& kern = kernels();
    const int64_t cols = w.cols, nb = cols / 32, r0 = 16 * u, nr = std::min<int64_t>(16, w.rows - r0);
    uint8_t* rows = reinterpret_cast<uint8_t*>(
        scratch(thread, static_cast<int64_t>((kn / 32) * tile16_column_bytes(w.type) / sizeof(float))));
    if (packed8(w))
        kern.repack16(w.type, packed_group(w, r0, k0), nr > 8 ? packed_group(w, r0 + 8, k0) : nullptr, kn, rows);
    else   // q5_* and the K-quants, from their rows
        kern.repack16_rows(w.type, w.data + static_cast<size_t>(r0) * w.row_stride, w.row_stride, static_cast<int>(nr), k0,
                        kn, rows);
    constexpr int NT = kTile16Tokens;
    const int8_t* q[NT];
    const float *d[NT], *sum[NT];
    float o[16 * NT];
    for (int64_t t = 0; t < T; t += NT) {
        for (int k = 0; k < NT; ++k) {   // a short last tile repeats the last token
            const int64_t tk = std::min<int64_t>(t + k, T - 1);
            q[k] = xa_.data() + tk * cols + k0;
            d[k] = xd8_.data() + tk * nb + k0 / 32;
            sum[k] = xsum_rounded_.data() + tk * nb + k0 / 32;
        }
        kern.dot_tile16(w.type, rows, kn, q, d, sum, o);
        for (int64_t k = 0; k < NT && t + k < T; ++k) store_chunk(out + (t + k) * w.rows + r0, o + 16 * k, nr, w, r0, k0);
    }
}

float* Matmul::scratch(int thread, int64_t n) {
    std::vector<float>& buf = scratch_[static_cast<size_t>(thread)];
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
    return buf.data();
}

}  // namespace tmill::cpu
