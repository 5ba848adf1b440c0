// AVX-512 kernels (F, BW, VL, DQ and VNNI; FMA and F16C). This file alone is compiled with those
// instructions enabled and is only called after cpuid says the CPU has all of them; like the AVX2
// file, everything stays in an anonymous namespace. Compared with AVX2: 16 floats or one whole
// 32-value block per register, masked loads instead of scalar tails, a 16-entry nf4 codebook in one
// register, VPDPWSSD (int16 pairs multiplied and summed into int32 in one instruction) on the
// integer path, and VPDPBUSD (four byte products per int32 lane) on 4-bit weights repacked in
// eight-row groups. (The AMX kernels, where the CPU has them, are in kernels_amx.cpp.)
#include <immintrin.h>

#include "core/quants.h"
#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace tmill::cpu {

namespace {

inline float half(uint16_t h) { return _cvtsh_ss(h); }

// the first n (< 16) lanes
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

float dot_f32(const float* a, const float* b, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
        acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), acc2);
        acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), acc3);
    }
    for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

// The four sums of a, b, c, d as one vector: pairwise adds of interleaved halves, then of the
// four 128-bit lanes (a quarter of the work of four separate reductions).
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));   // per lane: a02 b02 a13 b13
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));   // per lane: a b c d
    __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// 8 rows x 3 tokens: 24 accumulators, three token registers and one row register of the 32. The
// rows (dequantized, reused by every tile) stay in L1; the tokens stream from L2, so the tile is
// taller than wide: each token load feeds eight FMAs.
constexpr int kTileRows = 8, kTileTokens = 3;

void dot_f32_tile(const float* w, int64_t w_stride, const float* const* xs, int64_t n, float* out) {
    __m512 acc[kTileTokens][kTileRows];
    for (auto& row : acc)
        for (__m512& v : row) v = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
        __m512 xv[kTileTokens];
        for (int t = 0; t < kTileTokens; ++t) xv[t] = _mm512_maskz_loadu_ps(m, xs[t] + i);
        for (int r = 0; r < kTileRows; ++r) {
            const __m512 wr = _mm512_maskz_loadu_ps(m, w + r * w_stride + i);
            for (int t = 0; t < kTileTokens; ++t) acc[t][r] = _mm512_fmadd_ps(wr, xv[t], acc[t][r]);
        }
    }
    // (every loop over the accumulators fully unrolled, so they stay in registers)
#pragma GCC unroll 8
    for (int t = 0; t < kTileTokens; ++t)
#pragma GCC unroll 2
        for (int r = 0; r < kTileRows; r += 4)
            _mm_storeu_ps(out + kTileRows * t + r, reduce4(acc[t][r], acc[t][r + 1], acc[t][r + 2], acc[t][r + 3]));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// rows[j] . q_g for up to four queries at once (NG; s[g * s_stride + j]): each loaded row chunk
// feeds every query, and four rows per pass share one reduce4 per query. A short last group repeats
// its last row, so every row's sum has the same arithmetic wherever it falls (attention tiles differ
// by batch and by cache layout; a row's score must not). rows_dot is the one-query case, so a (row,
// query) sum has the same bits whether it is asked for alone or with its GQA group.
template <typename E, int NG>
void group_dot_n(const E* rows, int64_t n_rows, int64_t d, const float* q, float* s, int64_t s_stride) {
    for (int64_t j = 0; j < n_rows; j += 4) {
        const E* r[4];
        for (int k = 0; k < 4; ++k) r[k] = rows + std::min(j + k, n_rows - 1) * d;
        __m512 acc[NG][4];
        for (int g = 0; g < NG; ++g)
            for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            const __mmask16 m = d - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(d - i);
            __m512 rv[4];
            for (int k = 0; k < 4; ++k) {
                _mm_prefetch(reinterpret_cast<const char*>(r[k] + i) + kDecodePrefetchBytes, _MM_HINT_T0);
                rv[k] = load16(r[k] + i, m);
            }
            for (int g = 0; g < NG; ++g) {
                const __m512 qv = _mm512_maskz_loadu_ps(m, q + g * d + i);
                for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_fmadd_ps(rv[k], qv, acc[g][k]);
            }
        }
        for (int g = 0; g < NG; ++g) {
            alignas(16) float sums[4];
            _mm_store_ps(sums, reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
            for (int k = 0; k < 4 && j + k < n_rows; ++k) s[g * s_stride + j + k] = sums[k];
        }
    }
}

void rows_dot_f32(const float* rows, int64_t n_rows, int64_t d, const float* x, float* out) {
    group_dot_n<float, 1>(rows, n_rows, d, x, out, 0);
}
void rows_dot_f16(const uint16_t* rows, int64_t n_rows, int64_t d, const float* x, float* out) {
    group_dot_n<uint16_t, 1>(rows, n_rows, d, x, out, 0);
}

template <typename E>
void group_dot(const E* rows, int64_t n_rows, int64_t d, const float* q, int ng, float* s, int64_t s_stride) {
    for (int g = 0; g < ng; g += 4) {
        const float* qg = q + g * d;
        float* sg = s + g * s_stride;
        switch (std::min(4, ng - g)) {
            case 4: group_dot_n<E, 4>(rows, n_rows, d, qg, sg, s_stride); break;
            case 3: group_dot_n<E, 3>(rows, n_rows, d, qg, sg, s_stride); break;
            case 2: group_dot_n<E, 2>(rows, n_rows, d, qg, sg, s_stride); break;
            default: group_dot_n<E, 1>(rows, n_rows, d, qg, sg, s_stride);
        }
    }
}
void group_dot_f32(const float* rows, int64_t n_rows, int64_t d, const float* q, int ng, float* s, int64_t s_stride) {
    group_dot(rows, n_rows, d, q, ng, s, s_stride);
}
void group_dot_f16(const uint16_t* rows, int64_t n_rows, int64_t d, const float* q, int ng, float* s, int64_t s_stride) {
    group_dot(rows, n_rows, d, q, ng, s, s_stride);
}

// y_g += sum_j w[g * w_stride + j] rows[j] for up to four outputs at once (NG; y [NG, d]): 64
// columns at a time stay in four accumulators per output while the rows stream by, each loaded
// row chunk feeding every output. rows_axpy is the one-output case.
template <typename E, int NG>
void group_axpy_n(float* y, const E* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w, int64_t w_stride) {
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) {
        __m512 acc[NG][4];
        for (int g = 0; g < NG; ++g)
            for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_loadu_ps(y + g * d + c + 16 * k);
        for (int64_t j = 0; j < n_rows; ++j) {
            const E* r = rows + j * stride + c;
            for (int line = 0; line < 64 * static_cast<int>(sizeof(E)); line += 64)
                _mm_prefetch(reinterpret_cast<const char*>(r + kRowsAxpyPrefetchColumns) + line, _MM_HINT_T0);
            __m512 rv[4];
            for (int k = 0; k < 4; ++k) rv[k] = load16(r + 16 * k);
            for (int g = 0; g < NG; ++g) {
                const __m512 wj = _mm512_set1_ps(w[g * w_stride + j]);
                for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_fmadd_ps(wj, rv[k], acc[g][k]);
            }
        }
        for (int g = 0; g < NG; ++g)
            for (int k = 0; k < 4; ++k) _mm512_storeu_ps(y + g * d + c + 16 * k, acc[g][k]);
    }
    for (; c < d; c += 16) {
        const __mmask16 m = d - c >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(d - c);
        __m512 acc[NG];
        for (int g = 0; g < NG; ++g) acc[g] = _mm512_maskz_loadu_ps(m, y + g * d + c);
        for (int64_t j = 0; j < n_rows; ++j) {
            const __m512 rv = load16(rows + j * stride + c, m);
            for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[g * w_stride + j]), rv, acc[g]);
        }
        for (int g = 0; g < NG; ++g) _mm512_mask_storeu_ps(y + g * d + c, m, acc[g]);
    }
}

void rows_axpy_f32(float* y, const float* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    group_axpy_n<float, 1>(y, rows, n_rows, d, stride, w, 0);
}
void rows_axpy_f16(float* y, const uint16_t* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    group_axpy_n<uint16_t, 1>(y, rows, n_rows, d, stride, w, 0);
}

template <typename E>
void group_axpy(float* y, const E* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w, int ng, int64_t w_stride) {
    for (int g = 0; g < ng; g += 4) {
        float* yg = y + g * d;
        const float* wg = w + g * w_stride;
        switch (std::min(4, ng - g)) {
            case 4: group_axpy_n<E, 4>(yg, rows, n_rows, d, stride, wg, w_stride); break;
            case 3: group_axpy_n<E, 3>(yg, rows, n_rows, d, stride, wg, w_stride); break;
            case 2: group_axpy_n<E, 2>(yg, rows, n_rows, d, stride, wg, w_stride); break;
            default: group_axpy_n<E, 1>(yg, rows, n_rows, d, stride, wg, w_stride);
        }
    }
}
void group_axpy_f32(float* y, const float* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w, int ng,
                    int64_t w_stride) {
    group_axpy(y, rows, n_rows, d, stride, w, ng, w_stride);
}
void group_axpy_f16(float* y, const uint16_t* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w, int ng,
                    int64_t w_stride) {
    group_axpy(y, rows, n_rows, d, stride, w, ng, w_stride);
}

// exp(x) = 2^k * exp(r) with k = round(x / ln 2) and r = x - k ln 2 (ln 2 in two parts so r is
// exact); exp(r) by its degree-6 Taylor polynomial (relative error below 2e-7); VSCALEFPS applies
// 2^k without building the exponent bits by hand.
inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

float exp_sum(float* x, int64_t n, float shift) {
    const __m512 vs = _mm512_set1_ps(shift);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
        __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vs)));
        _mm512_mask_storeu_ps(x + i, m, e);
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}

// 1 + erf(x / sqrt 2) as in the AVX2 level (A&S 7.1.26 for erfc, no cancellation for negative x)
inline __m512 one_plus_erf(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    const __m512 erfc = _mm512_mul_ps(_mm512_mul_ps(p, t), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a))));
    const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), erfc), erfc);
}

void gelu_erf(float* x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), one_plus_erf(v)));
    }
}

// 0.5 x (1 + tanh u) = x / (1 + exp(-2 u)), u = sqrt(2 / pi) (x + 0.044715 x^3)
inline __m512 gelu_tanh_ps(__m512 x) {
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 minus_2u = _mm512_mul_ps(_mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x), _mm512_set1_ps(-1.5957691216057308f));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(minus_2u)));
}

void gelu_tanh(float* x, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
        __m512 g = gelu_tanh_ps(_mm512_maskz_loadu_ps(m, x + i));
        if (up) g = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, up + i));
        _mm512_mask_storeu_ps(x + i, m, g);
    }
}

void swiglu(float* gate, const float* up, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(zero, g))));
        _mm512_mask_storeu_ps(gate + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

// ---- 16 stored values -> 16 floats

inline __m512 f16x16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline __m512 bf16x16(const uint16_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// one stored value of the same type, for tails shorter than a register
template <__m512 (*Load)(const uint16_t*)>
inline float scalar_16bit(uint16_t h) { return Load == f16x16 ? half(h) : bf16_to_fp32(h); }

inline __m512 i8x16(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }

// 16 packed bytes -> (low nibbles = elements 0..15, high nibbles = elements 16..31) as bytes 0..15
inline void unpack_nibbles(const uint8_t* qs, __m128i* lo, __m128i* hi) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    __m128i mask = _mm_set1_epi8(0x0F);
    *lo = _mm_and_si128(packed, mask);
    *hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
}

// 16 bytes of 4-bit quants as two float vectors (elements 0..15, 16..31): d * (q - 8) for q4_0,
// d * q + m for q4_1, rounded twice exactly as the reference dequantization.
template <DType T>
inline void nibble_floats(const uint8_t* qs, float d, float m, __m512* lo, __m512* hi) {
    __m128i ql, qh;
    unpack_nibbles(qs, &ql, &qh);
    if constexpr (T == DType::q4_0) {
        ql = _mm_sub_epi8(ql, _mm_set1_epi8(8));
        qh = _mm_sub_epi8(qh, _mm_set1_epi8(8));
    }
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    *lo = _mm512_add_ps(_mm512_mul_ps(vd, i8x16(ql)), vm);
    *hi = _mm512_add_ps(_mm512_mul_ps(vd, i8x16(qh)), vm);
}

// Block i of a quantized row as two float vectors (elements 0..15, 16..31), rounded as the
// reference dequantization.
template <DType T>
inline void block_floats(const uint8_t* row, int64_t i, __m512* lo, __m512* hi) {
    if constexpr (T == DType::q8_0) {
        const BlockQ8_0& b = reinterpret_cast<const BlockQ8_0*>(row)[i];
        const __m512 vd = _mm512_set1_ps(half(b.d));
        *lo = _mm512_mul_ps(vd, i8x16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs))));
        *hi = _mm512_mul_ps(vd, i8x16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs + 16))));
    } else if constexpr (T == DType::q4_0) {
        const BlockQ4_0& b = reinterpret_cast<const BlockQ4_0*>(row)[i];
        nibble_floats<T>(b.qs, half(b.d), 0.0f, lo, hi);
    } else if constexpr (T == DType::q4_1) {
        const BlockQ4_1& b = reinterpret_cast<const BlockQ4_1*>(row)[i];
        nibble_floats<T>(b.qs, half(b.d), half(b.m), lo, hi);
    } else {   // nf4: the codebook is one register, each nibble indexes it
        const BlockNF4& b = reinterpret_cast<const BlockNF4*>(row)[i];
        __m128i ql, qh;
        unpack_nibbles(b.qs, &ql, &qh);
        const __m512 book = _mm512_loadu_ps(kNF4), vd = _mm512_set1_ps(half(b.d));
        *lo = _mm512_mul_ps(vd, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(ql), book));
        *hi = _mm512_mul_ps(vd, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(qh), book));
    }
}

template <DType T>
float dot_blocks(const void* row, const float* x, int64_t n) {
    const uint8_t* r = static_cast<const uint8_t*>(row);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        __m512 lo, hi;
        block_floats<T>(r, i, &lo, &hi);
        acc0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), acc0);
        acc1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <__m512 (*Load)(const uint16_t*)>
float dot_16bit(const uint16_t* w, const float* x, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(Load(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(Load(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (; i < n; ++i) sum += scalar_16bit<Load>(w[i]) * x[i];
    return sum;
}

// The rows-as-decode tile: R weight rows against NT vectors, each (row, vector) pair accumulated
// exactly as dot_row accumulates it (the same lanes, steps and reduction), so the results are
// dot_row's bit for bit, while each loaded weight vector feeds NT FMAs and each x vector R of them,
// all from L1. R and NT are compile-time, so the accumulators stay in registers.
template <int R, int NT>
void dot_f32_tile_exact(const float* const* rows, const float* const* xs, int64_t n, float* out) {
    __m512 acc[R][NT][4];
    for (auto& a : acc)
        for (auto& v : a)
            for (__m512& r : v) r = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int q = 0; q < 4; ++q)
            for (int r = 0; r < R; ++r) {
                const __m512 w = _mm512_loadu_ps(rows[r] + i + 16 * q);
                for (int t = 0; t < NT; ++t) acc[r][t][q] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[t] + i + 16 * q), acc[r][t][q]);
            }
    for (; i + 16 <= n; i += 16)
        for (int r = 0; r < R; ++r) {
            const __m512 w = _mm512_loadu_ps(rows[r] + i);
            for (int t = 0; t < NT; ++t) acc[r][t][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[t] + i), acc[r][t][0]);
        }
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        for (int r = 0; r < R; ++r) {
            const __m512 w = _mm512_maskz_loadu_ps(m, rows[r] + i);
            for (int t = 0; t < NT; ++t)
                acc[r][t][1] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, xs[t] + i), acc[r][t][1]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t)
            out[r * NT + t] = _mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]), _mm512_add_ps(acc[r][t][2], acc[r][t][3])));
}

template <int R, int NT, __m512 (*Load)(const uint16_t*)>
void dot_16bit_tile_exact(const uint16_t* const* rows, const float* const* xs, int64_t n, float* out) {
    __m512 acc[R][NT][2];
    for (auto& a : acc)
        for (auto& v : a) v[0] = v[1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int h = 0; h < 2; ++h)
            for (int r = 0; r < R; ++r) {
                const __m512 w = Load(rows[r] + i + 16 * h);
                for (int t = 0; t < NT; ++t) acc[r][t][h] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[t] + i + 16 * h), acc[r][t][h]);
            }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) {
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
            for (int64_t k = i; k < n; ++k) sum += scalar_16bit<Load>(rows[r][k]) * xs[t][k];
            out[r * NT + t] = sum;
        }
}

// f32: 2 rows x 3 vectors x 4 accumulators (24 registers); 16-bit: 4 x 3 x 2 (24)
constexpr int kExactF32Rows = 2, kExactF32Tokens = 3, kExact16Rows = 4, kExact16Tokens = 3;

using ExactTile = void (*)(const void* const*, const float* const*, int64_t, float*);

template <int R, int NT, int Kind>
void exact_tile(const void* const* rows, const float* const* xs, int64_t n, float* out) {
    if constexpr (Kind == 0) dot_f32_tile_exact<R, NT>(reinterpret_cast<const float* const*>(rows), xs, n, out);
    else if constexpr (Kind == 1) dot_16bit_tile_exact<R, NT, f16x16>(reinterpret_cast<const uint16_t* const*>(rows), xs, n, out);
    else dot_16bit_tile_exact<R, NT, bf16x16>(reinterpret_cast<const uint16_t* const*>(rows), xs, n, out);
}

// every (rows, vectors) shape up to the maximum, so a partial tile runs as fast as a full one
template <int Kind, int MaxR, int MaxT>
struct ExactTiles {
    template <int... I>
    static constexpr std::array<ExactTile, MaxR * MaxT> make(std::integer_sequence<int, I...>) {
        return {&exact_tile<I / MaxT + 1, I % MaxT + 1, Kind>...};
    }
    static constexpr std::array<ExactTile, MaxR * MaxT> table = make(std::make_integer_sequence<int, MaxR * MaxT>{});
};

float dot_row(DType t, const void* row, const float* x, int64_t n);

void dot_rows_tokens(DType t, const void* const* rows, int n_rows, const float* const* xs, int n_tokens, int64_t n,
                     float* out) {
    if (t != DType::f32 && t != DType::f16 && t != DType::bf16) {
        for (int r = 0; r < n_rows; ++r)
            for (int j = 0; j < n_tokens; ++j) out[r * n_tokens + j] = dot_row(t, rows[r], xs[j], n);
        return;
    }
    const bool f32 = t == DType::f32;
    const int max_r = f32 ? kExactF32Rows : kExact16Rows, max_t = f32 ? kExactF32Tokens : kExact16Tokens;
    float tile[kExact16Rows * kExact16Tokens];
    for (int r0 = 0; r0 < n_rows; r0 += max_r)
        for (int j0 = 0; j0 < n_tokens; j0 += max_t) {
            const int nr = std::min(max_r, n_rows - r0), nt = std::min(max_t, n_tokens - j0);
            const size_t shape = static_cast<size_t>((nr - 1) * max_t + nt - 1);
            ExactTile k = f32 ? ExactTiles<0, kExactF32Rows, kExactF32Tokens>::table[shape]
                        : t == DType::f16 ? ExactTiles<1, kExact16Rows, kExact16Tokens>::table[shape]
                                          : ExactTiles<2, kExact16Rows, kExact16Tokens>::table[shape];
            k(rows + r0, xs + j0, n, tile);
            for (int r = 0; r < nr; ++r)
                for (int j = 0; j < nt; ++j) out[(r0 + r) * n_tokens + j0 + j] = tile[r * nt + j];
        }
}

float dot_row(DType t, const void* row, const float* x, int64_t n) {
    switch (t) {
        case DType::f32: return dot_f32(static_cast<const float*>(row), x, n);
        case DType::f16: return dot_16bit<f16x16>(static_cast<const uint16_t*>(row), x, n);
        case DType::bf16: return dot_16bit<bf16x16>(static_cast<const uint16_t*>(row), x, n);
        case DType::q8_0: return dot_blocks<DType::q8_0>(row, x, n);
        case DType::q4_0: return dot_blocks<DType::q4_0>(row, x, n);
        case DType::q4_1: return dot_blocks<DType::q4_1>(row, x, n);
        case DType::nf4: return dot_blocks<DType::nf4>(row, x, n);
        default: return kernels_scalar().dot_row(t, row, x, n);
    }
}

template <DType T>
void dequantize_blocks(const void* row, float* out, int64_t n) {
    const uint8_t* r = static_cast<const uint8_t*>(row);
    for (int64_t i = 0; i < n / 32; ++i, out += 32) {
        __m512 lo, hi;
        block_floats<T>(r, i, &lo, &hi);
        _mm512_storeu_ps(out, lo);
        _mm512_storeu_ps(out + 16, hi);
    }
}

template <__m512 (*Load)(const uint16_t*)>
void dequantize_16bit(const uint16_t* h, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, Load(h + i));
    for (; i < n; ++i) out[i] = scalar_16bit<Load>(h[i]);
}

void dequantize(DType t, const void* row, float* out, int64_t n) {
    switch (t) {
        case DType::f16: return dequantize_16bit<f16x16>(static_cast<const uint16_t*>(row), out, n);
        case DType::bf16: return dequantize_16bit<bf16x16>(static_cast<const uint16_t*>(row), out, n);
        case DType::q8_0: return dequantize_blocks<DType::q8_0>(row, out, n);
        case DType::q4_0: return dequantize_blocks<DType::q4_0>(row, out, n);
        case DType::q4_1: return dequantize_blocks<DType::q4_1>(row, out, n);
        case DType::nf4: return dequantize_blocks<DType::nf4>(row, out, n);
        case DType::q5_0: return dequantize_extra<DType::q5_0>(static_cast<const uint8_t*>(row), out, n);
        case DType::q5_1: return dequantize_extra<DType::q5_1>(static_cast<const uint8_t*>(row), out, n);
        case DType::iq4_nl: return dequantize_extra<DType::iq4_nl>(static_cast<const uint8_t*>(row), out, n);
        case DType::q4_k: return dequantize_extra<DType::q4_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q5_k: return dequantize_extra<DType::q5_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q2_k: return dequantize_extra<DType::q2_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q3_k: return dequantize_extra<DType::q3_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q6_k: return dequantize_extra<DType::q6_k>(static_cast<const uint8_t*>(row), out, n);
        default: dequantize_row(t, row, out, n);
    }
}

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
    switch (t) {
        case DType::q8_0: return dot_rows_prepared<DType::q8_0, NT>(row, q, d, sum, n, out);
        case DType::q4_0: return dot_rows_prepared<DType::q4_0, NT>(row, q, d, sum, n, out);
        case DType::q4_1: return dot_rows_prepared<DType::q4_1, NT>(row, q, d, sum, n, out);
        case DType::q5_0: return dot_rows_prepared<DType::q5_0, NT>(row, q, d, sum, n, out);
        case DType::q5_1: return dot_rows_prepared<DType::q5_1, NT>(row, q, d, sum, n, out);
        case DType::iq4_nl: return dot_rows_prepared<DType::iq4_nl, NT>(row, q, d, sum, n, out);
        case DType::q4_k: return dot_rows_k<DType::q4_k, NT>(row, q, d, sum, n, out);
        case DType::q5_k: return dot_rows_k<DType::q5_k, NT>(row, q, d, sum, n, out);
        case DType::q2_k: return dot_rows_k<DType::q2_k, NT>(row, q, d, sum, n, out);
        case DType::q3_k: return dot_rows_k<DType::q3_k, NT>(row, q, d, sum, n, out);
        case DType::q6_k: return dot_rows_k<DType::q6_k, NT>(row, q, d, sum, n, out);
        default: for (int k = 0; k < NT; ++k) out[k] = 0.0f;   // callers check uses_prepared_x first
    }
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
    const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    // after the sums below, 128-bit lane k holds (P_ab, P_ce) of row k, then of row k + 4
    const __m512i row_of_lane = _mm512_set_epi32(7, 7, 3, 3, 6, 6, 2, 2, 5, 5, 1, 1, 4, 4, 0, 0);
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
        __m256 dw, per_row;
        const uint8_t* c = columns.at(i, &dw, &per_row);   // the column's quants
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
        __m512i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
            const __m512i w = _mm512_loadu_si512(c + 64 * h);
            lo[h] = _mm512_and_si512(w, low4);
            hi[h] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
            if constexpr (five_bit(T)) add_fifth_bits(c, h, lo[h], hi[h]);
        }
        const __m512 dw_lanes = _mm512_permutexvar_ps(row_of_lane, _mm512_castps256_ps512(dw));
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
    for (int t = 0; t < NT; ++t) {
        alignas(64) float lanes[16];
        alignas(32) float extra[8];
        _mm512_store_ps(lanes, acc[t]);
        _mm256_store_ps(extra, block_sums[t]);
        for (int r = 0; r < 8; ++r) out[8 * t + r] = lanes[4 * (r % 4) + 2 * (r / 4)] + extra[r];
    }
}

template <DType T>
void dot_packed8_tokens_n(const uint8_t* group, const int8_t* const* q, const float* const* d, const float* const* sum,
                          int nt, int64_t n, float* out) {
    switch (nt) {
        case 4: return dot_packed8_tokens_type<T, 4>(group, q, d, sum, n, out);
        case 3: return dot_packed8_tokens_type<T, 3>(group, q, d, sum, n, out);
        case 2: return dot_packed8_tokens_type<T, 2>(group, q, d, sum, n, out);
        default: return dot_packed8_tokens_type<T, 1>(group, q, d, sum, n, out);
    }
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
    const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    // after the lane sums below, 128-bit lane k holds rows k, k, k + 4, k + 4
    const __m512i row_of_lane = _mm512_set_epi32(7, 7, 3, 3, 6, 6, 2, 2, 5, 5, 1, 1, 4, 4, 0, 0);
    __m512 acc[NT];
    __m256 extra[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
        acc[t] = _mm512_setzero_ps();
        extra[t] = _mm256_setzero_ps();
    }
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m256 dw, offset;
        const uint8_t* c = columns.at(i, &dw, &offset);   // the column's quants
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
        __m512i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
            const __m512i w = _mm512_loadu_si512(c + 64 * h);
            lo[h] = _mm512_and_si512(w, low4);
            hi[h] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
            if constexpr (five_bit(T)) add_fifth_bits(c, h, lo[h], hi[h]);
        }
        const __m512 dw_lanes = _mm512_permutexvar_ps(row_of_lane, _mm512_castps256_ps512(dw));
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
    for (int t = 0; t < NT; ++t) {
        alignas(64) float lanes[16];
        alignas(32) float e[8];
        _mm512_store_ps(lanes, acc[t]);
        _mm256_store_ps(e, extra[t]);
        for (int r = 0; r < 8; ++r) out[8 * t + r] = lanes[4 * (r % 4) + 2 * (r / 4)] + e[r];
    }
}

template <DType T>
void dot_packed8_int8_type(const uint8_t* group, const int8_t* a, const float* d, const float* sum, int64_t n,
                           float* out) {
    dot_packed8_int8_tokens_type<T, 1>(group, &a, &d, &sum, n, out);
}

template <DType T>
void dot_packed8_int8_tokens_n(const uint8_t* group, const int8_t* const* a, const float* const* d,
                               const float* const* sum, int nt, int64_t n, float* out) {
    switch (nt) {
        case 4: return dot_packed8_int8_tokens_type<T, 4>(group, a, d, sum, n, out);
        case 3: return dot_packed8_int8_tokens_type<T, 3>(group, a, d, sum, n, out);
        case 2: return dot_packed8_int8_tokens_type<T, 2>(group, a, d, sum, n, out);
        default: return dot_packed8_int8_tokens_type<T, 1>(group, a, d, sum, n, out);
    }
}

void dot_packed8_int8_tokens(DType t, const uint8_t* group, const int8_t* const* a, const float* const* d,
                             const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) { dot_packed8_int8_tokens_n<decltype(type)::value>(group, a, d, sum, nt, n, out); });
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
    with_packed_type(t, [&](auto type) { dot_packed8_tokens_n<decltype(type)::value>(group, q, d, sum, nt, n, out); });
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

// ---- opt-in fast prefill of 4-bit weights: sixteen rows per register, x as one int8 part

// Two eight-row groups -> per block column: 16 float scales, (q4_1) 16 float minimums, then eight
// 64-byte steps of quants as bytes 0..15, step s holding in int32 lane r the elements 4s..4s+3
// (s < 4) or 16 + 4(s-4).. (s >= 4) of row r, so one VPDPBUSD multiplies four elements of
// sixteen rows by four broadcast bytes of x.
template <DType T>
void repack16_type(const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    GroupColumns<T> columns_a(a), columns_b(b);
    for (int64_t i = 0; i < n / 32; ++i, out += tile16_column_bytes(T)) {
        __m256 dw_a, offset_a, dw_b = _mm256_setzero_ps(), offset_b = _mm256_setzero_ps();   // zero rows without b
        const uint8_t* ca = columns_a.at(i, &dw_a, &offset_a);   // the columns' quants
        const uint8_t* cb = b ? columns_b.at(i, &dw_b, &offset_b) : nullptr;
        _mm512_storeu_ps(reinterpret_cast<float*>(out), _mm512_insertf32x8(_mm512_castps256_ps512(dw_a), dw_b, 1));
        if constexpr (T != DType::q4_0)
            _mm512_storeu_ps(reinterpret_cast<float*>(out + 64), _mm512_insertf32x8(_mm512_castps256_ps512(offset_a), offset_b, 1));
        // rows 0-3, 4-7, 8-11, 12-15: int32 lane 4 * (r % 4) + j holds bytes 4j..4j+3 of row r
        __m512i rows[4];
        for (int k = 0; k < 4; ++k) {
            const uint8_t* c = k < 2 ? ca : cb;
            rows[k] = c ? _mm512_loadu_si512(c + 64 * (k % 2)) : _mm512_setzero_si512();
        }
        uint8_t* steps = out + tile16_quants_offset(T);
        for (int nibble = 0; nibble < 2; ++nibble) {
            __m512i q[4];
            for (int k = 0; k < 4; ++k) {
                q[k] = nibble ? _mm512_and_si512(_mm512_srli_epi16(rows[k], 4), low4) : _mm512_and_si512(rows[k], low4);
                if constexpr (five_bit(T))
                    if (const uint8_t* c = k < 2 ? ca : cb)
                        q[k] = _mm512_mask_add_epi8(q[k], _cvtu64_mask64(fifth_bit_mask(c, k % 2, nibble)), q[k], _mm512_set1_epi8(16));
            }
            for (int j = 0; j < 4; ++j) {
                // lanes 0-3 <- lanes j, 4+j, 8+j, 12+j of the first source, lanes 4-7 <- the same of the second
                const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 28, 24, 20, 16, 12, 8, 4, 0),
                                                     _mm512_set1_epi32(j));
                const __m512i lo = _mm512_permutex2var_epi32(q[0], idx, q[1]);
                const __m512i hi = _mm512_permutex2var_epi32(q[2], idx, q[3]);
                _mm512_storeu_si512(steps + 64 * (4 * nibble + j), _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0)));
            }
        }
    }
}

void repack16(DType t, const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out) {
    // q4_k's and q5_*'s tiles are q4_1's: a scale and an offset per row and block
    with_packed_type(t, [&](auto type) { repack16_type<decltype(type)::value>(a, b, n, out); });
}

// Sixteen rows against eight tokens. Per block and token, with x rounded to dx * a (a = round(x / dx)):
//   row r: dw_r * dx * sum_j q_j a_j  +  (q4_0: -8 dw_r, q4_1: m_r) * dx * sum_j a_j
// -- exactly the dequantized row against the rounded x, so rounding errors meet the weights
// themselves, not the unsigned quants (sum holds dx * sum_j a_j per block). The int32 sums of eight
// VPDPBUSD per token convert once per block.
template <DType T>
void dot_tile16_type(const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                     const float* const* sum, float* out) {
    constexpr int NT = kTile16Tokens;
    __m512 acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, w += tile16_column_bytes(T)) {
        const __m512 dw = _mm512_loadu_ps(reinterpret_cast<const float*>(w));
        const __m512 offset = T == DType::q4_1 ? _mm512_loadu_ps(reinterpret_cast<const float*>(w + 64))
                                               : _mm512_mul_ps(dw, _mm512_set1_ps(-8.0f));
        __m512i ws[8];
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) ws[s] = _mm512_loadu_si512(w + tile16_quants_offset(T) + 64 * s);
        __m512i isum[NT];
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) isum[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
            const int at = s < 4 ? 4 * s : 16 + 4 * (s - 4);
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) {
                int32_t xs;
                __builtin_memcpy(&xs, q[t] + 32 * i + at, 4);
                isum[t] = _mm512_dpbusd_epi32(isum[t], ws[s], _mm512_set1_epi32(xs));
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(dw, _mm512_set1_ps(d[t][i])), acc[t]);
            acc[t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[t][i]), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

// One block column of sixteen rows for dot_tile16 from their quants as bytes (rows[r][32]) and their
// scales and offsets: the quants go into the steps repack16_type lays out -- step st, int32 lane r
// holding row r's quants 4 st .. 4 st + 3: a transpose of 4-byte words, rows 4p .. 4p + 3 taken from
// one pair of registers into lanes 4p .. 4p + 3.
template <DType T>
void emit_column16(const uint8_t (*rows)[32], const float* scales, const float* offsets, const int32_t* level_sums,
                   uint8_t* out) {
    std::memcpy(out, scales, 64);
    std::memcpy(out + 64, offsets, 64);
    if constexpr (signed_tile(T)) std::memcpy(out + 128, level_sums, 128);
    __m512i first[4], second[4];
    for (int p = 0; p < 4; ++p) {
        first[p] = _mm512_loadu_si512(rows[4 * p]);        // rows 4p, 4p + 1
        second[p] = _mm512_loadu_si512(rows[4 * p + 2]);   // rows 4p + 2, 4p + 3
    }
    for (int st = 0; st < 8; ++st) {
        const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(24, 16, 8, 0, 24, 16, 8, 0, 24, 16, 8, 0, 24, 16, 8, 0),
                                             _mm512_set1_epi32(st));
        __m512i step = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p)
            step = _mm512_or_si512(step, _mm512_maskz_permutex2var_epi32(static_cast<__mmask16>(0xF << (4 * p)), first[p], idx,
                                                                         second[p]));
        _mm512_storeu_si512(out + tile16_quants_offset(T) + 64 * st, step);
    }
}

// q3_k / q6_k / iq4_nl / q8_0 sixteen rows against eight tokens: each half of a block column has its own scale, and
// the levels l are signed, so x enters as unsigned bytes a + 128 and the repack's -128 * sum of levels
// starts each sum: per half h (a the rounded x, dx its block scale)
//   row r: d sc_rh * dx * sum_j l_j a_j   -- the dequantized row against the rounded x
// (these types share the layout: tile16_quants_offset is the same for them)
void dot_tile16_signed(const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d, float* out) {
    constexpr int NT = kTile16Tokens;
    constexpr DType T = DType::q6_k;
    __m512 acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, w += tile16_column_bytes(T)) {
        const __m512 scale[2] = {_mm512_loadu_ps(reinterpret_cast<const float*>(w)),
                                 _mm512_loadu_ps(reinterpret_cast<const float*>(w + 64))};
        const __m512i start[2] = {_mm512_loadu_si512(w + 128), _mm512_loadu_si512(w + 192)};
        __m512i ws[8];
#pragma GCC unroll 8
        for (int st = 0; st < 8; ++st) ws[st] = _mm512_loadu_si512(w + tile16_quants_offset(T) + 64 * st);
        // the tokens' bytes offset once per block column, so each VPDPBUSD's x is a broadcast load
        // (offsetting each 4 bytes in a general register cost a register-to-vector move per VPDPBUSD)
        alignas(32) uint8_t xu[NT][32];
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t)
            _mm256_store_si256(reinterpret_cast<__m256i*>(xu[t]),
                               _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[t] + 32 * i)),
                                                _mm256_set1_epi8(-128)));
        asm volatile("" ::: "memory");   // read xu back from memory: broadcast loads, not lane shuffles
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
            __m512i isum[2] = {start[0], start[1]};
#pragma GCC unroll 8
            for (int st = 0; st < 8; ++st) {
                int32_t xs;
                __builtin_memcpy(&xs, xu[t] + 4 * st, 4);
                isum[st / 4] = _mm512_dpbusd_epi32(isum[st / 4], _mm512_set1_epi32(xs), ws[st]);
            }
            const __m512 dx = _mm512_set1_ps(d[t][i]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[0]), _mm512_mul_ps(scale[0], dx), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[1]), _mm512_mul_ps(scale[1], dx), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

void dot_tile16(DType t, const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                const float* const* sum, float* out) {
    switch (t) {
        case DType::q4_0: return dot_tile16_type<DType::q4_0>(w, n, q, d, sum, out);
        case DType::q3_k: case DType::q6_k: case DType::iq4_nl: case DType::q8_0: return dot_tile16_signed(w, n, q, d, out);
        default: return dot_tile16_type<DType::q4_1>(w, n, q, d, sum, out);   // q4_1, q5_*, q4_k, q5_k: scale and offset
    }
}

// Q8_0 rows against x rounded to int8 per 32-block (int8_decode: llama.cpp's q8_0 x q8_0). Two
// blocks per register: VPDPBUSD takes x offset to unsigned (a + 128), its lanes start from the row's
// -128 * (sum of the same four weights), so every int32 lane is an exact partial sum. Each (row,
// token)'s lanes then add up in int32 per block, and its float operations are
//   acc = fma(float(S_b), dw_b * dx_b, acc) for b = 0, 1, ... in order
// whatever the tile -- and what the strip kernels (dot_q8_0_strip_int8, on VNNI and AMX) run on
// their block sums, which decode reads at this level -- so batched decode rows equal one-token
// steps bit for bit.

// v[k] for P <= 16 (row, token) pairs, each [8 lanes of block b | 8 of block b + 1] -> even[k], odd[k]:
// the pairs' whole sums of block b and of b + 1 (lane k of two vectors). v is padded to a multiple
// of four with zeros.
template <int P>
inline void block_sums_of_pairs(__m512i* v, __m512i* even, __m512i* odd) {
    constexpr int P4 = (P + 3) / 4 * 4;
    for (int k = P; k < P4; ++k) v[k] = _mm512_setzero_si512();
    __m512i x[P4 / 2], y[4];
    // per 128-bit lane: pairs 2m and 2m + 1, two partial sums each
    for (int m = 0; m < P4 / 2; ++m)
        x[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * m], v[2 * m + 1]), _mm512_unpackhi_epi32(v[2 * m], v[2 * m + 1]));
    // ... pairs 4j..4j + 3, one sum each (lanes 0-1 of the register: block b, 2-3: block b + 1)
    for (int j = 0; j < P4 / 4; ++j)
        y[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2 * j], x[2 * j + 1]), _mm512_unpackhi_epi64(x[2 * j], x[2 * j + 1]));
    for (int j = P4 / 4; j < 4; ++j) y[j] = _mm512_setzero_si512();
    // 128-bit lanes added: z0 = [b of 0-3, b+1 of 0-3, b of 4-7, b+1 of 4-7], z1 the same for 8-15
    const __m512i z0 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i z1 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
    *even = _mm512_shuffle_i32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0));
    *odd = _mm512_shuffle_i32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1));
}

template <int NR, int NT>
void dot_q8_0_int8_tile(const uint8_t* const* rows, const int8_t* const* a, const float* const* d, int64_t n,
                        float* out) {
    constexpr int64_t block = 34;   // fp16 scale + 32 quants
    constexpr int P = NR * NT;      // (row, token) pairs, lane r * NT + t
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    const int64_t nb = n / 32;
    for (int64_t b = 0; b < nb; b += 2) {
        const bool pair = b + 1 < nb;   // an odd last block fills the low half alone
        const __mmask64 x_mask = pair ? ~__mmask64{0} : __mmask64{0xFFFFFFFF};
        __m512i xu[NT];
        alignas(64) float scale_even[16] = {}, scale_odd[16] = {};
        for (int t = 0; t < NT; ++t) xu[t] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(x_mask, a[t] + 32 * b), offset);
        __m512i s[(P + 3) / 4 * 4];
        for (int r = 0; r < NR; ++r) {
            const uint8_t* blk = rows[r] + b * block;
            _mm_prefetch(reinterpret_cast<const char*>(blk) + kDecodePrefetchBytes, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(blk) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
            const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
            const __m256i w_hi = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + block + 2))
                                      : _mm256_setzero_si256();
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(w_lo), w_hi, 1);
            uint16_t h_lo, h_hi = 0;
            std::memcpy(&h_lo, blk, 2);
            if (pair) std::memcpy(&h_hi, blk + block, 2);
            const float dw_lo = half(h_lo), dw_hi = half(h_hi);
            const __m512i start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, w));
            for (int t = 0; t < NT; ++t) {
                s[r * NT + t] = _mm512_dpbusd_epi32(start, xu[t], w);
                scale_even[r * NT + t] = dw_lo * d[t][b];
                if (pair) scale_odd[r * NT + t] = dw_hi * d[t][b + 1];
            }
        }
        __m512i even, odd;
        block_sums_of_pairs<P>(s, &even, &odd);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(even), _mm512_load_ps(scale_even), acc);
        if (pair) acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(odd), _mm512_load_ps(scale_odd), acc);
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc);
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r * NT + t] = lanes[r * NT + t];
}

template <int NR>
void dot_q8_0_int8_rows(const uint8_t* const* rows, const int8_t* const* a, const float* const* d, int nt, int64_t n,
                        float* out) {
    switch (nt) {
        case 4: return dot_q8_0_int8_tile<NR, 4>(rows, a, d, n, out);
        case 3: return dot_q8_0_int8_tile<NR, 3>(rows, a, d, n, out);
        case 2: return dot_q8_0_int8_tile<NR, 2>(rows, a, d, n, out);
        default: return dot_q8_0_int8_tile<NR, 1>(rows, a, d, n, out);
    }
}

void dot_q8_0_int8(const void* const* rows, int n_rows, const int8_t* const* a, const float* const* d, int nt, int64_t n,
                   float* out) {
    const auto* r = reinterpret_cast<const uint8_t* const*>(rows);
    switch (n_rows) {
        case 4: return dot_q8_0_int8_rows<4>(r, a, d, nt, n, out);
        case 3: return dot_q8_0_int8_rows<3>(r, a, d, nt, n, out);
        case 2: return dot_q8_0_int8_rows<2>(r, a, d, nt, n, out);
        default: return dot_q8_0_int8_rows<1>(r, a, d, nt, n, out);
    }
}

// Up to 8 queries against 32 keys per pass: two key vectors per dimension feed 2 x NQ FMAs whose
// query factor is a broadcast (16 accumulators of the 32 registers).
template <int NQ>
void scores_queries(const float* q, int64_t hd, const float* kt, int64_t kt_stride, int64_t m, float* s, int64_t s_stride) {
    auto mask = [](int64_t r) { return r >= 16 ? static_cast<__mmask16>(0xFFFF) : r <= 0 ? __mmask16{0} : tail_mask(r); };
    for (int64_t j = 0; j < m; j += 32) {
        const __mmask16 m0 = mask(m - j), m1 = mask(m - j - 16);
        __m512 acc[NQ][2];
#pragma GCC unroll 8
        for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; ++d) {
            const float* k = kt + d * kt_stride + j;
            const __m512 k0 = _mm512_maskz_loadu_ps(m0, k), k1 = _mm512_maskz_loadu_ps(m1, k + 16);
#pragma GCC unroll 8
            for (int i = 0; i < NQ; ++i) {
                const __m512 qd = _mm512_set1_ps(q[i * hd + d]);
                acc[i][0] = _mm512_fmadd_ps(qd, k0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(qd, k1, acc[i][1]);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < NQ; ++i) {
            _mm512_mask_storeu_ps(s + i * s_stride + j, m0, acc[i][0]);
            _mm512_mask_storeu_ps(s + i * s_stride + j + 16, m1, acc[i][1]);
        }
    }
}

void scores_block(const float* q, int nq, int64_t hd, const float* kt, int64_t kt_stride, int64_t m, float* s,
                  int64_t s_stride) {
    using Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
    static constexpr Fn by_count[8] = {scores_queries<1>, scores_queries<2>, scores_queries<3>, scores_queries<4>,
                                       scores_queries<5>, scores_queries<6>, scores_queries<7>, scores_queries<8>};
    for (int i = 0; i < nq; i += 8) by_count[std::min(8, nq - i) - 1](q + i * hd, hd, kt, kt_stride, m, s + i * s_stride, s_stride);
}

const Kernels kAvx512{Level::avx512, "avx512", dot_f32,   rows_dot_f32,     rows_axpy_f32,
                      exp_sum,       swiglu,      kTileRows, kTileTokens, dot_f32_tile, dot_row, dot_rows_tokens, dequantize,
                      prepare_x, dot_row_prepared,
                      dot_row_prepared_x4, prepare_x8, dot_packed8, dot_packed8_int8, dequantize_packed8, repack16, dot_tile16,
                      dot_packed8_int8_tokens, dot_packed8_tokens, gelu_erf, gelu_tanh, group_dot_f32, group_dot_f16, group_axpy_f32,
                      group_axpy_f16, rows_dot_f16, rows_axpy_f16, repack16_rows, prepare_x_k,
                      dot_q8_0_int8, scores_block, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace

const Kernels& kernels_avx512() {
    static const Kernels table = [] {
        Kernels k = kAvx512;
        add_q8_0_strip_kernels(k);
        add_amx_kernels(k);
        return k;
    }();
    return table;
}

}  // namespace tmill::cpu
