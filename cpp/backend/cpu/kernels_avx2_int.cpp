// AVX2 kernels of the integer paths: x as two int16 parts against block-quantized rows widened to
// int16 (VPMADDWD), x as four int8 parts against the 4- and 5-bit types in groups of eight rows
// (VPMADDUBSW + VPMADDWD), and the opt-in int8 prefill tile. Part of the AVX2 level
// (kernels_avx2.cpp), compiled with its flags.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx2_common.h"
#include "core/quants.h"

namespace tmill::cpu {

namespace {

using namespace avx2;

// ---- integer path: int16 activations, weights widened from int8 / nibbles, madd into int32

// 32 values as x / d = hi + lo / 2^15 (inv = 1 / d) into q: hi[32] then lo[32]; returns their sum
inline float encode_block(const float* x, float inv_d, int16_t* q) {
    const __m256 lo_scale = _mm256_set1_ps(32768.0f), inv = _mm256_set1_ps(inv_d);
    __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)};
    __m256 s = _mm256_setzero_ps();
    for (const __m256& vi : v) s = _mm256_add_ps(s, vi);
    __m256i hi[4], lo[4];
    for (int g = 0; g < 4; ++g) {
        __m256 scaled = _mm256_mul_ps(v[g], inv);
        hi[g] = _mm256_cvtps_epi32(scaled);
        lo[g] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(scaled, _mm256_cvtepi32_ps(hi[g])), lo_scale));
    }
    // packs works per 128-bit lane; the permute restores element order
    auto store = [](int16_t* dst, __m256i a, __m256i b) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    };
    store(q, hi[0], hi[1]);
    store(q + 16, hi[2], hi[3]);
    store(q + 32, lo[0], lo[1]);
    store(q + 48, lo[2], lo[3]);
    return hsum(s);
}

inline float abs_max(const float* x, int64_t n) {
    const __m256 sign_mask = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    return _mm_cvtss_f32(m4);
}

// x / d = hi + lo / 2^15 with hi, lo int16: per 32-block, hi[32] then lo[32] (so q holds 2n values)
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

// Block j of a quantized row widened to int16: elements 0..15 and 16..31, plus the block's scale
// and (q4_1) minimum.
struct WideBlock {
    __m256i lo, hi;
    float d, m;
};

template <DType T>
inline WideBlock widen(const uint8_t* row, int64_t i) {
    WideBlock w;
    __m128i lo, hi;
    w.m = 0.0f;
    if constexpr (is_block32(T)) {
        const Quants32 u = quants32<T>(row, i);
        w.d = u.d;
        w.m = u.m;
        w.lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(u.q));
        w.hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(u.q, 1));
        return w;
    } else if constexpr (T == DType::q8_0) {
        const BlockQ8_0& b = reinterpret_cast<const BlockQ8_0*>(row)[i];
        lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
        hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs + 16));
        w.d = half(b.d);
    } else if constexpr (T == DType::q4_0) {
        const BlockQ4_0& b = reinterpret_cast<const BlockQ4_0*>(row)[i];
        unpack_nibbles(b.qs, &lo, &hi);
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
        w.d = half(b.d);
    } else {
        const BlockQ4_1& b = reinterpret_cast<const BlockQ4_1*>(row)[i];
        unpack_nibbles(b.qs, &lo, &hi);
        w.d = half(b.d);
        w.m = half(b.m);
    }
    w.lo = _mm256_cvtepi8_epi16(lo);
    w.hi = _mm256_cvtepi8_epi16(hi);
    return w;
}

// sum_j w_j (hi_j + lo_j / 2^15) over one block, as 8 float partial sums
inline __m256 block_madd(const WideBlock& w, const int16_t* q) {
    auto madd = [&](const int16_t* p) {
        __m256i a = _mm256_madd_epi16(w.lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        __m256i b = _mm256_madd_epi16(w.hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
        return _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
    };
    return _mm256_fmadd_ps(madd(q + 32), _mm256_set1_ps(1.0f / 32768.0f), madd(q));
}

// NT tokens against one row: each block is widened once and used for every token.
//   sum_j (dw q_j + m) x_j = dw * dx * sum_j q_j xq_j + m * sum_j x_j   (m = 0 for q8_0 / q4_0)
template <DType T, int NT>
void dot_rows_prepared(const void* row, const int16_t* q, const float* d, const float* sum, int64_t n, float* out) {
    const uint8_t* r = static_cast<const uint8_t*>(row);
    const int64_t blocks = n / 32;
    __m256 acc[NT];
    float min_part[NT];
    // every loop over the tokens fully unrolled, so the accumulators stay in registers
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) { acc[k] = _mm256_setzero_ps(); min_part[k] = 0.0f; }
    for (int64_t i = 0; i < blocks; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(r) + i * bytes_per_32<T>() + kDecodePrefetchBytes, _MM_HINT_T0);
        WideBlock w = widen<T>(r, i);
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) {   // token k's prepared vector: q [2n], d and sum [n / 32]
            const int64_t bi = k * blocks + i;
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(w.d * d[bi]), block_madd(w, q + k * 2 * n + i * 64), acc[k]);
            if constexpr (has_offset(T)) min_part[k] += w.m * sum[bi];
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) out[k] = hsum(acc[k]) + min_part[k];
}

// NT tokens against one K-quant row, x from prepare_x_k. The sub-block scales fold into the int16
// weights (|q sc| <= 4096) and the products add up in int32 (hi and lo parts) over a run of sub-blocks
// before one conversion: the whole super-block for q2_k .. q5_k (32 products per lane: below 2^31),
// halves for q6_k, whose larger weights would overflow over a whole one.
//   sum_j x_j (d sc_j q_j - dmin m_j) = d * dx * sum_j sc_j q_j xq_j - sum_b dmin m_b * xsum_b
// (q2_k's mins, one per half sub-block, go the same way as weights on xq: - dmin * dx * sum_j m_j xq_j)
template <DType T, int NT>
void dot_rows_k(const void* row, const int16_t* q, const float* d, const float* sum, int64_t n, float* out) {
    constexpr int kRun = T == DType::q6_k ? 4 : 8;
    const uint8_t* r = static_cast<const uint8_t*>(row);
    const int64_t supers = n / 256, block = super_bytes(T);
    __m256 acc[NT], min_acc[NT];
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) { acc[k] = _mm256_setzero_ps(); min_acc[k] = _mm256_setzero_ps(); }
    KSuper u;
    for (int64_t s = 0; s < supers; ++s) {
        for (int64_t line = 0; line < block; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(r) + s * block + kDecodePrefetchBytes + line, _MM_HINT_T0);
        k_super<T>(r, s, u);
        if constexpr (block_mins(T)) {
            const __m256 mins = _mm256_mul_ps(_mm256_set1_ps(u.dmin),
                                              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u.m)))));
#pragma GCC unroll 4
            for (int k = 0; k < NT; ++k)
                min_acc[k] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(sum + k * (n / 32) + 8 * s), min_acc[k]);
        }
        for (int j0 = 0; j0 < 8; j0 += kRun) {
            __m256i hi[NT], lo[NT], min_hi[NT], min_lo[NT];   // q2_k: sum_j m_j xq_j beside
#pragma GCC unroll 4
            for (int k = 0; k < NT; ++k) hi[k] = lo[k] = min_hi[k] = min_lo[k] = _mm256_setzero_si256();
            for (int j = j0; j < j0 + kRun; ++j) {
                const __m256i w0 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(u.q[j])),
                                                      _mm256_set1_epi16(static_cast<int16_t>(k_scale<T>(u, j, 0))));
                const __m256i w1 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(u.q[j], 1)),
                                                      _mm256_set1_epi16(static_cast<int16_t>(k_scale<T>(u, j, 1))));
                const __m256i m0 = _mm256_set1_epi16(static_cast<int16_t>(k_min<T>(u, j, 0)));
                const __m256i m1 = _mm256_set1_epi16(static_cast<int16_t>(k_min<T>(u, j, 1)));
#pragma GCC unroll 4
                for (int k = 0; k < NT; ++k) {   // token k's prepared vector: q [2n], d [n / 256], sum [n / 32]
                    const int16_t* xq = q + k * 2 * n + s * 512 + 64 * j;
                    auto load = [&](int off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + off)); };
                    const __m256i x[4] = {load(0), load(16), load(32), load(48)};   // hi parts, then lo parts
                    hi[k] = _mm256_add_epi32(hi[k], _mm256_add_epi32(_mm256_madd_epi16(w0, x[0]), _mm256_madd_epi16(w1, x[1])));
                    lo[k] = _mm256_add_epi32(lo[k], _mm256_add_epi32(_mm256_madd_epi16(w0, x[2]), _mm256_madd_epi16(w1, x[3])));
                    if constexpr (T == DType::q2_k) {
                        min_hi[k] = _mm256_add_epi32(min_hi[k], _mm256_add_epi32(_mm256_madd_epi16(m0, x[0]), _mm256_madd_epi16(m1, x[1])));
                        min_lo[k] = _mm256_add_epi32(min_lo[k], _mm256_add_epi32(_mm256_madd_epi16(m0, x[2]), _mm256_madd_epi16(m1, x[3])));
                    }
                }
            }
#pragma GCC unroll 4
            for (int k = 0; k < NT; ++k) {
                const float dx = d[k * (n / 32) + s];
                const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[k]), _mm256_set1_ps(1.0f / 32768.0f), _mm256_cvtepi32_ps(hi[k]));
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(u.d * dx), f, acc[k]);
                if constexpr (T == DType::q2_k) {   // - dmin * dx * sum_j m_j xq_j
                    const __m256 fm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_lo[k]), _mm256_set1_ps(1.0f / 32768.0f),
                                                      _mm256_cvtepi32_ps(min_hi[k]));
                    acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(-(u.dmin * dx)), fm, acc[k]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) out[k] = hsum(acc[k]) - hsum(min_acc[k]);
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

// ---- 4-bit weights in eight-row groups (pack_rows8): int8 activation parts, VPMADDUBSW (unsigned
// nibbles x signed bytes, pairs summed in int16) and VPMADDWD (pairs of those in int32)

// x / d = a + b / 2^7 + c / 2^14 + e / 2^21 per 32-block, as the AVX-512 level lays it out: a =
// round(x / d) in [-127, 127], then each part rounds 128 times the remainder of the one before.
void prepare_x8(const float* x, int64_t n, int8_t* q, float* d, float* sum, int parts) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   // undoes the packs' lane interleave
    for (int64_t b = 0; b < n / 32; ++b, x += 32, q += 128) {
        const float mx = abs_max(x, 32);
        d[b] = mx / 127.0f;
        __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)};
        sum[b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
        const __m256 inv = _mm256_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
        for (__m256& vi : v) vi = _mm256_mul_ps(vi, inv);
        for (int part = 0; part < parts; ++part) {
            __m256i whole[4];
            for (int g = 0; g < 4; ++g) {
                whole[g] = _mm256_cvtps_epi32(v[g]);
                v[g] = _mm256_mul_ps(_mm256_sub_ps(v[g], _mm256_cvtepi32_ps(whole[g])), _mm256_set1_ps(128.0f));
            }
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(whole[0], whole[1]), _mm256_packs_epi32(whole[2], whole[3]));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * part), _mm256_permutevar8x32_epi32(bytes, order));
        }
    }
}

// One group (eight rows) against NT prepared x's. Per block column, register k holds rows 2k and
// 2k + 1 (16 quant bytes each, one per 128-bit lane), so int32 lane l belongs to row 2k + l / 4 and
// x's 16 bytes are broadcast to both lanes. Parts pair up in int32 as a * 2^7 + b and c * 2^7 + e
// (int16 sums at most 7,620, int32 ones 2^21: exact), the pairs meet in float:
//   row r: sum_j w_j x_j = dw_r * d * 2^-7 * (S_ab + S_ce * 2^-14) + (q4_0: -8 dw_r, q4_1: m_r) * sum_j x_j
// The nibbles unpack once for all NT tokens; each token's operations are those of NT = 1 in the same
// order, so a token's eight sums have the same bits however many tokens share the call.
template <DType T, int NT>
void dot_packed8_tokens_type(const uint8_t* group, const int8_t* const* q, const float* const* d,
                             const float* const* sum, int64_t n, float* out) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi16(1), shifted = _mm256_set1_epi16(128);
    const __m256 low_pair = _mm256_set1_ps(1.0f / 16384.0f);
    __m256 acc[NT][4];
    __m256 block_sums[NT];   // per row: sum_i offset_i * sum(x of block i)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
        for (__m256& a : acc[t]) a = _mm256_setzero_ps();
        block_sums[t] = _mm256_setzero_ps();
    }
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m256 dw, per_row;
        const uint8_t* c = columns.at(i, &dw, &per_row);   // the column's quants
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
        __m256i lo[4], hi[4];
        for (int k = 0; k < 4; ++k) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * k));
            lo[k] = _mm256_and_si256(w, low4);
            hi[k] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
            if constexpr (five_bit(T)) {   // rows 2k and 2k + 1: half k % 2 of the four-row masks
                const int shift = 32 * (k % 2);
                lo[k] = _mm256_or_si256(lo[k], fifth_bits(static_cast<uint32_t>(fifth_bit_mask(c, k / 2, 0) >> shift)));
                hi[k] = _mm256_or_si256(hi[k], fifth_bits(static_cast<uint32_t>(fifth_bit_mask(c, k / 2, 1) >> shift)));
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(d[t][i] * (1.0f / 128.0f)));
            const int8_t* xb = q[t] + i * 128;
            __m256i xs[8];   // each part's x[0..15] and x[16..31], in both lanes
            for (int k = 0; k < 8; ++k)
                xs[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16 * k)));
            for (int k = 0; k < 4; ++k) {
                auto part = [&](int p) { return _mm256_add_epi16(_mm256_maddubs_epi16(lo[k], xs[2 * p]), _mm256_maddubs_epi16(hi[k], xs[2 * p + 1])); };
                const __m256i ab = _mm256_add_epi32(_mm256_madd_epi16(part(0), shifted), _mm256_madd_epi16(part(1), one));
                const __m256i ce = _mm256_add_epi32(_mm256_madd_epi16(part(2), shifted), _mm256_madd_epi16(part(3), one));
                const __m256 sp = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ce), low_pair, _mm256_cvtepi32_ps(ab));
                const __m256 row_scale = _mm256_permutevar8x32_ps(scale, _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1,
                                                                                            2 * k + 1, 2 * k + 1, 2 * k + 1));
                acc[t][k] = _mm256_fmadd_ps(sp, row_scale, acc[t][k]);
            }
            block_sums[t] = _mm256_fmadd_ps(per_row, _mm256_set1_ps(sum[t][i]), block_sums[t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        alignas(32) float lanes[32];
        alignas(32) float extra[8];
        for (int k = 0; k < 4; ++k) _mm256_store_ps(lanes + 8 * k, acc[t][k]);
        _mm256_store_ps(extra, block_sums[t]);
        for (int r = 0; r < 8; ++r)
            out[8 * t + r] = (lanes[4 * r] + lanes[4 * r + 1]) + (lanes[4 * r + 2] + lanes[4 * r + 3]) + extra[r];
    }
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

// One group's rows as floats, each row's blocks as dequantize_row gives them.
template <DType T>
void dequantize_packed8_type(const uint8_t* group, int64_t n, float* out, int64_t out_stride) {
    constexpr bool has_offset = T != DType::q4_0;   // q4_0: q - 8 instead
    alignas(32) float d[8], m[8] = {};
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m256 dw, offset;
        const uint8_t* c = columns.at(i, &dw, &offset);   // the column's quants
        _mm256_store_ps(d, dw);
        if (has_offset) _mm256_store_ps(m, offset);
        for (int r = 0; r < 8; ++r) nibble_block_floats(c + 16 * r, d[r], m[r], has_offset, out + r * out_stride + 32 * i);
    }
}

void dequantize_packed8(DType t, const uint8_t* group, int64_t n, float* out, int64_t out_stride) {
    with_packed_type(t, [&](auto type) {
        constexpr DType T = decltype(type)::value;
        if constexpr (five_bit(T)) dequantize_packed8_five<T>(group, n, out, out_stride);
        else dequantize_packed8_type<T>(group, n, out, out_stride);
    });
}

// ---- opt-in fast prefill (int8_prefill): sixteen rows against x rounded to int8, in dot_tile16's block
// columns (kernels.h): VPMADDUBSW pairs the bytes (unsigned quants at most 63 against x at most 127: no
// int16 saturation) and VPMADDWD sums four per int32 lane, row r in lane r % 8 of half r / 8.

// rows[8][32 bytes] -> steps: step st (of 8) gets dword st of the eight rows, an 8 x 8 dword transpose
inline void transpose8_dwords(const uint8_t (*rows)[32], uint8_t* steps, size_t step_bytes) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i]));
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; ++i) {   // u[i]: dwords i and i + 4 of rows 0-3, u[i + 4] the same of rows 4-7
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(steps + i * step_bytes), _mm256_permute2x128_si256(u[i], u[i + 4], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(steps + (i + 4) * step_bytes), _mm256_permute2x128_si256(u[i], u[i + 4], 0x31));
    }
}

template <DType T>
void emit_column16(const uint8_t (*rows)[32], const float* scales, const float* offsets, const int32_t* level_sums,
                   uint8_t* out) {
    std::memcpy(out, scales, 64);
    std::memcpy(out + 64, offsets, 64);
    if constexpr (signed_tile(T)) std::memcpy(out + 128, level_sums, 128);
    for (int g = 0; g < 2; ++g) transpose8_dwords(rows + 8 * g, out + tile16_quants_offset(T) + 32 * g, 64);
}

// Two eight-row groups (b null: zero rows) -> block columns of sixteen rows (q4_k's tile is q4_1's: a
// scale and an offset per row and block)
template <DType T>
void repack16_type(const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out) {
    alignas(32) uint8_t staged[16][32] = {};
    alignas(32) float scales[16] = {}, offsets[16] = {};
    GroupColumns<T> columns[2] = {GroupColumns<T>(a), GroupColumns<T>(b)};
    for (int64_t i = 0; i < n / 32; ++i, out += tile16_column_bytes(T)) {
        for (int g = 0; g < 2; ++g) {
            if (g == 1 && !b) continue;   // the zero rows stay zero
            __m256 dw, offset;
            const uint8_t* c = columns[g].at(i, &dw, &offset);   // the column's quants
            _mm256_store_ps(scales + 8 * g, dw);
            if (T != DType::q4_0) _mm256_store_ps(offsets + 8 * g, offset);
            for (int r = 0; r < 8; ++r) {
                __m128i lo, hi;
                unpack_nibbles(c + 16 * r, &lo, &hi);
                __m256i q = _mm256_set_m128i(hi, lo);
                if constexpr (five_bit(T)) q = _mm256_or_si256(q, fifth_bits(fifth_bits_of_row(c, r)));
                _mm256_store_si256(reinterpret_cast<__m256i*>(staged[8 * g + r]), q);
            }
        }
        std::memcpy(out, scales, 64);
        if (T != DType::q4_0) std::memcpy(out + 64, offsets, 64);
        for (int g = 0; g < 2; ++g) transpose8_dwords(staged + 8 * g, out + tile16_quants_offset(T) + 32 * g, 64);
    }
}

void repack16(DType t, const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out) {
    with_packed_type(t, [&](auto type) { repack16_type<decltype(type)::value>(a, b, n, out); });
}

// Sixteen rows against eight tokens (dot_tile16 of kernels.h). Per block and token, a the rounded x, dx
// its scale: unsigned quants, row r: dw_r * dx * sum_j q_j a_j + offset_r * dx * sum_j a_j (offset -8 dw
// for q4_0); signed levels (q3_k, q6_k, iq4_nl, q8_0): per half h, scale_rh * dx * sum_j l_j a_j, the products
// taken as |l_j| times a_j with l_j's sign (so both bytes stay in VPMADDUBSW's ranges).
template <DType T>
void dot_tile16_type(const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                     const float* const* sum, float* out) {
    constexpr int NT = kTile16Tokens;
    constexpr bool is_signed = signed_tile(T);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NT][2];
    for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, w += tile16_column_bytes(T)) {
        const float* f = reinterpret_cast<const float*>(w);
        const __m256 scale[2][2] = {{_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)}, {_mm256_loadu_ps(f + 16), _mm256_loadu_ps(f + 24)}};
        __m256 offset[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        if constexpr (T == DType::q4_0)
            for (int g = 0; g < 2; ++g) offset[g] = _mm256_mul_ps(scale[0][g], _mm256_set1_ps(-8.0f));
        else if constexpr (!is_signed)
            for (int g = 0; g < 2; ++g) offset[g] = scale[1][g];
        // (the steps are read from L1 for every token: sixteen registers could not hold them and the sums)
        const uint8_t* steps = w + tile16_quants_offset(T);
        for (int t = 0; t < NT; ++t) {
            __m256i isum[2][2] = {};   // [half of the block (signed tiles), group of eight rows]
            for (int st = 0; st < 8; ++st) {
                int32_t xs;
                __builtin_memcpy(&xs, q[t] + 32 * i + 4 * st, 4);
                const __m256i x = _mm256_set1_epi32(xs);
                for (int g = 0; g < 2; ++g) {
                    const __m256i ws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(steps + 64 * st + 32 * g));
                    const __m256i pairs = is_signed ? _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws))
                                                    : _mm256_maddubs_epi16(ws, x);
                    const int h = is_signed ? st / 4 : 0;
                    isum[h][g] = _mm256_add_epi32(isum[h][g], _mm256_madd_epi16(pairs, ones));
                }
            }
            const __m256 dx = _mm256_set1_ps(d[t][i]);
            for (int g = 0; g < 2; ++g) {
                acc[t][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[0][g]), _mm256_mul_ps(scale[0][g], dx), acc[t][g]);
                if constexpr (is_signed)
                    acc[t][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[1][g]), _mm256_mul_ps(scale[1][g], dx), acc[t][g]);
                else
                    acc[t][g] = _mm256_fmadd_ps(offset[g], _mm256_set1_ps(sum[t][i]), acc[t][g]);
            }
        }
    }
    for (int t = 0; t < NT; ++t)
        for (int g = 0; g < 2; ++g) _mm256_storeu_ps(out + 16 * t + 8 * g, acc[t][g]);
}

void dot_tile16(DType t, const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                const float* const* sum, float* out) {
    switch (t) {
        case DType::q4_0: return dot_tile16_type<DType::q4_0>(w, n, q, d, sum, out);
        case DType::q3_k: case DType::q6_k: case DType::iq4_nl: case DType::q8_0: return dot_tile16_type<DType::q6_k>(w, n, q, d, sum, out);
        default: return dot_tile16_type<DType::q4_1>(w, n, q, d, sum, out);   // q4_1, q5_*, q4_k, q5_k: scale and offset
    }
}

}  // namespace

void avx2::add_integer_kernels(Kernels& k) {
    k.prepare_x = prepare_x;
    k.prepare_x_k = prepare_x_k;
    k.dot_row_prepared = dot_row_prepared;
    k.dot_row_prepared_x4 = dot_row_prepared_x4;
    k.prepare_x8 = prepare_x8;
    k.dot_packed8 = dot_packed8;
    k.dot_packed8_tokens = dot_packed8_tokens;
    k.dequantize_packed8 = dequantize_packed8;
    k.repack16 = repack16;
    k.repack16_rows = repack16_rows;
    k.dot_tile16 = dot_tile16;
}

}  // namespace tmill::cpu
