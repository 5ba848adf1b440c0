// CPU kernels behind one table per instruction-set level. The level is picked once from cpuid (or
// forced with TOKENMILL_CPU=scalar|avx2|avx512), so one build runs on any x86-64 and uses the best
// the CPU has. The scalar table is the reference every other level is tested against.
#pragma once

#include <cstdint>
#include <type_traits>
#include <shared_mutex>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace tmill::cpu {

enum class Level { scalar = 0, avx2 = 1, avx512 = 2 };

// the largest prefill tile any level uses
constexpr int kMaxTileRows = 8;
constexpr int kMaxTileTokens = 8;

struct Kernels {
    Level level;
    const char* name;
    // sum_i a[i] * b[i]
    float (*dot_f32)(const float* a, const float* b, int64_t n);
    // Attention: out[j] = rows[j, :] . x for rows [n_rows, d] (scores of one query) ...
    void (*rows_dot_f32)(const float* rows, int64_t n_rows, int64_t d, const float* x, float* out);
    // ... y[d] += sum_j w[j] * rows[j, :] for rows `stride` floats apart (the weighted sum of values;
    // each column's sum runs over j in order, so a split of the columns changes no value) ...
    void (*rows_axpy_f32)(float* y, const float* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w);
    // ... and x[i] = exp(x[i] - shift), returning sum_i x[i] (softmax numerators)
    float (*exp_sum)(float* x, int64_t n, float shift);
    // gate[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]
    void (*swiglu)(float* gate, const float* up, int64_t n);
    // The prefill tile: tile_rows float rows (w + r * w_stride) against tile_tokens vectors xs[t],
    // out[t * tile_rows + r] = w_r . xs[t]. Each loaded element of w or x feeds several FMAs; the level
    // picks the shape its register file holds.
    int tile_rows, tile_tokens;
    void (*dot_f32_tile)(const float* w, int64_t w_stride, const float* const* xs, int64_t n, float* out);
    // sum_i row[i] * x[i] for a weight row of type t (n a multiple of the block size)
    float (*dot_row)(DType t, const void* row, const float* x, int64_t n);
    // out[r * n_tokens + j] = dot_row(t, rows[r], xs[j], n), bit for bit, in register tiles of rows x
    // vectors that read each weight once per tile from L1 (verifying k drafted tokens costs far less
    // than k decode steps for float weights)
    void (*dot_rows_tokens)(DType t, const void* const* rows, int n_rows, const float* const* xs, int n_tokens, int64_t n,
                            float* out);
    // out[i] = row[i] as float
    void (*dequantize_row)(DType t, const void* row, float* out, int64_t n);
    // Integer path for block-quantized rows: x is prepared once per vector as two int16 parts per
    // element with a float scale per 32-block (x = d * (hi + lo / 2^15), error below 2^-31 of the
    // block maximum, so results match the float path to float rounding) plus the block sums of x.
    // q holds 2n values; null where a level has no such path.
    void (*prepare_x)(const float* x, int64_t n, int16_t* q, float* d, float* sum);
    float (*dot_row_prepared)(DType t, const void* row, const int16_t* q, const float* d, const float* sum,
                              int64_t n);
    // The same for four consecutive prepared vectors (q [4, 2n], d and sum [4, n/32]) -> out[4], each
    // bit for bit what dot_row_prepared gives it (the row is widened once for all four)
    void (*dot_row_prepared_x4)(DType t, const void* row, const int16_t* q, const float* d, const float* sum,
                                int64_t n, float* out);
    // 4- and 5-bit weights (packable8) in groups of eight rows (pack_rows8) against x prepared as four int8
    // parts per element, x = d * (a + b / 2^7 + c / 2^14 + e / 2^21) per 32-block (error at most
    // d / 2^22, below float rounding of the block maximum), q [4n] holding a[32] b[32] c[32] e[32]
    // per block, plus the block sums -> out[8], the group's rows against x. Null where a level has
    // no such path. prepare_x8 writes the first `parts` parts of each block (1: only what the int8
    // kernels read; the other 96 bytes of the block are left as they were).
    void (*prepare_x8)(const float* x, int64_t n, int8_t* q, float* d, float* sum, int parts);
    void (*dot_packed8)(DType t, const uint8_t* group, const int8_t* q, const float* d, const float* sum, int64_t n,
                        float* out);
    // The same group against x rounded to int8 per 32-block (a [n], the first part; d its scales, sum
    // the block sums of the rounded x): llama.cpp's decode precision, opt-in (int8_decode).
    void (*dot_packed8_int8)(DType t, const uint8_t* group, const int8_t* a, const float* d, const float* sum, int64_t n,
                             float* out);
    // The group's eight rows (n values from the group's first block column on) as floats,
    // out[r * out_stride + i], equal to dequantize_row of each row. Null where a level does not pack.
    void (*dequantize_packed8)(DType t, const uint8_t* group, int64_t n, float* out, int64_t out_stride);
    // Opt-in fast prefill of 4-bit weights (llama.cpp's trade): x rounded to int8 per 32-block, the
    // first part (a) of prepare_x8 (see first_part). repack16 turns two eight-row groups (b null: zero
    // rows) into the block columns of sixteen rows this kernel reads; dot_tile16 runs 16 rows against
    // kTile16Tokens tokens (q the rounded x [n], d its block scales, sum the block sums of the rounded
    // x, each at the tokens' first block), out[t * 16 + r]. Null where a level has no such path.
    void (*repack16)(DType t, const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out);
    void (*dot_tile16)(DType t, const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                       const float* const* sum, float* out);
    // dot_packed8_int8 for nt <= kPackedTokens tokens at once (a[k], d[k], sum[k] token k's), one
    // unpacking of the group feeding every token; out[8 k + r] has exactly dot_packed8_int8's bits,
    // so batched decode rows equal one-token steps. Null where a level has none.
    void (*dot_packed8_int8_tokens)(DType t, const uint8_t* group, const int8_t* const* a, const float* const* d,
                                    const float* const* sum, int nt, int64_t n, float* out);
    // dot_packed8 for nt <= kPackedTokens tokens at once (q[k], d[k], sum[k] token k's prepare_x8
    // output), the group unpacked once for all of them; out[8 k + r] has exactly dot_packed8's bits
    // (batched exact decode rows). Null where a level has none.
    void (*dot_packed8_tokens)(DType t, const uint8_t* group, const int8_t* const* q, const float* const* d,
                               const float* const* sum, int nt, int64_t n, float* out);
    // x[i] = 0.5 x (1 + erf(x / sqrt 2)), the exact GELU (std::erf in scalar code; the vector levels
    // evaluate erfc by Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7 on erf)
    void (*gelu_erf)(float* x, int64_t n);
    // x[i] = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the tanh GELU, times up[i] where up is
    // not null (GeGLU). The vector levels take it as x / (1 + exp(-2 u)) -- the same function, with
    // no cancellation for negative x -- through their exp.
    void (*gelu_tanh)(float* x, const float* up, int64_t n);
    // Decode attention over a GQA group: s[g * s_stride + j] = q_g . rows[j] for ng query vectors
    // (q [ng, d]) against n_rows K rows, and y_g += sum_j w[g * w_stride + j] rows[j] (y [ng, d],
    // stride d) over V rows; each row is loaded once for the whole group, and every (row, query)
    // value has the bits rows_dot / rows_axpy give it. Null where a level has none (attention then
    // calls those per query).
    void (*group_dot_f32)(const float* rows, int64_t n_rows, int64_t d, const float* q, int ng, float* s, int64_t s_stride);
    void (*group_dot_f16)(const uint16_t* rows, int64_t n_rows, int64_t d, const float* q, int ng, float* s,
                          int64_t s_stride);
    void (*group_axpy_f32)(float* y, const float* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w,
                           int ng, int64_t w_stride);
    void (*group_axpy_f16)(float* y, const uint16_t* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w,
                           int ng, int64_t w_stride);
    // rows_dot_f32 and rows_axpy_f32 for fp16 rows (LoRA pairs whose values fp16 holds exactly):
    // each element widened in the loop, so the rows are read at half the bytes
    void (*rows_dot_f16)(const uint16_t* rows, int64_t n_rows, int64_t d, const float* x, float* out);
    void (*rows_axpy_f16)(float* y, const uint16_t* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w);
    // Opt-in int8 prefill of the types repackable16 names, from their file layout: sixteen rows
    // (rows[r * row_stride], n_rows <= 16, the rest zero) of columns [k0, k0 + kn) (whole blocks) into
    // dot_tile16's block columns (see tile16_quants_offset), which dot_tile16 then runs for t. Null
    // where a level has no such path.
    void (*repack16_rows)(DType t, const uint8_t* rows, size_t row_stride, int n_rows, int64_t k0, int64_t kn, uint8_t* out);
    // prepare_x with one scale per 256-block (d [n / 256]; q's layout and the 32-block sums as
    // prepare_x's): what dot_row_prepared(_x4) read for the K-quants, whose super-blocks then sum their
    // products in int32 with the sub-block scales folded into the weights. Null where prepare_x is.
    void (*prepare_x_k)(const float* x, int64_t n, int16_t* q, float* d, float* sum);
    // int8_decode's q8_0 kernel: n_rows <= 4 Q8_0 rows (file layout) against nt <= kPackedTokens vectors
    // rounded to int8 (a[k], d[k] as for dot_packed8_int8) -> out[r * nt + k], each (row, vector) with
    // the same arithmetic in any tile, so batched decode rows equal one-token steps. Null where a
    // level has none.
    void (*dot_q8_0_int8)(const void* const* rows, int n_rows, const int8_t* const* a, const float* const* d, int nt,
                          int64_t n, float* out);
    // Prefill attention's scores as a small matrix product: s[i * s_stride + j] = q_i . k_j for nq
    // queries q [nq, hd] against m keys given transposed, kt[d * kt_stride + j] -- each loaded key
    // vector feeds every query, and no score needs a horizontal sum.
    void (*scores_block)(const float* q, int nq, int64_t hd, const float* kt, int64_t kt_stride, int64_t m, float* s,
                         int64_t s_stride);
    // The decode kernels for many tokens (nt <= kAmxTokens) on Intel's AMX tile unit (null where the
    // CPU or the OS lacks it, or TOKENMILL_AMX=0), each (row, token) with the bits of the VNNI kernel
    // it stands for, out[16 t + r]; they read x as prepared, token k's at x + k * x_stride.
    // dot_packed8_int8_amx: int8 decode's product of two groups (b null: only a's eight rows), x
    // rounded (d[k], sum[k] as for dot_packed8_int8_tokens).
    // laid: the groups' B tiles as lay_out_packed16 left them (a prefill's tokens pass them sixteen at
    // a time), or null: laid out block by block as the product goes.
    void (*dot_packed8_int8_amx)(DType t, const uint8_t* a, const uint8_t* b, const uint8_t* laid, const int8_t* x,
                                 int64_t x_stride, const float* const* d, const float* const* sum, int nt, int64_t n,
                                 float* out);
    // ... the exact product (dot_packed8's) of two groups, x as prepare_x8's output (d[k], sum[k] as
    // for dot_packed8_tokens)
    void (*dot_packed8_amx)(DType t, const uint8_t* a, const uint8_t* b, const uint8_t* laid, const int8_t* q,
                            int64_t q_stride, const float* const* d, const float* const* sum, int nt, int64_t n,
                            float* out);
    // Two groups' (b null: a's rows only) n / 32 block columns as the products' B tiles, once for all
    // tokens: kAmxLaidColumnBytes per column (its tile, then its 16 rows' scales) at dst, 64-aligned.
    void (*lay_out_packed16)(DType t, const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* dst);
    // ... int8 decode's product of a Q8_0 strip (dot_q8_0_strip_int8's: d[k], s[k] as there), x rounded
    void (*dot_q8_0_strip_int8_amx)(const uint8_t* strip, const int8_t* x, int64_t x_stride, const float* const* d,
                                    const int32_t* const* s, int nt, int64_t n, float* out);
    // Exact decode of Q8_0 weights in strips of sixteen rows (pack_q8_0_strip) against nt <=
    // kPackedTokens tokens, x as prepare_x8's four parts (q[k], d[k] token k's) with their part sums
    // (q8_0_part_sums, s[k]) -> out[16 k + r], each token's arithmetic the same whatever nt. Null
    // where a level has none (Q8_0 rows then take dot_row_prepared on the file layout).
    void (*dot_q8_0_strip)(const uint8_t* strip, const int8_t* const* q, const float* const* d,
                           const int32_t* const* s, int nt, int64_t n, float* out);
    // ... and int8 decode's, x rounded to int8 (a[k], d[k] as for dot_q8_0_int8) with its block sums
    // as int32 (s[k], first_part's block_sums): dot_q8_0_int8's values, bit for bit
    void (*dot_q8_0_strip_int8)(const uint8_t* strip, const int8_t* const* a, const float* const* d,
                                const int32_t* const* s, int nt, int64_t n, float* out);
    // dot_q8_0_strip for nt <= kAmxTokens tokens on AMX (x as prepare_x8's output, token k's at
    // q + k * q_stride), out[16 k + r] with its bits. Null without AMX.
    void (*dot_q8_0_strip_amx)(const uint8_t* strip, const int8_t* q, int64_t q_stride, const float* const* d,
                               const int32_t* const* s, int nt, int64_t n, float* out);
    // dot_packed8_tokens on two groups at once (a's rows then b's, sixteen) -> out[16 k + r], every
    // value with dot_packed8's bits; the groups' quants transposed in registers so that no row needs
    // a horizontal sum (kernels_packed16.cpp). Null where a level has none.
    void (*dot_packed16_tokens)(DType t, const uint8_t* a, const uint8_t* b, const int8_t* const* q,
                                const float* const* d, const float* const* sum, int nt, int64_t n, float* out);
    // ... and dot_packed8_int8_tokens on two groups, with dot_packed8_int8's bits
    void (*dot_packed16_int8_tokens)(DType t, const uint8_t* a, const uint8_t* b, const int8_t* const* a_x,
                                     const float* const* d, const float* const* sum, int nt, int64_t n, float* out);
};

constexpr int kAmxTokens = 16;
constexpr int64_t kAmxLaidColumnBytes = 8 * 64 + 16 * sizeof(float);

constexpr int kPackedTokens = 4;

// fn(std::integral_constant<int, c>{}) with c = count clamped to 1..4: a kernel's token or row count
// (at most kPackedTokens or four rows) as the template argument its registers are unrolled for.
template <typename Fn>
inline void with_count_to_4(int count, Fn&& fn) {
    switch (count <= 1 ? 1 : count >= 4 ? 4 : count) {
        case 1: return fn(std::integral_constant<int, 1>{});
        case 2: return fn(std::integral_constant<int, 2>{});
        case 3: return fn(std::integral_constant<int, 3>{});
        default: return fn(std::integral_constant<int, 4>{});
    }
}

// From prepare_x8's output (q [4n], d [n / 32]), what the int8 kernels read: the first parts alone,
// a[n] (x rounded to int8), and their block sums d[b] * sum(a of block b) -> sums[n / 32] -- and,
// where block_sums is not null, the integer sums themselves (the Q8_0 strips' offsets).
void first_part(const int8_t* q, const float* d, int64_t n, int8_t* a, float* sums, int32_t* block_sums = nullptr);

// tokens per dot_tile16 call, and the bytes of one repack16 block column
constexpr int kTile16Tokens = 8;
// the types whose int8 prefill tile holds signed levels (a scale per half block, no offset)
constexpr bool signed_tile(DType t) {
    return t == DType::q3_k || t == DType::q6_k || t == DType::iq4_nl || t == DType::q8_0;
}
// (16 float scales, 16 float minimums for q4_1, then the quants at this offset)
// (q5_0 / q5_1 / q4_k / q5_k: 16 float scales, 16 float offsets, then the quants as unsigned bytes;
// the signed tiles: the scales of each half of 16 values, then per half the rows' -128 * sum of their
// levels as int32, then the signed levels)
constexpr size_t tile16_quants_offset(DType t) { return 64 * (t == DType::q4_0 ? 1 : signed_tile(t) ? 4 : 2); }
constexpr size_t tile16_column_bytes(DType t) { return tile16_quants_offset(t) + 512; }

// The eight-row layout of q4_0 / q4_1 / q4_k / q5_0 / q5_1 weights: per block column, the eight rows' scales (fp16;
// for q4_1 then their minimums), then their 16 bytes of quants each -- one aligned read feeds eight
// rows and their scales convert in one instruction. Groups follow each other (n / 32 block columns
// each). q4_k keeps its super-blocks: per 256 columns a header of the rows' d and dmin (fp16) and
// their 12 scale bytes as three 32-bit words (word w of row r at 32 + 32 w + 4 r), then the eight
// sub-blocks as block columns without scales, their nibbles re-laid as q4_1's (value l in the low
// nibble of byte l, value 16 + l in the high one) -- 144 bytes per row and super-block, as in the file.
// q5_0 / q5_1 columns hold the rows' fifth bits between the scales (and minimums) and the quants, as
// 64-bit masks: for the rows 4h..4h+3, the low nibbles' bits at 16 h, the high ones' at 16 h + 8, bit
// 16 j + l the fifth bit of value l (high: 16 + l) of row 4 h + j -- one mask per register of four rows.
bool packable8(DType t);
constexpr bool five_bit(DType t) { return t == DType::q5_0 || t == DType::q5_1; }
// the types whose group columns hold the rows' minimums (fp16) after their scales
constexpr bool packed8_minimums(DType t) { return t == DType::q4_1 || t == DType::q5_1; }
// bytes of a block column: the scales, the minimums (q4_1, q5_1), the fifth bits (q5_*), then the quants at this offset
constexpr size_t packed8_quants_offset(DType t) {
    return 16 * (packed8_minimums(t) ? 2 : 1) + (five_bit(t) ? 32 : 0);
}
// (q4_k: the average over a super-block, so column k0 of a group is k0 / 32 of them in, k0 a multiple of 256)
constexpr size_t packed8_column_bytes(DType t) { return t == DType::q4_k ? 144 : packed8_quants_offset(t) + 8 * 16; }
constexpr size_t kK4GroupHeader = 128, kK4GroupSuper = 8 * 144;
// where block column i's quants start in a group
constexpr size_t packed8_quants_at(DType t, int64_t i) {
    return t == DType::q4_k ? static_cast<size_t>(i / 8) * kK4GroupSuper + kK4GroupHeader + static_cast<size_t>(i % 8) * 128
                            : static_cast<size_t>(i) * packed8_column_bytes(t) + packed8_quants_offset(t);
}
// The strip layout of Q8_0 weights for exact decode: sixteen rows (zeros past the last), per block
// column eight groups of four values as [group][row][4] bytes of w + 128 -- unsigned, so VPDPBUSD
// multiplies sixteen rows' four values with four bytes of x broadcast, and AMX can read a column as
// its B tile -- all the columns' quants first, then their scales [n / 32][16] (fp16).
constexpr size_t kQ8_0StripQuantBytes = 512;
constexpr size_t q8_0_strip_bytes(int64_t n) { return static_cast<size_t>(n / 32) * (kQ8_0StripQuantBytes + 32); }
void pack_q8_0_strip(const uint8_t* rows, size_t row_stride, int n_rows, int64_t n, uint8_t* strip);
// What dot_q8_0_strip subtracts for the offset of 128: per 32-block of prepare_x8's output q [4n],
// s[2 b] = sum_j (2^7 a_j + b_j) and s[2 b + 1] = sum_j (2^7 c_j + e_j)
void q8_0_part_sums(const int8_t* q, int64_t n, int32_t* s);
// packs rows [8, n] (row_stride bytes apart) into one group
void pack_rows8(DType t, const uint8_t* rows, size_t row_stride, int64_t n, uint8_t* group);
// row j (0..7) of a group back in the type's own block layout (row_bytes(t, n) bytes)
void unpack_row8(DType t, const uint8_t* group, int64_t n, int j, uint8_t* row);

// Decode streams every weight once per token; the integer kernels ask for the weight bytes this far
// ahead, which keeps more loads in flight than the hardware prefetcher does on its own (measured on
// SmolLM2, 2 threads: +12-18% decode for Q8_0, Q4_0 and Q4_1 at both SIMD levels). The eight-row
// kernels ask for two cache lines per block column (128-160 bytes): with one, half the lines were
// left to the hardware (SmolLM2 Q4_1 at AVX-512: +14-25% decode, int8_decode +16-25%). With that,
// 4096 bytes ahead beat 2048 on an Intel Xeon (SmolLM2 Q4_1 205-213 -> 227-240 tok/s, a 1B-shape Q4_K
// 25.4-25.5 -> 25.7-26.6, binaries alternated); 1024 lost 10%.
constexpr size_t kDecodePrefetchBytes = 4096;
// rows_axpy's rows are often short runs at a stride (a LoRA B^T column chunk: 16 rows of 256 values,
// each its own stream too short for the hardware prefetchers): it asks for each row's values this
// many columns ahead: two 64-column steps, reaching into the next unit's columns at a unit's end.
// rows_dot asks kDecodePrefetchBytes ahead of each row. SmolLM2 with an r=16 adapter, per decode
// projection group: low-rank products 5.0 -> 3.9-4.0 us.
constexpr int64_t kRowsAxpyPrefetchColumns = 128;

// fn(std::integral_constant<DType, t>{}) for the block-quantized types dot_row_prepared reads (at
// the levels that have it); false, without calling fn, for any other type.
template <typename Fn>
inline bool with_prepared_type(DType t, Fn&& fn) {
    switch (t) {
        case DType::q8_0: fn(std::integral_constant<DType, DType::q8_0>{}); return true;
        case DType::q4_0: fn(std::integral_constant<DType, DType::q4_0>{}); return true;
        case DType::q4_1: fn(std::integral_constant<DType, DType::q4_1>{}); return true;
        case DType::q5_0: fn(std::integral_constant<DType, DType::q5_0>{}); return true;
        case DType::q5_1: fn(std::integral_constant<DType, DType::q5_1>{}); return true;
        case DType::iq4_nl: fn(std::integral_constant<DType, DType::iq4_nl>{}); return true;
        case DType::q2_k: fn(std::integral_constant<DType, DType::q2_k>{}); return true;
        case DType::q3_k: fn(std::integral_constant<DType, DType::q3_k>{}); return true;
        case DType::q4_k: fn(std::integral_constant<DType, DType::q4_k>{}); return true;
        case DType::q5_k: fn(std::integral_constant<DType, DType::q5_k>{}); return true;
        case DType::q6_k: fn(std::integral_constant<DType, DType::q6_k>{}); return true;
        default: return false;
    }
}
// Whether dot_row_prepared handles weights of type t at this level, and which preparation of x it
// reads for them (prepare_x_k for the K-quants, prepare_x otherwise; both take d and sum arrays of
// n / 32 floats).
inline bool uses_prepared_x(const Kernels& k, DType t) {
    return k.prepare_x != nullptr && with_prepared_type(t, [](auto) {});
}
constexpr bool superblock_x(DType t) {
    return t == DType::q2_k || t == DType::q3_k || t == DType::q4_k || t == DType::q5_k || t == DType::q6_k;
}
// the types repack16_rows takes (not q2_k: its mins per half sub-block have no place in the tile)
inline bool repackable16(DType t) {
    return (superblock_x(t) && t != DType::q2_k) || t == DType::q5_0 || t == DType::q5_1 || t == DType::iq4_nl ||
           t == DType::q8_0;
}
inline auto prepare_for(const Kernels& k, DType t) { return superblock_x(t) ? k.prepare_x_k : k.prepare_x; }

const Kernels& kernels_scalar();
const Kernels& kernels_avx2();     // only valid when the CPU has AVX2, FMA and F16C
const Kernels& kernels_avx512();   // only valid when it also has AVX-512 F, BW, VL, DQ and VNNI
// Sets the AMX entries of an AVX-512 table where this CPU and OS allow them (kernels_amx.cpp)
void add_amx_kernels(Kernels& k);
// Sets the Q8_0 strip kernel of an AVX-512 table (kernels_q8_0_strips.cpp)
void add_q8_0_strip_kernels(Kernels& k);
// Sets the sixteen-row decode kernels of an AVX-512 table (kernels_packed16.cpp)
void add_packed16_kernels(Kernels& k);

// The active table (chosen on first use; set_level overrides it).
const Kernels& kernels();
// Levels this CPU can run, best last.
std::vector<Level> supported_levels();
// Forces a level by name ("scalar", "avx2", "avx512"); throws tmill::Error if unsupported here.
// Waits until no LevelPin is held, so a forward pass never sees two levels.
void set_level(const std::string& name);
// Holds the active level fixed while it lives (a forward pass, a test kernel call).
class LevelPin {
public:
    LevelPin();

private:
    std::shared_lock<std::shared_mutex> lock_;
};
std::string level_name(Level level);

}  // namespace tmill::cpu
