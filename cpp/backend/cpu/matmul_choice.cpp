// Which kernel each weight's product with T tokens runs on (Matmul's choice, the measurements behind
// it): the decode kernels for decode-sized products, AMX where it pays, the float or int8 tiles for
// prefill elsewhere -- and which arithmetic the rows then get. matmul.cpp runs the products.
#include "backend/cpu/kernels.h"
#include "backend/cpu/matmul.h"

namespace tmill::cpu {

namespace {

// Below this many tokens, block-quantized weights use the integer kernels; from it on, the float
// tile on dequantized rows is faster (each row's widening is amortised over more tokens) -- or, with
// int8 prefill, the sixteen-row int8 kernel on 4-bit weights.
constexpr int64_t kPreparedMaxTokens = 8;
// Decode rows take the AMX kernels from this many tokens on: those cost nearly the same for 1 to 16
// tokens, the VNNI kernels' work grows with the tokens. Per 16-row block, one core (q4_1 x 576), VNNI
// against AMX (tokens as the tile rows): int8 decode's packed kernel 22 against 24 ns at 4 tokens, 30
// against 25 at 5, 86 against 41 at 16; the exact four-part one 57 against 61 at 4, 69-72 against
// 63-67 at 5, 223 against 95-102 at 16. int8 decode's Q8_0 rows (signed, no unpacking): 47 against
// 38 ns per row at 3 tokens, 254 against 51 at 16.
constexpr int64_t kAmxInt8MinTokens = 5;
constexpr int64_t kAmxExactMinTokens = 5;
// The Q8_0 strips' VNNI kernels need no unpacking and no horizontal sums, so AMX pays only later:
// per strip (16 x 576, one core) exact 1009 against 1041 ns at 6 tokens, 1331 against 1183 at 8,
// 2731 against 1740 at 16; int8 461 against 501 at 8, 569 against 537 at 9, 925 against 713 at 16.
constexpr int64_t kAmxStripExactMinTokens = 7;
constexpr int64_t kAmxStripInt8MinTokens = 9;
// The sixteen-row decode kernels (no horizontal sums, but an in-register transpose per block column
// and longer dependency chains) pay from this many tokens on. Whole passes of SmolLM2 Q4_1 with T
// rows as decode, Zen 4, 2 threads, eight-row -> sixteen-row kernels, ms: exact T = 1 4.3 -> 5.0-5.3,
// 2 6.2 -> 5.6-5.8, 4 10.1 -> 8.9-9.2, 8 20.0 -> 15.3; int8 decode T = 2 4.0-4.2 -> 4.8-4.9, 3
// 4.6-4.8 -> 4.9-5.3, 4 5.4-5.6 -> 5.1-5.3, 8 8.7-8.9 -> 6.9-7.1.
constexpr int64_t kPacked16ExactMinTokens = 2;
constexpr int64_t kPacked16Int8MinTokens = 4;
// int8 prefill of the packed types from this many tokens on takes the sixteen-row int8 tile, not AMX
// (prefill_on_amx)
constexpr int64_t kInt8TileMinTokens = 64;

}  // namespace

// Which kernels a weight's product with T tokens runs on: the eight-row integer kernel (few
// tokens, packed 4-bit), the float tile on dequantized rows (prefill), else the per-row kernels.
// (Rows as decode: always the kernels of T = 1, each token on its own.) Few tokens outside a
// batch-invariant pass are decode-sized: they take the decode kernels (int8 ones with int8 decode).
bool Matmul::uses_packed(const Kernels& kern, const Weight& w, int64_t T) const {
    return (decode_sized(T) || prefill_on_amx(kern, w, T)) && packed8(w) && kern.dot_packed8;
}
bool Matmul::uses_q8_0_strips(const Kernels& kern, const Weight& w, int64_t T) const {
    return (decode_sized(T) || prefill_on_amx(kern, w, T)) && q8_0_strips(w) &&
           (int8_rows_ ? kern.dot_q8_0_strip_int8 : kern.dot_q8_0_strip);
}
bool Matmul::uses_tile(const Kernels& kern, const Weight& w, int64_t T) const {
    if (prefill_on_amx(kern, w, T)) return false;
    if (invariant()) return true;
    return T > 1 && !rows_as_decode() && !(T < kPreparedMaxTokens && uses_prepared_x(kern, w.type));
}
bool Matmul::decode_sized(int64_t T) const { return (T < kPreparedMaxTokens && !invariant()) || rows_as_decode(); }

// ... and prefill (a long product, or a batch-invariant pass's prompt rows) of a weight whose decode
// kernel of the same arithmetic runs on AMX takes that kernel, so prompt rows get decode's bits.
// Exact, it beats the float tile at every length (2 threads, tokens/s, pp64 / pp512: SmolLM2 Q4_1
// 590 / 592 -> 924 / 785, its Q8_0 copy 580 / 523 -> 844 / 742, a Qwen2.5-0.5B-shape Q4_K 176 / 173
// -> 301 / 259). With int8_prefill it beats the sixteen-row int8 tile, which repacks every weight
// per call, on short products (pp16: SmolLM2 Q4_1 916-957 -> 1177-1235, the Qwen shape's Q4_K
// 363-384 -> 473-475) and on Q8_0 strips at any length (1084 / 1189 -> 1515 / 1403), but not on
// the 4-bit types' long ones (Gemma 3 Q4_K_M pp512 1120-1160 against 1020-1038), which keep the tile
// from kInt8TileMinTokens -- except in a batch-invariant pass, whose every chunk must take one
// kernel, and whose chunks are mostly short (the 10-token rest of a cached prompt took 18 ms on the
// tile, which repacks the whole model, and takes 13 on AMX). Without AMX the integer decode kernels
// are not faster than the tiles, which keep prefill there.
bool Matmul::prefill_on_amx(const Kernels& kern, const Weight& w, int64_t T) const {
    if (decode_sized(T)) return false;
    if (q8_0_strips(w)) return (int8_prefill_ ? kern.dot_q8_0_strip_int8_amx : kern.dot_q8_0_strip_amx) != nullptr;
    if (int8_prefill_ && !invariant() && T >= kInt8TileMinTokens) return false;
    return packed8(w) && (int8_prefill_ ? kern.dot_packed8_int8_amx : kern.dot_packed8_amx) != nullptr;
}

// Rows per unit of the float tile path: a whole eight-row group of a packed weight (dequantized in
// one call, then run as tiles of the level's height), else one tile.
int64_t Matmul::tile_unit_rows(const Kernels& kern, const Weight& w) const {
    return packed8(w) && kern.dequantize_packed8 ? 8 : kern.tile_rows;
}

// Rows per unit of the packed kernels: two groups where the level has the sixteen-row kernel of
// the unit's arithmetic, else one ...
int64_t Matmul::packed_unit_rows(const Kernels& kern) const {
    return (uses_int8_x(kern) ? kern.dot_packed16_int8_tokens : kern.dot_packed16_tokens) ? 16 : 8;
}
// ... which runs both groups at once from kPacked16*MinTokens tokens on
bool Matmul::packed_as_sixteen(const Kernels& kern, int64_t T) const {
    return T >= (uses_int8_x(kern) ? kPacked16Int8MinTokens : kPacked16ExactMinTokens);
}

// ... the packed kernel on x rounded to int8: int8 decode's rows (rows as decode too: they must be
// what this model's one-token steps compute), or int8 prefill's on AMX
bool Matmul::uses_int8_x(const Kernels& kern) const { return int8_rows_ && kern.dot_packed8_int8; }
// ... on AMX from amx_min_tokens on (each row's bits those of the VNNI kernel)
// (int8 decode's Q8_0 rows too, where they run as decode)
bool Matmul::uses_amx(const Kernels& kern, const Weight& w, int64_t T) const {
    if (T < amx_min_tokens(kern, w)) return false;
    if (q8_0_strips(w))
        return uses_q8_0_strips(kern, w, T) && (int8_rows_ ? kern.dot_q8_0_strip_int8_amx : kern.dot_q8_0_strip_amx);
    const bool has_kernel = uses_int8_x(kern) ? kern.dot_packed8_int8_amx != nullptr : kern.dot_packed8_amx != nullptr;
    return uses_packed(kern, w, T) && has_kernel;
}
int64_t Matmul::amx_min_tokens(const Kernels& kern, const Weight& w) const {
    if (q8_0_strips(w)) return int8_rows_ ? kAmxStripInt8MinTokens : kAmxStripExactMinTokens;
    return uses_int8_x(kern) ? kAmxInt8MinTokens : kAmxExactMinTokens;
}
// ... and Q8_0 weights in decode (not on the tile paths) meet the same rounded x (q8_0 x q8_0) in
// their file layout, where the level does not read the strips
bool Matmul::uses_int8_q8_0(const Kernels& kern, const Weight& w) const {
    return int8_rows_ && w.type == DType::q8_0 && !(q8_0_strips(w) && kern.dot_q8_0_strip_int8) && kern.dot_q8_0_int8;
}

// ... and, with int8 prefill, the sixteen-row kernel on a packed weight's prefill
bool Matmul::uses_tile16(const Kernels& kern, const Weight& w, int64_t T) const {
    const bool repackable = packed8(w) || (repackable16(w.type) && kern.repack16_rows);
    return int8_prefill_ && !decode_sized(T) && !prefill_on_amx(kern, w, T) && repackable && kern.dot_tile16;
}

}  // namespace tmill::cpu
