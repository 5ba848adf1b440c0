// AVX-512 kernels (F, BW, VL, DQ and VNNI; FMA and F16C): the level's table and its float kernels.
// This file and its siblings (kernels_avx512_int.cpp, kernels_avx512_int8.cpp, kernels_q8_0_strips.cpp)
// alone are compiled with those instructions enabled, and are only called after cpuid says the CPU
// has all of them; each keeps its kernels in an anonymous namespace and fills its own entries of the
// table. Compared with AVX2: 16 floats or one whole 32-value block per register, masked loads
// instead of scalar tails, a 16-entry nf4 codebook in one register, VPDPWSSD (int16 pairs multiplied
// and summed into int32 in one instruction) on the integer path, and VPDPBUSD (four byte products
// per int32 lane) on 4-bit weights repacked in eight-row groups and on Q8_0 strips. (The AMX
// kernels, where the CPU has them, are in kernels_amx.cpp.)
#include <immintrin.h>

#include "core/quants.h"
#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx512_common.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace tmill::cpu {

namespace {

using namespace avx512;


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

const Kernels kAvx512{Level::avx512, "avx512", dot_f32, rows_dot_f32, rows_axpy_f32, exp_sum, swiglu, kTileRows,
                      kTileTokens, dot_f32_tile, dot_row, dot_rows_tokens, dequantize,
                      nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,   // integer kernels:
                      nullptr, nullptr, gelu_erf, gelu_tanh, group_dot_f32, group_dot_f16, group_axpy_f32,   // set below
                      group_axpy_f16, rows_dot_f16, rows_axpy_f16, nullptr, nullptr,
                      nullptr, scores_block, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace

const Kernels& kernels_avx512() {
    static const Kernels table = [] {
        Kernels k = kAvx512;
        avx512::add_integer_kernels(k);
        avx512::add_int8_kernels(k);
        add_q8_0_strip_kernels(k);
        add_packed16_kernels(k);
        add_amx_kernels(k);
        return k;
    }();
    return table;
}

}  // namespace tmill::cpu
