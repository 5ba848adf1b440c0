// Unpacking of the 5-bit legacy types and the K-quants (layouts in core/kquants.h) with AVX2, for
// the AVX2 and AVX-512 kernel files alone (both are compiled with AVX2 enabled). Everything is in an
// anonymous namespace, so each of those files keeps its own copy, compiled with its own flags.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "core/dtype.h"
#include "core/kquants.h"

namespace tmill::cpu {

namespace {

// The types unpacked here, and whether their values carry an offset (x = d q + m).
constexpr bool is_extra(DType t) {
    return t == DType::q5_0 || t == DType::q5_1 || t == DType::q4_k || t == DType::q5_k || t == DType::q6_k;
}
constexpr bool has_offset(DType t) { return t == DType::q4_1 || t == DType::q5_1 || t == DType::q4_k || t == DType::q5_k; }

// Bytes of a row per 32 values (for prefetching ahead; q6_k's 26.25 rounds down).
template <DType T>
constexpr size_t bytes_per_32() {
    switch (T) {
        case DType::q8_0: return 34;
        case DType::q4_0: return 18;
        case DType::q4_1: return 20;
        case DType::q5_0: return 22;
        case DType::q5_1: return 24;
        case DType::q4_k: return 18;
        case DType::q5_k: return 22;
        case DType::q6_k: return 26;
        default: return 32;
    }
}

// Values 32 i .. 32 i + 31 of a row: x_j = d * sc[j / 16] * q_j + m, q as signed bytes (sc is 1
// except for q6_k's sub-blocks of 16). d and m are the floats the reference dequantizer multiplies
// and adds (for the K-quants d = d * sc_b and m = -(dmin * m_b) of the sub-block).
struct Quants32 {
    __m256i q;
    float d, m;
    int sc[2];
};

inline float half_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i nibbles(__m256i bytes, bool high) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    return _mm256_and_si256(high ? _mm256_srli_epi16(bytes, 4) : bytes, mask);
}

// byte j = 0x10 where bit j of bits is set, else 0
inline __m256i fifth_bits(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

template <DType T>
inline Quants32 quants32(const uint8_t* row, int64_t i) {
    Quants32 u;
    u.m = 0.0f;
    u.sc[0] = u.sc[1] = 1;
    if constexpr (T == DType::q5_0 || T == DType::q5_1) {
        constexpr bool with_min = T == DType::q5_1;
        const uint8_t* b = row + i * (with_min ? 24 : 22);
        u.d = half_at(b);
        if (with_min) u.m = half_at(b + 2);
        uint32_t qh;
        std::memcpy(&qh, b + kQ5QhOffset(with_min), 4);
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kQ5QhOffset(with_min) + 4));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);   // element j in byte j
        u.q = _mm256_or_si256(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), fifth_bits(qh));
        if constexpr (!with_min) u.q = _mm256_sub_epi8(u.q, _mm256_set1_epi8(16));
    } else if constexpr (T == DType::q4_k || T == DType::q5_k) {
        constexpr bool five = T == DType::q5_k;
        const uint8_t* b = row + (i / 8) * (five ? 176 : 144);
        const int sub = static_cast<int>(i % 8);
        int sc = 0, mn = 0;
        k4_scale_min(b + kK4Scales, sub, sc, mn);
        u.d = half_at(b) * static_cast<float>(sc);
        u.m = -(half_at(b + 2) * static_cast<float>(mn));
        u.q = nibbles(load32(b + (five ? kK5Qs : kK4Qs) + 32 * (sub / 2)), sub % 2 != 0);
        if constexpr (five) {
            const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << sub));
            const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(load32(b + kK5Qh), bit), bit);
            u.q = _mm256_or_si256(u.q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
        }
    } else {   // q6_k
        const uint8_t* b = row + (i / 8) * 210;
        const int h = static_cast<int>(i % 8) / 4, k = static_cast<int>(i % 4);
        const __m256i low = nibbles(load32(b + 64 * h + 32 * (k % 2)), k >= 2);
        const __m256i high = _mm256_and_si256(_mm256_srl_epi16(load32(b + kK6Qh + 32 * h), _mm_cvtsi32_si128(2 * k)),
                                              _mm256_set1_epi8(3));
        u.q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
        const int8_t* scales = reinterpret_cast<const int8_t*>(b + kK6Scales) + 8 * h + 2 * k;
        u.sc[0] = scales[0];
        u.sc[1] = scales[1];
        u.d = half_at(b + kK6D);
    }
    return u;
}

// n values of a row as floats, rounded exactly as the reference dequantization: (d * sc) * q + m,
// the product rounded before the sum.
template <DType T>
void dequantize_extra(const uint8_t* row, float* out, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i, out += 32) {
        const Quants32 u = quants32<T>(row, i);
        const __m128i halves[2] = {_mm256_castsi256_si128(u.q), _mm256_extracti128_si256(u.q, 1)};
        for (int h = 0; h < 2; ++h) {
            const __m256 d = _mm256_set1_ps(T == DType::q6_k ? u.d * static_cast<float>(u.sc[h]) : u.d);
            for (int g = 0; g < 2; ++g) {
                const __m128i bytes = g == 0 ? halves[h] : _mm_unpackhi_epi64(halves[h], halves[h]);
                __m256 v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
                if constexpr (has_offset(T)) v = _mm256_add_ps(v, _mm256_set1_ps(u.m));
                _mm256_storeu_ps(out + 16 * h + 8 * g, v);
            }
        }
    }
}

}  // namespace

}  // namespace tmill::cpu
