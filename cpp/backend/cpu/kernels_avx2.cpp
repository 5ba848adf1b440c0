// AVX2 + FMA + F16C kernels. This file alone is compiled with those instructions enabled; it is only
// called after cpuid says the CPU has them. Everything here stays in an anonymous namespace so no
// inline function compiled with AVX2 can be picked by the linker for the portable code.
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

inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

inline float half(uint16_t h) { return _cvtsh_ss(h); }

// 8 signed bytes -> 8 floats
inline __m256 i8x8_to_ps(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); }

float dot_f32(const float* a, const float* b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

// 4 rows x 3 tokens: twelve accumulators, three token registers and one row register -- all sixteen
// AVX2 has; each row load feeds three FMAs, each token load four.
constexpr int kTileRows = 4, kTileTokens = 3;

void dot_f32_tile(const float* w, int64_t w_stride, const float* const* xs, int64_t n, float* out) {
    __m256 acc[kTileTokens][kTileRows];
    for (auto& row : acc)
        for (__m256& v : row) v = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xv[kTileTokens];
        for (int t = 0; t < kTileTokens; ++t) xv[t] = _mm256_loadu_ps(xs[t] + i);
        for (int r = 0; r < kTileRows; ++r) {
            const __m256 wr = _mm256_loadu_ps(w + r * w_stride + i);
            for (int t = 0; t < kTileTokens; ++t) acc[t][r] = _mm256_fmadd_ps(wr, xv[t], acc[t][r]);
        }
    }
#pragma GCC unroll 12   // fully unrolled, so the accumulators stay in registers
    for (int k = 0; k < kTileTokens * kTileRows; ++k) {
        const int t = k / kTileRows, r = k % kTileRows;
        float s = hsum(acc[t][r]);
        for (int64_t j = i; j < n; ++j) s += w[r * w_stride + j] * xs[t][j];
        out[k] = s;
    }
}

void rows_dot_f32(const float* rows, int64_t n_rows, int64_t d, const float* x, float* out) {
    for (int64_t j = 0; j < n_rows; ++j) out[j] = dot_f32(rows + j * d, x, d);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float value(const float* p) { return *p; }
inline float value(const uint16_t* p) { return fp16_to_fp32(*p); }

void rows_dot_f16(const uint16_t* rows, int64_t n_rows, int64_t d, const float* x, float* out) {
    for (int64_t j = 0; j < n_rows; ++j) {
        const uint16_t* r = rows + j * d;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= d; i += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(r + i) + kDecodePrefetchBytes, _MM_HINT_T0);
            acc0 = _mm256_fmadd_ps(load8(r + i), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(load8(r + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(load8(r + i), _mm256_loadu_ps(x + i), acc0);
        float sum = hsum(_mm256_add_ps(acc0, acc1));
        for (; i < d; ++i) sum += value(r + i) * x[i];
        out[j] = sum;
    }
}

// y += sum_j w[j] rows[j]: 64 columns at a time stay in eight accumulators while the rows stream by
template <typename E>
void rows_axpy(float* y, const E* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) {
        __m256 acc[8];
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_loadu_ps(y + c + 8 * k);
        for (int64_t j = 0; j < n_rows; ++j) {
            __m256 wj = _mm256_set1_ps(w[j]);
            const E* r = rows + j * stride + c;
            for (int line = 0; line < 64 * static_cast<int>(sizeof(E)); line += 64)
                _mm_prefetch(reinterpret_cast<const char*>(r + kRowsAxpyPrefetchColumns) + line, _MM_HINT_T0);
            for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(wj, load8(r + 8 * k), acc[k]);
        }
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(y + c + 8 * k, acc[k]);
    }
    for (; c + 8 <= d; c += 8) {
        __m256 acc = _mm256_loadu_ps(y + c);
        for (int64_t j = 0; j < n_rows; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), load8(rows + j * stride + c), acc);
        _mm256_storeu_ps(y + c, acc);
    }
    for (; c < d; ++c)
        for (int64_t j = 0; j < n_rows; ++j) y[c] += w[j] * value(rows + j * stride + c);
}
void rows_axpy_f32(float* y, const float* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    rows_axpy(y, rows, n_rows, d, stride, w);
}
void rows_axpy_f16(float* y, const uint16_t* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    rows_axpy(y, rows, n_rows, d, stride, w);
}

// exp(x) = 2^k * exp(r), k = round(x / ln 2), r = x - k ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
// parts so r is exact), exp(r) by its degree-6 Taylor polynomial: relative error below 2e-7.
inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i pow2k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2k));
}

float exp_sum(float* x, int64_t n, float shift) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; i < n; ++i) {
        float tail[8] = {x[i] - shift};   // the last few through the same formula, one lane at a time
        float e = _mm256_cvtss_f32(exp_ps(_mm256_loadu_ps(tail)));
        x[i] = e;
        sum += e;
    }
    return sum;
}

// 1 + erf(z) for z = x / sqrt 2: with t = 1 / (1 + p |z|), erfc(|z|) = t P(t) exp(-z^2) (A&S 7.1.26),
// and 1 + erf(z) = erfc(|z|) for z < 0 (no cancellation), 2 - erfc(|z|) otherwise.
inline __m256 one_plus_erf(__m256 x) {
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.7071067811865476f));
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    const __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a))));
    const __m256 negative = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), erfc), erfc, negative);
}

void gelu_erf(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), one_plus_erf(v)));
    }
    for (; i < n; ++i) {   // the last few through the same formula, one lane at a time
        float tail[8] = {x[i]};
        x[i] = 0.5f * x[i] * _mm256_cvtss_f32(one_plus_erf(_mm256_loadu_ps(tail)));
    }
}

// 0.5 x (1 + tanh u) = x / (1 + exp(-2 u)), u = sqrt(2 / pi) (x + 0.044715 x^3)
inline __m256 gelu_tanh_ps(__m256 x) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 minus_2u = _mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x), _mm256_set1_ps(-1.5957691216057308f));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(minus_2u)));
}

void gelu_tanh(float* x, const float* up, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = gelu_tanh_ps(_mm256_loadu_ps(x + i));
        if (up) g = _mm256_mul_ps(g, _mm256_loadu_ps(up + i));
        _mm256_storeu_ps(x + i, g);
    }
    for (; i < n; ++i) {   // the last few through the same formula, one lane at a time
        float tail[8] = {x[i]};
        x[i] = _mm256_cvtss_f32(gelu_tanh_ps(_mm256_loadu_ps(tail))) * (up ? up[i] : 1.0f);
    }
}

void swiglu(float* gate, const float* up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    if (i < n) kernels_scalar().swiglu(gate + i, up + i, n - i);
}

float dot_f16(const uint16_t* w, const float* x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
        __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8)));
        acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), acc1);
    }
    float sum = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; ++i) sum += half(w[i]) * x[i];
    return sum;
}

inline __m256 bf16x8_to_ps(const uint16_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

float dot_bf16(const uint16_t* w, const float* x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(bf16x8_to_ps(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8_to_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    }
    float sum = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; ++i) sum += bf16_to_fp32(w[i]) * x[i];
    return sum;
}

// Sum over one block of 32 int8 quants q (as 4 groups of 8) times x: returns the float vector of
// partial sums; the caller scales it by the block's d.
inline __m256 block_dot_i8(__m128i q_lo, __m128i q_hi, const float* x) {
    // q_lo: quants 0..15, q_hi: quants 16..31
    __m256 s = _mm256_mul_ps(i8x8_to_ps(q_lo), _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(i8x8_to_ps(_mm_unpackhi_epi64(q_lo, q_lo)), _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(i8x8_to_ps(q_hi), _mm256_loadu_ps(x + 16), s);
    s = _mm256_fmadd_ps(i8x8_to_ps(_mm_unpackhi_epi64(q_hi, q_hi)), _mm256_loadu_ps(x + 24), s);
    return s;
}

float dot_q8_0(const BlockQ8_0* b, const float* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[i].qs));
        __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[i].qs + 16));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i].d)), block_dot_i8(lo, hi, x), acc);
    }
    return hsum(acc);
}

// 16 packed bytes -> (low nibbles, high nibbles) as unsigned bytes 0..15
inline void unpack_nibbles(const uint8_t* qs, __m128i* lo, __m128i* hi) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    __m128i mask = _mm_set1_epi8(0x0F);
    *lo = _mm_and_si128(packed, mask);
    *hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
}

// A 4-bit block's 16 quant bytes as 32 floats: d * (q - 8) (q4_0) or d * q + m (q4_1), rounded
// twice exactly as the reference dequantization
inline void nibble_block_floats(const uint8_t* qs, float d_value, float m_value, bool has_min, float* out) {
    __m128i lo, hi;
    unpack_nibbles(qs, &lo, &hi);
    if (!has_min) {
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
    }
    const __m256 d = _mm256_set1_ps(d_value), m = _mm256_set1_ps(m_value);
    auto put = [&](float* dst, __m128i q) { _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_mul_ps(d, i8x8_to_ps(q)), m)); };
    put(out, lo);
    put(out + 8, _mm_unpackhi_epi64(lo, lo));
    put(out + 16, hi);
    put(out + 24, _mm_unpackhi_epi64(hi, hi));
}

float dot_q4_0(const BlockQ4_0* b, const float* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    const __m128i eight = _mm_set1_epi8(8);
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        __m128i lo, hi;
        unpack_nibbles(b[i].qs, &lo, &hi);   // element j: low nibble of byte j, element j+16: high nibble
        lo = _mm_sub_epi8(lo, eight);
        hi = _mm_sub_epi8(hi, eight);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i].d)), block_dot_i8(lo, hi, x), acc);
    }
    return hsum(acc);
}

float dot_q4_1(const BlockQ4_1* b, const float* x, int64_t n) {
    // sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * sum_j x_j
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, x += 32) {
        __m128i lo, hi;
        unpack_nibbles(b[i].qs, &lo, &hi);
        __m256 xs = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                                  _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i].d)), block_dot_i8(lo, hi, x), acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i].m)), xs, acc);
    }
    return hsum(acc);
}

// The rows-as-decode tile: R weight rows against NT vectors, each (row, vector) pair accumulated
// exactly as dot_row accumulates it (the same lanes, steps and reduction), so the results are
// dot_row's bit for bit, while each loaded weight vector feeds NT FMAs and each x vector R of them.
template <int R, int NT>
void dot_f32_tile_exact(const float* const* rows, const float* const* xs, int64_t n, float* out) {
    __m256 acc[R][NT][4];
    for (auto& a : acc)
        for (auto& v : a)
            for (__m256& r : v) r = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int q = 0; q < 4; ++q)
            for (int r = 0; r < R; ++r) {
                const __m256 w = _mm256_loadu_ps(rows[r] + i + 8 * q);
                for (int t = 0; t < NT; ++t) acc[r][t][q] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + i + 8 * q), acc[r][t][q]);
            }
    for (; i + 8 <= n; i += 8)
        for (int r = 0; r < R; ++r) {
            const __m256 w = _mm256_loadu_ps(rows[r] + i);
            for (int t = 0; t < NT; ++t) acc[r][t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + i), acc[r][t][0]);
        }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) {
            float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][t][0], acc[r][t][1]), _mm256_add_ps(acc[r][t][2], acc[r][t][3])));
            for (int64_t k = i; k < n; ++k) sum += rows[r][k] * xs[t][k];
            out[r * NT + t] = sum;
        }
}

template <int R, int NT, bool BF16>
void dot_16bit_tile_exact(const uint16_t* const* rows, const float* const* xs, int64_t n, float* out) {
    __m256 acc[R][NT][2];
    for (auto& a : acc)
        for (auto& v : a) v[0] = v[1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int h = 0; h < 2; ++h)
            for (int r = 0; r < R; ++r) {
                const uint16_t* p = rows[r] + i + 8 * h;
                const __m256 w = BF16 ? bf16x8_to_ps(p) : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
                for (int t = 0; t < NT; ++t) acc[r][t][h] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + i + 8 * h), acc[r][t][h]);
            }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) {
            float sum = hsum(_mm256_add_ps(acc[r][t][0], acc[r][t][1]));
            for (int64_t k = i; k < n; ++k) sum += (BF16 ? bf16_to_fp32(rows[r][k]) : half(rows[r][k])) * xs[t][k];
            out[r * NT + t] = sum;
        }
}

// f32: 1 row x 3 vectors x 4 accumulators (12 of 16 registers); 16-bit: 2 x 3 x 2 (12)
constexpr int kExactF32Rows = 1, kExactF32Tokens = 3, kExact16Rows = 2, kExact16Tokens = 3;

using ExactTile = void (*)(const void* const*, const float* const*, int64_t, float*);

template <int R, int NT, int Kind>
void exact_tile(const void* const* rows, const float* const* xs, int64_t n, float* out) {
    if constexpr (Kind == 0) dot_f32_tile_exact<R, NT>(reinterpret_cast<const float* const*>(rows), xs, n, out);
    else if constexpr (Kind == 1) dot_16bit_tile_exact<R, NT, false>(reinterpret_cast<const uint16_t* const*>(rows), xs, n, out);
    else dot_16bit_tile_exact<R, NT, true>(reinterpret_cast<const uint16_t* const*>(rows), xs, n, out);
}

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
        case DType::f16: return dot_f16(static_cast<const uint16_t*>(row), x, n);
        case DType::bf16: return dot_bf16(static_cast<const uint16_t*>(row), x, n);
        case DType::q8_0: return dot_q8_0(static_cast<const BlockQ8_0*>(row), x, n);
        case DType::q4_0: return dot_q4_0(static_cast<const BlockQ4_0*>(row), x, n);
        case DType::q4_1: return dot_q4_1(static_cast<const BlockQ4_1*>(row), x, n);
        default: return kernels_scalar().dot_row(t, row, x, n);
    }
}

void dequantize(DType t, const void* row, float* out, int64_t n) {
    switch (t) {
        case DType::f16: {
            const uint16_t* h = static_cast<const uint16_t*>(row);
            int64_t i = 0;
            for (; i + 8 <= n; i += 8)
                _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
            for (; i < n; ++i) out[i] = half(h[i]);
            return;
        }
        case DType::bf16: {
            const uint16_t* h = static_cast<const uint16_t*>(row);
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, bf16x8_to_ps(h + i));
            for (; i < n; ++i) out[i] = bf16_to_fp32(h[i]);
            return;
        }
        case DType::q8_0: {
            const BlockQ8_0* b = static_cast<const BlockQ8_0*>(row);
            for (int64_t i = 0; i < n / 32; ++i, out += 32) {
                __m256 d = _mm256_set1_ps(half(b[i].d));
                for (int g = 0; g < 4; ++g)
                    _mm256_storeu_ps(out + 8 * g, _mm256_mul_ps(d, i8x8_to_ps(_mm_loadl_epi64(
                                                                    reinterpret_cast<const __m128i*>(b[i].qs + 8 * g)))));
            }
            return;
        }
        case DType::q4_0:
        case DType::q4_1: {
            const bool has_min = t == DType::q4_1;
            const uint8_t* p = static_cast<const uint8_t*>(row);
            const size_t block_bytes = has_min ? sizeof(BlockQ4_1) : sizeof(BlockQ4_0);
            for (int64_t i = 0; i < n / 32; ++i, out += 32, p += block_bytes) {
                uint16_t dh, mh = 0;
                __builtin_memcpy(&dh, p, 2);
                if (has_min) __builtin_memcpy(&mh, p + 2, 2);
                nibble_block_floats(p + (has_min ? 4 : 2), half(dh), has_min ? half(mh) : 0.0f, has_min, out);
            }
            return;
        }
        case DType::q5_0: return dequantize_extra<DType::q5_0>(static_cast<const uint8_t*>(row), out, n);
        case DType::q5_1: return dequantize_extra<DType::q5_1>(static_cast<const uint8_t*>(row), out, n);
        case DType::iq4_nl: return dequantize_extra<DType::iq4_nl>(static_cast<const uint8_t*>(row), out, n);
        case DType::q4_k: return dequantize_extra<DType::q4_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q5_k: return dequantize_extra<DType::q5_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q2_k: return dequantize_extra<DType::q2_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q3_k: return dequantize_extra<DType::q3_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::q6_k: return dequantize_extra<DType::q6_k>(static_cast<const uint8_t*>(row), out, n);
        case DType::nf4: {
            // codebook lookup: the low 3 bits pick within each half of the table, bit 3 picks the half
            const __m256 book_lo = _mm256_loadu_ps(kNF4), book_hi = _mm256_loadu_ps(kNF4 + 8);
            const BlockNF4* b = static_cast<const BlockNF4*>(row);
            for (int64_t i = 0; i < n / 32; ++i, out += 32) {
                __m256 d = _mm256_set1_ps(half(b[i].d));
                __m128i lo, hi;
                unpack_nibbles(b[i].qs, &lo, &hi);
                auto put = [&](float* dst, __m128i q) {
                    __m256i idx = _mm256_cvtepu8_epi32(q);
                    __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
                    __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(book_lo, idx),
                                                _mm256_permutevar8x32_ps(book_hi, idx), upper);
                    _mm256_storeu_ps(dst, _mm256_mul_ps(d, v));
                };
                put(out, lo);
                put(out + 8, _mm_unpackhi_epi64(lo, lo));
                put(out + 16, hi);
                put(out + 24, _mm_unpackhi_epi64(hi, hi));
            }
            return;
        }
        default: dequantize_row(t, row, out, n);
    }
}

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

void dot_packed8(DType t, const uint8_t* group, const int8_t* q, const float* d, const float* sum, int64_t n,
                 float* out) {
    with_packed_type(t, [&](auto type) { dot_packed8_tokens_type<decltype(type)::value, 1>(group, &q, &d, &sum, n, out); });
}

void dot_packed8_tokens(DType t, const uint8_t* group, const int8_t* const* q, const float* const* d,
                        const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) { dot_packed8_tokens_n<decltype(type)::value>(group, q, d, sum, nt, n, out); });
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

// Up to 6 queries against 16 keys per pass: two key vectors per dimension feed 2 x NQ FMAs whose
// query factor is a broadcast (12 accumulators of the 16 registers).
template <int NQ>
void scores_queries(const float* q, int64_t hd, const float* kt, int64_t kt_stride, int64_t m, float* s, int64_t s_stride) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    auto mask = [&](int64_t r) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(r, 8))), lane); };
    for (int64_t j = 0; j < m; j += 16) {
        const __m256i m0 = mask(m - j), m1 = mask(m - j - 8);
        __m256 acc[NQ][2];
#pragma GCC unroll 6
        for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < hd; ++d) {
            const float* k = kt + d * kt_stride + j;
            const __m256 k0 = _mm256_maskload_ps(k, m0), k1 = _mm256_maskload_ps(k + 8, m1);
#pragma GCC unroll 6
            for (int i = 0; i < NQ; ++i) {
                const __m256 qd = _mm256_broadcast_ss(q + i * hd + d);
                acc[i][0] = _mm256_fmadd_ps(qd, k0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(qd, k1, acc[i][1]);
            }
        }
#pragma GCC unroll 6
        for (int i = 0; i < NQ; ++i) {
            _mm256_maskstore_ps(s + i * s_stride + j, m0, acc[i][0]);
            _mm256_maskstore_ps(s + i * s_stride + j + 8, m1, acc[i][1]);
        }
    }
}

void scores_block(const float* q, int nq, int64_t hd, const float* kt, int64_t kt_stride, int64_t m, float* s,
                  int64_t s_stride) {
    using Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
    static constexpr Fn by_count[6] = {scores_queries<1>, scores_queries<2>, scores_queries<3>,
                                       scores_queries<4>, scores_queries<5>, scores_queries<6>};
    for (int i = 0; i < nq; i += 6) by_count[std::min(6, nq - i) - 1](q + i * hd, hd, kt, kt_stride, m, s + i * s_stride, s_stride);
}

const Kernels kAvx2{Level::avx2, "avx2", dot_f32, rows_dot_f32, rows_axpy_f32, exp_sum, swiglu, kTileRows, kTileTokens, dot_f32_tile, dot_row,
                    dot_rows_tokens, dequantize, prepare_x, dot_row_prepared,
                    dot_row_prepared_x4, prepare_x8, dot_packed8, nullptr, dequantize_packed8, repack16, dot_tile16, nullptr,
                    dot_packed8_tokens, gelu_erf, gelu_tanh, nullptr, nullptr, nullptr, nullptr,
                    rows_dot_f16, rows_axpy_f16, repack16_rows, prepare_x_k, nullptr, scores_block, nullptr, nullptr, nullptr,
                    nullptr, nullptr, nullptr};

}  // namespace

const Kernels& kernels_avx2() { return kAvx2; }

}  // namespace tmill::cpu
