// AVX-512 kernels of exact decode's integer paths: x as two int16 parts against block-quantized
// rows widened to int16 (VPDPWSSD), and x as four int8 parts against the 4- and 5-bit types in
// groups of eight rows (VPDPBUSD), with int8 decode's one-part variant of the latter. Part of the
// AVX-512 level (kernels_avx512.cpp), compiled with its flags.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx512_common.h"
#include "core/quants.h"

namespace tmill::cpu {

namespace {

using namespace avx512;

// ---- integer path: int16 activations, weights widened to int16, VPDPWSSD into int32

// 32 values as x / d = hi + lo / 2^15 (inv = 1 / d) into q: hi[32] then lo[32]; returns their sum
inline float encode_block(const float* x, float inv_d, int16_t* q) {
    const __m512 lo_scale = _mm512_set1_ps(32768.0f), inv = _mm512_set1_ps(inv_d);
    __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    __m512 s0 = _mm512_mul_ps(v0, inv), s1 = _mm512_mul_ps(v1, inv);
    __m512i h0 = _mm512_cvtps_epi32(s0), h1 = _mm512_cvtps_epi32(s1);
    __m512i l0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(s0, _mm512_cvtepi32_ps(h0)), lo_scale));
    __m512i l1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(s1, _mm512_cvtepi32_ps(h1)), lo_scale));
    auto store = [](int16_t* dst, __m512i v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtsepi32_epi16(v));
    };
    store(q, h0);
    store(q + 16, h1);
    store(q + 32, l0);
    store(q + 48, l1);
    return _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
}

inline float abs_max(const float* x, int64_t n) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    return _mm512_reduce_max_ps(m);
}

// x / d = hi + lo / 2^15 with hi, lo int16: per 32-block, hi[32] then lo[32] (so q holds 2n values),
// the same layout and rounding as the AVX2 level.
void prepare_x(const float* x, int64_t n, int16_t* q, float* d, float* sum) {
    for (int64_t b = 0; b < n / 32; ++b, x += 32, q += 64) {
        const float mx = abs_max(x, 32);
        d[b] = mx / 32767.0f;
        sum[b] = encode_block(x, mx > 0.0f ? 32767.0f / mx : 0.0f, q);
    }
}

// The same layout with one scale per 256-block (d [n / 256]); sum [n / 32] still per 32-block.
void prepare_x_k(const float* x, int64_t n, int16_t* q, float* d, float* sum) {
    for (int64_t s = 0; s < n / 256; ++s, x += 256) {
        const float mx = abs_max(x, 256), inv = mx > 0.0f ? 32767.0f / mx : 0.0f;
        d[s] = mx / 32767.0f;
        for (int b = 0; b < 8; ++b, q += 64) sum[8 * s + b] = encode_block(x + 32 * b, inv, q);
    }
}

// Block i of a quantized row: its 32 quants as int16 in one register, its scale and (q4_1) minimum.
struct WideBlock {
    __m512i q;
    float d, m;
};

template <DType T>
inline WideBlock widen(const uint8_t* row, int64_t i) {
    WideBlock w;
    w.m = 0.0f;
    __m256i bytes;
    if constexpr (is_block32(T)) {
        const Quants32 u = quants32<T>(row, i);
        w.d = u.d;
        w.m = u.m;
        w.q = _mm512_cvtepi8_epi16(u.q);
        return w;
    } else if constexpr (T == DType::q8_0) {
        const BlockQ8_0& b = reinterpret_cast<const BlockQ8_0*>(row)[i];
        bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
        w.d = half(b.d);
    } else {
        const uint8_t* qs;
        if constexpr (T == DType::q4_0) {
            const BlockQ4_0& b = reinterpret_cast<const BlockQ4_0*>(row)[i];
            qs = b.qs;
            w.d = half(b.d);
        } else {
            const BlockQ4_1& b = reinterpret_cast<const BlockQ4_1*>(row)[i];
            qs = b.qs;
            w.d = half(b.d);
            w.m = half(b.m);
        }
        __m128i lo, hi;
        unpack_nibbles(qs, &lo, &hi);
        bytes = _mm256_set_m128i(hi, lo);
        if constexpr (T == DType::q4_0) bytes = _mm256_sub_epi8(bytes, _mm256_set1_epi8(8));
    }
    w.q = _mm512_cvtepi8_epi16(bytes);
    return w;
}

// sum_j w_j (hi_j + lo_j / 2^15) over one block, as 16 float partial sums
inline __m512 block_dot(const WideBlock& w, const int16_t* q) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i hi = _mm512_dpwssd_epi32(zero, w.q, _mm512_loadu_si512(q));
    __m512i lo = _mm512_dpwssd_epi32(zero, w.q, _mm512_loadu_si512(q + 32));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(1.0f / 32768.0f), _mm512_cvtepi32_ps(hi));
}

// NT tokens against one row: each block is widened once and used for every token.
//   sum_j (dw q_j + m) x_j = dw * dx * sum_j q_j xq_j + m * sum_j x_j   (m = 0 for q8_0 / q4_0)
template <DType T, int NT>
void dot_rows_prepared(const void* row, const int16_t* q, const float* d, const float* sum, int64_t n, float* out) {
    const uint8_t* r = static_cast<const uint8_t*>(row);
    const int64_t blocks = n / 32;
    __m512 acc[NT];
    float min_part[NT];
    // every loop over the tokens fully unrolled, so the accumulators stay in registers
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) { acc[k] = _mm512_setzero_ps(); min_part[k] = 0.0f; }
    for (int64_t i = 0; i < blocks; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(r) + i * bytes_per_32<T>() + kDecodePrefetchBytes, _MM_HINT_T0);
        WideBlock w = widen<T>(r, i);
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) {   // token k's prepared vector: q [2n], d and sum [n / 32]
            const int64_t bi = k * blocks + i;
            acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(w.d * d[bi]), block_dot(w, q + k * 2 * n + i * 64), acc[k]);
            if constexpr (has_offset(T)) min_part[k] += w.m * sum[bi];
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) out[k] = _mm512_reduce_add_ps(acc[k]) + min_part[k];
}

// NT tokens against one K-quant row, x from prepare_x_k. Per super-block the sub-block scales fold
// into the int16 weights (|q sc| <= 4096), so each token's 256 products add up in two int32 vectors
// (hi and lo parts, at most 16 products per lane: below 2^31) before one conversion:
//   sum_j x_j (d sc_j q_j - dmin m_j) = d * dx * sum_j sc_j q_j xq_j - sum_b dmin m_b * xsum_b
template <DType T, int NT>
void dot_rows_k(const void* row, const int16_t* q, const float* d, const float* sum, int64_t n, float* out) {
    const uint8_t* r = static_cast<const uint8_t*>(row);
    const int64_t supers = n / 256, block = super_bytes(T);
    __m512 acc[NT];
    __m256 min_acc[NT];
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) { acc[k] = _mm512_setzero_ps(); min_acc[k] = _mm256_setzero_ps(); }
    KSuper u;
    for (int64_t s = 0; s < supers; ++s) {
        for (int64_t line = 0; line < block; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(r) + s * block + kDecodePrefetchBytes + line, _MM_HINT_T0);
        k_super<T>(r, s, u);
        __m512i w[8], mw[8];   // weights with their scales folded in; q2_k: each half's min as weights on x
        if constexpr (half_scales(T)) {   // sub-block j's two halves: entries 2j and 2j + 1
            const __m512i scales = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(u.sc))));
            const __m512i mins = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(u.m))));
            for (int j = 0; j < 8; ++j) {
                const __m512i pick = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * j)),
                                                        _mm256_set1_epi16(static_cast<int16_t>(2 * j + 1)), 1);
                w[j] = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(u.q[j]), _mm512_permutexvar_epi16(pick, scales));
                if constexpr (T == DType::q2_k) mw[j] = _mm512_permutexvar_epi16(pick, mins);
            }
        } else {
            for (int j = 0; j < 8; ++j)
                w[j] = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(u.q[j]), _mm512_set1_epi16(static_cast<uint8_t>(u.sc[j])));
        }
        __m256 mins = _mm256_setzero_ps();
        if constexpr (block_mins(T))
            mins = _mm256_mul_ps(_mm256_set1_ps(u.dmin),
                                 _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u.m)))));
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) {   // token k's prepared vector: q [2n], d [n / 256], sum [n / 32]
            const int16_t* xq = q + k * 2 * n + s * 512;
            const float dx = d[k * (n / 32) + s];
            __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512(), min_hi = hi, min_lo = hi;
            for (int j = 0; j < 8; ++j) {
                const __m512i xh = _mm512_loadu_si512(xq + 64 * j), xl = _mm512_loadu_si512(xq + 64 * j + 32);
                hi = _mm512_dpwssd_epi32(hi, w[j], xh);
                lo = _mm512_dpwssd_epi32(lo, w[j], xl);
                if constexpr (T == DType::q2_k) {
                    min_hi = _mm512_dpwssd_epi32(min_hi, mw[j], xh);
                    min_lo = _mm512_dpwssd_epi32(min_lo, mw[j], xl);
                }
            }
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(1.0f / 32768.0f), _mm512_cvtepi32_ps(hi));
            acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(u.d * dx), f, acc[k]);
            if constexpr (T == DType::q2_k) {   // - dmin * dx * sum_j m_j xq_j
                const __m512 fm = _mm512_fmadd_ps(_mm512_cvtepi32_ps(min_lo), _mm512_set1_ps(1.0f / 32768.0f), _mm512_cvtepi32_ps(min_hi));
                acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(-(u.dmin * dx)), fm, acc[k]);
            }
            if constexpr (block_mins(T))
                min_acc[k] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(sum + k * (n / 32) + 8 * s), min_acc[k]);
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) {
        const __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(min_acc[k]), _mm256_extractf128_ps(min_acc[k], 1));
        const __m128 m2 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4));
        out[k] = _mm512_reduce_add_ps(acc[k]) - _mm_cvtss_f32(_mm_add_ss(m2, _mm_movehdup_ps(m2)));
    }
}

template <int NT>
void dispatch_prepared(DType t, const void* row, const int16_t* q, const float* d, const float* sum, int64_t n,
                       float* out) {
    const bool known = with_prepared_type(t, [&](auto type) {
        constexpr DType T = decltype(type)::value;
        if constexpr (superblock_x(T)) dot_rows_k<T, NT>(row, q, d, sum, n, out);
        else dot_rows_prepared<T, NT>(row, q, d, sum, n, out);
    });
    if (!known)
        for (int k = 0; k < NT; ++k) out[k] = 0.0f;   // callers check uses_prepared_x first
}

float dot_row_prepared(DType t, const void* row, const int16_t* q, const float* d, const float* sum, int64_t n) {
    float out;
    dispatch_prepared<1>(t, row, q, d, sum, n, &out);
    return out;
}

void dot_row_prepared_x4(DType t, const void* row, const int16_t* q, const float* d, const float* sum, int64_t n,
                         float* out) {
    dispatch_prepared<4>(t, row, q, d, sum, n, out);
}

// ---- 4-bit weights in eight-row groups: int8 activation parts, VPDPBUSD (unsigned nibbles x signed
// bytes, four products per int32 lane)

// x / d = a + b / 2^7 + c / 2^14 + e / 2^21 per 32-block: a = round(x / d) in [-127, 127], then each
// part rounds 128 times the remainder of the one before (in [-64, 64]).
void prepare_x8(const float* x, int64_t n, int8_t* q, float* d, float* sum, int parts) {
    for (int64_t b = 0; b < n / 32; ++b, x += 32, q += 128) {
        __m512 v[2] = {_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)};
        float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        d[b] = mx / 127.0f;
        sum[b] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
        const __m512 inv = _mm512_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
        v[0] = _mm512_mul_ps(v[0], inv);
        v[1] = _mm512_mul_ps(v[1], inv);
        for (int part = 0; part < parts; ++part)
            for (int h = 0; h < 2; ++h) {
                __m512i whole = _mm512_cvtps_epi32(v[h]);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * part + 16 * h), _mm512_cvtsepi32_epi8(whole));
                v[h] = _mm512_mul_ps(_mm512_sub_ps(v[h], _mm512_cvtepi32_ps(whole)), _mm512_set1_ps(128.0f));
            }
    }
}

// Block column i of a group, unpacked once for all the tokens of a call: each half's low and high
// nibbles as bytes (q5: with their fifth bits), the column prefetched ahead, and the rows' scales
// spread over the lanes the kernels' lane sums leave each row in (128-bit lane k: rows k, k, k + 4,
// k + 4); per_row gets the rows' offsets (q4_0: -8 dw, q4_1: m).
template <DType T>
inline __m512 unpack_column(GroupColumns<T>& columns, int64_t i, __m512i* lo, __m512i* hi, __m256* per_row) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i row_of_lane = _mm512_set_epi32(7, 7, 3, 3, 6, 6, 2, 2, 5, 5, 1, 1, 4, 4, 0, 0);
    __m256 dw;
    const uint8_t* c = columns.at(i, &dw, per_row);   // the column's quants
    _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
        const __m512i w = _mm512_loadu_si512(c + 64 * h);
        lo[h] = _mm512_and_si512(w, low4);
        hi[h] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
        if constexpr (five_bit(T)) add_fifth_bits(c, h, lo[h], hi[h]);
    }
    return _mm512_permutexvar_ps(row_of_lane, _mm512_castps256_ps512(dw));
}

// out[8 t + r] = the eight-row kernels' result for token t and row r: acc[t]'s lane 4 (r % 4) + 2 (r / 4)
// (where their sums end up) plus extra[t]'s lane r (the offsets' terms)
void store_group_rows(const __m512* acc, const __m256* extra, int nt, float* out) {
    for (int t = 0; t < nt; ++t) {
        alignas(64) float lanes[16];
        alignas(32) float e[8];
        _mm512_store_ps(lanes, acc[t]);
        _mm256_store_ps(e, extra[t]);
        for (int r = 0; r < 8; ++r) out[8 * t + r] = lanes[4 * (r % 4) + 2 * (r / 4)] + e[r];
    }
}

// One group (eight rows) against NT prepared x's (q[t], d[t], sum[t] token t's). Per block column,
// each half of the group is one 64-byte register: four rows of 16 quant bytes, so int32 lane l
// belongs to row l / 4 and x's 16 bytes are broadcast to every 128-bit lane. Parts pair up in int32
// as P_ab = a * 2^7 + b and P_ce = c * 2^7 + e (at most 2^21 in magnitude per product, 2^24 per
// block: exact), and each row's pair sums are added up in int32 before they meet floats, so a
// (row, token) pair's float operations depend on nothing but its block sums -- those the AMX
// kernel (dot_packed8_amx) computes too:
//   acc_r = fma(fma(float(P_ce), 2^-14, float(P_ab)), dw_r * (d * 2^-7), acc_r) per block,
//   extra_r = fma(c_r, sum_j x_j, extra_r) for the offset c_r (q4_0: -8 dw_r, q4_1: m_r),
//   out_r = acc_r + extra_r.
// The nibbles unpack once for all NT tokens.
template <DType T, int NT>
void dot_packed8_tokens_type(const uint8_t* group, const int8_t* const* q, const float* const* d,
                             const float* const* sum, int64_t n, float* out) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512 low_pair = _mm512_set1_ps(1.0f / 16384.0f);
    __m512 acc[NT];
    __m256 block_sums[NT];   // per row: sum_i offset_i * sum(x of block i)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
        acc[t] = _mm512_setzero_ps();
        block_sums[t] = _mm256_setzero_ps();
    }
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m512i lo[2], hi[2];
        __m256 per_row;
        const __m512 dw_lanes = unpack_column(columns, i, lo, hi, &per_row);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
            const int8_t* xb = q[t] + i * 128;
            __m512i xs[8];   // each part's x[0..15] and x[16..31], in all four lanes
            for (int k = 0; k < 8; ++k)
                xs[k] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16 * k)));
            auto pair = [&](int h, int k) {   // parts k and k + 1 as part_k * 2^7 + part_k+1, four per row
                __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[h], xs[2 * k]), hi[h], xs[2 * k + 1]);
                s = _mm512_slli_epi32(s, 7);
                return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, lo[h], xs[2 * k + 2]), hi[h], xs[2 * k + 3]);
            };
            // per 128-bit lane k, rows k and k + 4: first two partial sums each, then whole ones
            // with P_ab and P_ce side by side
            const __m512i ab0 = pair(0, 0), ab1 = pair(1, 0), ce0 = pair(0, 2), ce1 = pair(1, 2);
            const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi64(ab0, ab1), _mm512_unpackhi_epi64(ab0, ab1));
            const __m512i ce = _mm512_add_epi32(_mm512_unpacklo_epi64(ce0, ce1), _mm512_unpackhi_epi64(ce0, ce1));
            const __m512i lo_pairs = _mm512_unpacklo_epi32(ab, ce), hi_pairs = _mm512_unpackhi_epi32(ab, ce);
            const __m512 f = _mm512_cvtepi32_ps(
                _mm512_add_epi32(_mm512_unpacklo_epi64(lo_pairs, hi_pairs), _mm512_unpackhi_epi64(lo_pairs, hi_pairs)));
            const __m512 pairs = _mm512_fmadd_ps(_mm512_movehdup_ps(f), low_pair, f);   // even lanes
            const __m512 scale = _mm512_mul_ps(dw_lanes, _mm512_set1_ps(d[t][i] * (1.0f / 128.0f)));
            acc[t] = _mm512_fmadd_ps(pairs, scale, acc[t]);
            block_sums[t] = _mm256_fmadd_ps(per_row, _mm256_set1_ps(sum[t][i]), block_sums[t]);
        }
    }
    store_group_rows(acc, block_sums, NT, out);
}

// The eight-row group against NT vectors rounded to int8 per 32-block (the first part of prepare_x8
// alone: llama.cpp's decode precision) -- a quarter of the VPDPBUSD work of the exact kernel above.
// a[t] the rounded x, d[t] its block scales, sum[t] the block sums of the rounded x. Per block, each
// row's 32 products are summed in int32 (exact) before one conversion, so every (row, vector) pair
// runs the same float operations as in the sixteen-row AMX kernel (dot_packed8_int8_amx) and in any
// tile of tokens:
//   acc_r = fma(float(sum_j q_rj a_j), dw_r * dx, acc_r) per block, extra_r = fma(c_r, dx sum_j a_j,
//   extra_r) for the offset c_r (q4_0: -8 dw_r, q4_1: m_r), out_r = acc_r + extra_r.
// The nibbles unpack once for all NT vectors.
template <DType T, int NT>
void dot_packed8_int8_tokens_type(const uint8_t* group, const int8_t* const* a, const float* const* d,
                                  const float* const* sum, int64_t n, float* out) {
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[NT];
    __m256 extra[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
        acc[t] = _mm512_setzero_ps();
        extra[t] = _mm256_setzero_ps();
    }
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m512i lo[2], hi[2];
        __m256 offset;
        const __m512 dw_lanes = unpack_column(columns, i, lo, hi, &offset);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
            const __m512i x_lo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a[t] + 32 * i)));
            const __m512i x_hi =
                _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a[t] + 32 * i + 16)));
            // rows 0-3 and 4-7, four partial sums per row (128-bit lane k: row k, or k + 4) ...
            const __m512i s0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[0], x_lo), hi[0], x_hi);
            const __m512i s1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[1], x_lo), hi[1], x_hi);
            // ... added up in two steps: lane k holds (row k, row k, row k + 4, row k + 4)
            const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(s0, s1), _mm512_unpackhi_epi64(s0, s1));
            const __m512i rows = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, _MM_PERM_CDAB));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rows), _mm512_mul_ps(dw_lanes, _mm512_set1_ps(d[t][i])), acc[t]);
            extra[t] = _mm256_fmadd_ps(offset, _mm256_set1_ps(sum[t][i]), extra[t]);
        }
    }
    store_group_rows(acc, extra, NT, out);
}

template <DType T>
void dot_packed8_int8_type(const uint8_t* group, const int8_t* a, const float* d, const float* sum, int64_t n,
                           float* out) {
    dot_packed8_int8_tokens_type<T, 1>(group, &a, &d, &sum, n, out);
}

void dot_packed8_int8_tokens(DType t, const uint8_t* group, const int8_t* const* a, const float* const* d,
                             const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) {
        with_count_to_4(nt, [&](auto count) {
            dot_packed8_int8_tokens_type<decltype(type)::value, decltype(count)::value>(group, a, d, sum, n, out);
        });
    });
}

void dot_packed8_int8(DType t, const uint8_t* group, const int8_t* a, const float* d, const float* sum, int64_t n,
                      float* out) {
    with_packed_type(t, [&](auto type) { dot_packed8_int8_type<decltype(type)::value>(group, a, d, sum, n, out); });
}

void dot_packed8(DType t, const uint8_t* group, const int8_t* q, const float* d, const float* sum, int64_t n,
                 float* out) {
    with_packed_type(t, [&](auto type) { dot_packed8_tokens_type<decltype(type)::value, 1>(group, &q, &d, &sum, n, out); });
}

void dot_packed8_tokens(DType t, const uint8_t* group, const int8_t* const* q, const float* const* d,
                        const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) {
        with_count_to_4(nt, [&](auto count) {
            dot_packed8_tokens_type<decltype(type)::value, decltype(count)::value>(group, q, d, sum, n, out);
        });
    });
}

// One group's rows as floats: per block column, the eight scales (and minimums) convert in one
// instruction, then each row's 16 quant bytes as in dequantize_row.
template <DType T>
void dequantize_packed8_type(const uint8_t* group, int64_t n, float* out, int64_t out_stride) {
    alignas(32) float d[8], m[8] = {};
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m256 dw, offset;
        const uint8_t* c = columns.at(i, &dw, &offset);   // the column's quants
        _mm256_store_ps(d, dw);
        if constexpr (T != DType::q4_0) _mm256_store_ps(m, offset);   // q4_0: q - 8 instead
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
            __m512 lo, hi;
            nibble_floats<T == DType::q4_0 ? T : DType::q4_1>(c + 16 * r, d[r], m[r], &lo, &hi);
            _mm512_storeu_ps(out + r * out_stride + 32 * i, lo);
            _mm512_storeu_ps(out + r * out_stride + 32 * i + 16, hi);
        }
    }
}

void dequantize_packed8(DType t, const uint8_t* group, int64_t n, float* out, int64_t out_stride) {
    with_packed_type(t, [&](auto type) {
        constexpr DType T = decltype(type)::value;
        if constexpr (five_bit(T)) dequantize_packed8_five<T>(group, n, out, out_stride);
        else dequantize_packed8_type<T>(group, n, out, out_stride);
    });
}

}  // namespace

void avx512::add_integer_kernels(Kernels& k) {
    k.prepare_x = prepare_x;
    k.prepare_x_k = prepare_x_k;
    k.dot_row_prepared = dot_row_prepared;
    k.dot_row_prepared_x4 = dot_row_prepared_x4;
    k.prepare_x8 = prepare_x8;
    k.dot_packed8 = dot_packed8;
    k.dot_packed8_tokens = dot_packed8_tokens;
    k.dot_packed8_int8 = dot_packed8_int8;
    k.dot_packed8_int8_tokens = dot_packed8_int8_tokens;
    k.dequantize_packed8 = dequantize_packed8;
}

}  // namespace tmill::cpu
