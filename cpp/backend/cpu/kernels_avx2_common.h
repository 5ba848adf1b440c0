// What the AVX2 kernel files share (kernels_avx2.cpp: the table and the float kernels;
// kernels_avx2_int.cpp: the integer paths, the eight-row groups and int8 prefill). Only files
// compiled with the AVX2 level's flags include it.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "backend/cpu/kernels.h"

namespace tmill::cpu::avx2 {

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

// Fill the AVX2 table's entries of kernels_avx2_int.cpp
void add_integer_kernels(Kernels& k);

}  // namespace tmill::cpu::avx2
