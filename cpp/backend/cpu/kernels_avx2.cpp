// AVX2 + FMA + F16C kernels: the level's table and its float kernels. This file and
// kernels_avx2_int.cpp (the integer paths) alone are compiled with those instructions enabled, and
// are only called after cpuid says the CPU has them. Their kernels stay in anonymous namespaces and
// their shared helpers (kernels_avx2_common.h) in namespace avx2, so no function compiled with AVX2
// can be picked by the linker for the portable code.
#include <immintrin.h>

#include "core/quants.h"
#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx2_common.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace tmill::cpu {

namespace {

using namespace avx2;




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

const Kernels kAvx2{Level::avx2, "avx2", dot_f32, rows_dot_f32, rows_axpy_f32, exp_sum, swiglu, kTileRows, kTileTokens,
                    dot_f32_tile, dot_row, dot_rows_tokens, dequantize,
                    nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,   // integer kernels:
                    nullptr, nullptr, gelu_erf, gelu_tanh, nullptr, nullptr, nullptr, nullptr,         // set below
                    rows_dot_f16, rows_axpy_f16, nullptr, nullptr, nullptr, scores_block, nullptr, nullptr, nullptr,
                    nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace

const Kernels& kernels_avx2() {
    static const Kernels table = [] {
        Kernels k = kAvx2;
        avx2::add_integer_kernels(k);
        return k;
    }();
    return table;
}

}  // namespace tmill::cpu
