#include "core/quants.h"

#include <cmath>

#include "core/error.h"
#include "core/kquants.h"

namespace tmill {

float fp16_to_fp32(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (mant << 13);          // inf / nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);   // normal: rebias 15 -> 127
    } else if (mant == 0) {
        bits = sign;                                        // zero
    } else {
        // subnormal: normalise the mantissa
        int e = -1;
        do { mant <<= 1; ++e; } while ((mant & 0x400) == 0);
        bits = sign | ((112 - e) << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t abs = x & 0x7FFFFFFF;
    if (abs >= 0x7F800000) return static_cast<uint16_t>(sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0));
    if (abs >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);  // rounds to inf
    if (abs < 0x38800000) {
        // subnormal or zero in half: scale into the 10-bit mantissa with round-to-nearest-even
        if (abs < 0x33000000) return static_cast<uint16_t>(sign);
        uint32_t e = abs >> 23;
        uint32_t mant = (abs & 0x7FFFFF) | 0x800000;
        uint32_t shift = 126 - e;   // 113 - e + 13
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) ++half;
        return static_cast<uint16_t>(sign | half);
    }
    uint32_t rounded = abs + 0xFFF + ((abs >> 13) & 1);  // round to nearest even at bit 13
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000) >> 13));
}

void dequantize_row(DType t, const void* row, float* out, int64_t n) {
    switch (t) {
        case DType::f32:
            std::memcpy(out, row, static_cast<size_t>(n) * 4);
            return;
        case DType::f16: {
            const uint16_t* h = static_cast<const uint16_t*>(row);
            for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(h[i]);
            return;
        }
        case DType::bf16: {
            const uint16_t* h = static_cast<const uint16_t*>(row);
            for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(h[i]);
            return;
        }
        case DType::q8_0: {
            const BlockQ8_0* b = static_cast<const BlockQ8_0*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < 32; ++j) out[i * 32 + j] = d * b[i].qs[j];
            }
            return;
        }
        case DType::q4_0: {
            const BlockQ4_0* b = static_cast<const BlockQ4_0*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < 16; ++j) {
                    out[i * 32 + j] = d * ((b[i].qs[j] & 0x0F) - 8);
                    out[i * 32 + j + 16] = d * ((b[i].qs[j] >> 4) - 8);
                }
            }
            return;
        }
        case DType::q4_1: {
            const BlockQ4_1* b = static_cast<const BlockQ4_1*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d), m = fp16_to_fp32(b[i].m);
                for (int j = 0; j < 16; ++j) {
                    out[i * 32 + j] = d * (b[i].qs[j] & 0x0F) + m;
                    out[i * 32 + j + 16] = d * (b[i].qs[j] >> 4) + m;
                }
            }
            return;
        }
        case DType::nf4: {
            const BlockNF4* b = static_cast<const BlockNF4*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < 16; ++j) {
                    out[i * 32 + j] = d * kNF4[b[i].qs[j] & 0x0F];
                    out[i * 32 + j + 16] = d * kNF4[b[i].qs[j] >> 4];
                }
            }
            return;
        }
        default:
            if (dequantizes_only(t)) return dequantize_row_extra(t, row, out, n);
            fail(ErrorKind::unsupported, "cannot compute with tensor type " + dtype_name(t));
    }
}

void quantize_row(DType t, const float* x, void* out, int64_t n) {
    switch (t) {
        case DType::f32:
            std::memcpy(out, x, static_cast<size_t>(n) * 4);
            return;
        case DType::f16: {
            uint16_t* h = static_cast<uint16_t*>(out);
            for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i]);
            return;
        }
        case DType::bf16: {
            uint16_t* h = static_cast<uint16_t*>(out);
            for (int64_t i = 0; i < n; ++i) {
                uint32_t bits;
                std::memcpy(&bits, &x[i], 4);
                if ((bits & 0x7FFFFFFF) > 0x7F800000) { h[i] = static_cast<uint16_t>((bits >> 16) | 0x40); continue; }
                h[i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
            }
            return;
        }
        case DType::q8_0: {
            BlockQ8_0* b = static_cast<BlockQ8_0*>(out);
            for (int64_t i = 0; i < n / 32; ++i) {
                const float* xb = x + i * 32;
                float amax = 0.0f;
                for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
                float d = amax / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
                b[i].d = fp32_to_fp16(d);
                for (int j = 0; j < 32; ++j) b[i].qs[j] = static_cast<int8_t>(std::lround(xb[j] * inv));
            }
            return;
        }
        case DType::q4_0: {
            // scale from the signed value of largest magnitude, mapped to -8 so the full range is used
            BlockQ4_0* b = static_cast<BlockQ4_0*>(out);
            for (int64_t i = 0; i < n / 32; ++i) {
                const float* xb = x + i * 32;
                float amax = 0.0f, vmax = 0.0f;
                for (int j = 0; j < 32; ++j)
                    if (std::fabs(xb[j]) > amax) { amax = std::fabs(xb[j]); vmax = xb[j]; }
                float d = vmax / -8.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
                b[i].d = fp32_to_fp16(d);
                for (int j = 0; j < 16; ++j) {
                    int lo = static_cast<int>(std::fmin(15.0f, xb[j] * inv + 8.5f));
                    int hi = static_cast<int>(std::fmin(15.0f, xb[j + 16] * inv + 8.5f));
                    b[i].qs[j] = static_cast<uint8_t>(lo | (hi << 4));
                }
            }
            return;
        }
        case DType::q4_1: {
            BlockQ4_1* b = static_cast<BlockQ4_1*>(out);
            for (int64_t i = 0; i < n / 32; ++i) {
                const float* xb = x + i * 32;
                float lo_v = xb[0], hi_v = xb[0];
                for (int j = 1; j < 32; ++j) { lo_v = std::fmin(lo_v, xb[j]); hi_v = std::fmax(hi_v, xb[j]); }
                float d = (hi_v - lo_v) / 15.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
                b[i].d = fp32_to_fp16(d);
                b[i].m = fp32_to_fp16(lo_v);
                for (int j = 0; j < 16; ++j) {
                    int lo = static_cast<int>(std::fmin(15.0f, (xb[j] - lo_v) * inv + 0.5f));
                    int hi = static_cast<int>(std::fmin(15.0f, (xb[j + 16] - lo_v) * inv + 0.5f));
                    b[i].qs[j] = static_cast<uint8_t>(lo | (hi << 4));
                }
            }
            return;
        }
        case DType::nf4: {
            // scale = absmax (as fp16); each value goes to the nearest codebook entry of x / scale
            BlockNF4* b = static_cast<BlockNF4*>(out);
            for (int64_t i = 0; i < n / 32; ++i) {
                const float* xb = x + i * 32;
                float amax = 0.0f;
                for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
                b[i].d = fp32_to_fp16(amax);
                float inv = amax != 0.0f ? 1.0f / amax : 0.0f;
                auto nearest = [&](float v) {
                    int best = 0;
                    for (int k = 1; k < 16; ++k)
                        if (std::fabs(v - kNF4[k]) < std::fabs(v - kNF4[best])) best = k;
                    return best;
                };
                for (int j = 0; j < 16; ++j)
                    b[i].qs[j] = static_cast<uint8_t>(nearest(xb[j] * inv) | (nearest(xb[j + 16] * inv) << 4));
            }
            return;
        }
        default:
            fail(ErrorKind::unsupported, "cannot quantize to tensor type " + dtype_name(t));
    }
}

}  // namespace tmill
