// The CPU backend: activations in host memory, ops split over a persistent thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include <sys/mman.h>

#include "backend/backend.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/memory_attention.h"
#include "core/error.h"
#include "core/quants.h"
#include "core/threadpool.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/lora.h"

namespace tmill {

namespace {

// Below this many tokens, block-quantized weights use the integer kernels; from it on, the float
// tile on dequantized rows is faster (each row's widening is amortised over more tokens) -- or, with
// int8 prefill, the sixteen-row int8 kernel on 4-bit weights.
constexpr int64_t kPreparedMaxTokens = 8;
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
// Element-wise ops split across threads only from this many elements on, in chunks of kElementChunk
// (a multiple of every vector width).
constexpr int64_t kMinParallelElements = 1 << 15;
constexpr int64_t kElementChunk = 1 << 12;
// RoPE handles head dimensions up to twice this (the model loader accepts up to 1024)
constexpr int kMaxRopeHalf = 512;
// int8 decode rows of packed weights go to the AMX kernel from this many tokens on: its scaling of
// the int32 sums costs the same for 1 to 16 tokens, so below this the VNNI kernel is faster
// (SmolLM2 Q4_1 generate_batch: 4 sequences 342 tok/s on AMX against 498, 8: 525 against 564,
// 16: 660 against 620)
constexpr int64_t kAmxMinTokens = 12;
// Rows-as-decode passes run float weight rows against this many tokens per call
constexpr int kMaxExactTokens = 32;

class CpuBackend final : public Backend {
public:
    CpuBackend(int n_threads, bool int8_prefill, bool int8_decode)
        : pool_(n_threads), scratch_(static_cast<size_t>(pool_.size())), int8_prefill_(int8_prefill),
          int8_decode_(int8_decode) {}

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

    // The map is used in place; only biases are copied (and 4-bit matrices packed, below).
    Weight upload_weight(DType type, int64_t rows, int64_t cols, const uint8_t* data, const float* bias,
                         WeightUse use) override {
        Weight w;
        w.type = type;
        w.rows = rows;
        w.cols = cols;
        w.data = data;
        w.row_stride = row_bytes(type, cols);
        w.bias = bias ? upload_vector(bias, static_cast<size_t>(rows)) : nullptr;
        if (use == WeightUse::matmul) pack(w);
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

    // q4_0 / q4_1 / q4_k / q5_* matrices get the eight-row layout where the level has a kernel for it;
    // decode then reads only that copy, prefill dequantizes (or, with int8 prefill, repacks) rows from
    // it. The other block-quantized matrices are copied as they are into the same huge-page chunks,
    // which decode streams faster than the file's map (a 1B-shape Q6_K +9 %, Gemma 3 Q4_K_M with its
    // q8_0 output matrix +23-27 %). Either way the mapped original goes cold (the model releases it).
    void pack(Weight& w) {
        const cpu::Kernels& kern = cpu::kernels();
        if (!kern.dot_packed8 || !cpu::packable8(w.type) || w.rows % 8 != 0 || w.cols % 32 != 0) {
            if (cpu::uses_prepared_x(kern, w.type)) {
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
        const size_t group_bytes = static_cast<size_t>(w.cols / 32) * cpu::packed8_column_bytes(w.type);
        uint8_t* dst = pack_space(group_bytes * static_cast<size_t>(w.rows / 8));
        pool_.parallel_for(w.rows / 8, [&](int64_t g0, int64_t g1, int) {
            for (int64_t g = g0; g < g1; ++g)
                cpu::pack_rows8(w.type, w.data + static_cast<size_t>(8 * g) * w.row_stride, w.row_stride, w.cols,
                                dst + static_cast<size_t>(g) * group_bytes);
        });
        w.packed = dst;
    }

    // Room for a weight's copy: copies follow each other in chunks of at least 64 MB, 2 MB-aligned
    // and advised as huge pages -- decode streams every copy once per token, and on 4 KB pages the
    // TLB misses cost 5-15 % of decode (SmolLM2 Q4_1 174-178 -> 184-191 tok/s, a 1B-shape Q4_K
    // 25.4-26.1 -> 27.6-27.8, 2 threads). Huge pages of their own would triple SmolLM2's memory.
    uint8_t* pack_space(size_t bytes) {
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
    // else 4.
    void matmul_group(const MatmulItem* items, int n_items, const float* x, int64_t T) override {
        matmul_group_lora(items, n_items, x, T, nullptr, 0);
    }

    // LoRA additions of a pass whose product runs in one region (decode steps, small batches) join
    // that region: each thread goes on from a fixed share of the weights' units to its share of the
    // additions, instead of a region of their own -- per projection group one hand-off to the
    // workers and one wait for the slowest thread fewer.
    void matmul_group_lora(const MatmulItem* items, int n_items, const float* x, int64_t T, const LoraItem* lora,
                           int n_lora) override {
        const int64_t cols = items[0].w->cols;
        if (T > kTokenBlock) {   // activations meet the weights a block of tokens at a time
            const int64_t n_blocks = (T + kTokenBlock - 1) / kTokenBlock, block = (T + n_blocks - 1) / n_blocks;
            std::vector<MatmulItem> part(items, items + n_items);
            for (int64_t t0 = 0; t0 < T; t0 += block) {
                for (int i = 0; i < n_items; ++i) part[i].out = items[i].out + t0 * items[i].w->rows;
                matmul_group(part.data(), n_items, x + t0 * cols, std::min(block, T - t0));
            }
            if (n_lora > 0) lora_add(lora, n_lora);
            return;
        }
        const cpu::Kernels& kern = cpu::kernels();
        const bool small_batch = (T < kPreparedMaxTokens && !invariant()) || rows_as_decode();
        bool any_prepared = false, any_prepared_k = false, any_packed = false, any_tile16 = false, any_tile = false,
             any_int8 = false, any_packed_exact = false, any_amx = false;
        std::vector<int64_t> first_unit(static_cast<size_t>(n_items) + 1, 0);
        for (int i = 0; i < n_items; ++i) {
            const Weight& w = *items[i].w;
            const bool packed = uses_packed(kern, w, T), tile16 = uses_tile16(kern, w, T), tile = uses_tile(kern, w, T);
            any_packed |= packed;
            any_packed_exact |= packed && !uses_int8_decode(kern);   // the only reader of prepare_x8's parts 2..4
            any_int8 |= (packed && uses_int8_decode(kern)) || (small_batch && uses_int8_q8_0(kern, w));
            any_tile16 |= tile16;
            any_tile |= tile;
            any_amx |= uses_amx(kern, w, T);
            const bool prepared = !packed && small_batch && cpu::uses_prepared_x(kern, w.type) && !uses_int8_q8_0(kern, w);
            (cpu::superblock_x(w.type) ? any_prepared_k : any_prepared) |= prepared;
            const int64_t unit_rows = tile16 || uses_amx(kern, w, T) ? 16 : packed ? 8 : tile ? tile_unit_rows(kern, w) : 4;
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
            if (rounded) {
                xa_.resize(static_cast<size_t>(T * cols));
                xsum_rounded_.resize(static_cast<size_t>(T * nb));
            }
            pool_.parallel_for(T, [&](int64_t t0, int64_t t1, int) {
                for (int64_t t = t0; t < t1; ++t) {
                    int8_t* q = xq8_.data() + 4 * t * cols;
                    kern.prepare_x8(x + t * cols, cols, q, xd8_.data() + t * nb, xsum8_.data() + t * nb, any_packed_exact ? 4 : 1);
                    if (rounded)
                        cpu::first_part(q, xd8_.data() + t * nb, cols, xa_.data() + t * cols, xsum_rounded_.data() + t * nb);
                }
            });
        }
        if (any_amx) amx_tiles(T, cols);
        // column chunks [k0, k0 + chunk) for the tile paths, whole blocks of every weight's type (256
        // values for the K-quants); the other paths run in the first pass
        int64_t block = 32;
        for (int i = 0; i < n_items; ++i) block = std::max<int64_t>(block, dtype_info(items[i].w->type).block_size);
        const int64_t n_chunks = any_tile ? (cols + kPrefillColumnChunk - 1) / kPrefillColumnChunk : 1;
        if (n_chunks == 1 && n_lora > 0) {
            lora_plan_.reset(lora, n_lora);
            cpu::run_lora(pool_, lora_plan_, [&](int thread, int n_threads) {
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
        if (n_lora > 0) lora_add(lora, n_lora);
    }

    // Units [u0, u1) of a matmul_group; tile-path units cover columns [k0, k0 + kn) and add to out
    // after the first chunk, the others run whole when k0 = 0.
    void matmul_units(const MatmulItem* items, const std::vector<int64_t>& first_unit, const float* x, int64_t T,
                      int64_t u0, int64_t u1, int thread, int64_t k0, int64_t kn) {
        const int64_t cols = items[0].w->cols, nb = cols / 32;
        const cpu::Kernels& kern = cpu::kernels();
        for (int64_t u = u0; u < u1; ++u) {
            int i = static_cast<int>(std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin()) - 1;
            const Weight& w = *items[i].w;
            float* out = items[i].out;
            if (!uses_tile(kern, w, T) && k0 > 0) continue;
            if (uses_amx(kern, w, T)) {
                amx_unit(w, out, T, 16 * (u - first_unit[i]));
                continue;
            }
            if (uses_packed(kern, w, T)) {
                // one group of eight rows against each token
                const int64_t r0 = 8 * (u - first_unit[i]);
                const uint8_t* group = packed_group(w, r0);
                if (T > 1 && (uses_int8_decode(kern) ? kern.dot_packed8_int8_tokens : kern.dot_packed8_tokens)) {
                    packed_tokens(w, out, r0, 0, T);   // tokens share the unpacking
                    continue;
                }
                for (int64_t t = 0; t < T; ++t) {
                    float o[8];
                    if (uses_int8_decode(kern))
                        kern.dot_packed8_int8(w.type, group, xa_.data() + t * cols, xd8_.data() + t * nb,
                                              xsum_rounded_.data() + t * nb, cols, o);
                    else
                        kern.dot_packed8(w.type, group, xq8_.data() + 4 * t * cols, xd8_.data() + t * nb,
                                         xsum8_.data() + t * nb, cols, o);
                    for (int k = 0; k < 8; ++k) out[t * w.rows + r0 + k] = o[k] + bias_at(w, r0 + k);
                }
                continue;
            }
            const int64_t rows = w.rows;
            auto row_ptr = [&](int64_t r) { return w.data + static_cast<size_t>(r) * w.row_stride; };
            if (!uses_tile(kern, w, T)) {
                const int64_t r0 = 4 * (u - first_unit[i]), r1 = std::min<int64_t>(r0 + 4, rows);
                if (uses_int8_q8_0(kern, w)) {   // int8 decode: the unit's rows against four tokens at a time
                    const void* unit_rows[4];
                    const int8_t* a[cpu::kPackedTokens];
                    const float* d[cpu::kPackedTokens];
                    float o[4 * cpu::kPackedTokens];
                    for (int64_t r = r0; r < r1; ++r) unit_rows[r - r0] = row_ptr(r);
                    for (int64_t t0 = 0; t0 < T; t0 += cpu::kPackedTokens) {
                        const int nt = static_cast<int>(std::min<int64_t>(cpu::kPackedTokens, T - t0));
                        for (int k = 0; k < nt; ++k) {
                            a[k] = xa_.data() + (t0 + k) * cols;
                            d[k] = xd8_.data() + (t0 + k) * nb;
                        }
                        kern.dot_q8_0_int8(unit_rows, static_cast<int>(r1 - r0), a, d, nt, cols, o);
                        for (int64_t r = r0; r < r1; ++r)
                            for (int k = 0; k < nt; ++k) out[(t0 + k) * rows + r] = o[(r - r0) * nt + k] + bias_at(w, r);
                    }
                    continue;
                }
                if (!cpu::uses_prepared_x(kern, w.type) && T == 1) {   // decode: straight from the stored type
                    for (int64_t r = r0; r < r1; ++r) out[r] = kern.dot_row(w.type, row_ptr(r), x, cols) + bias_at(w, r);
                    continue;
                }
                if (!cpu::uses_prepared_x(kern, w.type)) {   // rows as decode: the same arithmetic, per tile
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
                const PreparedX& px = cpu::superblock_x(w.type) ? x256_ : x32_;
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
            if (w.packed && kern.dequantize_packed8) {   // r0 is a group's first row
                kern.dequantize_packed8(w.type, packed_group(w, r0, k0), kn, buf, kn);
            } else {
                for (int64_t k = 0; k < unit; ++k) {
                    float* dst = buf + k * kn;
                    const int64_t r = r0 + k;
                    if (k >= nr_unit) {
                        std::fill(dst, dst + kn, 0.0f);   // padding rows
                    } else if (w.packed) {   // a level without the packed kernels, after the load
                        uint8_t* row = reinterpret_cast<uint8_t*>(buf + unit * kn);
                        cpu::unpack_row8(w.type, packed_group(w, r, k0), kn, static_cast<int>(r % 8), row);
                        kern.dequantize_row(w.type, row, dst, kn);
                    } else {
                        kern.dequantize_row(w.type, row_ptr(r) + row_bytes(w.type, k0), dst, kn);
                    }
                }
            }
            const int64_t width = kern.tile_tokens;
            const float* xs[cpu::kMaxTileTokens];
            float o[cpu::kMaxTileRows * cpu::kMaxTileTokens];
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

    // The eight rows of the group at r0 against tokens [t0, t1), kPackedTokens per call of the
    // tokens kernel (exact, or int8 decode's)
    void packed_tokens(const Weight& w, float* out, int64_t r0, int64_t t0, int64_t t1) {
        const cpu::Kernels& kern = cpu::kernels();
        const int64_t cols = w.cols, nb = cols / 32;
        const bool int8 = uses_int8_decode(kern);
        const auto tokens_kernel = int8 ? kern.dot_packed8_int8_tokens : kern.dot_packed8_tokens;
        constexpr int NT = cpu::kPackedTokens;
        const int8_t* a[NT];
        const float *d[NT], *sum[NT];
        float o[8 * NT];
        for (int64_t t = t0; t < t1; t += NT) {
            const int nt = static_cast<int>(std::min<int64_t>(NT, t1 - t));
            for (int k = 0; k < nt; ++k) {
                a[k] = int8 ? xa_.data() + (t + k) * cols : xq8_.data() + 4 * (t + k) * cols;
                d[k] = xd8_.data() + (t + k) * nb;
                sum[k] = (int8 ? xsum_rounded_.data() : xsum8_.data()) + (t + k) * nb;
            }
            tokens_kernel(w.type, packed_group(w, r0), a, d, sum, nt, cols, o);
            for (int k = 0; k < nt; ++k)
                for (int j = 0; j < 8; ++j) out[(t + k) * w.rows + r0 + j] = o[8 * k + j] + bias_at(w, r0 + j);
        }
    }

    // int8 decode rows on AMX: the two groups from row r0 against the tokens, kAmxTokens at a time
    // (amx_tiles laid them out); a last chunk of fewer than kAmxMinTokens takes the VNNI kernel,
    // whose bits are the same
    void amx_unit(const Weight& w, float* out, int64_t T, int64_t r0) {
        const cpu::Kernels& kern = cpu::kernels();
        const int64_t nb = w.cols / 32;
        const uint8_t* b = r0 + 8 < w.rows ? packed_group(w, r0 + 8) : nullptr;
        const int rows = b ? 16 : 8;
        float o[16 * cpu::kAmxTokens];
        for (int64_t t0 = 0, c = 0; t0 < T; t0 += cpu::kAmxTokens, ++c) {
            const int nt = static_cast<int>(std::min<int64_t>(cpu::kAmxTokens, T - t0));
            if (nt < kAmxMinTokens) {
                for (int g = 0; g < rows / 8; ++g) packed_tokens(w, out, r0 + 8 * g, t0, T);
                break;
            }
            kern.dot_packed8_int8_amx(w.type, packed_group(w, r0), b, x_tiles_.data() + c * nb * 512,
                                      x_tile_scales_.data() + 2 * c * nb * 16, x_tile_scales_.data() + (2 * c + 1) * nb * 16,
                                      nt, w.cols, o);
            for (int k = 0; k < nt; ++k)
                for (int r = 0; r < rows; ++r) out[(t0 + k) * w.rows + r0 + r] = o[16 * k + r] + bias_at(w, r0 + r);
        }
    }

    // x rounded to int8 (xa_) as the AMX kernel's tiles, per chunk of kAmxTokens tokens: x_tiles_
    // [chunks, cols / 32, 512], x_tile_scales_ [chunks, 2 (scales, sums), cols / 32, 16]
    void amx_tiles(int64_t T, int64_t cols) {
        const cpu::Kernels& kern = cpu::kernels();
        const int64_t nb = cols / 32, chunks = (T + cpu::kAmxTokens - 1) / cpu::kAmxTokens;
        x_tiles_.resize(static_cast<size_t>(chunks * nb * 512));
        x_tile_scales_.resize(static_cast<size_t>(chunks * 2 * nb * 16));
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t t0 = c * cpu::kAmxTokens;
            const int nt = static_cast<int>(std::min<int64_t>(cpu::kAmxTokens, T - t0));
            const int8_t* a[cpu::kAmxTokens];
            const float *d[cpu::kAmxTokens], *sum[cpu::kAmxTokens];
            for (int k = 0; k < nt; ++k) {
                a[k] = xa_.data() + (t0 + k) * cols;
                d[k] = xd8_.data() + (t0 + k) * nb;
                sum[k] = xsum_rounded_.data() + (t0 + k) * nb;
            }
            kern.amx_x_tiles(a, d, sum, nt, cols, x_tiles_.data() + c * nb * 512,
                             x_tile_scales_.data() + 2 * c * nb * 16, x_tile_scales_.data() + (2 * c + 1) * nb * 16);
        }
    }

    // Opt-in int8 prefill, unit u of a packed 4-bit, q5_* or K-quant weight: sixteen rows, columns k0..k0 + kn,
    // repacked (per call: a kept copy would take twice the 4-bit weights' memory) and run against the
    // tokens eight at a time (x rounded to int8 in xa_, xd8_, xsum_rounded_).
    void tile16_unit(const Weight& w, float* out, int64_t T, int64_t u, int thread, int64_t k0, int64_t kn) {
        const cpu::Kernels& kern = cpu::kernels();
        const int64_t cols = w.cols, nb = cols / 32, r0 = 16 * u, nr = std::min<int64_t>(16, w.rows - r0);
        uint8_t* rows = reinterpret_cast<uint8_t*>(
            scratch(thread, static_cast<int64_t>((kn / 32) * cpu::tile16_column_bytes(w.type) / sizeof(float))));
        if (w.packed)
            kern.repack16(w.type, packed_group(w, r0, k0), nr > 8 ? packed_group(w, r0 + 8, k0) : nullptr, kn, rows);
        else   // q5_* and the K-quants, from their rows
            kern.repack16_rows(w.type, w.data + static_cast<size_t>(r0) * w.row_stride, w.row_stride, static_cast<int>(nr), k0,
                            kn, rows);
        constexpr int NT = cpu::kTile16Tokens;
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

    void rms_norm(float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps) override {
        for_rows(T, n, [&](int64_t t) {
            const float* xt = x + t * n;
            float* ot = out + t * n;
            double ss = 0.0;
            for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xt[i]) * xt[i];
            float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
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
        for_rows(T, int64_t{n_heads} * head_dim, [&](int64_t t) {
            float cs[2 * kMaxRopeHalf];   // cos, sin of each pair's angle
            // angle_i = pos * theta^(-2i/d), computed in float like the reference implementations
            for (int i = 0; i < half; ++i) {
                float inv_freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
                if (freq_factors) inv_freq /= freq_factors[i];
                float angle = static_cast<float>(pos[t]) * inv_freq;
                cs[2 * i] = static_cast<float>(std::cos(static_cast<double>(angle)));
                cs[2 * i + 1] = static_cast<float>(std::sin(static_cast<double>(angle)));
            }
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
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        for_elements(n, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                float v = x[i];
                x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
            }
        });
    }

    void geglu(float* gate, const float* up, int64_t n) override {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        for_elements(n, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const float v = gate[i];
                gate[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v))) * up[i];
            }
        });
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
    // Which kernels a weight's product with T tokens runs on: the eight-row integer kernel (few
    // tokens, packed 4-bit), the float tile on dequantized rows (prefill), else the per-row kernels.
    // (Rows as decode: always the kernels of T = 1, each token on its own.)
    bool uses_packed(const cpu::Kernels& kern, const Weight& w, int64_t T) const {
        return ((T < kPreparedMaxTokens && !invariant()) || rows_as_decode()) && w.packed && kern.dot_packed8;
    }
    bool uses_tile(const cpu::Kernels& kern, const Weight& w, int64_t T) const {
        if (invariant()) return true;
        return T > 1 && !rows_as_decode() && !(T < kPreparedMaxTokens && cpu::uses_prepared_x(kern, w.type));
    }

    // Rows per unit of the float tile path: a whole eight-row group of a packed weight (dequantized in
    // one call, then run as tiles of the level's height), else one tile.
    int64_t tile_unit_rows(const cpu::Kernels& kern, const Weight& w) const {
        return w.packed && kern.dequantize_packed8 ? 8 : kern.tile_rows;
    }

    // ... with int8 decode, the packed kernel on x rounded to int8 (rows as decode too: they must
    // be what this model's one-token steps compute)
    bool uses_int8_decode(const cpu::Kernels& kern) const { return int8_decode_ && kern.dot_packed8_int8; }
    // ... on AMX from kAmxMinTokens tokens on (each row's bits those of the VNNI kernel)
    bool uses_amx(const cpu::Kernels& kern, const Weight& w, int64_t T) const {
        return T >= kAmxMinTokens && uses_packed(kern, w, T) && uses_int8_decode(kern) && kern.dot_packed8_int8_amx;
    }
    // ... and Q8_0 weights in decode (not on the tile paths) meet the same rounded x (q8_0 x q8_0)
    bool uses_int8_q8_0(const cpu::Kernels& kern, const Weight& w) const {
        return int8_decode_ && w.type == DType::q8_0 && !w.packed && kern.dot_q8_0_int8;
    }

    // ... and, with int8 prefill, the sixteen-row kernel on a packed weight's prefill
    bool uses_tile16(const cpu::Kernels& kern, const Weight& w, int64_t T) const {
        const bool repackable = w.packed || (cpu::repackable16(w.type) && kern.repack16_rows);
        return int8_prefill_ && !rows_as_decode() && (T >= kPreparedMaxTokens || invariant()) && repackable && kern.dot_tile16;
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

    // the bias of row r (0 without one)
    static float bias_at(const Weight& w, int64_t r) { return w.bias ? w.bias[r] : 0.0f; }
    // the eight-row group of a packed weight that holds row r, from block column k0 / 32 on
    static const uint8_t* packed_group(const Weight& w, int64_t r, int64_t k0 = 0) {
        return w.packed + static_cast<size_t>(r / 8 * (w.cols / 32) + k0 / 32) * cpu::packed8_column_bytes(w.type);
    }

    // One token's results for rows r0.. of a column chunk: the first chunk writes them (plus the
    // bias), later ones add.
    static void store_chunk(float* dst, const float* o, int64_t nr, const Weight& w, int64_t r0, int64_t k0) {
        if (k0 == 0)
            for (int64_t r = 0; r < nr; ++r) dst[r] = o[r] + bias_at(w, r0 + r);
        else
            for (int64_t r = 0; r < nr; ++r) dst[r] += o[r];
    }

    float* scratch(int thread, int64_t n) {
        std::vector<float>& buf = scratch_[static_cast<size_t>(thread)];
        if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
        return buf.data();
    }

    ThreadPool pool_;
    std::vector<std::vector<float>> scratch_;
    // activations prepared for the integer kernels: q [T, 2 * cols], d and sum [T, cols / 32]; by
    // prepare_x (32-block scales) and by prepare_x_k (super-block scales, for the K-quants)
    struct PreparedX {
        std::vector<int16_t> q;
        std::vector<float> d, sum;
    };
    PreparedX x32_, x256_;
    std::vector<int8_t> xq8_;   // ... and for the packed 4-bit kernel [T, 4 * cols]
    std::vector<float> xd8_, xsum8_;
    std::vector<int8_t> xa_;            // int8 prefill: x rounded to int8 [T, cols] ...
    std::vector<float> xsum_rounded_;   // ... and its block sums [T, cols / 32]
    std::vector<int8_t> x_tiles_;         // ... and as AMX tiles (amx_tiles) ...
    std::vector<float> x_tile_scales_;    // ... with their scales and block sums
    std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> packed_;   // chunks of weight copies (pack_space) ...
    size_t pack_used_ = 0, pack_size_ = 0;                             // ... and the last one's use and size
    std::vector<std::unique_ptr<float[]>> vectors_;    // uploaded norm weights and biases
    std::optional<cpu::LevelPin> level_;               // held during a pass
    RowsMode rows_mode_ = RowsMode::fast;              // of the ops now running
    bool rows_as_decode() const { return rows_mode_ == RowsMode::as_decode; }
    bool invariant() const { return rows_mode_ == RowsMode::invariant; }
    cpu::AttentionBuffers attention_buffers_;
    cpu::LoraPlan lora_plan_;       // LoRA: the units of a projection group's additions and their scratch
    std::vector<std::vector<float>> memory_scratch_;   // memory attention: one buffer per thread
    bool int8_prefill_;   // 4-bit weights meet x rounded to int8 in prefill (BackendOptions::int8_prefill) ...
    bool int8_decode_;    // ... and in decode (BackendOptions::int8_decode)
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
