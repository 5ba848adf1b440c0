// Decode of Q8_0 weights in strips of sixteen rows, AVX-512 VNNI (kernels.h: dot_q8_0_strip, exact,
// and dot_q8_0_strip_int8).
// Each 64-byte load holds four values of each of the strip's sixteen rows, so one VPDPBUSD with four
// bytes of x broadcast adds four products to every row at once: 32 instructions per block column
// for four x parts and sixteen rows (8 for int8 decode's one), where the file layout's exact int16
// kernel spends about ten per row.
// Lane r of every accumulator is row r, so rows need no horizontal sums.
#include <immintrin.h>


#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx512_common.h"

namespace tmill::cpu {

namespace {

// NT tokens against one strip. Per block column i and token, with u = w + 128 and x's parts
// x / d = a + b / 2^7 + c / 2^14 + e / 2^21:
//   P_ab = sum_j w_j (2^7 a_j + b_j) = 2^7 sum_j u_j a_j + sum_j u_j b_j - 2^7 s_ab   (exact, |P| < 2^27)
//   P_ce the same with c, e and s_ce, s the x part sums of q8_0_part_sums
//   acc_r = fma(dw_r * (d * 2^-7), fma(float(P_ce), 2^-14, float(P_ab)), acc_r)
// so a token's arithmetic depends only on its own integers, whatever NT.
template <int NT>
void strip_tokens(const uint8_t* strip, const int8_t* const* q, const float* const* d, const int32_t* const* s,
                  int64_t n, float* out) {
    const int64_t nb = n / 32;
    const uint8_t* quants = strip;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(strip + nb * kQ8_0StripQuantBytes);
    const __m512 low_pair = _mm512_set1_ps(1.0f / 16384.0f);
    __m512 acc[NT];
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* col = quants + i * kQ8_0StripQuantBytes;
        __m512i pa[NT], pb[NT], pc[NT], pe[NT];
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) pa[k] = pb[k] = pc[k] = pe[k] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
            _mm_prefetch(reinterpret_cast<const char*>(col) + 64 * g + kDecodePrefetchBytes, _MM_HINT_T0);
            const __m512i w = _mm512_loadu_si512(col + 64 * g);
#pragma GCC unroll 4
            for (int k = 0; k < NT; ++k) {
                const int8_t* x = q[k] + 128 * i + 4 * g;
                pa[k] = _mm512_dpbusd_epi32(pa[k], w, avx512::broadcast4(x));
                pb[k] = _mm512_dpbusd_epi32(pb[k], w, avx512::broadcast4(x + 32));
                pc[k] = _mm512_dpbusd_epi32(pc[k], w, avx512::broadcast4(x + 64));
                pe[k] = _mm512_dpbusd_epi32(pe[k], w, avx512::broadcast4(x + 96));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 16 * i)));
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) {
            const __m512i ab = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(pa[k], 7), pb[k]),
                                                _mm512_set1_epi32(s[k][2 * i] * 128));
            const __m512i ce = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(pc[k], 7), pe[k]),
                                                _mm512_set1_epi32(s[k][2 * i + 1] * 128));
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ce), low_pair, _mm512_cvtepi32_ps(ab));
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(d[k][i] * (1.0f / 128.0f))), f, acc[k]);
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) _mm512_storeu_ps(out + 16 * k, acc[k]);
}

// int8 decode's product: x rounded to int8 (a, the first part alone), s its block sums. Per block the
// exact sum_j w_j a_j = sum_j u_j a_j - 128 s meets floats as dot_q8_0_int8's block sums do:
//   acc_r = fma(float(sum), dw_r * d, acc_r)
// so the strips give the file layout kernel's bits.
template <int NT>
void strip_tokens_int8(const uint8_t* strip, const int8_t* const* a, const float* const* d, const int32_t* const* s,
                       int64_t n, float* out) {
    const int64_t nb = n / 32;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(strip + nb * kQ8_0StripQuantBytes);
    __m512 acc[NT];
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* col = strip + i * kQ8_0StripQuantBytes;
        __m512i p[NT];
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) p[k] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
            _mm_prefetch(reinterpret_cast<const char*>(col) + 64 * g + kDecodePrefetchBytes, _MM_HINT_T0);
            const __m512i w = _mm512_loadu_si512(col + 64 * g);
#pragma GCC unroll 4
            for (int k = 0; k < NT; ++k) p[k] = _mm512_dpbusd_epi32(p[k], w, avx512::broadcast4(a[k] + 32 * i + 4 * g));
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 16 * i)));
#pragma GCC unroll 4
        for (int k = 0; k < NT; ++k) {
            const __m512i sum = _mm512_sub_epi32(p[k], _mm512_set1_epi32(s[k][i] * 128));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(d[k][i])), acc[k]);
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NT; ++k) _mm512_storeu_ps(out + 16 * k, acc[k]);
}

void dot_q8_0_strip_int8(const uint8_t* strip, const int8_t* const* a, const float* const* d, const int32_t* const* s,
                         int nt, int64_t n, float* out) {
    with_count_to_4(nt, [&](auto count) { strip_tokens_int8<decltype(count)::value>(strip, a, d, s, n, out); });
}

void dot_q8_0_strip(const uint8_t* strip, const int8_t* const* q, const float* const* d, const int32_t* const* s,
                    int nt, int64_t n, float* out) {
    with_count_to_4(nt, [&](auto count) { strip_tokens<decltype(count)::value>(strip, q, d, s, n, out); });
}

}  // namespace

void add_q8_0_strip_kernels(Kernels& k) {
    k.dot_q8_0_strip = dot_q8_0_strip;
    k.dot_q8_0_strip_int8 = dot_q8_0_strip_int8;
}

}  // namespace tmill::cpu
