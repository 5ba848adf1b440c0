// The 5-bit legacy types and the K-quants: dequantization per the GGUF block layouts (float products
// in the order of the reference dequantizers, so values are bit for bit theirs) and quantization as
// llama.cpp's reference quantizers do it (the same float operations in the same order, so blocks are
// byte for byte theirs; the core is built for baseline x86-64, where nothing fuses a * b + c).
#include "core/kquants.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/quants.h"

namespace tmill {

// llama.cpp's iq4_nl codebook (a format fact: the values the files were made for)
const int8_t kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

namespace {

float half(const uint8_t* p) { return fp16_to_fp32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }
void put_half(uint8_t* p, float f) {
    const uint16_t h = fp32_to_fp16(f);
    p[0] = static_cast<uint8_t>(h & 0xFF);
    p[1] = static_cast<uint8_t>(h >> 8);
}
uint32_t le32(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24); }

// ---- dequantization

// q5_0: x_i = d * (q_i - 16); q5_1: x_i = d * q_i + m (layout in kquants.h)
void q5(const uint8_t* b, bool with_min, float* out) {
    const float d = half(b), m = with_min ? half(b + 2) : 0.0f;
    const uint32_t qh = le32(b + kQ5QhOffset(with_min));
    const uint8_t* qs = b + kQ5QhOffset(with_min) + 4;
    for (int i = 0; i < 32; ++i) {
        const int q = ((i < 16 ? qs[i] : qs[i - 16] >> 4) & 0x0F) | (((qh >> i) & 1) << 4);
        out[i] = with_min ? d * static_cast<float>(q) + m : d * static_cast<float>(q - 16);
    }
}

// iq4_nl: x_i = d * kIQ4NL[q_i]
void iq4nl(const uint8_t* b, float* out) {
    const float d = half(b);
    for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(kIQ4NL[(i < 16 ? b[2 + i] : b[2 + i - 16] >> 4) & 0x0F]);
}

// q2_k: element e is (qs[32 h + l] >> 2 s) & 3 (e = 128 h + 32 s + l) in sub-block e / 16, whose scale
// byte holds d's multiplier (low nibble) and dmin's (high) (layout in kquants.h)
void q2k(const uint8_t* b, float* out) {
    const uint8_t *scales = b, *qs = b + kK2Qs;
    const float d = half(b + kK2D), dmin = half(b + kK2D + 2);
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, s = (e % 128) / 32, l = e % 32, sub = e / 16;
        const float dl = d * static_cast<float>(scales[sub] & 0x0F), ml = dmin * static_cast<float>(scales[sub] >> 4);
        out[e] = dl * static_cast<float>((qs[32 * h + l] >> (2 * s)) & 3) - ml;
    }
}

// q3_k: q = ((qs >> 2 s) & 3) - (hmask bit clear ? 4 : 0), x = d * scale * q (layout in kquants.h)
void q3k(const uint8_t* b, float* out) {
    const uint8_t *hmask = b, *qs = b + kK3Qs, *sc = b + kK3Scales;
    const float d = half(b + kK3D);
    float dl[16];
    for (int k = 0; k < 16; ++k) {
        const int low = (k < 8 ? sc[k] : sc[k - 8] >> 4) & 0x0F, high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
        dl[k] = d * static_cast<float>(static_cast<int8_t>((low | (high << 4))) - 32);
    }
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, s = (e % 128) / 32, l = e % 32;
        const int low = (qs[32 * h + l] >> (2 * s)) & 3, bit = (hmask[e % 32] >> (e / 32)) & 1;
        out[e] = dl[e / 16] * static_cast<float>(low - (bit ? 0 : 4));
    }
}

// q4_k and q5_k: x = d * sc_b * q - dmin * m_b per sub-block b of 32
void q45k(const uint8_t* b, bool five, float* out) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t* qs = b + (five ? kK5Qs : kK4Qs);
    for (int sub = 0; sub < 8; ++sub) {
        int sc = 0, mn = 0;
        k4_scale_min(b + kK4Scales, sub, sc, mn);
        const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
        const int c = sub / 2, shift = 4 * (sub % 2);
        for (int l = 0; l < 32; ++l) {
            int q = (qs[32 * c + l] >> shift) & 0x0F;
            if (five) q |= ((b[kK5Qh + l] >> sub) & 1) << 4;
            out[32 * sub + l] = dl * static_cast<float>(q) - ml;
        }
    }
}

// q6_k: x = d * scale[e / 16] * (q - 32)
void q6k(const uint8_t* b, float* out) {
    const uint8_t *ql = b, *qh = b + kK6Qh;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + kK6Scales);
    const float d = half(b + kK6D);
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, r = e % 128;
        const int low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F, high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
        out[e] = d * static_cast<float>(scales[e / 16]) * static_cast<float>((low | (high << 4)) - 32);
    }
}

// ---- quantization (llama.cpp's reference algorithms, see the file comment)

// round to nearest, ties to even, for |f| <= 2^22: adding 1.5 * 2^23 leaves the integer in the low
// mantissa bits
int nearest_int(float f) {
    const float v = f + 12582912.0f;
    int32_t i;
    std::memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}
int clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

// q5_0: the scale from the signed value of largest magnitude, mapped to -16
void quantize_q5(const float* x, bool with_min, uint8_t* b) {
    float d, lo = 0.0f;
    if (with_min) {
        float hi = x[0];
        lo = x[0];
        for (int j = 1; j < 32; ++j) {
            if (x[j] < lo) lo = x[j];
            if (x[j] > hi) hi = x[j];
        }
        d = (hi - lo) / 31.0f;
    } else {
        float amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < 32; ++j)
            if (amax < std::fabs(x[j])) {
                amax = std::fabs(x[j]);
                vmax = x[j];
            }
        d = vmax / -16.0f;
    }
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;
    put_half(b, d);
    if (with_min) put_half(b + 2, lo);
    uint32_t qh = 0;
    uint8_t* qs = b + kQ5QhOffset(with_min) + 4;
    for (int j = 0; j < 16; ++j) {
        int q[2];
        for (int h = 0; h < 2; ++h) {
            const float v = x[j + 16 * h];
            q[h] = with_min ? std::min(31, static_cast<int>(static_cast<uint8_t>((v - lo) * inv + 0.5f)))
                            : std::min(31, static_cast<int>(static_cast<int8_t>(v * inv + 16.5f)));
            qh |= static_cast<uint32_t>((q[h] >> 4) & 1) << (j + 16 * h);
        }
        qs[j] = static_cast<uint8_t>((q[0] & 0x0F) | ((q[1] & 0x0F) << 4));
    }
    for (int k = 0; k < 4; ++k) b[kQ5QhOffset(with_min) + k] = static_cast<uint8_t>(qh >> (8 * k));
}

// An asymmetric scale and min for n values in 0..nmax by weighted least squares over nstep + 1
// candidate scales (llama.cpp's make_qkx2_quants without the absolute-error option): L the levels,
// returns the scale, *neg_min = -min >= 0.
float scale_min_search(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min, float rmin,
                       float rdelta, int nstep) {
    float mn = x[0], mx = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (mn > 0) mn = 0;
    if (mx == mn) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *neg_min = -mn;
        return 0.0f;
    }
    float iscale = static_cast<float>(nmax) / (mx - mn), scale = 1 / iscale, best_error = 0;
    for (int i = 0; i < n; ++i) {
        L[i] = static_cast<uint8_t>(clamp(nearest_int(iscale * (x[i] - mn)), 0, nmax));
        const float diff = scale * static_cast<float>(L[i]) + mn - x[i];
        best_error += w[i] * (diff * diff);
    }
    uint8_t aux[32];
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (mx - mn);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = clamp(nearest_int(iscale * (x[i] - mn)), 0, nmax);
            aux[i] = static_cast<uint8_t>(l);
            const float fl = static_cast<float>(l);
            sum_l += w[i] * fl;
            sum_l2 += w[i] * fl * fl;
            sum_xl += w[i] * fl * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D, this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float error = 0;
        for (int i = 0; i < n; ++i) {
            const float diff = this_scale * static_cast<float>(aux[i]) + this_min - x[i];
            error += w[i] * (diff * diff);
        }
        if (error < best_error) {
            std::memcpy(L, aux, static_cast<size_t>(n));
            best_error = error;
            scale = this_scale;
            mn = this_min;
        }
    }
    *neg_min = -mn;
    return scale;
}

// q4_k (nmax 15) and q5_k (31): per sub-block of 32 a scale and min searched with weights
// sqrt(mean x^2) + |x_i|, then both quantized to 6 bits against the largest of each, and the
// levels recomputed against the stored scales.
void quantize_k45(const float* x, bool five, uint8_t* b) {
    const int nmax = five ? 31 : 15;
    uint8_t L[256];
    float scales[8], mins[8], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        const float* xj = x + 32 * j;
        float sum_x2 = 0, w[32];
        for (int l = 0; l < 32; ++l) sum_x2 += xj[l] * xj[l];
        const float av_x = std::sqrt(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xj[l]);
        scales[j] = five ? scale_min_search(32, nmax, xj, w, L + 32 * j, &mins[j], -0.5f, 0.1f, 15)
                         : scale_min_search(32, nmax, xj, w, L + 32 * j, &mins[j], -1.0f, 0.1f, 20);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f, inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t* s = b + kK4Scales;
    std::memset(s, 0, 12);
    for (int j = 0; j < 8; ++j) {
        // the reference stores nearest_int's result in a byte before the cap
        const int ls = std::min<int>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
        const int lm = std::min<int>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
        if (j < 4) {
            s[j] = static_cast<uint8_t>(ls);
            s[j + 4] = static_cast<uint8_t>(lm);
        } else {
            s[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
            s[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
            s[j] |= static_cast<uint8_t>((lm >> 4) << 6);
        }
    }
    put_half(b, max_scale / 63.0f);
    put_half(b + 2, max_min / 63.0f);
    for (int j = 0; j < 8; ++j) {
        int sc = 0, mn = 0;
        k4_scale_min(s, j, sc, mn);
        const float d = half(b) * static_cast<float>(sc);
        if (!(d != 0.0f)) continue;
        const float dm = half(b + 2) * static_cast<float>(mn);
        for (int i = 0; i < 32; ++i) L[32 * j + i] = static_cast<uint8_t>(clamp(nearest_int((x[32 * j + i] + dm) / d), 0, nmax));
    }
    uint8_t* qs = b + (five ? kK5Qs : kK4Qs);
    if (five) std::memset(b + kK5Qh, 0, 32);
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
            int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
            if (five) {
                b[kK5Qh + l] |= static_cast<uint8_t>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
                lo &= 0x0F;
                hi &= 0x0F;
            }
            qs[32 * c + l] = static_cast<uint8_t>(lo | (hi << 4));
        }
}

// A symmetric scale for n values in -nmax..nmax-1, weighted by x^2, the best of 19 candidates
// (llama.cpp's make_qx_quants with rmse_type 1): L = level + nmax, returns the scale.
float symmetric_scale_search(int n, int nmax, const float* x, int8_t* L) {
    float amax = 0, vmax = 0;
    for (int i = 0; i < n; ++i)
        if (std::fabs(x[i]) > amax) {
            amax = std::fabs(x[i]);
            vmax = x[i];
        }
    if (amax < 1e-15f) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    auto levels = [&](float iscale, float& sumlx, float& suml2, bool store) {
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            const int l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
            if (store) L[i] = static_cast<int8_t>(l + nmax);
            const float w = x[i] * x[i], fl = static_cast<float>(l);
            sumlx += w * x[i] * fl;
            suml2 += w * fl * fl;
        }
    };
    float sumlx, suml2;
    levels(static_cast<float>(-nmax) / vmax, sumlx, suml2, true);
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        const float iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / vmax;
        levels(iscale, sumlx, suml2, false);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            levels(iscale, sumlx, suml2, true);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// q6_k: a symmetric scale per sub-block of 16, the scales quantized to int8 against the one of
// largest magnitude (mapped to -128), levels recomputed against the stored scales.
void quantize_k6(const float* x, uint8_t* b) {
    int8_t L[256];
    float scales[16], max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        scales[ib] = symmetric_scale_search(16, 32, x + 16 * ib, L + 16 * ib);
        if (std::fabs(scales[ib]) > max_abs_scale) {
            max_abs_scale = std::fabs(scales[ib]);
            max_scale = scales[ib];
        }
    }
    std::memset(b, 0, 210);
    if (max_abs_scale < 1e-15f) return;   // all zero: d = 0 (fp16 zero is all-zero bytes)
    const float iscale = -128.0f / max_scale;
    put_half(b + kK6D, 1 / iscale);
    int8_t* sc = reinterpret_cast<int8_t*>(b + kK6Scales);
    for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
    for (int j = 0; j < 16; ++j) {
        const float d = half(b + kK6D) * static_cast<float>(sc[j]);
        if (!(d != 0.0f)) continue;
        for (int i = 0; i < 16; ++i) L[16 * j + i] = static_cast<int8_t>(clamp(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
    }
    uint8_t *ql = b, *qh = b + kK6Qh;
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t q[4] = {static_cast<uint8_t>(L[128 * h + l]), static_cast<uint8_t>(L[128 * h + l + 32]),
                                  static_cast<uint8_t>(L[128 * h + l + 64]), static_cast<uint8_t>(L[128 * h + l + 96])};
            ql[64 * h + l] = static_cast<uint8_t>((q[0] & 0xF) | ((q[2] & 0xF) << 4));
            ql[64 * h + l + 32] = static_cast<uint8_t>((q[1] & 0xF) | ((q[3] & 0xF) << 4));
            qh[32 * h + l] = static_cast<uint8_t>((q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6));
        }
}

}  // namespace

bool extra_type(DType t) {
    switch (t) {
        case DType::q5_0: case DType::q5_1: case DType::iq4_nl: case DType::q2_k: case DType::q3_k: case DType::q4_k:
        case DType::q5_k: case DType::q6_k:
            return true;
        default:
            return false;
    }
}

bool quantizes_extra(DType t) { return extra_type(t) && t != DType::q2_k && t != DType::q3_k && t != DType::iq4_nl; }

void dequantize_row_extra(DType t, const void* row, float* out, int64_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(row);
    const DTypeInfo info = dtype_info(t);
    for (int64_t i = 0; i < n / info.block_size; ++i, p += info.block_bytes, out += info.block_size) {
        switch (t) {
            case DType::q5_0: q5(p, false, out); break;
            case DType::q5_1: q5(p, true, out); break;
            case DType::iq4_nl: iq4nl(p, out); break;
            case DType::q2_k: q2k(p, out); break;
            case DType::q3_k: q3k(p, out); break;
            case DType::q4_k: q45k(p, false, out); break;
            case DType::q5_k: q45k(p, true, out); break;
            case DType::q6_k: q6k(p, out); break;
            default: return;
        }
    }
}

void quantize_row_extra(DType t, const float* x, void* out, int64_t n) {
    uint8_t* p = static_cast<uint8_t*>(out);
    const DTypeInfo info = dtype_info(t);
    for (int64_t i = 0; i < n / info.block_size; ++i, p += info.block_bytes, x += info.block_size) {
        switch (t) {
            case DType::q5_0: quantize_q5(x, false, p); break;
            case DType::q5_1: quantize_q5(x, true, p); break;
            case DType::q4_k: quantize_k45(x, false, p); break;
            case DType::q5_k: quantize_k45(x, true, p); break;
            case DType::q6_k: quantize_k6(x, p); break;
            default: return;
        }
    }
}

}  // namespace tmill
