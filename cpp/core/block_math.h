// The arithmetic of one value or one block of the storage types, written once for the host and the
// GPU kernels (cuda/, hip/): the CPU's reference conversions (quants.cpp) and the device's K/V
// stores and dequantizing kernels call these, so a cache written on either holds the same bits.
#pragma once

#include <math.h>
#include <string.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/hd.h"

namespace tmill {

// The NormalFloat-4 codebook (kNF4 in dtype.h holds the same numbers for the CPU kernels).
#define TM_NF4_CODEBOOK                                                                                       \
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,     \
     -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,      \
     0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,               \
     0.7229568362236023f, 1.0f}

TM_HD inline float nf4_value(int k) {
    constexpr float book[16] = TM_NF4_CODEBOOK;
    return book[k];
}

TM_HD inline float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}
TM_HD inline uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
    return __float_as_uint(f);
#else
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
#endif
}

// exact: the 15 exponent-and-mantissa bits moved into place and rebiased by one multiplication by
// 2^112 (which also normalises subnormals); infinities and NaNs set apart
TM_HD inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, rest = h & 0x7FFF;
    float f = bits_to_float(rest << 13) * 5.192296858534828e33f;   // 2^112
    if (rest >= 0x7C00) f = bits_to_float(0x7F800000 | ((rest & 0x3FF) << 13));
    return bits_to_float(float_to_bits(f) | sign);
}

// round to nearest even
TM_HD inline uint16_t float_to_half(float f) {
    const uint32_t x = float_to_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000, abs = x & 0x7FFFFFFF;
    if (abs >= 0x7F800000) return static_cast<uint16_t>(sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0));
    if (abs >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);   // rounds to inf
    if (abs < 0x38800000) {
        // subnormal or zero in half: scale into the 10-bit mantissa with round-to-nearest-even
        if (abs < 0x33000000) return static_cast<uint16_t>(sign);
        const uint32_t e = abs >> 23, mant = (abs & 0x7FFFFF) | 0x800000;
        const uint32_t shift = 126 - e;   // 113 - e + 13
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) ++half;
        return static_cast<uint16_t>(sign | half);
    }
    const uint32_t rounded = abs + 0xFFF + ((abs >> 13) & 1);   // round to nearest even at bit 13
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000) >> 13));
}

TM_HD inline float bfloat_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// round to nearest even; NaNs stay quiet NaNs
TM_HD inline uint16_t float_to_bfloat(float f) {
    const uint32_t bits = float_to_bits(f);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return static_cast<uint16_t>((bits >> 16) | 0x40);
    return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// --- one block of 32 values: quantizers (round to nearest, as the GGUF reference does)

TM_HD inline void quantize_block(const float* x, BlockQ8_0& b) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
    b.d = float_to_half(d);
    for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(lroundf(x[j] * inv));
}

// the scale from the signed value of largest magnitude, mapped to -8 so the full range is used
TM_HD inline void quantize_block(const float* x, BlockQ4_0& b) {
    float amax = 0.0f, vmax = 0.0f;
    for (int j = 0; j < 32; ++j)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            vmax = x[j];
        }
    const float d = vmax / -8.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
    b.d = float_to_half(d);
    for (int j = 0; j < 16; ++j) {
        const int lo = static_cast<int>(fminf(15.0f, x[j] * inv + 8.5f));
        const int hi = static_cast<int>(fminf(15.0f, x[j + 16] * inv + 8.5f));
        b.qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
}

TM_HD inline void quantize_block(const float* x, BlockQ4_1& b) {
    float lo_v = x[0], hi_v = x[0];
    for (int j = 1; j < 32; ++j) {
        lo_v = fminf(lo_v, x[j]);
        hi_v = fmaxf(hi_v, x[j]);
    }
    const float d = (hi_v - lo_v) / 15.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
    b.d = float_to_half(d);
    b.m = float_to_half(lo_v);
    for (int j = 0; j < 16; ++j) {
        const int lo = static_cast<int>(fminf(15.0f, (x[j] - lo_v) * inv + 0.5f));
        const int hi = static_cast<int>(fminf(15.0f, (x[j + 16] - lo_v) * inv + 0.5f));
        b.qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
}

// scale = absmax (as fp16); each value goes to the nearest codebook entry of x / scale
TM_HD inline int nf4_nearest(float v) {
    int best = 0;
    for (int k = 1; k < 16; ++k)
        if (fabsf(v - nf4_value(k)) < fabsf(v - nf4_value(best))) best = k;
    return best;
}
TM_HD inline void quantize_block(const float* x, BlockNF4& b) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    b.d = float_to_half(amax);
    const float inv = amax != 0.0f ? 1.0f / amax : 0.0f;
    for (int j = 0; j < 16; ++j)
        b.qs[j] = static_cast<uint8_t>(nf4_nearest(x[j] * inv) | (nf4_nearest(x[j + 16] * inv) << 4));
}

// --- value j (0..31) of one block, exactly as dequantize_row gives it

TM_HD inline float block_value(const BlockQ8_0& b, int j) { return half_to_float(b.d) * b.qs[j]; }
TM_HD inline float block_value(const BlockQ4_0& b, int j) {
    const int q = j < 16 ? (b.qs[j] & 0x0F) : (b.qs[j - 16] >> 4);
    return half_to_float(b.d) * (q - 8);
}
TM_HD inline float block_value(const BlockQ4_1& b, int j) {
    const int q = j < 16 ? (b.qs[j] & 0x0F) : (b.qs[j - 16] >> 4);
    return half_to_float(b.d) * q + half_to_float(b.m);
}
TM_HD inline float block_value(const BlockNF4& b, int j) {
    const int q = j < 16 ? (b.qs[j] & 0x0F) : (b.qs[j - 16] >> 4);
    return half_to_float(b.d) * nf4_value(q);
}

}  // namespace tmill
