// What the AVX-512 kernel files share (kernels_avx512.cpp: the table and the float kernels;
// kernels_avx512_int.cpp: the integer paths of exact decode and the eight-row groups;
// kernels_avx512_int8.cpp: int8 prefill and int8 decode's Q8_0 rows; kernels_q8_0_strips.cpp and
// kernels_packed16.cpp: decode in sixteen-row lanes). Only files compiled with the AVX-512 level's
// flags include it.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "backend/cpu/kernels.h"
#include "core/dtype.h"

namespace tmill::cpu::avx512 {

inline float half(uint16_t h) { return _cvtsh_ss(h); }

// The four bytes at p in every 32-bit lane: x's bytes against four quants of each lane's row
// (VPDPBUSD in the sixteen-row layouts)
inline __m512i broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

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

// Fill the AVX-512 table's entries of kernels_avx512_int.cpp and kernels_avx512_int8.cpp
void add_integer_kernels(Kernels& k);
void add_int8_kernels(Kernels& k);

}  // namespace tmill::cpu::avx512
